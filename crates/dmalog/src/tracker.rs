//! The consumer side (SPEC 7): one trait for every dirty source a VMM pulls reports from,
//! and its in-process backend over the logging core.

use crate::driver::LogDriver;
use crate::error::LogError;
use crate::iova_bitmap::report_bits;
use crate::logging_core::{Dialect, LoggingCore};
use crate::ranges::IovaRange;
use crate::uapi::{DeviceState, LoggingRange};

/// Why a dirty source failed.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    /// The device (or the logging core) refused the request; carries the errno's meaning.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The caller's bitmap is shorter than the report.
    #[error(
        "bitmap of {have_words} words is shorter than the {need_words} words the report needs"
    )]
    BufferTooSmall {
        /// u64 words the report needs.
        need_words: u64,
        /// u64 words supplied.
        have_words: u64,
    },
    /// The channel to the device failed (socket, ioctl); the log must be treated as lost.
    #[error("transport: {0}")]
    Transport(#[source] std::io::Error),
}

impl TrackerError {
    /// The errno this error stands for (EIO for transport failures).
    pub fn errno(&self) -> i32 {
        match self {
            TrackerError::Log(err) => err.errno(),
            TrackerError::BufferTooSmall { .. } => libc::EINVAL,
            TrackerError::Transport(err) => err.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// What a [`DirtyTracker`] call returns.
pub type TrackerResult<T = ()> = Result<T, TrackerError>;

/// A source of dirty pages: a device tracker reached in-process, over vfio-user, through a
/// kernel ioctl, or the VMM's own CPU-write log.
///
/// Reports OR into a buffer the caller owns and reuses: no allocation per report. Any
/// report error means the log is corrupt: the caller treats the whole range as dirty and
/// restarts tracking (stop, start).
pub trait DirtyTracker {
    /// Whether the source supports DMA logging.
    fn probe(&mut self) -> Result<bool, TrackerError>;

    /// Starts logging `ranges` with a page size hint; returns the chosen page size.
    fn start(&mut self, ranges: &[IovaRange], page_size: u64) -> Result<u64, TrackerError>;

    /// ORs the dirty pages of `range` at `page_size` (bytes) into `bitmap` (bit `k` of the
    /// range is bit `k % 64` of word `k / 64`; `bitmap` needs at least
    /// `ceil(range.len_bytes() / page_size / 64)` words) and clears them from the log.
    fn report(&mut self, range: IovaRange, page_size: u64, bitmap: &mut [u64]) -> TrackerResult;

    /// Stops logging. Succeeds when not started.
    fn stop(&mut self) -> Result<(), TrackerError>;
}

/// Migration data the device still holds, as the device estimates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PendingBytes {
    /// PRE_COPY: initial data not yet read (must be read before STOP_COPY pays off).
    pub initial_bytes: u64,
    /// PRE_COPY: data that changed since it was read; STOP_COPY: all that is left.
    pub dirty_bytes: u64,
}

/// A device whose state migrates (VFIO migration v2), however it is reached: a vfio-user
/// server or a kernel VFIO device. What a migration engine needs besides [`DirtyTracker`].
pub trait MigrationDevice {
    /// The MIGRATION feature flags (`MIGRATION_STOP_COPY`, `_P2P`, `_PRE_COPY`).
    fn migration_flags(&mut self) -> Result<u64, TrackerError>;

    /// The current migration state.
    fn device_state(&mut self) -> Result<DeviceState, TrackerError>;

    /// Moves the device to `state` (through the shortest path of allowed arcs).
    fn set_device_state(&mut self, state: DeviceState) -> Result<(), TrackerError>;

    /// Reads migration data in PRE_COPY or STOP_COPY into `buf`. `Ok(0)` means "nothing
    /// more now" in PRE_COPY and "end of the device state" in STOP_COPY.
    fn read_migration_data(&mut self, buf: &mut [u8]) -> Result<usize, TrackerError>;

    /// Writes all of `data` in RESUMING.
    fn write_migration_data(&mut self, data: &[u8]) -> Result<(), TrackerError>;

    /// What the device still holds, if it can say (PRE_COPY info, STOP_COPY data size).
    fn pending_migration_bytes(&mut self) -> Result<Option<PendingBytes>, TrackerError>;
}

/// The bytes of u64 bitmap words: on a little-endian host, bit `k` of word `k / 64` is bit
/// `k % 8` of byte `k / 8`, the byte layout reports use.
pub fn words_as_bytes(words: &mut [u64]) -> &mut [u8] {
    bytemuck::cast_slice_mut(words)
}

/// u64 words a report of `len_bytes` bytes at `page_size` needs.
pub fn report_words(len_bytes: u64, page_size: u64) -> Result<u64, LogError> {
    Ok(report_bits(len_bytes, page_size)?.div_ceil(64))
}

/// The words a report of `len_bytes` bytes at `page_size` needs, checked against the caller's
/// buffer of `have_words` words ([`TrackerError::BufferTooSmall`] when it is shorter).
pub fn checked_report_words(
    len_bytes: u64,
    page_size: u64,
    have_words: usize,
) -> Result<u64, TrackerError> {
    let need_words = report_words(len_bytes, page_size)?;
    if (have_words as u64) < need_words {
        return Err(TrackerError::BufferTooSmall {
            need_words,
            have_words: have_words as u64,
        });
    }
    Ok(need_words)
}

/// The first bytes of `bitmap` that a report of `len_bytes` bytes at `page_size` fills, or
/// [`TrackerError::BufferTooSmall`] when `bitmap` is shorter than the report needs.
pub fn report_bitmap_bytes(
    len_bytes: u64,
    page_size: u64,
    bitmap: &mut [u64],
) -> Result<&mut [u8], TrackerError> {
    let need_words = checked_report_words(len_bytes, page_size, bitmap.len())?;
    Ok(words_as_bytes(&mut bitmap[..need_words as usize]))
}

/// A [`DirtyTracker`] over a logging core in the same process: a VMM using a soft (or
/// modelled hardware) tracker directly, with every request checked by the core's rules
/// (kernel dialect: at least one range, report pages of at least 4 KiB).
#[derive(Debug)]
pub struct InProcessTracker<D> {
    core: LoggingCore<D>,
    ranges: Vec<LoggingRange>,
}

impl<D: LogDriver> InProcessTracker<D> {
    /// A tracker over `driver`.
    pub fn new(driver: D) -> Self {
        InProcessTracker {
            core: LoggingCore::new(driver),
            ranges: Vec::new(),
        }
    }

    /// A tracker over an existing core.
    pub fn from_core(core: LoggingCore<D>) -> Self {
        InProcessTracker {
            core,
            ranges: Vec::new(),
        }
    }

    /// The logging core.
    pub fn core(&self) -> &LoggingCore<D> {
        &self.core
    }

    /// The logging core, mutably (fault injection, DMA mapping events).
    pub fn core_mut(&mut self) -> &mut LoggingCore<D> {
        &mut self.core
    }
}

impl<D: LogDriver> DirtyTracker for InProcessTracker<D> {
    fn probe(&mut self) -> Result<bool, TrackerError> {
        Ok(self.core.is_supported())
    }

    fn start(&mut self, ranges: &[IovaRange], page_size: u64) -> Result<u64, TrackerError> {
        self.ranges.clear();
        self.ranges
            .extend(ranges.iter().map(|r| LoggingRange::from(*r)));
        Ok(self.core.start(Dialect::Kernel, page_size, &self.ranges)?)
    }

    fn report(&mut self, range: IovaRange, page_size: u64, bitmap: &mut [u64]) -> TrackerResult {
        let bytes = report_bitmap_bytes(range.len_bytes(), page_size, bitmap)?;
        let (iova, length) = (range.iova(), range.len_bytes());
        Ok(self
            .core
            .report(Dialect::Kernel, iova, length, page_size, bytes)?)
    }

    fn stop(&mut self) -> Result<(), TrackerError> {
        Ok(self.core.stop()?)
    }
}
