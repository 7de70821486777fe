//! The kernel consumers against a real Linux kernel (6.12, built and booted by
//! scripts/kernel-vm.sh, which runs this binary as the guest's init with
//! DMALOG_REAL_KERNEL=1). Without that variable and /dev/iommu the kernel tests skip with a
//! message; the dmalog column of the errno oracle runs everywhere.
//!
//! - `IommufdDirtyTracker` over the iommufd self-test mock domain, side by side with
//!   `FakeIommu` configured like the mock (2 KiB IO pages).
//! - SPEC 3's kernel-dialect errno table sent to Linux's vfio core through mtty (stub
//!   logging ops) and to dmalog's core through `FakeVfioDevice`.
//! - `VfioDevice` on mtty: logging, MIGRATION flags, a full migration between two
//!   instances through the real data fds.

mod kernel_rig;

use dmalog::uapi::{
    DeviceState, LoggingRange, UapiStruct, MIGRATION_P2P, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY,
};
use dmalog::IovaRange;
use dmalog::{DirtyTracker, LoggingCore, SoftDriver};
use dmalog_vfio::fake::{FakeIommu, FakeMigration, FakeVfioDevice};
use dmalog_vfio::iommufd_uapi::MOCK_IO_PAGE_SIZE;
use dmalog_vfio::{IommufdDirtyTracker, KernelIoctl, VfioError};
use kernel_rig::{bind_mtty, mock_dirty, oracle, real_kernel, MockDirty, MttyInstance};

/// Bytes mapped into the mock HWPT: 1024 mock pages.
const MAP_BYTES: u64 = 2 << 20;

fn fake_soft_device() -> FakeVfioDevice<SoftDriver> {
    FakeVfioDevice::new(
        LoggingCore::new(SoftDriver::new()),
        Some(FakeMigration::new(7, vec![0; 24], vec![0; 36])),
    )
}

// ---------------------------------------------------------------------------------------
// SPEC 3 oracle

#[test]
fn oracle_dmalog_column() {
    // Runs everywhere: dmalog's core must give the table's dmalog column.
    let answers = oracle::run(&mut fake_soft_device());
    oracle::check_column("dmalog", &answers, oracle::Expect::dmalog);
}

#[test]
fn oracle_kernel_column_on_mtty() {
    if !real_kernel("oracle_kernel_column_on_mtty") {
        return;
    }
    let instance = MttyInstance::create(1);
    let (mut device, _iommufd, _devid) = kernel_rig::open_bound(&instance);
    let kernel = oracle::run(&mut device);
    let dmalog = oracle::run(&mut fake_soft_device());
    for (row, (k, d)) in oracle::rows().iter().zip(kernel.iter().zip(&dmalog)) {
        eprintln!(
            "oracle: {:<52} kernel {k:>3} dmalog {d:>3} {:?}",
            row.name, row.expect
        );
    }
    oracle::check_column(
        "Linux 6.12 vfio core (mtty)",
        &kernel,
        oracle::Expect::kernel,
    );
    oracle::check_column("dmalog", &dmalog, oracle::Expect::dmalog);
}

// ---------------------------------------------------------------------------------------
// iommufd mock domain

/// `$body` with `$t` bound to the kernel's tracker on side 0 and to the fake on side 1 (two
/// types, so no closure over `dyn`).
macro_rules! on_side {
    ($side:expr, $real:expr, $fake:expr, |$t:ident| $body:expr) => {
        if $side == 0 {
            let $t = &mut $real;
            $body
        } else {
            let $t = &mut $fake;
            $body
        }
    };
}

