#!/usr/bin/env bash
# Runs every cargo-fuzz target of this directory for a bounded time.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 seconds, every target)
#
# Each target starts from its checked-in seeds in corpus/<target>/ (never written to); what
# libFuzzer finds is kept in target/fuzz-corpus/<target>/ for the next run, its output in
# target/fuzz-logs/<target>.log. Exits 1 when a target crashed (the reproducer is in
# artifacts/<target>/, see the lines printed at the end), 2 when cargo-fuzz is missing or the
# arguments are wrong. Installs nothing.
#
# FUZZ_SANITIZER=address|none picks the sanitizer (default address, with a fallback to none
# when the address sanitizer cannot be built); FUZZ_TIMEOUT is the longest one input may run
# (seconds, default 10) before libFuzzer reports it as a hang.
set -uo pipefail

seconds=${1:-60}
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]" >&2
    exit 2
fi
shift $(($# > 0 ? 1 : 0))
cd "$(dirname "$0")" || exit 2

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is not installed. Install it with:" >&2
    echo "    cargo install cargo-fuzz" >&2
    exit 2
fi

# cargo-fuzz builds with nightly-only flags (-Zsanitizer, sanitizer coverage). On a stable or
# beta toolchain, RUSTC_BOOTSTRAP=1 lets that compiler accept them; it changes nothing else, and
# a nightly toolchain (e.g. `RUSTUP_TOOLCHAIN=nightly fuzz/run.sh`) does not need it.
if ! rustc -vV | grep -q '^release: .*-nightly'; then
    export RUSTC_BOOTSTRAP=1
    echo "== $(rustc -V) is not a nightly toolchain: building with RUSTC_BOOTSTRAP=1"
fi

sanitizer=${FUZZ_SANITIZER:-address}
timeout=${FUZZ_TIMEOUT:-10}
if ! cargo fuzz build --sanitizer "$sanitizer"; then
    if [[ $sanitizer == none ]]; then
        echo "== the fuzz targets do not build" >&2
        exit 2
    fi
    # Without the address sanitizer, libFuzzer still catches panics, aborts, hangs and
    # out-of-memory; only memory errors in unsafe code would go unnoticed.
    echo "== building with --sanitizer $sanitizer failed: falling back to --sanitizer none" >&2
    sanitizer=none
    cargo fuzz build --sanitizer none || exit 2
fi

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

mkdir -p target/fuzz-logs
stamp=target/fuzz-logs/.started
touch "$stamp"
failed=()
for t in "${targets[@]}"; do
    work=target/fuzz-corpus/$t
    log=target/fuzz-logs/$t.log
    mkdir -p "$work" "corpus/$t"
    echo "== $t: ${seconds}s, sanitizer $sanitizer"
    # The first corpus directory receives the new inputs; the seeds are only read.
    cargo fuzz run --sanitizer "$sanitizer" "$t" "$work" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout="$timeout" -print_final_stats=1 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    if [[ $status -ne 0 ]]; then
        failed+=("$t")
    fi
done

echo
echo "== summary (${seconds}s per target, sanitizer $sanitizer)"
for t in "${targets[@]}"; do
    log=target/fuzz-logs/$t.log
    last=$(grep -E '^#[0-9]+[[:space:]]+(DONE|NEW|REDUCE|pulse|INITED)' "$log" | tail -n 1)
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log")
    echo "$t: ${runs:-?} runs, ${speed:-?} exec/s, peak RSS ${rss:-?} MB"
    echo "    $last"
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo
    for t in "${failed[@]}"; do
        echo "== $t FAILED; log: fuzz/target/fuzz-logs/$t.log"
        grep -E 'Test unit written to|^Reproduce with:|cargo fuzz run' "target/fuzz-logs/$t.log" |
            sed 's/^/    /'
        # Reproducers of this run only: artifacts/ keeps those of earlier runs too.
        find "artifacts/$t" -type f -newer "$stamp" 2>/dev/null | while read -r a; do
            echo "    reproducer: fuzz/$a"
            echo "        replay: cd fuzz && cargo fuzz run $t $a"
            echo "        hex:    od -An -tx1 -v fuzz/$a"
        done
    done
    exit 1
fi
echo "== no crash"
