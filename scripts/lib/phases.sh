# Sourced by the opt-in scripts (kernel-vm.sh, qemu-interop.sh): their messages and timed
# phases. The sourcing script sets `script_name` first.
# shellcheck shell=bash
: "${script_name:?set by the sourcing script}"

say() { echo "== $script_name: $*"; }
die() { echo "$script_name: FAIL: $*" >&2; exit 1; }

phase_start=0
phase() { phase_start=$(date +%s); say "$*"; }
phase_done() { say "$1 took $(($(date +%s) - phase_start)) s"; }
