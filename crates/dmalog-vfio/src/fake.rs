//! Test implementations of the ioctl seam: a VFIO device and an iommufd HWPT served from
//! dmalog's own kernel-dialect logic, in this process.
//!
//! - [`FakeVfioDevice`]: DMA logging features go to a [`LoggingCore`] in the kernel dialect
//!   (pointers resolved inside the buffers the request lends, so every byte the consumer puts
//!   in a request is checked by the kernel's rules); migration v2 with a real data fd (a
//!   memfd), PRE_COPY info and MIG_DATA_SIZE, following the kernel's state arcs.
//! - [`FakeIommu`]: `IOMMU_HWPT_SET_DIRTY_TRACKING` and `IOMMU_HWPT_GET_DIRTY_BITMAP` with
//!   the kernel's checks, in order, over a [`DirtyLog`].

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::IntoRawFd;

use dmalog::feature::{DeviceFeatures, FeatureError, FeatureRequest, MigrationFeatures};
use dmalog::uapi::{DeviceState, UapiStruct};
use dmalog::{DirtyLog, IovaBitmap, IovaRange, LogDriver, LoggingCore};

use crate::seam::{BorrowedUserMemory, Errno, IoctlCall, IoctlTarget, VfioIoctl};
use crate::uapi::{
    precopy_info, GetDirtyBitmap, SetDirtyTracking, GET_DIRTY_BITMAP_BYTES,
    IOMMU_HWPT_DIRTY_TRACKING_ENABLE, IOMMU_HWPT_GET_DIRTY_BITMAP,
    IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR, IOMMU_HWPT_SET_DIRTY_TRACKING, PRECOPY_INFO_BYTES,
    SET_DIRTY_TRACKING_BYTES, VFIO_DEVICE_FEATURE, VFIO_MIG_GET_PRECOPY_INFO,
};

fn errno(err: dmalog::LogError) -> Errno {
    Errno(err.errno())
}

/// The migration side of a fake device: a state machine with the kernel's arcs and a device
/// state made of `initial` (sent in PRE_COPY) and `final_part` (sent in STOP_COPY).
#[derive(Debug)]
pub struct FakeMigration {
    state: DeviceState,
    flags: u64,
    initial: Vec<u8>,
    final_part: Vec<u8>,
    file: Option<File>,
    /// What a RESUMING device received, once it moved on to STOP.
    pub loaded: Option<Vec<u8>>,
    /// The arcs taken, in order (for tests of shortest paths).
    pub arcs: Vec<(DeviceState, DeviceState)>,
}

impl FakeMigration {
    /// A RUNNING device with MIGRATION `flags` whose state is `initial` then `final_part`.
    pub fn new(flags: u64, initial: Vec<u8>, final_part: Vec<u8>) -> Self {
        FakeMigration {
            state: DeviceState::Running,
            flags,
            initial,
            final_part,
            file: None,
            loaded: None,
            arcs: Vec::new(),
        }
    }

    /// The current state.
    pub fn state(&self) -> DeviceState {
        self.state
    }

    /// The whole device state a destination must receive.
    pub fn image(&self) -> Vec<u8> {
        [self.initial.as_slice(), self.final_part.as_slice()].concat()
    }

    fn new_data_file(&mut self, contents: &[u8]) -> Result<i32, Errno> {
        let fd = rustix::fs::memfd_create("dmalog-fake-migration", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| Errno(e.raw_os_error()))?;
        let mut file = File::from(fd);
        file.write_all(contents).map_err(|_| Errno(libc::EIO))?;
        file.seek(SeekFrom::Start(0))
            .map_err(|_| Errno(libc::EIO))?;
        let for_user = file.try_clone().map_err(|_| Errno(libc::EMFILE))?;
        self.file = Some(file);
        Ok(for_user.into_raw_fd())
    }

