#!/usr/bin/env bash
# Opt-in test of dmalog's kernel consumers (crate dmalog-vfio) against a real Linux kernel.
#
#   1. Installs the build dependencies from Debian (apt only) and Debian's
#      `linux-source-6.12` (bookworm-security and trixie both carry it).
#   2. Builds a small x86_64 kernel: tinyconfig plus scripts/kernel-vm/config (iommufd with
#      its self-test mock domain, VFIO with the device cdev, the mtty mdev sample; most
#      unneeded subsystems off). `nice -n 10 make -j2`: the machine is shared.
#   3. Builds dmalog-vfio's test binaries statically for the guest (musl when the target
#      is installed, else glibc with +crt-static) and packs them with busybox and
#      scripts/kernel-vm/init into an initramfs.
#   4. Boots it under qemu-system-x86_64 (TCG). The guest's /init runs every test binary
#      with DMALOG_REAL_KERNEL=1 and prints one result line per binary on the serial
#      console. This script exits 0 only when every binary passed.
#
# Kernel and initramfs are cached under target/kernel-vm (the kernel is rebuilt when the
# config fragment or the source package changes). Phases are timed.
# Needs root for apt-get on the first run (skipped when every package is installed).
# Environment:
#   DMALOG_KERNEL_VM_TIMEOUT  seconds allowed for the guest run (default 600)
#   DMALOG_KERNEL_VM_JOBS     make -j (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."

repo="$(pwd)"
work="$repo/target/kernel-vm"
fragment="$repo/scripts/kernel-vm/config"
guest_init="$repo/scripts/kernel-vm/init"
boot_timeout_secs="${DMALOG_KERNEL_VM_TIMEOUT:-600}"
jobs="${DMALOG_KERNEL_VM_JOBS:-2}"
kver=6.12
src_tar="/usr/src/linux-source-$kver.tar.xz"
src_dir="$work/linux-source-$kver"
bzimage="$work/bzImage"

script_name=kernel-vm
# shellcheck source=scripts/lib/phases.sh
. "$repo/scripts/lib/phases.sh"
script_start=$(date +%s)

mkdir -p "$work"

# --- 1. Packages ---------------------------------------------------------------------
phase "packages"
packages=(build-essential bc flex bison libelf-dev libssl-dev cpio xz-utils file
    busybox-static qemu-system-x86 "linux-source-$kver")
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
        missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "needs root to install: ${missing[*]}"
    if ! apt-cache policy "linux-source-$kver" | grep -q 'Candidate: [0-9]'; then
        die "no linux-source-$kver in the apt sources (bookworm-security or trixie has it)"
    fi
    say "installing: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
src_version="$(dpkg-query -W -f '${Version}' "linux-source-$kver")"
phase_done "packages"

# --- 2. Kernel -----------------------------------------------------------------------
# The cache key: the source package version and the config fragment.
kernel_key="$src_version $(sha256sum "$fragment" | cut -d' ' -f1)"
if [ -f "$bzimage" ] && [ "$(cat "$work/bzImage.key" 2>/dev/null)" = "$kernel_key" ]; then
    say "kernel: cached ($bzimage, linux-source-$kver $src_version)"
else
    phase "kernel: unpacking linux-source-$kver $src_version"
    if [ "$(cat "$work/source.version" 2>/dev/null)" != "$src_version" ]; then
        rm -rf "$src_dir"
        tar -C "$work" -xf "$src_tar"
        echo "$src_version" >"$work/source.version"
    fi
    phase_done "kernel unpack"

    phase "kernel: configuring"
    make -C "$src_dir" -s ARCH=x86_64 tinyconfig
    args=()
    while IFS= read -r line; do
        case "$line" in '' | '#'*) continue ;; esac
        name="${line%%=*}"
        name="${name#CONFIG_}"
        case "${line#*=}" in
        y) args+=(--enable "$name") ;;
        n) args+=(--disable "$name") ;;
        *) args+=(--set-val "$name" "${line#*=}") ;;
        esac
    done <"$fragment"
    "$src_dir/scripts/config" --file "$src_dir/.config" "${args[@]}"
    make -C "$src_dir" -s ARCH=x86_64 olddefconfig
    # scripts/config checks nothing: every line of the fragment must hold now.
    bad=0
    while IFS= read -r line; do
        case "$line" in '' | '#'*) continue ;; esac
        name="${line%%=*}"
        want="${line#*=}"
        if [ "$want" = n ]; then
            if grep -q "^$name=" "$src_dir/.config"; then
                echo "config: $name should be off but is $(grep "^$name=" "$src_dir/.config")" >&2
                bad=1
            fi
        elif ! grep -qx "$name=$want" "$src_dir/.config"; then
            echo "config: $name=$want did not stick (dependency missing?)" >&2
            bad=1
        fi
    done <"$fragment"
    [ "$bad" = 0 ] || die "kernel config does not match scripts/kernel-vm/config"
    phase_done "kernel config"

    phase "kernel: building bzImage (nice -n 10 make -j$jobs)"
    nice -n 10 make -C "$src_dir" -s ARCH=x86_64 -j"$jobs" bzImage
    cp "$src_dir/arch/x86/boot/bzImage" "$bzimage"
    cp "$src_dir/.config" "$work/config"
    echo "$kernel_key" >"$work/bzImage.key"
    phase_done "kernel build"
