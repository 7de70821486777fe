#!/usr/bin/env bash
# Opt-in: runs every cargo-fuzz target for DMALOG_FUZZ_SECONDS each (default 600) with the
# nightly toolchain, one after another, and prints each target's executions and result.
# Needs `cargo install cargo-fuzz` and a nightly toolchain. Findings land in
# fuzz/artifacts/<target>/ (not committed). Usage:
#   ./scripts/fuzz.sh                      # every target, 10 minutes each
#   DMALOG_FUZZ_SECONDS=60 ./scripts/fuzz.sh lvu_sample_dispatch
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${DMALOG_FUZZ_SECONDS:-600}"
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
status=0
for target in "${targets[@]}"; do
    log="$(mktemp)"
    if cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" >"$log" 2>&1; then
        result=clean
    else
        result=FAILED
        status=1
    fi
    # libFuzzer's last status line: "#N DONE ..." (or the crash report).
    runs="$(grep -Eo '^#[0-9]+' "$log" | tail -1 | tr -d '#')"
    echo "$target: ${runs:-0} executions in ${seconds} s, $result"
    if [ "$result" = FAILED ]; then
        tail -40 "$log"
    fi
    rm -f "$log"
done
exit "$status"