    /// Carries out one arc; returns a new data fd for the user when the arc creates one.
    fn step(&mut self, from: DeviceState, to: DeviceState) -> Result<Option<i32>, Errno> {
        use DeviceState::*;
        let fd = match (from, to) {
            (Running, PreCopy) | (RunningP2p, PreCopyP2p) => {
                Some(self.new_data_file(&self.initial.clone())?)
            }
            (Stop, StopCopy) => Some(self.new_data_file(&self.image())?),
            (Stop, Resuming) => Some(self.new_data_file(&[])?),
            (PreCopy | PreCopyP2p, StopCopy) => {
                let file = self.file.as_mut().ok_or(Errno(libc::EIO))?;
                let at = file.stream_position().map_err(|_| Errno(libc::EIO))?;
                file.seek(SeekFrom::End(0)).map_err(|_| Errno(libc::EIO))?;
                file.write_all(&self.final_part)
                    .map_err(|_| Errno(libc::EIO))?;
                file.seek(SeekFrom::Start(at))
                    .map_err(|_| Errno(libc::EIO))?;
                None
            }
            (Resuming, Stop) => {
                let mut file = self.file.take().ok_or(Errno(libc::EIO))?;
                let mut loaded = Vec::new();
                file.seek(SeekFrom::Start(0))
                    .map_err(|_| Errno(libc::EIO))?;
                file.read_to_end(&mut loaded)
                    .map_err(|_| Errno(libc::EIO))?;
                let complete = loaded == self.image();
                self.loaded = Some(loaded);
                if !complete {
                    return Err(Errno(libc::EINVAL)); // invalid or incomplete state data
                }
                None
            }
            (StopCopy, Stop) | (PreCopy, Running) | (PreCopyP2p, RunningP2p) => {
                self.file = None;
                None
            }
            _ => None,
        };
        self.arcs.push((from, to));
        self.state = to;
        Ok(fd)
    }

    fn transition(&mut self, target: DeviceState) -> Result<i32, Errno> {
        if self.flags & dmalog::uapi::MIGRATION_PRE_COPY == 0
            && matches!(target, DeviceState::PreCopy | DeviceState::PreCopyP2p)
        {
            return Err(Errno(libc::EINVAL));
        }
        let path = if self.flags & dmalog::uapi::MIGRATION_P2P != 0 {
            p2p_path(self.state, target)?
        } else {
            dmalog::migration::migration_path(self.state, target).map_err(errno)?
        };
        let mut data_fd = -1;
        for pair in path.windows(2) {
            if let Some(fd) = self.step(pair[0], pair[1])? {
                data_fd = fd;
            }
        }
        Ok(data_fd)
    }

    fn remaining_bytes(&mut self) -> u64 {
        let read = self
            .file
            .as_mut()
            .and_then(|f| f.stream_position().ok())
            .unwrap_or(0);
        (self.initial.len() + self.final_part.len()) as u64
            - read.min((self.initial.len() + self.final_part.len()) as u64)
    }
}

/// The kernel's next-step table (`vfio_mig_get_next_state`, Linux 6.12), indexed by
/// `[from][to]` state numbers: ERROR 0, STOP 1, RUNNING 2, STOP_COPY 3, RESUMING 4,
/// RUNNING_P2P 5, PRE_COPY 6, PRE_COPY_P2P 7.
const KERNEL_NEXT_STATE: [[u32; 8]; 8] = [
    [0, 0, 0, 0, 0, 0, 0, 0],
    [0, 1, 5, 3, 4, 5, 5, 5],
    [0, 5, 2, 5, 5, 5, 6, 5],
    [0, 1, 1, 3, 1, 1, 0, 0],
    [0, 1, 1, 1, 4, 1, 1, 1],
    [0, 1, 2, 1, 1, 5, 2, 7],
    [0, 2, 2, 7, 2, 2, 6, 7],
    [0, 5, 5, 3, 5, 5, 6, 7],
];

/// The states from `from` to `to` the kernel walks for a device with STOP_COPY, P2P and
/// PRE_COPY (dmalog's own `migration_path` has no P2P states). ERROR on the way: EINVAL.
fn p2p_path(from: DeviceState, to: DeviceState) -> Result<Vec<DeviceState>, Errno> {
    if from == DeviceState::Error || to == DeviceState::Error {
        return Err(Errno(libc::EINVAL));
    }
    let mut path = vec![from];
    let mut at = from;
    while at != to {
        let next = KERNEL_NEXT_STATE[at as usize][to as usize];
        at = DeviceState::from_u32(next).ok_or(Errno(libc::EINVAL))?;
        if at == DeviceState::Error {
            return Err(Errno(libc::EINVAL));
        }
        path.push(at);
    }
    Ok(path)
}

/// A VFIO device served in process: DMA logging through a kernel-dialect [`LoggingCore`],
/// migration through an optional [`FakeMigration`].
pub struct FakeVfioDevice<D> {
    /// The logging core (kernel dialect).
    pub core: LoggingCore<D>,
    /// Migration support (None: the migration features are ENOTTY).
    pub migration: Option<FakeMigration>,
}

impl<D: LogDriver> FakeVfioDevice<D> {
    /// A fake device over `core`, with or without migration.
    pub fn new(core: LoggingCore<D>, migration: Option<FakeMigration>) -> Self {
        FakeVfioDevice { core, migration }
    }

