#!/usr/bin/env bash
# Tests deploy/install.sh into a temporary root: what it installs (and nothing more), that a
# second run changes nothing, that the installed unit points at the installed binary and still
# scores 1.5, and that --uninstall removes what it installed and keeps the operator's config.
# Usage: deploy/test-install.sh [BINARY]   (default target/debug/edge-gateway)
set -euo pipefail
cd "$(dirname "$0")/.."
binary=${1:-target/debug/edge-gateway}
fail() { echo "test-install: FAIL: $*" >&2; exit 1; }
[ -x "$binary" ] || fail "no binary at $binary (cargo build first)"

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
listing() { (cd "$root" && find . -mindepth 1 -printf '%M %p\n' | sort && find . -type f -exec sha256sum {} + | sort); }

deploy/install.sh --root "$root" --binary "$binary" >/dev/null
expected=$(printf '%s\n' ./etc ./etc/edge-gateway ./etc/edge-gateway/gateway.example.toml \
  ./etc/systemd ./etc/systemd/system ./etc/systemd/system/edge-gateway.service \
  ./usr ./usr/local ./usr/local/bin ./usr/local/bin/edge-gateway)
got=$(cd "$root" && find . -mindepth 1 | sort)
[ "$got" = "$expected" ] || fail "installed other than expected:"$'\n'"$(diff <(echo "$expected") <(echo "$got"))"
[ "$(stat -c %a "$root/usr/local/bin/edge-gateway")" = 755 ] || fail "the binary is not 0755"
[ "$(stat -c %a "$root/etc/systemd/system/edge-gateway.service")" = 644 ] || fail "the unit is not 0644"
cmp -s "$binary" "$root/usr/local/bin/edge-gateway" || fail "the installed binary differs"
cmp -s deploy/gateway.example.toml "$root/etc/edge-gateway/gateway.example.toml" || fail "the example differs"

unit="$root/etc/systemd/system/edge-gateway.service"
grep -q '^ExecStart=/usr/local/bin/edge-gateway run --config /etc/edge-gateway/gateway.toml$' "$unit" ||
  fail "the unit does not run the installed binary"
! grep -q '/usr/bin/edge-gateway' "$unit" || fail "the unit still names /usr/bin/edge-gateway"
deploy/check-unit.sh "$unit" >/dev/null
"$root/usr/local/bin/edge-gateway" --version >/dev/null || fail "the installed binary does not run"

# Idempotent: a second run installs nothing and leaves the tree as it was.
before=$(listing)
out=$(deploy/install.sh --root "$root" --binary "$binary")
grep -q '^installed ' <<<"$out" && fail "a second run installed again: $out"
[ "$(listing)" = "$before" ] || fail "a second run changed the tree"

# --prefix moves the binary and the unit follows.
deploy/install.sh --root "$root" --prefix /opt/edge --binary "$binary" >/dev/null
grep -q '^ExecStart=/opt/edge/bin/edge-gateway run ' "$unit" || fail "--prefix: the unit does not follow"
deploy/install.sh --root "$root" --prefix /opt/edge --uninstall >/dev/null
rm -rf "${root:?}/opt"
deploy/install.sh --root "$root" --binary "$binary" >/dev/null

# --uninstall keeps the operator's config (and so its directory), removes the rest; twice is
# fine too.
echo '# the operator' >"$root/etc/edge-gateway/gateway.toml"
deploy/install.sh --root "$root" --uninstall >/dev/null
deploy/install.sh --root "$root" --uninstall >/dev/null
got=$(cd "$root" && find . -type f | sort)
[ "$got" = "./etc/edge-gateway/gateway.toml" ] || fail "--uninstall left: $got"
rm "$root/etc/edge-gateway/gateway.toml"
deploy/install.sh --root "$root" --uninstall >/dev/null
[ ! -e "$root/etc/edge-gateway" ] || fail "--uninstall left an empty /etc/edge-gateway"

# A missing binary is refused without installing anything.
empty=$(mktemp -d)
if deploy/install.sh --root "$empty" --binary /nonexistent >/dev/null 2>&1; then
  rm -rf "$empty"; fail "installed without a binary"
fi
[ -z "$(ls -A "$empty")" ] || { rm -rf "$empty"; fail "a refused install left files"; }
rm -rf "$empty"
echo "test-install: OK"
