#!/usr/bin/env bash
# Opt-in interop test against a real VMM: QEMU's vfio-user-pci client drives `dmalog serve`.
#
#   1. A Debian trixie chroot (debootstrap, cached at target/qemu-chroot) supplies
#      qemu-system-x86 from trixie-backports (vfio-user-pci), linux-image-amd64 and
#      busybox-static. Only Debian packages; nothing is downloaded outside apt.
#   2. Each device profile (dma-engine, lvu-sample) must realize under vfio-user-pci:
#      QEMU starts paused, `info pci` must list the device's IDs, then it quits.
#   3. A Linux guest boots with both devices (TCG, 1 vCPU). Its /init
#      (scripts/qemu-guest/init) finds the dma-engine in sysfs, programs BAR0 to FILL a
#      buffer in guest RAM above `mem=`, reads the pattern back with devmem, COPYs part of
#      it, and checks EFAULT for an unmapped IOVA. For lvu-sample it checks the IDs, reads
#      back BAR1 through its mmapped and trapped pages, and fires the device's timer: its
#      DMA_WRITE messages, which QEMU serves, must land in guest page 0. The dma-engine's
#      DMA works only because QEMU's DMA_MAPs carry the memfd of guest RAM: the script
#      checks that dmalog maps that memfd, and that QEMU maps lvu-sample's BAR1 from
#      dmalog's memfd. The guest prints a PASS/FAIL line on the serial console; this
#      script exits 0 only on PASS with every device realized.
#
# Phases are timed. Delete target/qemu-chroot to rebuild the chroot (e.g. for a newer
# QEMU in trixie-backports).
#
# Needs root (debootstrap, chroot, mount namespaces) and network access to deb.debian.org
# on the first run. Environment:
#   DMALOG_QEMU_MIRROR   Debian mirror (default http://deb.debian.org/debian)
#   DMALOG_QEMU_TIMEOUT  seconds allowed for the guest boot (default 300)
set -euo pipefail
cd "$(dirname "$0")/.."

mirror="${DMALOG_QEMU_MIRROR:-http://deb.debian.org/debian}"
boot_timeout_secs="${DMALOG_QEMU_TIMEOUT:-300}"
repo="$(pwd)"
chroot_dir="$repo/target/qemu-chroot"
# Inside the chroot, so that the sockets dmalog binds on the host are visible to QEMU.
run_rel="tmp/dmalog-qemu"
run_dir="$chroot_dir/$run_rel"

script_name=qemu-interop
# shellcheck source=scripts/lib/phases.sh
. "$repo/scripts/lib/phases.sh"

