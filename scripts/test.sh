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

# The network-namespace fault tests (crates/dmalog-cli/tests/netns_faults.rs) drop 1% of
# packets with iptables. As root on a Debian-like machine without it, install it
# (DMALOG_NO_INSTALL=1: don't; the tests then run without the loss and say so).
if [ "$(id -u)" = 0 ] && [ -z "${DMALOG_NO_INSTALL:-}" ] && ! command -v iptables >/dev/null \
    && command -v apt-get >/dev/null; then
    echo "== installing iptables for the netns tests' packet loss (DMALOG_NO_INSTALL=1 skips this)"
    apt-get install -y -qq iptables >/dev/null \
        || { apt-get update -qq && apt-get install -y -qq iptables >/dev/null; } \
        || echo "   could not install iptables: the netns tests run without packet loss"
fi

cargo test --workspace

echo "== loom models of the dirty log and the live log (preemption bound ${DMALOG_LOOM_PREEMPTIONS:-2})"
LOOM_MAX_PREEMPTIONS="${DMALOG_LOOM_PREEMPTIONS:-2}" RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
    cargo test --release -p dmalog --test loom_dirty_log --test loom_live_log
