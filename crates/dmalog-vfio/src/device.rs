//! A VFIO device reached through its kernel file descriptor: DMA logging as a
//! [`DirtyTracker`] and migration v2 as a [`MigrationDevice`].

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use dmalog::error::LogError;
use dmalog::report_split::report_parts;
use dmalog::tracker::checked_report_words;
use dmalog::uapi::{
    feature_request, vfio_device_feature_mig_data_size, vfio_device_feature_migration, DeviceState,
    KernelLoggingControl, KernelLoggingReport, LoggingRange, MigDeviceStatePayload, UapiStruct,
    FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP, FEATURE_GET,
    FEATURE_HEADER_BYTES, FEATURE_MIGRATION, FEATURE_MIG_DATA_SIZE, FEATURE_MIG_DEVICE_STATE,
    FEATURE_PROBE, FEATURE_SET,
};
use dmalog::{DirtyTracker, IovaRange, MigrationDevice, PendingBytes, TrackerError, TrackerResult};
use tracing::debug;

use crate::seam::{Errno, IoctlCall, IoctlTarget, VfioIoctl};
use crate::uapi::{precopy_info, PrecopyInfo, VFIO_DEVICE_FEATURE, VFIO_MIG_GET_PRECOPY_INFO};

/// Why a kernel VFIO request failed.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// ENOTTY on a DMA logging feature: the device (driver) has no DMA logging.
    #[error("no DMA logging on this device")]
    NoDmaLogging,
    /// ENOTTY on a migration feature: the device does not support migration v2.
    #[error("no migration support on this device")]
    NoMigration,
    /// The kernel refused the request.
    #[error("{op}: {errno}")]
    Kernel {
        /// What was asked.
        op: &'static str,
        /// The errno.
        errno: Errno,
    },
    /// Reading or writing the migration data fd failed.
    #[error("migration data fd: {0}")]
    DataFd(#[source] std::io::Error),
    /// The device answered something impossible, or the call does not fit the state.
    #[error("{0}")]
    Protocol(&'static str),
}

impl VfioError {
    /// The errno this error stands for.
    pub fn errno(&self) -> i32 {
        match self {
            VfioError::NoDmaLogging | VfioError::NoMigration => libc::ENOTTY,
            VfioError::Kernel { errno, .. } => errno.0,
            VfioError::DataFd(err) => err.raw_os_error().unwrap_or(libc::EIO),
            VfioError::Protocol(_) => libc::EIO,
        }
    }
}

impl From<VfioError> for TrackerError {
    fn from(err: VfioError) -> Self {
        match err {
            VfioError::NoDmaLogging => {
                LogError::NotSupported("no DMA logging on this device").into()
            }
            VfioError::NoMigration => {
                LogError::NotSupported("no migration support on this device").into()
            }
            VfioError::Kernel { errno, .. } => LogError::from_errno(errno.0).into(),
            VfioError::DataFd(err) => TrackerError::Transport(err),
            VfioError::Protocol(why) => LogError::TrackerError(why).into(),
        }
    }
}

/// A VFIO device (a cdev `/dev/vfio/devices/vfioN` bound to an iommufd, or a device fd a VMM
/// hands over) driven through an ioctl seam.
pub struct VfioDevice<I: VfioIoctl> {
    ioctl: I,
    request: Vec<u8>,
    ranges: Vec<u8>,
    chosen_page_size: Option<u64>,
    report_chunk_bytes: Option<u64>,
    last_state: Option<DeviceState>,
    data_file: Option<File>,
}

impl<I: VfioIoctl> std::fmt::Debug for VfioDevice<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioDevice")
            .field("logging_page_size", &self.chosen_page_size)
            .field("state", &self.last_state)
            .field("data_fd", &self.data_file.as_ref().map(|f| f.as_raw_fd()))
            .finish()
    }
}

fn is_data_state(state: DeviceState) -> bool {
    matches!(
        state,
        DeviceState::PreCopy
            | DeviceState::PreCopyP2p
            | DeviceState::StopCopy
            | DeviceState::Resuming
    )
}

impl<I: VfioIoctl> VfioDevice<I> {
    /// A device behind `ioctl`.
    pub fn new(ioctl: I) -> Self {
        VfioDevice {
            ioctl,
            request: Vec::with_capacity(64),
            ranges: Vec::new(),
            chosen_page_size: None,
            report_chunk_bytes: None,
            last_state: None,
            data_file: None,
        }
    }

    /// Splits REPORTs of more than `max_len_bytes` of IOVA into several ioctls (rounded down
    /// to a multiple of 64 report pages, at least 64, so each part starts on a whole bitmap
    /// word: [`report_parts`]). The kernel takes any size; this bounds the time one ioctl
    /// holds the device's lock.
    pub fn with_report_chunk(mut self, max_len_bytes: u64) -> Self {
        self.report_chunk_bytes = Some(max_len_bytes);
        self
    }

