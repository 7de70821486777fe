#!/usr/bin/env bash
# Mutation testing of the protocol modules (opt-in; CPU heavy: hours on 2 cores).
# Each surviving ("missed") mutant is a missing test or an equivalent mutant listed with
# its reason in docs/mutants.md.
#
#   ./scripts/mutants.sh                       # all protocol modules
#   ./scripts/mutants.sh crates/dmalog/src/bits.rs   # only the files given
#   MUTANTS_JOBS=2 MUTANTS_OUT=/tmp/m ./scripts/mutants.sh
#
# Needs cargo-mutants (`cargo install cargo-mutants --locked`). Loom models are not run per
# mutant (they need their own --cfg loom build); docs/mutants.md lists the mutants only
# loom catches.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$#" -gt 0 ]; then
    files=("$@")
else
    files=(
        crates/dmalog/src/dirty_log.rs
        crates/dmalog/src/bits.rs
        crates/dmalog/src/iova_bitmap.rs
        crates/dmalog/src/ranges.rs
        crates/dmalog/src/logging_core.rs
        crates/dmalog/src/soft.rs
        crates/dmalog-models/src/mlx5.rs
        crates/dmalog-vfio-user/src/wire.rs
    )
fi
out="${MUTANTS_OUT:-target/mutants}"
mkdir -p "$out"
file_args=()
for file in "${files[@]}"; do
    file_args+=(--file "$file")
done

# Missed mutants make cargo-mutants exit non-zero; the counts below are the result.
nice -n 10 cargo mutants --package dmalog --package dmalog-models --package dmalog-vfio-user "${file_args[@]}" \
    --jobs "${MUTANTS_JOBS:-1}" --timeout "${MUTANTS_TIMEOUT:-120}" --output "$out" \
    --exclude-re 'tests::|impl std::fmt::Debug' || true

count() { [ -f "$out/mutants.out/$1.txt" ] && wc -l < "$out/mutants.out/$1.txt" || echo 0; }
echo "== mutants: caught $(count caught), missed $(count missed), unviable $(count unviable), timeouts $(count timeout)"
if [ -s "$out/mutants.out/missed.txt" ]; then
    echo "== missed (each needs a test or an entry in docs/mutants.md):"
    cat "$out/mutants.out/missed.txt"
fi
