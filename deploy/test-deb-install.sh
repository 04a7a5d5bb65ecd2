#!/usr/bin/env bash
# Installs the Debian package with dpkg -i into a minimal Debian chroot (debootstrap, minbase)
# and checks what an operator gets: the binary, the unit enabled and not started, the example
# config as a conffile and no gateway.toml, `edge-gateway check` on the example, a reinstall
# over an operator's config, a remove that keeps the config and a purge that takes the config
# and the state away.
# Usage: deploy/test-deb-install.sh PACKAGE.deb [--root DIR]
#   --root DIR: a debootstrapped tree to copy instead of making one (it is not changed).
# Needs root (chroot), debootstrap and Debian's mirror (DEBIAN_MIRROR, default
# http://deb.debian.org/debian); fails, never skips, without them.
set -euo pipefail

fail() { echo "test-deb-install: FAIL: $*" >&2; exit 1; }

deb=${1:?usage: deploy/test-deb-install.sh PACKAGE.deb [--root DIR]}
[ -f "$deb" ] || fail "no package at $deb"
deb=$(realpath "$deb")
base=""
if [ "${2:-}" = "--root" ]; then
  base=$(realpath "${3:?--root needs a directory}")
fi
cd "$(dirname "$0")/."
[ "$(id -u)" -eq 0 ] || fail "needs root (chroot and dpkg -i)"

work=$(mktemp -d)
trap 'rm -rf --one-file-system "$work"' EXIT
root="$work/root"
if [ -n "$base" ]; then
  cp -a "$base" "$root"
else
  command -v debootstrap >/dev/null 2>&1 || fail "debootstrap is missing (apt-get install debootstrap)"
  # The host's own Debian release, from Debian's mirror (another distribution's codename is
  # not on it: say which suite to use with DEBIAN_SUITE).
  suite=${DEBIAN_SUITE:-}
  if [ -z "$suite" ]; then
    grep -q '^ID=debian$' /etc/os-release ||
      fail "not a Debian host: set DEBIAN_SUITE (e.g. bookworm) for the chroot"
    suite=$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release)
  fi
  mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
  echo "test-deb-install: debootstrap --variant=minbase $suite from $mirror"
  debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log" >&2; fail "debootstrap failed"; }
fi
in_root() { chroot "$root" "$@"; }
cp "$deb" "$root/tmp/edge-gateway.deb"

# A fresh install: enabled, not started (no config), nothing the operator must remove.
in_root dpkg -i /tmp/edge-gateway.deb || fail "dpkg -i failed"
in_root test -x /usr/bin/edge-gateway || fail "/usr/bin/edge-gateway missing after dpkg -i"
unit=""
for dir in /lib/systemd/system /usr/lib/systemd/system; do
  if in_root test -f "$dir/edge-gateway.service"; then unit="$dir/edge-gateway.service"; fi
done
[ -n "$unit" ] || fail "edge-gateway.service is not installed"
wants=/etc/systemd/system/multi-user.target.wants/edge-gateway.service
[ "$(in_root readlink -f "$wants")" = "$(in_root readlink -f "$unit")" ] ||
  fail "the unit is not enabled ($wants)"
in_root test -f /etc/edge-gateway/gateway.example.toml || fail "no example config"
! in_root test -e /etc/edge-gateway/gateway.toml || fail "a gateway.toml was installed"
# shellcheck disable=SC2016 # dpkg-query's format, not the shell's
in_root dpkg-query -W -f='${Conffiles}\n' edge-gateway | grep '/etc/edge-gateway/gateway.example.toml' >/dev/null ||
  fail "the example config is not a conffile"
in_root /usr/bin/edge-gateway check --config /etc/edge-gateway/gateway.example.toml >"$work/check.log" 2>&1 ||
  { cat "$work/check.log" >&2; fail "edge-gateway check fails on the installed example"; }

# The operator configures it; a reinstall (an upgrade) keeps the config.
in_root cp /etc/edge-gateway/gateway.example.toml /etc/edge-gateway/gateway.toml
in_root dpkg -i /tmp/edge-gateway.deb || fail "dpkg -i over a configured install failed"
in_root test -f /etc/edge-gateway/gateway.toml || fail "the reinstall lost gateway.toml"

# Remove: the program goes, the configuration stays.
in_root mkdir -p /var/lib/edge-gateway/buffer
in_root dpkg -r edge-gateway || fail "dpkg -r failed"
! in_root test -e /usr/bin/edge-gateway || fail "dpkg -r left /usr/bin/edge-gateway"
in_root test -f /etc/edge-gateway/gateway.toml || fail "dpkg -r removed the operator's config"
in_root test -d /var/lib/edge-gateway || fail "dpkg -r removed the state"

# Purge: the conffile, the enablement and the state go.
in_root dpkg -P edge-gateway || fail "dpkg -P failed"
! in_root test -e /etc/edge-gateway/gateway.example.toml || fail "dpkg -P left the example config"
! in_root test -e /var/lib/edge-gateway || fail "dpkg -P left /var/lib/edge-gateway"
! in_root test -L "$wants" || fail "dpkg -P left the unit enabled"
echo "test-deb-install: OK (dpkg -i, reinstall, -r and -P in a minbase chroot)"