    /// The seam (for tests: the fake device behind it).
    pub fn ioctl(&self) -> &I {
        &self.ioctl
    }

    /// The seam, mutably.
    pub fn ioctl_mut(&mut self) -> &mut I {
        &mut self.ioctl
    }

    /// The page size the device chose at START, while logging.
    pub fn logging_page_size(&self) -> Option<u64> {
        self.chosen_page_size
    }

    /// Issues DEVICE_FEATURE with `flags` and `payload`; the payload the kernel wrote back
    /// replaces `payload`.
    fn feature(
        &mut self,
        op: &'static str,
        flags: u32,
        payload: &mut [u8],
        referenced: &mut [&mut [u8]],
    ) -> Result<(), VfioError> {
        self.request.clear();
        self.request.extend_from_slice(&feature_request(
            (FEATURE_HEADER_BYTES + payload.len()) as u32,
            flags,
            payload,
        ));
        // SAFETY: `self.request` is the whole feature (header and payload, argsz equal to
        // its length); the only pointers in a payload are START's `ranges` and REPORT's
        // `bitmap`, which the callers below point at a buffer they pass in `referenced`, sized
        // for every byte the request touches (`start_logging`: the encoded ranges;
        // `report_bytes`: checked against `report_bytes(length, page_size)`).
        let result = unsafe {
            self.ioctl.ioctl(
                IoctlCall::device(VFIO_DEVICE_FEATURE, &mut self.request).lending(referenced),
            )
        };
        match result {
            Ok(_) => {
                payload.copy_from_slice(&self.request[FEATURE_HEADER_BYTES..]);
                Ok(())
            }
            Err(Errno(libc::ENOTTY)) => Err(match flags & 0xffff {
                FEATURE_DMA_LOGGING_START
                | FEATURE_DMA_LOGGING_STOP
                | FEATURE_DMA_LOGGING_REPORT => VfioError::NoDmaLogging,
                _ => VfioError::NoMigration,
            }),
            Err(errno) => Err(VfioError::Kernel { op, errno }),
        }
    }

