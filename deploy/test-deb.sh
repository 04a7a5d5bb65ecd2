#!/usr/bin/env bash
# Builds the Debian package (cargo deb: the production build, without the demo feature),
# unpacks it into a temporary tree with dpkg -x, checks its control data, maintainer scripts
# and unit, and runs the packaged `edge-gateway check` on the packaged example config.
# Usage: deploy/test-deb.sh [--no-build | --profile dev]   (--no-build: package
# target/release/edge-gateway as it is; --profile dev: package an unoptimized build, which is
# what CI does to keep within its time: the packaging is the same, only the binary is slower).
# Needs cargo-deb (cargo install cargo-deb), dpkg-deb, systemd-analyze and shellcheck.
set -euo pipefail
cd "$(dirname "$0")/.."
build=(--no-default-features --strip)
case "${1:-}" in
  --no-build) build+=(--no-build) ;;
  --profile) build+=(--profile "${2:?--profile needs a name}") ;;
  "") ;;
  *) echo "usage: deploy/test-deb.sh [--no-build | --profile NAME]" >&2; exit 2 ;;
esac

fail() { echo "test-deb: FAIL: $*" >&2; exit 1; }

deb=$(cargo deb -p edge-gateway "${build[@]}" 2>&1 | tail -1)
[ -f "$deb" ] || fail "cargo deb made no package: $deb"
echo "test-deb: $deb ($(du -k "$deb" | cut -f1) KiB)"

tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
dpkg-deb -x "$deb" "$tree/root"
dpkg-deb -e "$deb" "$tree/DEBIAN"

# Control data: the fields dpkg needs, the conffile, and no dependency beyond libc.
control="$tree/DEBIAN/control"
for field in Package Version Architecture Maintainer Description Depends Section Priority; do
  grep -q "^$field: ." "$control" || fail "control has no $field"
done
grep -q '^Package: edge-gateway$' "$control" || fail "control names another package"
synopsis=$(sed -n 's/^Description: //p' "$control")
[ "${#synopsis}" -le 80 ] || fail "the synopsis is longer than 80 characters: $synopsis"
grep -q '^ [^ ]' "$control" || fail "no extended description"
depends=$(sed -n 's/^Depends: //p' "$control")
if grep -vqE '^libc6( \(>= [0-9.]+\))?$' <<<"$(tr ',' '\n' <<<"$depends" | sed 's/^ *//')"; then
  fail "depends on more than libc: $depends"
fi
[ "$(cat "$tree/DEBIAN/conffiles")" = /etc/edge-gateway/gateway.example.toml ] ||
  fail "conffiles: $(cat "$tree/DEBIAN/conffiles")"

# What it installs.
for f in usr/bin/edge-gateway etc/edge-gateway/gateway.example.toml usr/share/doc/edge-gateway/README.md; do
  [ -f "$tree/root/$f" ] || fail "/$f is not in the package"
done
[ -x "$tree/root/usr/bin/edge-gateway" ] || fail "/usr/bin/edge-gateway is not executable"
if readelf -W -S "$tree/root/usr/bin/edge-gateway" | grep -qE '\.debug_(info|line) '; then
  fail "/usr/bin/edge-gateway is not stripped"
fi
[ ! -e "$tree/root/etc/edge-gateway/gateway.toml" ] ||
  fail "the package ships gateway.toml: the service would start on the example"
unit=$(find "$tree/root" -name edge-gateway.service -path '*/systemd/system/*')
[ -n "$unit" ] || fail "no edge-gateway.service in the package"
cmp -s "$unit" systemd/edge-gateway.service || fail "the packaged unit differs from systemd/edge-gateway.service"
while read -r exe; do
  [ -x "$tree/root$exe" ] || [ -x "$exe" ] || fail "the unit runs $exe, which neither the package nor the system has"
done < <(sed -n 's/^Exec[A-Za-z]*=[-@!+]*\(\/[^ ]*\).*/\1/p' "$unit" | sort -u)
deploy/check-unit.sh "$unit"

# Maintainer scripts: valid shell, shellcheck-clean, enable without starting, start only
# with a config.
for script in postinst postrm prerm; do
  [ -f "$tree/DEBIAN/$script" ] || continue
  sh -n "$tree/DEBIAN/$script" || fail "$script is not valid sh"
  shellcheck -s sh -e SC2317 "$tree/DEBIAN/$script" || fail "shellcheck: $script"
done
grep -q 'deb-systemd-helper enable' "$tree/DEBIAN/postinst" || fail "postinst does not enable the unit"
starts=$(grep -nE 'deb-systemd-invoke (start|restart)|systemctl (start|restart)' "$tree/DEBIAN/postinst" || true)
[ "$(wc -l <<<"$starts")" -eq 1 ] || fail "postinst starts the service elsewhere than once a config exists: $starts"
grep -q 'if .*-e /etc/edge-gateway/gateway.toml' "$tree/DEBIAN/postinst" || fail "postinst starts without a config"

# The production build: no demo.
if "$tree/root/usr/bin/edge-gateway" demo --help >/dev/null 2>&1; then
  fail "the packaged binary has the demo"
fi

# The packaged check on the packaged example: its data_dir is the service's state directory,
# /var/lib/edge-gateway, which check creates and removes again. Where a mount namespace can be
# had, /var/lib is a scratch tmpfs for it, so nothing on this machine is touched.
example="$tree/root/etc/edge-gateway/gateway.example.toml"
grep -q '^data_dir = "/var/lib/edge-gateway"$' "$example" || fail "the example's data_dir is not the state directory"
check=("$tree/root/usr/bin/edge-gateway" check --config "$example")
if unshare --mount true 2>/dev/null; then
  out=$(unshare --mount sh -c 'mount -t tmpfs tmpfs /var/lib && exec "$@"' sh "${check[@]}") ||
    fail "check on the packaged example: $out"
else
  echo "test-deb: no mount namespace here; check creates and removes /var/lib/edge-gateway itself" >&2
  out=$("${check[@]}") || fail "check on the packaged example: $out"
fi
echo "test-deb: $out"
echo "test-deb: OK"