# Prints the pids of the processes below $1, each before its own children.
descendants() {
    local pid
    # shellcheck disable=SC2013 # children holds space-separated pids
    for pid in $(cat /proc/"$1"/task/*/children 2>/dev/null); do
        echo "$pid"
        descendants "$pid"
    done
}
# Ends the process tree under $1 and $1 itself, by pid.
# shellcheck disable=SC2317 # also invoked by traps
kill_tree() {
    local pid
    for pid in $(descendants "$1") "$1"; do kill "$pid" 2>/dev/null || true; done
}

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mount namespaces)"

# Runs a command inside the chroot with /proc and /dev mounted in a private mount
# namespace: the mounts vanish with the namespace, even if this script is killed.
in_chroot() {
    # shellcheck disable=SC2016 # expanded by the inner sh
    unshare --mount --propagation private -- sh -c '
        root=$1; shift
        mount -t proc proc "$root/proc"
        mount --rbind /dev "$root/dev"
        exec chroot "$root" "$@"' sh "$chroot_dir" "$@"
}

# rm -rf must never descend into a bind-mounted /dev: the mounts live in private
# namespaces, but check anyway before deleting a chroot.
refuse_if_mounted() {
    if awk -v dir="$1" 'index($2, dir) == 1 { found = 1 } END { exit !found }' /proc/self/mounts; then
        die "something is mounted under $1; unmount it first"
    fi
}

# --- 1. the chroot -------------------------------------------------------------------
build_chroot() {
    local partial="$chroot_dir.partial"
    if ! command -v debootstrap >/dev/null; then
        say "installing debootstrap on the host"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    fi
    refuse_if_mounted "$partial"
    rm -rf "$partial"
    # busybox-static: the guest's userland; cpio: packs the guest's initramfs.
    unshare --mount --propagation private -- \
        debootstrap --variant=minbase --include=busybox-static,cpio trixie "$partial" "$mirror"
    cat >"$partial/etc/apt/sources.list.d/backports.list" <<EOF
deb $mirror trixie-backports main
EOF
    # The guest boots our own initramfs; building Debian's would only burn CPU.
    chroot "$partial" dpkg-divert --local --rename --add /usr/sbin/update-initramfs >/dev/null
    ln -s /bin/true "$partial/usr/sbin/update-initramfs"
    local saved="$chroot_dir"
    chroot_dir="$partial"
    in_chroot apt-get update -qq
    in_chroot env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        linux-image-amd64 >/dev/null
    in_chroot env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -t trixie-backports qemu-system-x86 >/dev/null
    in_chroot apt-get clean
    chroot_dir="$saved"
    touch "$partial/.dmalog-ready"
    mv "$partial" "$chroot_dir"
}

# dmalog builds while debootstrap downloads and unpacks: one is CPU, the other mostly I/O,
# and together they are most of a first run.
mkdir -p target
cargo_log="$repo/target/qemu-interop-cargo.log"
cargo_start=$(date +%s)
(cargo build -q -p dmalog-cli --bin dmalog && echo "took $(($(date +%s) - cargo_start)) s") \
    >"$cargo_log" 2>&1 &
cargo_pid=$!
# Until the servers start, the build is all there is to end if the chroot phase fails.
# shellcheck disable=SC2064 # the pid is fixed now
trap "kill_tree $cargo_pid" EXIT

if [ ! -e "$chroot_dir/.dmalog-ready" ]; then
    phase "building the trixie chroot at target/qemu-chroot (once; cached)"
    refuse_if_mounted "$chroot_dir"
    rm -rf "$chroot_dir"
    build_chroot
    phase_done "debootstrap + packages"
else
    say "using the cached chroot at target/qemu-chroot"
fi

qemu_version="$(chroot "$chroot_dir" qemu-system-x86_64 --version | head -1)"
say "$qemu_version"
chroot "$chroot_dir" qemu-system-x86_64 -device help 2>/dev/null | grep -q '"vfio-user-pci"' ||
    die "$qemu_version has no vfio-user-pci device"
kernel="$(cd "$chroot_dir" && find boot -name 'vmlinuz-*' | sort -V | tail -1)"
[ -n "$kernel" ] || die "no kernel in the chroot"
say "guest kernel /$kernel"

# --- 2. dmalog ------------------------------------------------------------------------
phase "waiting for the dmalog build (started with the chroot phase)"
if ! wait "$cargo_pid"; then
    cat "$cargo_log" >&2
    die "cargo build -p dmalog-cli failed"
fi
say "cargo build $(tail -n 1 "$cargo_log")"
dmalog="$repo/target/debug/dmalog"
phase_done "waiting for cargo"

rm -rf "$run_dir"
mkdir -p "$run_dir"
serve_pids=()
qemu_pid=
# Ends what this script started, by pid: the servers and, if interrupted mid-boot, the
# QEMU process tree.
# shellcheck disable=SC2317 # invoked by the trap
cleanup() {
    local pid
    if [ -n "$qemu_pid" ]; then kill_tree "$qemu_pid"; fi
    for pid in "${serve_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# Starts `dmalog serve --device $1` on $run_dir/$1.sock. The socket is bound by a path
# relative to the chroot (cwd), which keeps it short of the 108-byte sun_path limit.
start_server() {
    local device=$1
    rm -f "$run_dir/$device.sock"
    (cd "$chroot_dir" && exec "$dmalog" serve --device "$device" --socket "$run_rel/$device.sock") \
        >>"$run_dir/serve-$device.log" 2>&1 &
    serve_pids+=("$!")
    for _ in $(seq 100); do
        [ -S "$run_dir/$device.sock" ] && return 0
        sleep 0.1
    done
    die "dmalog serve --device $device did not create its socket (see $run_dir/serve-$device.log)"
}

stop_servers() {
    local pid
    for pid in "${serve_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${serve_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    serve_pids=()
}

# Guest RAM must be an fd (memfd, shared) for QEMU to pass it with DMA_MAP.
guest_ram_mib=512
# shellcheck disable=SC2054 # the commas belong to QEMU options
qemu_common=(
    qemu-system-x86_64 -accel tcg -machine q35,memory-backend=ram -m "${guest_ram_mib}M" -smp 1
    -object "memory-backend-memfd,id=ram,size=${guest_ram_mib}M,share=on"
    -nodefaults -display none
)
vfio_user_dev() { echo "{\"driver\":\"vfio-user-pci\",\"id\":\"$1\",\"socket\":{\"type\":\"unix\",\"path\":\"/$run_rel/$1.sock\"}}"; }

# --- 3. realization of each device -----------------------------------------------------
declare -A want_ids=([dma-engine]="1b36:10d1" [lvu-sample]="dead:beef")
realize_failed=()
for device in dma-engine lvu-sample; do
    phase "realizing --device $device under vfio-user-pci"
    start_server "$device"
    out="$run_dir/realize-$device.txt"
    if printf 'info pci\nquit\n' |
        in_chroot timeout 120 "${qemu_common[@]}" -S -monitor stdio -device "$(vfio_user_dev "$device")" \
            >"$out" 2>&1 &&
        grep -qi "${want_ids[$device]}" "$out"; then
        say "$device realized: $(grep -i -m1 "${want_ids[$device]}" "$out" | tr -s ' ')"
    else
        sed 's/^/    /' "$out" >&2
        say "$device did NOT realize (qemu output above)"
        realize_failed+=("$device")
    fi
    stop_servers
    phase_done "realize $device"
done

# --- 4. guest boot ---------------------------------------------------------------------
phase "building the guest initramfs"
initramfs_root="$run_dir/initramfs"
mkdir -p "$initramfs_root"/{bin,dev,proc,sys}
cp "$chroot_dir/usr/bin/busybox" "$initramfs_root/bin/busybox"
cp scripts/qemu-guest/init "$initramfs_root/init"
chmod 0755 "$initramfs_root/init"
chroot "$chroot_dir" sh -c "cd /$run_rel/initramfs && find . | cpio -o -H newc --quiet" \
    | gzip -1 >"$run_dir/initramfs.cpio.gz"
phase_done "initramfs"

guest_devices=(dma-engine)
[[ " ${realize_failed[*]} " == *" lvu-sample "* ]] || guest_devices+=(lvu-sample)
phase "booting the guest (devices: ${guest_devices[*]}; TCG)"
dev_args=()
for device in "${guest_devices[@]}"; do
    start_server "$device"
    dev_args+=(-device "$(vfio_user_dev "$device")")
done
console="$run_dir/console.log"
# mem= hides the top of guest RAM from Linux: the guest's FILL target lives there, RAM that
# QEMU maps for DMA but the kernel never uses, so /dev/mem may touch it.
in_chroot timeout "$boot_timeout_secs" "${qemu_common[@]}" "${dev_args[@]}" \
    -kernel "/$kernel" -initrd "/$run_rel/initramfs.cpio.gz" \
    -append "console=ttyS0 mem=384M panic=-1 quiet dmalog.devices=$(IFS=,; echo "${guest_devices[*]}")" \
    -serial "file:/$run_rel/console.log" -no-reboot </dev/null >"$run_dir/qemu-boot.log" 2>&1 &
qemu_pid=$!
# Evidence that the DMA went through QEMU's fds: while the guest runs, the dma-engine
# server (the first one started) must have guest RAM's memfd mapped.
engine_maps="/proc/${serve_pids[0]}/maps"
memfd_mapped=no
# And the other way round: QEMU (a descendant of $qemu_pid: subshell, unshare/chroot/
# timeout, qemu) must map lvu-sample's BAR1 sparse areas from the memfd dmalog sent with
# the region info.
bar1_mapped=no
[[ " ${guest_devices[*]} " == *" lvu-sample "* ]] || bar1_mapped=n/a
while kill -0 "$qemu_pid" 2>/dev/null; do
    if [ "$memfd_mapped" = no ] && grep -q 'memfd:' "$engine_maps" 2>/dev/null; then
        memfd_mapped=yes
        say "dmalog serve --device dma-engine maps guest RAM: $(grep -m1 'memfd:' "$engine_maps")"
    fi
    if [ "$bar1_mapped" = no ]; then
        for pid in $(descendants "$qemu_pid"); do
            if grep -q 'memfd:lvu-sample-bar1' "/proc/$pid/maps" 2>/dev/null; then
                bar1_mapped=yes
                say "qemu maps lvu-sample's BAR1: $(grep -c 'memfd:lvu-sample-bar1' "/proc/$pid/maps") area(s) of dmalog's memfd"
            fi
        done
    fi
    sleep 0.5
done
qemu_status=0
wait "$qemu_pid" || qemu_status=$?
qemu_pid=
[ "$qemu_status" = 0 ] || say "qemu exited with status $qemu_status (see $run_dir/qemu-boot.log)"
stop_servers
phase_done "guest boot"
grep -a 'DMALOG-GUEST' "$console" || true

status=0
if ! grep -aq '^DMALOG-GUEST: PASS' "$console"; then
    sed 's/^/    qemu: /' "$run_dir/qemu-boot.log" >&2
    for log in "$run_dir"/serve-*.log; do sed "s|^|    ${log##*/}: |" "$log" >&2; done
    tail -n 40 "$console" | sed 's/^/    console: /' >&2
    echo "qemu-interop: FAIL: the guest did not report PASS (console: $console)" >&2
    status=1
fi
if [ "$memfd_mapped" != yes ]; then
    echo "qemu-interop: FAIL: dmalog serve never mapped QEMU's guest-RAM memfd" >&2
    status=1
fi
if [ "$bar1_mapped" = no ]; then
    echo "qemu-interop: FAIL: qemu never mapped lvu-sample's BAR1 memfd" >&2
    status=1
fi
if [ "${#realize_failed[@]}" -gt 0 ]; then
    echo "qemu-interop: FAIL: did not realize under vfio-user-pci: ${realize_failed[*]}" >&2
    status=1
fi
[ "$status" = 0 ] && say "PASS"
exit "$status"