/// The real tracker and a fake one shaped like the mock (same IOVA span, 2 KiB pages).
fn trackers() -> (
    IommufdDirtyTracker<KernelIoctl>,
    IommufdDirtyTracker<FakeIommu>,
    MockDirty,
) {
    let mut rig = MockDirty::new(MAP_BYTES);
    let real = IommufdDirtyTracker::new(rig.iommufd.take().unwrap(), rig.hwpt_id);
    let fake = IommufdDirtyTracker::new(
        FakeIommu::with_io_page(
            rig.hwpt_id,
            IovaRange::new(rig.iova, MAP_BYTES).unwrap(),
            MOCK_IO_PAGE_SIZE,
            true,
        ),
        rig.hwpt_id,
    );
    (real, fake, rig)
}

/// On a kernel built for it: [`trackers`], both started over the whole mapping at 4 KiB.
fn started_trackers(
    test: &str,
) -> Option<(
    IommufdDirtyTracker<KernelIoctl>,
    IommufdDirtyTracker<FakeIommu>,
    MockDirty,
    IovaRange,
)> {
    if !real_kernel(test) {
        return None;
    }
    let (mut real, mut fake, rig) = trackers();
    let range = IovaRange::new(rig.iova, MAP_BYTES).unwrap();
    real.start(&[range], 4096).unwrap();
    fake.start(&[range], 4096).unwrap();
    Some((real, fake, rig, range))
}

/// A clearing GET_DIRTY_BITMAP of the whole mapping at 2 KiB pages on each side: the
/// indices of the bits set, kernel first.
fn whole_map_bits(
    real: &mut IommufdDirtyTracker<KernelIoctl>,
    fake: &mut IommufdDirtyTracker<FakeIommu>,
    rig: &MockDirty,
) -> [Vec<u64>; 2] {
    [0, 1].map(|side| {
        let mut bitmap = vec![0u8; 128];
        on_side!(side, *real, *fake, |t| t.report_bytes(
            rig.iova,
            MAP_BYTES,
            2048,
            &mut bitmap,
            true
        ))
        .unwrap();
        set_bits(&bitmap)
    })
}

/// Dirties mock pages `pages` on both sides; checks the kernel marked them all.
fn dirty_both(
    real: &mut IommufdDirtyTracker<KernelIoctl>,
    fake: &mut IommufdDirtyTracker<FakeIommu>,
    rig: &MockDirty,
    pages: &[u64],
) {
    let npages = MAP_BYTES / MOCK_IO_PAGE_SIZE;
    let marked =
        mock_dirty(real.ioctl_mut(), rig.hwpt_id, rig.iova, npages, pages).expect("OP_DIRTY");
    assert_eq!(
        marked,
        pages.len() as u64,
        "OP_DIRTY marks every mapped page asked for"
    );
    for &page in pages {
        fake.ioctl()
            .dma_write(rig.iova + page * MOCK_IO_PAGE_SIZE, 1);
    }
}

fn set_bits(bytes: &[u8]) -> Vec<u64> {
    (0..bytes.len() as u64 * 8)
        .filter(|k| bytes[(k / 8) as usize] >> (k % 8) & 1 == 1)
        .collect()
}

