#!/bin/sh
# Installs the edge gateway on a box without a package manager (or without Debian's): the
# binary, the hardened systemd unit and the example config; nothing else. No user is created
# (the unit's DynamicUser= allocates one), no data directory (StateDirectory= makes
# /var/lib/edge-gateway), no config (write /etc/edge-gateway/gateway.toml from the example;
# until then the enabled service does not start). Running it again changes nothing;
# --uninstall removes what it installed and leaves the config and the data.
#
#   deploy/install.sh [--root DIR] [--prefix /usr/local] [--binary PATH]
#   deploy/install.sh [--root DIR] [--prefix /usr/local] --uninstall
#
#   --root DIR     install into DIR as if it were / (a staging tree, an image); no systemctl
#   --prefix P     the binary goes to P/bin (default /usr/local; the unit is rewritten to match)
#   --binary PATH  the binary to install (default: target/release/edge-gateway of this checkout,
#                  built with `cargo build --release --no-default-features`)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=""
prefix=/usr/local
binary="$here/../target/release/edge-gateway"
uninstall=no

usage() {
    sed -n '2,17s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || usage; root=${2%/}; shift 2 ;;
        --prefix) [ $# -ge 2 ] || usage; prefix=${2%/}; shift 2 ;;
        --binary) [ $# -ge 2 ] || usage; binary=$2; shift 2 ;;
        --uninstall) uninstall=yes; shift ;;
        -h|--help) usage ;;
        *) echo "install.sh: unknown argument: $1" >&2; usage ;;
    esac
done
case "$prefix" in
    /*) ;;
    *) echo "install.sh: --prefix must be absolute: $prefix" >&2; exit 2 ;;
esac

bin="$root$prefix/bin/edge-gateway"
unit="$root/etc/systemd/system/edge-gateway.service"
confdir="$root/etc/edge-gateway"
example="$confdir/gateway.example.toml"
# systemctl only for the running system, never for a staging tree.
live=no
if [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    live=yes
fi

if [ "$uninstall" = yes ]; then
    if [ "$live" = yes ]; then
        systemctl disable --now edge-gateway.service >/dev/null 2>&1 || true
    fi
    rm -f "$bin" "$unit" "$example"
    if [ "$live" = yes ]; then systemctl daemon-reload; fi
    # The config directory goes only when nothing of the operator's is left in it.
    rmdir "$confdir" 2>/dev/null || true
    echo "edge-gateway removed; kept: $confdir/gateway.toml (if any) and /var/lib/edge-gateway (the buffer)"
    exit 0
fi

[ -x "$binary" ] || {
    echo "install.sh: no binary at $binary (cargo build --release --no-default-features, or --binary PATH)" >&2
    exit 1
}

# install(1) replaces each file whole, so a second run leaves the same tree. A file is
# rewritten only when its content differs.
put() { # mode source destination
    if ! cmp -s "$2" "$3" 2>/dev/null; then
        install -D -m "$1" "$2" "$3"
        echo "installed $3"
    fi
}
put 0755 "$binary" "$bin"
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
sed "s|/usr/bin/edge-gateway|$prefix/bin/edge-gateway|g" "$here/../systemd/edge-gateway.service" >"$tmp"
put 0644 "$tmp" "$unit"
put 0644 "$here/gateway.example.toml" "$example"

if [ "$live" = yes ]; then
    systemctl daemon-reload
    systemctl enable edge-gateway.service >/dev/null
    echo "edge-gateway.service enabled; it starts once $confdir/gateway.toml exists:"
else
    echo "not enabled (--root, or no running systemd): systemctl enable edge-gateway.service"
fi
echo "  cp $example $confdir/gateway.toml, edit it, edge-gateway check --config $confdir/gateway.toml,"
echo "  then systemctl start edge-gateway"