fi
if [ "${DMALOG_KERNEL_VM_KERNEL_ONLY:-0}" = 1 ]; then
    say "kernel only: done in $(($(date +%s) - script_start)) s"
    exit 0
fi

# --- 3. Guest test binaries and initramfs ------------------------------------------------
# The test binaries run as the guest's init: linked statically (no libc in the initramfs).
# musl when its target is installed (rustup cannot download here), else glibc +crt-static.
tests="${DMALOG_KERNEL_VM_TESTS:-real_kernel}"
if rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
    target=x86_64-unknown-linux-musl
    rustflags=""
else
    target=x86_64-unknown-linux-gnu
    rustflags="-C target-feature=+crt-static"
fi
phase "guest binaries: cargo test --no-run --target $target ($tests)"
test_args=()
for t in $tests; do test_args+=(--test "$t"); done
# --target puts these in target/$target, apart from the host build (other RUSTFLAGS).
json="$(RUSTFLAGS="$rustflags" nice -n 10 cargo test -p dmalog-vfio --no-run --target "$target" \
    "${test_args[@]}" --message-format=json)"
binaries="$(echo "$json" | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')"
[ -n "$binaries" ] || die "no test binaries built"
for bin in $binaries; do
    file "$bin" | grep -Eq 'statically linked|static-pie linked' || die "$bin is not statically linked"
done
phase_done "guest binaries"

phase "initramfs"
root="$work/initramfs"
rm -rf "$root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,tests}
cp /bin/busybox "$root/bin/busybox"
cp "$guest_init" "$root/init"
chmod +x "$root/init"
for bin in $binaries; do
    # cargo names them <test>-<hash>; the guest runs every file in /tests.
    name="$(basename "$bin")"
    cp "$bin" "$root/tests/${name%-*}"
done
(cd "$root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc --owner=0:0) >"$work/initramfs.cpio"
phase_done "initramfs"

# --- 4. Boot -------------------------------------------------------------------------
phase "boot: qemu-system-x86_64 (TCG), timeout ${boot_timeout_secs} s"
console="$work/console.log"
set +e
timeout "$boot_timeout_secs" qemu-system-x86_64 -accel tcg -m 1024 -smp 1 \
    -nographic -no-reboot -kernel "$bzimage" -initrd "$work/initramfs.cpio" \
    -append "console=ttyS0 panic=-1 loglevel=4" </dev/null >"$console" 2>&1
qemu_rc=$?
set -e
phase_done "boot"
sed -n 's/\r$//; /^DMALOG-KVM: \|^oracle: \|^test \|panicked\|^  left\|^ right\|failures:\|disagrees/p' "$console" | sed 's/^/    /'
[ "$qemu_rc" = 124 ] && die "the guest did not finish within ${boot_timeout_secs} s (log: $console)"
grep -q '^DMALOG-KVM: DONE' <(tr -d '\r' <"$console") || die "the guest did not report DONE (log: $console)"
if grep -q '^DMALOG-KVM: FAIL' <(tr -d '\r' <"$console"); then
    die "tests failed in the guest (log: $console)"
fi
npass="$(tr -d '\r' <"$console" | grep -c '^DMALOG-KVM: PASS')"
say "PASS: $npass test binaries against Linux $kver ($src_version) in $(($(date +%s) - script_start)) s"