#[test]
fn mock_domain_start_report_stop() {
    if !real_kernel("mock_domain_start_report_stop") {
        return;
    }
    let (mut real, mut fake, rig) = trackers();
    assert!(real.probe().unwrap(), "the mock HWPT has dirty tracking");
    let range = dmalog::IovaRange::new(rig.iova, MAP_BYTES).unwrap();
    assert_eq!(real.start(&[range], 4096).unwrap(), 4096);
    fake.start(&[range], 4096).unwrap();
    let pages = [0u64, 1, 2, 7, 64, 100, 511, 1000, 1023];
    dirty_both(&mut real, &mut fake, &rig, &pages);
    // Several report page sizes, bitmap offsets (not 8-aligned) and lengths that are not
    // a multiple of 64 pages; NO_CLEAR first, then a clearing read, then an empty one.
    for page_size in [2048u64, 4096, 8192, 65536] {
        for (offset, length) in [
            (0usize, MAP_BYTES),
            (1, MAP_BYTES),
            (3, 100 * page_size.max(4096)),
            (5, 37 * page_size),
        ] {
            let length = length.min(MAP_BYTES);
            let nbytes = (length / page_size).div_ceil(8) as usize;
            let mut got = Vec::new();
            for side in 0..2 {
                let mut buffer = vec![0xA5u8; offset + nbytes + 8];
                buffer[offset..offset + nbytes].fill(0);
                let bitmap = &mut buffer[offset..offset + nbytes];
                let result = on_side!(side, real, fake, |t| {
                    t.report_bytes(rig.iova, length, page_size, bitmap, false)
                });
                result.unwrap_or_else(|e| {
                    panic!("side {side} NO_CLEAR ps {page_size} len {length}: {e}")
                });
                assert!(
                    buffer[..offset].iter().all(|&b| b == 0xA5),
                    "nothing before the bitmap"
                );
                assert!(
                    buffer[offset + nbytes..].iter().all(|&b| b == 0xA5),
                    "nothing after the bitmap"
                );
                got.push(set_bits(&buffer[offset..offset + nbytes]));
            }
            let expected: Vec<u64> = {
                let mut v: Vec<u64> = pages
                    .iter()
                    .map(|p| p * MOCK_IO_PAGE_SIZE / page_size)
                    .filter(|&bit| bit < length / page_size)
                    .collect();
                v.dedup();
                v
            };
            assert_eq!(
                got[0], expected,
                "kernel, page size {page_size}, length {length}, offset {offset}"
            );
            assert_eq!(
                got[1], got[0],
                "fake vs kernel, page size {page_size}, length {length}"
            );
        }
    }
    // A clearing read reports the same, then nothing is left; the caller's bits stay.
    for side in 0..2 {
        let mut bitmap = vec![0u64; 16];
        on_side!(side, real, fake, |t| t.report(
            IovaRange::new(rig.iova, MAP_BYTES).unwrap(),
            2048,
            &mut bitmap,
        ))
        .unwrap();
        let bits: Vec<u64> = (0..1024)
            .filter(|k| bitmap[k / 64] >> (k % 64) & 1 == 1)
            .map(|k| k as u64)
            .collect();
        assert_eq!(bits, pages, "side {side}: clearing report");
        let mut again = vec![1u64 << 63; 16];
        on_side!(side, real, fake, |t| t.report(
            IovaRange::new(rig.iova, MAP_BYTES).unwrap(),
            2048,
            &mut again,
        ))
        .unwrap();
        assert_eq!(
            again,
            vec![1u64 << 63; 16],
            "side {side}: empty after clearing, caller's bits kept"
        );
    }
    real.stop().unwrap();
    fake.stop().unwrap();
}

#[test]
fn mock_domain_tracking_off_and_restart() {
    let Some((mut real, mut fake, rig, range)) =
        started_trackers("mock_domain_tracking_off_and_restart")
    else {
        return;
    };
    dirty_both(&mut real, &mut fake, &rig, &[3, 4]);
    real.stop().unwrap();
    fake.stop().unwrap();
    // Tracking off: OP_DIRTY is refused, and GET_DIRTY_BITMAP succeeds with no bits (6.12
    // drops the mock's error), also for bits dirtied before the stop.
    let npages = MAP_BYTES / MOCK_IO_PAGE_SIZE;
    assert_eq!(
        mock_dirty(real.ioctl_mut(), rig.hwpt_id, rig.iova, npages, &[5]).map(|_| ()),
        Err(dmalog_vfio::Errno(libc::EINVAL)),
        "OP_DIRTY with tracking off"
    );
    assert_eq!(
        whole_map_bits(&mut real, &mut fake, &rig),
        [vec![], vec![]],
        "kernel, fake: no bits with tracking off"
    );
    // Enabling again clears what was dirty before.
    real.start(&[range], 4096).unwrap();
    fake.start(&[range], 4096).unwrap();
    assert_eq!(
        whole_map_bits(&mut real, &mut fake, &rig),
        [vec![], vec![]],
        "kernel, fake: enabling cleared stale bits"
    );
}