    /// VFIO_DEVICE_FEATURE through the core's dispatcher: logging to the core, migration
    /// to the [`FakeMigration`] (ENOTTY without one).
    fn feature(&mut self, arg: &mut [u8], referenced: &mut [&mut [u8]]) -> Result<i32, Errno> {
        let request = FeatureRequest::kernel(arg).map_err(feature_errno)?;
        let mut user = BorrowedUserMemory::new(referenced);
        let mut features = DeviceFeatures {
            logging: &mut self.core,
            migration: self
                .migration
                .as_mut()
                .map(|m| m as &mut dyn MigrationFeatures),
        };
        features.kernel(request, &mut user).map_err(feature_errno)?;
        Ok(0)
    }
}

fn feature_errno(err: FeatureError) -> Errno {
    Errno(err.errno())
}

impl MigrationFeatures for FakeMigration {
    fn migration_flags(&self) -> u64 {
        self.flags
    }

    fn device_state(&self) -> DeviceState {
        self.state
    }

    fn set_device_state(&mut self, target: DeviceState) -> Result<i32, FeatureError> {
        self.transition(target)
            .map_err(|Errno(errno)| FeatureError::migration(errno, "migration arc refused"))
    }

    fn has_data_size(&self) -> bool {
        true
    }

    fn data_size(&mut self) -> Result<u64, FeatureError> {
        Ok(self.remaining_bytes())
    }
}

// SAFETY: every pointer in a request is resolved inside `lent` only
// (`BorrowedUserMemory`), and the data fds it reports are memfds it created for the caller.
unsafe impl<D: LogDriver> VfioIoctl for FakeVfioDevice<D> {
    unsafe fn ioctl(&mut self, call: IoctlCall<'_, '_>) -> Result<i32, Errno> {
        match (call.target, call.nr) {
            (IoctlTarget::Device, VFIO_DEVICE_FEATURE) => self.feature(call.arg, call.lent),
            (IoctlTarget::DataFd(_), VFIO_MIG_GET_PRECOPY_INFO) => self.precopy_info(call.arg),
            _ => Err(Errno(libc::ENOTTY)),
        }
    }
}

impl<D: LogDriver> FakeVfioDevice<D> {
    /// `VFIO_MIG_GET_PRECOPY_INFO` on the data fd.
    fn precopy_info(&mut self, arg: &mut [u8]) -> Result<i32, Errno> {
        let migration = self.migration.as_mut().ok_or(Errno(libc::ENOTTY))?;
        // PRE_COPY and PRE_COPY_P2P both answer (as mtty and the uAPI do).
        if arg.len() < PRECOPY_INFO_BYTES
            || !matches!(
                migration.state,
                DeviceState::PreCopy | DeviceState::PreCopyP2p
            )
        {
            return Err(Errno(libc::EINVAL));
        }
        let read = migration
            .file
            .as_mut()
            .and_then(|f| f.stream_position().ok())
            .unwrap_or(0);
        let info = precopy_info((migration.initial.len() as u64).saturating_sub(read), 0);
        arg[..PRECOPY_INFO_BYTES].copy_from_slice(&info.encode());
        Ok(0)
    }
}

/// An iommufd HWPT with dirty tracking over one IO address space, at 4 KiB IOMMU pages.
pub struct FakeIommu {
    hwpt_id: u32,
    io_page: u64,
    dirty_capable: bool,
    tracking: bool,
    log: DirtyLog,
}

/// The IOMMU page (and IOVA alignment) of [`FakeIommu`].
pub const FAKE_IOMMU_PAGE: u64 = 4096;

impl FakeIommu {
    /// HWPT `hwpt_id` over the IO address space `ioas`; `dirty_capable == false` models an
    /// IOMMU without dirty tracking (EOPNOTSUPP).
    ///
    /// # Panics
    ///
    /// If `ioas` is not aligned to [`FAKE_IOMMU_PAGE`] (a test's own mistake).
    pub fn new(hwpt_id: u32, ioas: IovaRange, dirty_capable: bool) -> Self {
        Self::with_io_page(hwpt_id, ioas, FAKE_IOMMU_PAGE, dirty_capable)
    }

    /// Like [`FakeIommu::new`] with IO pages (and IOVA alignment) of `io_page_size` bytes:
    /// the iommufd self-test mock domain has 2 KiB pages.
    ///
    /// # Panics
    ///
    /// If `io_page_size` is not a power of two or `ioas` is not aligned to it.
    pub fn with_io_page(
        hwpt_id: u32,
        ioas: IovaRange,
        io_page_size: u64,
        dirty_capable: bool,
    ) -> Self {
        let log =
            DirtyLog::new(ioas.iova(), ioas.length(), io_page_size).expect("fake IOAS geometry");
        FakeIommu {
            hwpt_id,
            io_page: io_page_size,
            dirty_capable,
            tracking: false,
            log,
        }
    }

