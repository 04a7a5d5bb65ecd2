#!/bin/bash
# Builds deploy/Containerfile with podman and runs the image, on a machine where no container
# registry is reachable: the two base images the Containerfile names are replaced by local
# stand-ins tagged with the same names, so the Containerfile is used unchanged.
#
#   deploy/test-container.sh            (as root; from any directory of a checkout)
#
# What it checks: the image builds from a clean clone of the committed sources (HEAD); the
# binary in it prints its version; `check` passes on the example config mounted read-only as
# /etc/edge-gateway/gateway.toml; `run` starts as uid/gid 65532 (read from /proc/PID/status of
# the container's process), writes its state into a fresh named volume on /var/lib/edge-gateway
# (the files in it are owned by 65532), reloads on SIGHUP and exits 0 on SIGTERM. It prints the
# image size. Not checked: a serial port passed with --device (no serial hardware here; a pty
# passed that way gives EIO, a pty slave only works on its own devpts).
#
# Stand-ins (made once, reused while present; EDGE_CTR_REBUILD=1 makes them again):
#   docker.io/library/rust:1-slim-bookworm  Debian bookworm (debootstrap --variant=minbase) with
#       gcc, libc6-dev, make, ca-certificates and this machine's default Rust toolchain copied
#       in, RUSTUP_HOME=/usr/local/rustup, CARGO_HOME=/usr/local/cargo, PATH as in the official
#       image.
#   gcr.io/distroless/cc-debian12:nonroot   a rootfs made of bookworm's base-files, netbase,
#       tzdata, libc6, libgcc-s1, libgomp1, libstdc++6, libssl3 (dpkg -x: no shell, no dpkg, no
#       apt), the CA bundle, /etc/passwd and /etc/group with nonroot 65532, /home/nonroot, /tmp;
#       user 65532 and SSL_CERT_FILE as in distroless. The same packages distroless cc-debian12
#       is made of, not its exact files.
# Both carry the label edge-gateway.stand-in=true. If real images with those names are present
# (pulled from a registry) they are used as they are.
#
# Needs: root, podman, runc, debootstrap, network access to deb.debian.org and crates.io (the
# build stage runs apt-get and cargo). On 2 cores: the stand-ins about 1 minute (once), the build
# 5-7 minutes (it compiles the whole gateway), the runs 15 s. Not part of .ci/run: too slow.
#
# Podman settings (a containers.conf of this script's, through CONTAINERS_CONF): runtime runc
# (crun refuses the cgroup v1/v2 hybrid layout some machines have), and ulimits no higher than
# this shell's hard limits (podman's default nofile=1048576 fails where root lacks
# CAP_SYS_RESOURCE). Storage, network and cgroup manager are podman's defaults.
#
# Environment: EDGE_CTR_CACHE (default /var/tmp/edge-gateway-ctr: debootstrap'd rootfs, staging),
# EDGE_CTR_IMAGE (default localhost/edge-gateway:test), EDGE_CTR_KEEP=0 removes the built image at
# the end, EDGE_CTR_CA_BUNDLE (default /etc/ssl/certs/ca-certificates.crt, empty for none): the CA
# bundle the build's RUN steps see (see step 4).
set -Eeuo pipefail

say() { printf '== %s\n' "$*"; }
die() { printf '\n!! FAILED: %s\n' "$*" >&2; exit 1; }
trap 'printf "\n!! FAILED at line %s: %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

[ "$(id -u)" -eq 0 ] || die "run as root (rootful podman, debootstrap)"
for tool in podman runc debootstrap git; do
    command -v "$tool" >/dev/null || die "$tool missing (apt-get install -y podman runc debootstrap git)"
done

repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
cache=${EDGE_CTR_CACHE:-/var/tmp/edge-gateway-ctr}
image=${EDGE_CTR_IMAGE:-localhost/edge-gateway:test}
rust_image=docker.io/library/rust:1-slim-bookworm
runtime_image=gcr.io/distroless/cc-debian12:nonroot
base_image=localhost/edge-gateway-ctr/bookworm-minbase:latest
ca_bundle=${EDGE_CTR_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
[ -z "$ca_bundle" ] || [ -r "$ca_bundle" ] || die "CA bundle $ca_bundle not readable (EDGE_CTR_CA_BUNDLE= for none)"
mkdir -p "$cache"
work=$(mktemp -d "$cache/run.XXXXXX")
volume=edge-gateway-ctr-test-$$
container=edge-gateway-ctr-test-$$
cleanup() {
    podman rm -f -t 0 "$container" >/dev/null 2>&1 || true
    podman volume rm -f "$volume" >/dev/null 2>&1 || true
    if [ "${EDGE_CTR_KEEP:-1}" = 0 ]; then podman rmi "$image" >/dev/null 2>&1 || true; fi
    rm -rf "$work"
}
on_exit() {
    local rc=$?
    cleanup
    [ "$rc" -eq 0 ] || printf '\n!! FAILED (exit %s); see the output above\n' "$rc" >&2
}
trap on_exit EXIT

# Podman's settings: see the header.
nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] && nofile=1048576
nproc=$(ulimit -Hu); { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
cat >"$work/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF=$work/containers.conf
heavy() { nice -n 19 "$@"; }
t0=$SECONDS

is_standin() { [ "$(podman image inspect --format '{{index .Labels "edge-gateway.stand-in"}}' "$1" 2>/dev/null)" = true ]; }
want() { ! podman image exists "$1"; } # want IMAGE: true when IMAGE must be made
if [ "${EDGE_CTR_REBUILD:-0}" = 1 ]; then
    for img in "$runtime_image" "$rust_image" "$base_image"; do
        if is_standin "$img"; then podman rmi "$img" >/dev/null; fi
    done
fi

# --- 1. Debian bookworm, debootstrap'd (the base of both stand-ins) -------------------------
if want "$base_image"; then
    say "debootstrap bookworm (minbase) into $cache/bookworm"
    rm -rf "$cache/bookworm"
    heavy debootstrap --variant=minbase bookworm "$cache/bookworm" http://deb.debian.org/debian \
        >"$cache/debootstrap.log" 2>&1 || { tail -20 "$cache/debootstrap.log"; die "debootstrap"; }
    rm -rf "$cache/bookworm/var/cache/apt/archives/"*.deb "$cache/bookworm/var/lib/apt/lists/"*
    tar -C "$cache/bookworm" -c . | heavy podman import \
        --change 'LABEL edge-gateway.stand-in=true' --change 'CMD ["bash"]' - "$base_image" >/dev/null
    rm -rf "$cache/bookworm"
fi
podman run --rm --network none "$base_image" true || die "podman run of the bookworm base image"
say "podman runs containers here (runtime runc, ulimits nofile=$nofile nproc=$nproc)"

# --- 2. Stand-in for docker.io/library/rust:1-slim-bookworm ----------------------------------
if want "$rust_image"; then
    sysroot=$(rustc --print sysroot) || die "no Rust toolchain on this machine to copy in"
    toolchain=$(basename "$sysroot")
    cargo_bin=$(dirname "$(command -v rustup)")
    say "stand-in $rust_image: bookworm + gcc/libc6-dev/make + toolchain $toolchain"
    ctx=$work/rust-ctx
    mkdir -p "$ctx/rustup/toolchains/$toolchain" "$ctx/cargo/bin"
    # The toolchain without its HTML documentation; the rustup proxies as the official image has.
    (cd "$sysroot" && tar --exclude=./share/doc -cf - .) | tar -C "$ctx/rustup/toolchains/$toolchain" -xf -
    printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\n' "$toolchain" \
        >"$ctx/rustup/settings.toml"
    cp "$cargo_bin/rustup" "$ctx/cargo/bin/rustup"
    for proxy in cargo rustc rustdoc cargo-clippy clippy-driver cargo-fmt rustfmt; do
        ln -s rustup "$ctx/cargo/bin/$proxy"
    done
    cat >"$ctx/Containerfile" <<EOF
FROM $base_image
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev make ca-certificates \\
    && rm -rf /var/lib/apt/lists/*
COPY rustup /usr/local/rustup
COPY cargo /usr/local/cargo
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \\
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    RUST_VERSION=$(rustc --version | cut -d' ' -f2)
LABEL edge-gateway.stand-in=true
EOF
    heavy podman build --quiet --layers=false -t "$rust_image" "$ctx" >/dev/null
    rm -rf "$ctx"
fi
podman run --rm --network none "$rust_image" sh -c 'cargo --version && rustc --version && cc --version | head -1' \
    || die "the Rust build image cannot run cargo/rustc/cc"

# --- 3. Stand-in for gcr.io/distroless/cc-debian12:nonroot -----------------------------------
if want "$runtime_image"; then
    say "stand-in $runtime_image: bookworm's libc6, libgcc-s1, libstdc++6, libssl3, CA bundle; no shell"
    mkdir -p "$work/out"
    podman run --rm -v "$work/out:/out" "$base_image" bash -euc '
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends ca-certificates >/dev/null
        cd /tmp
        apt-get download -qq base-files netbase tzdata libc6 libgcc-s1 libgomp1 libstdc++6 libssl3
        mkdir /rootfs
        for deb in *.deb; do dpkg -x "$deb" /rootfs; done
        cd /rootfs
        rm -rf usr/share/man usr/share/info usr/share/lintian usr/share/doc-base
        mkdir -p etc/ssl/certs home/nonroot root tmp var/lib
        cp /etc/ssl/certs/ca-certificates.crt etc/ssl/certs/
        printf "%s\n" "root:x:0:0:root:/root:/sbin/nologin" \
            "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin" \
            "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin" >etc/passwd
        printf "%s\n" "root:x:0:" "nobody:x:65534:" "tty:x:5:" "staff:x:50:" "nonroot:x:65532:" >etc/group
        chown 65532:65532 home/nonroot; chmod 700 home/nonroot root; chmod 1777 tmp
        test ! -e bin/sh && test ! -e usr/bin/sh && test ! -e usr/bin/dpkg
        tar -cf /out/rootfs.tar .'
    podman import \
        --change 'USER 65532' --change 'WORKDIR /home/nonroot' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        --change 'LABEL edge-gateway.stand-in=true' \
        "$work/out/rootfs.tar" "$runtime_image" >/dev/null
    rm -rf "$work/out"
fi
for img in "$rust_image" "$runtime_image"; do
    if is_standin "$img"; then say "base $img: local stand-in"; else say "base $img: as pulled"; fi
done
t_bases=$((SECONDS - t0))

# --- 4. The build, from a clean clone of HEAD ------------------------------------------------
src=$work/src
git clone --quiet --no-hardlinks "$repo" "$src"
say "building $image from $(git -C "$src" rev-parse --short HEAD) (deploy/Containerfile, unchanged)"
t1=$SECONDS
# The build stage downloads crates over HTTPS: where outgoing HTTPS goes through a proxy with
# its own CA (as on the machine this was written on), the build's RUN steps see this machine's CA
# bundle, mounted read-only over the image's; nothing of it ends up in an image.
ca_mount=()
if [ -n "$ca_bundle" ]; then
    ca_mount=(-v "$ca_bundle:/etc/ssl/certs/ca-certificates.crt:ro")
    say "the build's RUN steps use this machine's CA bundle ($ca_bundle)"
fi
podman rmi "$image" >/dev/null 2>&1 || true # an earlier run's, so that none is left untagged
heavy podman build --pull=never --layers=false "${ca_mount[@]}" -f deploy/Containerfile -t "$image" "$src" \
    >"$cache/build.log" 2>&1 \
    || { tail -40 "$cache/build.log"; die "podman build -f deploy/Containerfile"; }
t_build=$((SECONDS - t1))
grep -E '^(STEP|COMMIT)|Finished' "$cache/build.log" | sed 's/^/   /'
say "built in ${t_build}s"

# --- 5. Run it --------------------------------------------------------------------------------
version=$(podman run --rm --network none "$image" --version) || die "podman run $image --version"
say "--version: $version"

conf=$work/conf
mkdir -p "$conf"
cp "$src/deploy/gateway.example.toml" "$conf/gateway.toml"
chmod 755 "$conf"; chmod 644 "$conf/gateway.toml"
podman run --rm --network none -v "$conf:/etc/edge-gateway:ro" "$image" \
    check --config /etc/edge-gateway/gateway.toml || die "check --config on the example config"
say "check --config /etc/edge-gateway/gateway.toml (example config, read-only volume): OK"

# run: the example's devices and broker are not there (--network none), so the gateway keeps
# trying them and buffers; what matters is that it starts as 65532 and writes its state.
podman volume create "$volume" >/dev/null
podman run -d --name "$container" --network none --stop-timeout 30 \
    -v "$conf:/etc/edge-gateway:ro" -v "$volume:/var/lib/edge-gateway" "$image" >/dev/null
sleep 5
[ "$(podman inspect --format '{{.State.Running}}' "$container")" = true ] \
    || { podman logs "$container" | tail -20; die "run exited within 5 s"; }
pid=$(podman inspect --format '{{.State.Pid}}' "$container")
uids=$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$pid/status")
gids=$(awk '/^Gid:/ {print $2, $3, $4, $5}' "/proc/$pid/status")
[ "$uids" = "65532 65532 65532 65532" ] || die "the gateway runs with uids '$uids', not 65532"
[ "$gids" = "65532 65532 65532 65532" ] || die "the gateway runs with gids '$gids', not 65532"
say "run: process $pid runs as uid 65532, gid 65532 (/proc/$pid/status)"
podman kill -s HUP "$container" >/dev/null
for _ in $(seq 50); do
    podman logs "$container" 2>&1 | grep -q 'reloading the configuration' && break
    sleep 0.2
done
podman logs "$container" 2>&1 | grep -q 'reloading the configuration' || die "no reload on SIGHUP"
sleep 1
! podman logs "$container" 2>&1 | grep -q 'fails check' || die "the reload on SIGHUP refused the config"
[ "$(podman inspect --format '{{.State.Running}}' "$container")" = true ] || die "the gateway ended after SIGHUP"
say "run: SIGHUP (podman kill -s HUP) reloads the config, the gateway keeps running"
podman stop -t 30 "$container" >/dev/null
code=$(podman inspect --format '{{.State.ExitCode}}' "$container")
[ "$code" = 0 ] || { podman logs "$container" | tail -20; die "run exited with $code after SIGTERM"; }
say "run: stopped by SIGTERM, exit code 0"
podman logs "$container" 2>&1 | tail -5 | sed 's/^/   /'
mnt=$(podman volume inspect --format '{{.Mountpoint}}' "$volume")
owner=$(stat -c %u:%g "$mnt")
[ "$owner" = 65532:65532 ] || die "the data volume's root is owned by $owner, not 65532:65532"
written=$(find "$mnt" -mindepth 1 | wc -l)
[ "$written" -gt 0 ] || die "the gateway wrote nothing into /var/lib/edge-gateway"
foreign=$(find "$mnt" -mindepth 1 \( ! -uid 65532 -o ! -gid 65532 \) | wc -l)
[ "$foreign" -eq 0 ] || die "files in the data volume not owned by 65532: $(find "$mnt" ! -uid 65532)"
say "run: /var/lib/edge-gateway (fresh named volume, owned 65532:65532) written by the gateway:" \
    "$written entries, all owned by 65532"
find "$mnt" -mindepth 1 -maxdepth 2 -printf '   %u:%g %M %P\n' | head -10
podman rm "$container" >/dev/null

size=$(podman image inspect --format '{{.Size}}' "$image")
base_size=$(podman image inspect --format '{{.Size}}' "$runtime_image")
say "image $image: $((size / 1000000)) MB ($size bytes; runtime base $((base_size / 1000000)) MB)"
say "all verified: stand-in bases ${t_bases}s, build ${t_build}s, total $((SECONDS - t0))s"