#[test]
fn mock_domain_errors_are_typed_like_the_fake() {
    let Some((mut real, mut fake, rig, range)) =
        started_trackers("mock_domain_errors_are_typed_like_the_fake")
    else {
        return;
    };
    let base = rig.iova;
    // (name, iova, length, page size, expected errno)
    let rows: &[(&str, u64, u64, u64, i32)] = &[
        (
            "iova not aligned to the IOAS (2 KiB)",
            base + 1024,
            4096,
            4096,
            libc::EINVAL,
        ),
        (
            "length not aligned to the IOAS",
            base,
            4096 + 1024,
            2048,
            libc::EINVAL,
        ),
        (
            "iova not aligned to the page size",
            base + 2048,
            8192,
            4096,
            libc::EINVAL,
        ),
        ("page size 3000", base, 6000 * 2048, 3000, libc::EINVAL),
        ("wraps", u64::MAX - 4095, 8192, 4096, libc::EOVERFLOW),
    ];
    for &(name, iova, length, page_size, errno) in rows {
        let mut bitmap = vec![0u8; 1 << 16];
        let got_real = real
            .report_bytes(iova, length, page_size, &mut bitmap, true)
            .map_err(|e| e.errno());
        let got_fake = fake
            .report_bytes(iova, length, page_size, &mut bitmap, true)
            .map_err(|e| e.errno());
        assert_eq!(got_real, Err(errno), "kernel: {name}");
        assert_eq!(got_fake, got_real, "fake vs kernel: {name}");
    }
    // A HWPT id that does not exist: ENOENT; the mock device's automatic HWPT has no dirty
    // ops: probe says false (EOPNOTSUPP), START is NotSupported.
    let mut wrong = IommufdDirtyTracker::new(
        KernelIoctl::open(std::path::Path::new("/dev/iommu")).unwrap(),
        9999,
    );
    assert_eq!(
        wrong.start(&[range], 4096).map_err(|e| e.errno()),
        Err(libc::ENOENT)
    );
    let mut other = MockDirty::new(1 << 20);
    let mut plain = IommufdDirtyTracker::new(other.iommufd.take().unwrap(), other.plain_hwpt_id);
    assert!(
        !plain.probe().unwrap(),
        "the automatic mock domain has no dirty tracking"
    );
    let err = plain.start(&[range], 4096).unwrap_err();
    // EOPNOTSUPP from the kernel is dmalog's NotSupported (ENOTTY): no dirty tracking here.
    assert_eq!(err.errno(), libc::ENOTTY);
    assert!(err.to_string().contains("no dirty tracking"), "{err}");
}

// ---------------------------------------------------------------------------------------
// mtty

#[test]
fn mtty_logging_and_migration_flags() {
    if !real_kernel("mtty_logging_and_migration_flags") {
        return;
    }
    let mut mtty = bind_mtty(MttyInstance::create(1));
    let dev = &mut mtty.device;
    assert!(
        dev.probe_dma_logging().unwrap(),
        "mtty registers DMA logging ops"
    );
    let range = LoggingRange {
        iova: 0x1000_0000,
        length: 1 << 20,
    };
    assert_eq!(
        dev.start_logging(&[range], 4096).unwrap(),
        4096,
        "the stub keeps the hint"
    );
    let mut bitmap = [0xffu8; 33];
    bitmap[..32].fill(0);
    dev.report_bytes(range.iova, range.length, 4096, &mut bitmap[..32])
        .unwrap();
    assert_eq!(bitmap[..32], [0u8; 32], "mtty never reports a dirty page");
    assert_eq!(bitmap[32], 0xff);
    dev.stop_logging().unwrap();
    let flags = dev.migration_flags().unwrap();
    assert_eq!(
        flags,
        MIGRATION_STOP_COPY | MIGRATION_P2P | MIGRATION_PRE_COPY
    );
    assert_eq!(dev.device_state().unwrap(), DeviceState::Running);
    assert_eq!(dev.mig_data_size().unwrap(), 60, "header 24 + one port 36");
}