    /// A DMA write of `len_bytes` at `iova` by an attached device: the IOMMU marks it while
    /// tracking is on.
    pub fn dma_write(&self, iova: u64, len_bytes: u64) {
        if self.tracking {
            self.log.record_write(iova, len_bytes);
        }
    }

    /// Whether tracking is on.
    pub fn tracking(&self) -> bool {
        self.tracking
    }

    /// After the flag checks, as iommufd: ENOENT for another object, EOPNOTSUPP for a HWPT
    /// without dirty tracking.
    fn check_hwpt(&self, hwpt_id: u32) -> Result<(), Errno> {
        if hwpt_id != self.hwpt_id {
            return Err(Errno(libc::ENOENT));
        }
        if !self.dirty_capable {
            return Err(Errno(libc::EOPNOTSUPP));
        }
        Ok(())
    }

    fn set_dirty_tracking(&mut self, arg: &[u8]) -> Result<i32, Errno> {
        let request = SetDirtyTracking::decode(arg).map_err(|_| Errno(libc::EFAULT))?;
        if (request.size as usize) < SET_DIRTY_TRACKING_BYTES {
            return Err(Errno(libc::EINVAL));
        }
        if request.flags & !IOMMU_HWPT_DIRTY_TRACKING_ENABLE != 0 || request.reserved != 0 {
            return Err(Errno(libc::EOPNOTSUPP));
        }
        self.check_hwpt(request.hwpt_id)?;
        let enable = request.flags & IOMMU_HWPT_DIRTY_TRACKING_ENABLE != 0;
        if enable {
            // A clean snapshot: enabling clears every stale dirty bit first.
            self.log
                .drain_pages(self.log.base_iova(), self.log.length(), |_| {});
        }
        self.tracking = enable;
        Ok(0)
    }

    fn get_dirty_bitmap(&mut self, arg: &[u8], referenced: &mut [&mut [u8]]) -> Result<i32, Errno> {
        let request = GetDirtyBitmap::decode(arg).map_err(|_| Errno(libc::EFAULT))?;
        if (request.size as usize) < GET_DIRTY_BITMAP_BYTES {
            return Err(Errno(libc::EINVAL));
        }
        if request.flags & !IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR != 0 || request.reserved != 0 {
            return Err(Errno(libc::EOPNOTSUPP));
        }
        self.check_hwpt(request.hwpt_id)?;
        // iommufd_check_iova_range, in order.
        let last = request
            .iova
            .checked_add(request.length.wrapping_sub(1))
            .filter(|_| request.length != 0);
        let last = match last {
            Some(last) => last,
            None if request.length == 0 => return Err(Errno(libc::EINVAL)),
            None => return Err(Errno(libc::EOVERFLOW)),
        };
        let end = last.wrapping_add(1);
        if request.iova % self.io_page != 0 || end % self.io_page != 0 {
            return Err(Errno(libc::EINVAL));
        }
        if request.page_size == 0 || !request.page_size.is_power_of_two() {
            return Err(Errno(libc::EINVAL));
        }
        if request.iova % request.page_size != 0 || end % request.page_size != 0 {
            return Err(Errno(libc::EINVAL));
        }
        if !self.tracking {
            // 6.12 drops the domain's "tracking off" error: success, no bit set, the user
            // bitmap untouched (and the stale bits are cleared by the next enable).
            return Ok(0);
        }
        let bytes =
            dmalog::iova_bitmap::report_bytes(request.length, request.page_size).map_err(errno)?;
        let mut user = BorrowedUserMemory::new(referenced);
        let buffer = dmalog::user_memory::UserMemory::bytes_mut(&mut user, request.data, bytes)
            .map_err(errno)?;
        let mut bitmap = IovaBitmap::new(request.iova, request.length, request.page_size, buffer)
            .map_err(errno)?;
        if request.flags & IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR != 0 {
            self.log.read(request.iova, request.length, &mut bitmap);
        } else {
            self.log
                .read_and_clear(request.iova, request.length, &mut bitmap);
        }
        Ok(0)
    }
}

// SAFETY: the bitmap pointer is resolved inside `lent` only, and no fd is returned.
unsafe impl VfioIoctl for FakeIommu {
    unsafe fn ioctl(&mut self, call: IoctlCall<'_, '_>) -> Result<i32, Errno> {
        match (call.target, call.nr) {
            (IoctlTarget::Device, IOMMU_HWPT_SET_DIRTY_TRACKING) => {
                self.set_dirty_tracking(call.arg)
            }
            (IoctlTarget::Device, IOMMU_HWPT_GET_DIRTY_BITMAP) => {
                self.get_dirty_bitmap(call.arg, call.lent)
            }
            _ => Err(Errno(libc::ENOTTY)),
        }
    }
}
