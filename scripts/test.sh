#!/usr/bin/env bash
# The whole test suite: every crate's tests, then a short loom run of the dirty log's
# mark / read_and_clear protocol and the live log's publish / record race (loom needs its
# own build with --cfg loom).
#
# Longer runs (opt-in):
#   DMALOG_PROPTEST_CASES=5000 ./scripts/test.sh         # more model-test cases
#   DMALOG_STRESS_WRITES=5000000 cargo test --release -p dmalog --test stress
#   DMALOG_LOOM_PREEMPTIONS=4 ./scripts/test.sh           # deeper loom search
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace

echo "== loom models of the dirty log and the live log (preemption bound ${DMALOG_LOOM_PREEMPTIONS:-2})"
LOOM_MAX_PREEMPTIONS="${DMALOG_LOOM_PREEMPTIONS:-2}" RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
    cargo test --release -p dmalog --test loom_dirty_log --test loom_live_log