#[test]
fn mtty_full_migration_through_the_data_fd() {
    if !real_kernel("mtty_full_migration_through_the_data_fd") {
        return;
    }
    let mut src = bind_mtty(MttyInstance::create(1));
    let mut dst = bind_mtty(MttyInstance::create(1));
    let s = &mut src.device;
    s.set_device_state(DeviceState::PreCopy).unwrap();
    assert_eq!(s.device_state().unwrap(), DeviceState::PreCopy);
    let info = s.precopy_info().unwrap();
    assert_eq!(
        (info.initial_bytes, info.dirty_bytes),
        (24, 0),
        "PRE_COPY holds the header"
    );
    let mut stream = Vec::new();
    let mut chunk = [0u8; 7];
    loop {
        let n = s.read_migration_data(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        stream.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(stream.len(), 24);
    assert_eq!(s.precopy_info().unwrap().initial_bytes, 0, "drained");
    s.set_device_state(DeviceState::PreCopyP2p).unwrap();
    assert_eq!(
        s.precopy_info().unwrap().initial_bytes,
        0,
        "PRECOPY_INFO in PRE_COPY_P2P"
    );
    s.set_device_state(DeviceState::StopCopy).unwrap();
    assert!(
        matches!(s.precopy_info(), Err(VfioError::Kernel { errno, .. }) if errno.0 == libc::EINVAL),
        "PRECOPY_INFO outside PRE_COPY"
    );
    loop {
        let n = s.read_migration_data(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        stream.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(stream.len(), 60, "header and one port");
    assert_eq!(
        u64::from_ne_bytes(stream[..8].try_into().unwrap()),
        0x7e9d09898c3e2c4e,
        "mtty's magic"
    );
    s.set_device_state(DeviceState::Stop).unwrap();
    // Destination: RUNNING -> RESUMING (through STOP), the stream, STOP, RUNNING.
    let d = &mut dst.device;
    d.set_device_state(DeviceState::Resuming).unwrap();
    d.write_migration_data(&stream[..10]).unwrap();
    d.write_migration_data(&stream[10..]).unwrap();
    d.set_device_state(DeviceState::Stop).unwrap();
    d.set_device_state(DeviceState::Running).unwrap();
    assert_eq!(d.device_state().unwrap(), DeviceState::Running);
    // A short stream is refused at RESUMING -> STOP, a bad header at the write.
    d.set_device_state(DeviceState::Resuming).unwrap();
    d.write_migration_data(&stream[..30]).unwrap();
    let err = d.set_device_state(DeviceState::Stop).unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL, "short stream: {err}");
}

#[test]
fn probe_reports_mtty() {
    // What `dmalog probe --try-start` prints, on a real cdev (open_cdev binds it to a fresh
    // iommufd; no IOAS is needed for DEVICE_FEATURE).
    if !real_kernel("probe_reports_mtty") {
        return;
    }
    let instance = MttyInstance::create(2);
    let cdev = instance.cdev();
    let mut bound = dmalog_vfio::probe::open_cdev(&cdev).expect("open_cdev");
    let range = dmalog::IovaRange::new(0x1000_0000, 1 << 20).unwrap();
    let report = dmalog_vfio::probe::probe_device("mtty", &mut bound.device, Some((range, 4096)));
    assert!(report.dma_logging);
    let migration = report.migration.expect("mtty has migration v2");
    assert!(migration.stop_copy && migration.p2p && migration.pre_copy);
    let try_start = report.try_start.expect("try-start ran");
    assert_eq!(try_start.chosen_page_size, Some(4096));
    assert!(try_start.report_ok && try_start.stop_ok, "{try_start:?}");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(
        dmalog_vfio::probe::scan_devices(std::path::Path::new("/dev/vfio/devices"))
            .unwrap()
            .contains(&cdev)
    );
    assert_eq!(
        bound.device.mig_data_size().unwrap(),
        96,
        "header 24 + two ports 36"
    );
}

#[test]
fn mock_domain_bad_bitmap_pointer_loses_bits_silently() {
    // Why IommufdDirtyTracker checks the bitmap length before issuing GET_DIRTY_BITMAP:
    // 6.12 pins the user bitmap only when it sets a bit, and a pin failure drops the bit
    // (iova_bitmap_set returns) while the IOMMU's copy is cleared: the ioctl succeeds and
    // the dirty pages are gone. The fake refuses such a pointer (EFAULT) instead.
    let Some((mut real, mut fake, rig, _)) =
        started_trackers("mock_domain_bad_bitmap_pointer_loses_bits_silently")
    else {
        return;
    };
    dirty_both(&mut real, &mut fake, &rig, &[10, 20]);
    let request = dmalog_vfio::uapi::GetDirtyBitmap {
        size: 48,
        hwpt_id: rig.hwpt_id,
        flags: 0,
        reserved: 0,
        iova: rig.iova,
        length: MAP_BYTES,
        page_size: 2048,
        data: oracle::NOT_USER,
    };
    let mut answers = Vec::new();
    for side in 0..2 {
        let mut arg = request.encode();
        // SAFETY: `data` is a kernel-half address: the kernel's access_ok refuses it before
        // any write (and the fake resolves it in no lent buffer), so nothing is written.
        let result = unsafe {
            on_side!(side, real, fake, |t| dmalog_vfio::VfioIoctl::ioctl(
                t.ioctl_mut(),
                dmalog_vfio::IoctlCall::device(
                    dmalog_vfio::uapi::IOMMU_HWPT_GET_DIRTY_BITMAP,
                    &mut arg,
                ),
            ))
        };
        answers.push(result.map(|_| ()).map_err(|e| e.0));
    }
    assert_eq!(answers, vec![Ok(()), Err(libc::EFAULT)], "kernel, fake");
    let [kernel_bits, fake_bits] = whole_map_bits(&mut real, &mut fake, &rig);
    assert_eq!(
        kernel_bits,
        Vec::<u64>::new(),
        "the kernel cleared the bits it could not report"
    );
    assert_eq!(fake_bits, vec![10, 20], "the fake kept them");
}

#[test]
fn mtty_and_the_fake_walk_the_same_state_machine() {
    // The same MIG_DEVICE_STATE requests to mtty (vfio_mig_get_next_state) and to a fake
    // with the same MIGRATION flags: the same errno and the same state after each.
    if !real_kernel("mtty_and_the_fake_walk_the_same_state_machine") {
        return;
    }
    use DeviceState::*;
    let mut mtty = bind_mtty(MttyInstance::create(1));
    let mut fake = dmalog_vfio::VfioDevice::new(fake_soft_device());
    let targets = [
        RunningP2p, Stop, Running, PreCopy, PreCopyP2p, PreCopy, Running, PreCopyP2p, StopCopy,
        PreCopy, PreCopyP2p, Running, Stop, StopCopy, Running, Error, RunningP2p, StopCopy, Stop,
        Running,
    ];
    for target in targets {
        let real = mtty.device.set_device_state(target).map_err(|e| e.errno());
        let faked = fake.set_device_state(target).map_err(|e| e.errno());
        let real_state = mtty.device.device_state().unwrap();
        let fake_state = fake.device_state().unwrap();
        eprintln!(
            "state: -> {target:?}: kernel {real:?} {real_state:?}, fake {faked:?} {fake_state:?}"
        );
        assert_eq!(faked, real, "errno of -> {target:?}");
        assert_eq!(fake_state, real_state, "state after -> {target:?}");
    }
}