    /// Whether the device supports DMA logging (PROBE of START with SET).
    pub fn probe_dma_logging(&mut self) -> Result<bool, VfioError> {
        match self.feature(
            "PROBE DMA_LOGGING_START",
            FEATURE_DMA_LOGGING_START | FEATURE_SET | FEATURE_PROBE,
            &mut [],
            &mut [],
        ) {
            Ok(()) => Ok(true),
            Err(VfioError::NoDmaLogging) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// START with ranges exactly as given (raw [`LoggingRange`]s or checked [`IovaRange`]s;
    /// the kernel checks them); returns the page size the device chose.
    pub fn start_logging<R: Copy + Into<LoggingRange>>(
        &mut self,
        ranges: &[R],
        page_size: u64,
    ) -> Result<u64, VfioError> {
        self.ranges.clear();
        for &range in ranges {
            self.ranges.extend_from_slice(&range.into().encode());
        }
        let control = KernelLoggingControl {
            page_size,
            num_ranges: ranges.len() as u32,
            __reserved: 0,
            ranges: self.ranges.as_ptr() as u64,
        };
        let mut payload = control.encode();
        let mut ranges_buf = std::mem::take(&mut self.ranges);
        let result = self.feature(
            "DMA_LOGGING_START",
            FEATURE_DMA_LOGGING_START | FEATURE_SET,
            &mut payload,
            &mut [&mut ranges_buf],
        );
        self.ranges = ranges_buf;
        result?;
        let chosen = KernelLoggingControl::decode(&payload)
            .map_err(|_| VfioError::Protocol("short START reply"))?
            .page_size;
        if !chosen.is_power_of_two() {
            return Err(VfioError::Protocol(
                "device chose a page size that is not a power of two",
            ));
        }
        debug!(chosen, ranges = ranges.len(), "kernel DMA logging started");
        self.chosen_page_size = Some(chosen);
        Ok(chosen)
    }

    /// REPORT of `[iova, iova + len_bytes)` into `bitmap` bytes, one ioctl, with the values
    /// exactly as given (the kernel checks them: a wrapping range is its EOVERFLOW). The
    /// kernel writes `ceil(len_bytes / page_size / 8)` bytes through the pointer; a shorter
    /// `bitmap` is refused (EFAULT, as the kernel answers for memory that is not there), and
    /// a zero length or a page size that is not a power of two (EINVAL), before anything is
    /// issued.
    pub fn report_bytes(
        &mut self,
        iova: u64,
        len_bytes: u64,
        page_size: u64,
        bitmap: &mut [u8],
    ) -> Result<(), VfioError> {
        check_bitmap_len(len_bytes, page_size, bitmap.len()).map_err(|errno| {
            VfioError::Kernel {
                op: "DMA_LOGGING_REPORT",
                errno,
            }
        })?;
        let report = KernelLoggingReport {
            iova,
            length: len_bytes,
            page_size,
            bitmap: bitmap.as_mut_ptr() as u64,
        };
        let mut payload = report.encode();
        self.feature(
            "DMA_LOGGING_REPORT",
            FEATURE_DMA_LOGGING_REPORT | FEATURE_GET,
            &mut payload,
            &mut [bitmap],
        )
    }

    /// STOP (succeeds when not started).
    pub fn stop_logging(&mut self) -> Result<(), VfioError> {
        self.chosen_page_size = None;
        self.feature(
            "DMA_LOGGING_STOP",
            FEATURE_DMA_LOGGING_STOP | FEATURE_SET,
            &mut [],
            &mut [],
        )
    }

    /// GET of feature `index` whose payload is one `T` (sent zeroed).
    fn get_feature<T: UapiStruct + Default>(
        &mut self,
        op: &'static str,
        index: u32,
    ) -> Result<T, VfioError> {
        let mut payload = T::default().encode();
        self.feature(op, index | FEATURE_GET, payload.as_mut(), &mut [])?;
        T::decode(payload.as_ref()).map_err(|_| VfioError::Protocol("short feature reply"))
    }

    /// The MIGRATION feature flags.
    pub fn migration_flags(&mut self) -> Result<u64, VfioError> {
        let reply: vfio_device_feature_migration =
            self.get_feature("MIGRATION", FEATURE_MIGRATION)?;
        Ok(reply.flags)
    }

    /// The current migration state.
    pub fn device_state(&mut self) -> Result<DeviceState, VfioError> {
        let mut payload = MigDeviceStatePayload {
            device_state: 0,
            data_fd: -1,
        }
        .encode();
        self.feature(
            "MIG_DEVICE_STATE GET",
            FEATURE_MIG_DEVICE_STATE | FEATURE_GET,
            &mut payload,
            &mut [],
        )?;
        let state = MigDeviceStatePayload::decode(&payload)
            .map_err(|_| VfioError::Protocol("short state reply"))?;
        let state = DeviceState::from_u32(state.device_state)
            .ok_or(VfioError::Protocol("unknown device state"))?;
        self.last_state = Some(state);
        Ok(state)
    }

    /// Moves the device to `state`; keeps the data fd the kernel returns for saving and
    /// resuming states, and closes it when the device leaves them.
    pub fn set_device_state(&mut self, state: DeviceState) -> Result<(), VfioError> {
        let mut payload = MigDeviceStatePayload {
            device_state: state as u32,
            data_fd: -1,
        }
        .encode();
        self.feature(
            "MIG_DEVICE_STATE SET",
            FEATURE_MIG_DEVICE_STATE | FEATURE_SET,
            &mut payload,
            &mut [],
        )?;
        let reply = MigDeviceStatePayload::decode(&payload)
            .map_err(|_| VfioError::Protocol("short state reply"))?;
        if reply.data_fd >= 0 {
            // SAFETY: on success the kernel installed `data_fd` in our fd table for us
            // alone (VFIO returns a new anon-inode file per transition into a saving or
            // resuming state); nothing else owns or will close it.
            let fd = unsafe { OwnedFd::from_raw_fd(reply.data_fd) };
            self.data_file = Some(File::from(fd));
        } else if !is_data_state(state) {
            self.data_file = None;
        }
        self.last_state = Some(state);
        Ok(())
    }

    /// Reads migration data; ENOMSG (PRE_COPY has nothing more now) and end of file are 0.
    pub fn read_migration_data(&mut self, buf: &mut [u8]) -> Result<usize, VfioError> {
        let file = self.data_file.as_mut().ok_or(VfioError::Protocol(
            "no migration data fd: the device is not saving",
        ))?;
        loop {
            match file.read(buf) {
                Ok(n) => return Ok(n),
                Err(err) if err.raw_os_error() == Some(libc::ENOMSG) => return Ok(0),
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(VfioError::DataFd(err)),
            }
        }
    }

    /// Writes migration data in RESUMING.
    pub fn write_migration_data(&mut self, data: &[u8]) -> Result<(), VfioError> {
        let file = self.data_file.as_mut().ok_or(VfioError::Protocol(
            "no migration data fd: the device is not resuming",
        ))?;
        file.write_all(data).map_err(VfioError::DataFd)
    }

    /// `VFIO_MIG_GET_PRECOPY_INFO` on the data fd (PRE_COPY only).
    pub fn precopy_info(&mut self) -> Result<PrecopyInfo, VfioError> {
        let fd = self
            .data_file
            .as_ref()
            .ok_or(VfioError::Protocol("no migration data fd"))?
            .as_raw_fd();
        let mut arg = precopy_info(0, 0).encode();
        // SAFETY: PRECOPY_INFO is a plain in/out structure (`arg`, its argsz the buffer's
        // length) with no embedded pointers; `fd` stays open, owned by `self.data_file`.
        unsafe {
            self.ioctl.ioctl(
                IoctlCall::device(VFIO_MIG_GET_PRECOPY_INFO, &mut arg).to(IoctlTarget::DataFd(fd)),
            )
        }
        .map_err(|errno| VfioError::Kernel {
            op: "VFIO_MIG_GET_PRECOPY_INFO",
            errno,
        })?;
        PrecopyInfo::decode(&arg).map_err(|_| VfioError::Protocol("short PRECOPY_INFO reply"))
    }

    /// MIG_DATA_SIZE: the device's estimate of its STOP_COPY data, in bytes.
    pub fn mig_data_size(&mut self) -> Result<u64, VfioError> {
        let reply: vfio_device_feature_mig_data_size =
            self.get_feature("MIG_DATA_SIZE", FEATURE_MIG_DATA_SIZE)?;
        Ok(reply.stop_copy_length)
    }
}

/// Checks that a bitmap of `bitmap_len_bytes` holds every byte a kernel report of
/// `len_bytes` at `page_size` writes (`ceil(bits / 8)`); EINVAL for a report the kernel
/// would refuse anyway (so the size cannot be computed), EFAULT for a short buffer.
pub(crate) fn check_bitmap_len(
    len_bytes: u64,
    page_size: u64,
    bitmap_len_bytes: usize,
) -> Result<(), Errno> {
    let needed = dmalog::iova_bitmap::report_bytes(len_bytes, page_size)
        .map_err(|err| Errno(err.errno()))?;
    if (bitmap_len_bytes as u64) < needed {
        return Err(Errno(libc::EFAULT));
    }
    Ok(())
}

impl<I: VfioIoctl> DirtyTracker for VfioDevice<I> {
    fn probe(&mut self) -> Result<bool, TrackerError> {
        Ok(self.probe_dma_logging()?)
    }

    fn start(&mut self, ranges: &[IovaRange], page_size: u64) -> Result<u64, TrackerError> {
        Ok(self.start_logging(ranges, page_size)?)
    }

    fn report(&mut self, range: IovaRange, page_size: u64, bitmap: &mut [u64]) -> TrackerResult {
        checked_report_words(range.length(), page_size, bitmap.len())?;
        for part in report_parts(range, page_size, self.report_chunk_bytes)? {
            let (iova, len_bytes) = (part.range.iova(), part.range.length());
            self.report_bytes(iova, len_bytes, page_size, part.bytes_of(bitmap))?;
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), TrackerError> {
        Ok(self.stop_logging()?)
    }
}

impl<I: VfioIoctl> MigrationDevice for VfioDevice<I> {
    fn migration_flags(&mut self) -> Result<u64, TrackerError> {
        Ok(VfioDevice::migration_flags(self)?)
    }

    fn device_state(&mut self) -> Result<DeviceState, TrackerError> {
        Ok(VfioDevice::device_state(self)?)
    }

    fn set_device_state(&mut self, state: DeviceState) -> Result<(), TrackerError> {
        Ok(VfioDevice::set_device_state(self, state)?)
    }

    fn read_migration_data(&mut self, buf: &mut [u8]) -> Result<usize, TrackerError> {
        Ok(VfioDevice::read_migration_data(self, buf)?)
    }

    fn write_migration_data(&mut self, data: &[u8]) -> Result<(), TrackerError> {
        Ok(VfioDevice::write_migration_data(self, data)?)
    }

    fn pending_migration_bytes(&mut self) -> Result<Option<PendingBytes>, TrackerError> {
        let result = match self.last_state {
            Some(DeviceState::PreCopy | DeviceState::PreCopyP2p) => {
                self.precopy_info().map(|info| PendingBytes {
                    initial_bytes: info.initial_bytes,
                    dirty_bytes: info.dirty_bytes,
                })
            }
            _ => self.mig_data_size().map(|bytes| PendingBytes {
                initial_bytes: 0,
                dirty_bytes: bytes,
            }),
        };
        match result {
            Ok(pending) => Ok(Some(pending)),
            Err(err) if err.errno() == libc::ENOTTY => Ok(None),
            Err(err) => Err(err.into()),
        }
    }
}
