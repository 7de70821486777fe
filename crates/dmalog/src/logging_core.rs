//! The logging core: the DMA logging state of a device, validated per SPEC 3.2-3.4, driving
//! a [`LogDriver`] (the kernel's `vfio_main.c` part). DEVICE_FEATURE requests reach it
//! through the one dispatcher, [`crate::feature`], which checks the header (SPEC 3.1).

use std::collections::BTreeMap;

use crate::driver::LogDriver;
use crate::error::{LogError, LogResult};
use crate::feature::{DeviceFeatures, FeatureError, FeatureRequest};
use crate::iova_bitmap::IovaBitmap;
use crate::ranges::{merge_ranges, validate_ranges, IovaRange, DEFAULT_MAX_RANGES};
use crate::uapi::LoggingRange;
use crate::user_memory::UserMemory;
use tracing::{debug, warn};

/// Which form a request arrives in; the rules differ in a few rows of SPEC 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// The kernel ioctl payload (pointers to ranges and bitmap; byte-exact bitmaps; report
    /// pages of at least 4 KiB; START needs at least one range).
    Kernel,
    /// The vfio-user payload (inline ranges and bitmap; u64-word bitmaps; START with no
    /// ranges logs all DMA-mapped space; an identical second START succeeds).
    VfioUser {
        /// The negotiated `max_data_xfer_size`, bounding a REPORT reply.
        max_data_xfer_size: u64,
    },
}

/// Smallest report page size of the kernel dialect.
pub const KERNEL_MIN_REPORT_PAGE: u64 = 4096;

#[derive(Debug, Clone)]
struct Started {
    page_size_hint: u64,
    requested: Vec<LoggingRange>,
    chosen_page_size: u64,
    log_all: bool,
    /// Why the log lost track of a DMA mapping made while logging all DMA-mapped space:
    /// every REPORT fails with EIO until STOP and a new START (SPEC 3.4, 8).
    untracked: Option<&'static str>,
}

/// The DMA logging state of one device and the driver that tracks it.
pub struct LoggingCore<D> {
    driver: Option<D>,
    max_ranges: u32,
    started: Option<Started>,
    /// The DMA mappings (IOVA -> length), O(log n) per map and unmap.
    dma_mappings: BTreeMap<u64, u64>,
}

impl<D> std::fmt::Debug for LoggingCore<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoggingCore")
            .field("supported", &self.driver.is_some())
            .field("max_ranges", &self.max_ranges)
            .field("started", &self.started)
            .finish()
    }
}

impl<D: LogDriver> LoggingCore<D> {
    /// A core for a device whose DMA writes `driver` tracks.
    pub fn new(driver: D) -> Self {
        LoggingCore {
            driver: Some(driver),
            max_ranges: DEFAULT_MAX_RANGES,
            started: None,
            dma_mappings: BTreeMap::new(),
        }
    }

    /// A core for a device without DMA logging: every logging feature is ENOTTY.
    pub fn unsupported() -> Self {
        LoggingCore {
            driver: None,
            max_ranges: DEFAULT_MAX_RANGES,
            started: None,
            dma_mappings: BTreeMap::new(),
        }
    }

    /// Sets the START range limit (E2BIG above it); values below 256 are raised to 256.
    pub fn with_max_ranges(mut self, max_ranges: u32) -> Self {
        self.max_ranges = max_ranges.max(DEFAULT_MAX_RANGES);
        self
    }

    /// The START range limit.
    pub fn max_ranges(&self) -> u32 {
        self.max_ranges
    }

    /// Whether the device supports DMA logging (what PROBE answers).
    pub fn is_supported(&self) -> bool {
        self.driver.is_some()
    }

    /// The chosen page size while started.
    pub fn started_page_size(&self) -> Option<u64> {
        self.started.as_ref().map(|s| s.chosen_page_size)
    }

    /// The driver, for its owner (fault injection, statistics).
    pub fn driver(&self) -> Option<&D> {
        self.driver.as_ref()
    }

    /// The driver, mutably.
    pub fn driver_mut(&mut self) -> Option<&mut D> {
        self.driver.as_mut()
    }

    fn driver_or_enotty(&mut self) -> LogResult<&mut D> {
        self.driver
            .as_mut()
            .ok_or(LogError::NotSupported("device has no DMA logging"))
    }

    /// Records a new DMA mapping (the mapping itself always succeeds). While logging all
    /// DMA-mapped space the driver is asked to cover it too ([`LogDriver::add_range`]);
    /// when it cannot (fixed hardware ranges that do not contain it, the memory budget, any
    /// error) the started log is latched into error: every REPORT fails with EIO until STOP
    /// and a new START, so the consumer resends everything (SPEC 3.4) instead of trusting
    /// a log that misses this mapping's writes.
    pub fn dma_mapped(&mut self, range: IovaRange) {
        self.dma_mappings.insert(range.iova(), range.length());
        self.cover_mapping(range);
    }

    /// Makes a started "log all mapped space" log cover `range` before a DMA mapping of it
    /// becomes reachable by the device, so that no write into the new mapping is marked on
    /// a log that lacks it (and lost). Call it before publishing the mapping to DMA threads,
    /// then [`LoggingCore::dma_mapped`] once the mapping is in place; covering IOVA whose map
    /// then fails only tracks a little more.
    pub fn cover_before_map(&mut self, range: IovaRange) {
        self.cover_mapping(range);
    }

    fn cover_mapping(&mut self, range: IovaRange) {
        let Some(started) = self.started.as_mut().filter(|s| s.log_all) else {
            return;
        };
        let Some(driver) = self.driver.as_mut() else {
            return;
        };
        if started.untracked.is_some() {
            return; // already in error: nothing more to track until STOP
        }
        if let Err(err) = driver.add_range(range) {
            warn!(
                iova = range.iova(),
                length = range.length(),
                %err,
                "DMA mapping made while logging all mapped space is not tracked: REPORT fails with EIO until STOP and a new START"
            );
            started.untracked =
                Some("a DMA mapping made while logging all mapped space is not tracked");
        }
    }

    /// Forgets a DMA mapping (exactly `range`, as mapped). Logged writes of its IOVA stay
    /// in the log (the log is indexed by IOVA, not by mapping).
    pub fn dma_unmapped(&mut self, range: IovaRange) {
        if self.dma_mappings.get(&range.iova()) == Some(&range.length()) {
            self.dma_mappings.remove(&range.iova());
        }
    }

    /// Whether the started log is latched into error because a DMA mapping made while
    /// logging all mapped space is not tracked (every REPORT is EIO until STOP).
    pub fn is_untracked_mapping_latched(&self) -> bool {
        self.started.as_ref().is_some_and(|s| s.untracked.is_some())
    }

    /// Forgets every DMA mapping.
    pub fn dma_unmapped_all(&mut self) {
        self.dma_mappings.clear();
    }

    /// START with typed arguments: validates per SPEC 3.2 and starts the driver. Returns
    /// the chosen page size.
    pub fn start(
        &mut self,
        dialect: Dialect,
        page_size_hint: u64,
        ranges: &[LoggingRange],
    ) -> LogResult<u64> {
        self.driver_or_enotty()?;
        self.check_num_ranges(dialect, ranges.len() as u64)?;
        self.start_requested(dialect, page_size_hint, ranges)
    }

    /// The START range count rules (SPEC 3.2): none is EINVAL in the kernel dialect, more
    /// than the limit E2BIG. Checked before any range is read.
    pub(crate) fn check_num_ranges(&self, dialect: Dialect, num_ranges: u64) -> LogResult<()> {
        if num_ranges == 0 && dialect == Dialect::Kernel {
            return Err(LogError::Invalid("no ranges"));
        }
        if num_ranges > u64::from(self.max_ranges) {
            return Err(LogError::TooManyRanges {
                num_ranges,
                limit: u64::from(self.max_ranges),
            });
        }
        Ok(())
    }

    /// START of `requested` ranges whose count passed [`Self::check_num_ranges`]: validates
    /// them (SPEC 3.2) and starts the driver. Returns the chosen page size.
    pub(crate) fn start_requested(
        &mut self,
        dialect: Dialect,
        page_size_hint: u64,
        requested: &[LoggingRange],
    ) -> LogResult<u64> {
        let validated = validate_ranges(requested.iter().copied(), page_size_hint)?;
        self.start_validated(dialect, page_size_hint, requested, validated)
    }

    fn start_validated(
        &mut self,
        dialect: Dialect,
        page_size_hint: u64,
        requested: &[LoggingRange],
        validated: Vec<IovaRange>,
    ) -> LogResult<u64> {
        if let Some(started) = &self.started {
            if matches!(dialect, Dialect::VfioUser { .. })
                && started.page_size_hint == page_size_hint
                && started.requested == requested
            {
                return Ok(started.chosen_page_size);
            }
            return Err(LogError::Invalid("logging already started"));
        }
        let log_all = validated.is_empty();
        let mut targets = if log_all {
            mapped_targets(&self.dma_mappings)?
        } else {
            validated
        };
        let driver = self
            .driver
            .as_mut()
            .ok_or(LogError::NotSupported("device has no DMA logging"))?;
        if targets.len() > driver.max_ranges() {
            targets = merge_ranges(&targets, driver.max_ranges());
        }
        let mut page_size = page_size_hint;
        driver.start(&targets, &mut page_size)?;
        debug!(
            ranges = targets.len(),
            page_size, log_all, "DMA logging started"
        );
        self.started = Some(Started {
            page_size_hint,
            requested: requested.to_vec(),
            chosen_page_size: page_size,
            log_all,
            untracked: None,
        });
        Ok(page_size)
    }

    /// STOP: always succeeds (also when not started); frees the log.
    pub fn stop(&mut self) -> LogResult<()> {
        let driver = self.driver_or_enotty()?;
        driver.stop();
        if self.started.take().is_some() {
            debug!("DMA logging stopped");
        }
        Ok(())
    }

    /// REPORT with typed arguments into `bitmap` bytes (at least `ceil(bits/8)`; only those
    /// are touched): validates per SPEC 3.4, then ORs the dirty pages in and clears them.
    pub fn report(
        &mut self,
        dialect: Dialect,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u8],
    ) -> LogResult<()> {
        self.driver_or_enotty()?;
        Self::check_report(dialect, iova, length, page_size)?;
        self.report_checked(iova, length, page_size, bitmap)
    }

    /// The REPORT argument rules (SPEC 3.4) that need no state: page size, wrap, length.
    pub(crate) fn check_report(
        dialect: Dialect,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> LogResult<()> {
        let min_page = if dialect == Dialect::Kernel {
            KERNEL_MIN_REPORT_PAGE
        } else {
            1
        };
        if !page_size.is_power_of_two() || page_size < min_page {
            return Err(LogError::Invalid(
                "report page size is not a supported power of two",
            ));
        }
        iova.checked_add(length)
            .ok_or(LogError::Overflow { iova, length })?;
        if length == 0 {
            return Err(LogError::Invalid("zero-length report"));
        }
        Ok(())
    }

    /// Whether logging is started (a REPORT before START is EINVAL).
    pub(crate) fn require_started(&self) -> LogResult<()> {
        match self.started {
            Some(_) => Ok(()),
            None => Err(LogError::Invalid("logging not started")),
        }
    }

    /// REPORT of arguments that passed [`Self::check_report`] into `bitmap` bytes.
    pub(crate) fn report_checked(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u8],
    ) -> LogResult<()> {
        match &self.started {
            None => return Err(LogError::Invalid("logging not started")),
            Some(Started {
                untracked: Some(why),
                ..
            }) => return Err(LogError::TrackerError(why)),
            Some(_) => {}
        }
        let mut bitmap = IovaBitmap::new(iova, length, page_size, bitmap)?;
        let driver = self
            .driver
            .as_mut()
            .ok_or(LogError::NotSupported("device has no DMA logging"))?;
        driver.read_and_clear(iova, length, &mut bitmap)
    }

    /// Handles a DMA logging DEVICE_FEATURE in the vfio-user dialect, for a device that has
    /// no migration features (those are ENOTTY): [`DeviceFeatures::vfio_user`] with this
    /// core alone.
    ///
    /// `request` is the feature payload of the message (argsz, flags, data). On success
    /// `reply` holds the reply's feature payload: the request echoed for SET and PROBE (with
    /// START's chosen page size written in), or for REPORT the 24-byte request followed by
    /// the bitmap as whole u64 words, with `argsz` set to the full size. `reply` is cleared
    /// first and may be reused across calls (no allocation once it is large enough).
    pub fn handle_vfio_user(
        &mut self,
        request: &[u8],
        max_data_xfer_size: u64,
        reply: &mut Vec<u8>,
    ) -> LogResult<()> {
        reply.clear();
        let request = FeatureRequest::vfio_user(request, max_data_xfer_size).map_err(log_error)?;
        DeviceFeatures::logging_only(self)
            .vfio_user(request, reply)
            .map_err(log_error)
    }

    /// Handles a DMA logging DEVICE_FEATURE in the kernel dialect, for a device that has no
    /// migration features: [`DeviceFeatures::kernel`] with this core alone.
    ///
    /// `request` is the user's `struct vfio_device_feature` (header then payload, `argsz`
    /// bytes as the ioctl copies them); START's chosen page size is written back into it.
    /// The ranges and the bitmap are reached through `user` (EFAULT when not there).
    pub fn handle_kernel(
        &mut self,
        request: &mut [u8],
        user: &mut dyn UserMemory,
    ) -> LogResult<()> {
        let request = FeatureRequest::kernel(request).map_err(log_error)?;
        DeviceFeatures::logging_only(self)
            .kernel(request, user)
            .map_err(log_error)
    }
}

/// The logging error of a dispatch without a migration side (the only kind it can fail with).
fn log_error(err: FeatureError) -> LogError {
    match err {
        FeatureError::Logging(err) => err,
        FeatureError::Migration { .. } => LogError::NotSupported("no migration features"),
    }
}

/// The DMA mappings as START targets: sorted by IOVA, overlapping ones (possible only
/// through a caller that does not check overlaps) joined. O(n).
fn mapped_targets(mappings: &BTreeMap<u64, u64>) -> LogResult<Vec<IovaRange>> {
    let mut targets: Vec<IovaRange> = Vec::new();
    targets
        .try_reserve_exact(mappings.len())
        .map_err(|_| LogError::OutOfMemory("START ranges"))?;
    for (&iova, &length) in mappings {
        let range = IovaRange::new(iova, length)?;
        match targets.last_mut() {
            Some(last) if last.overlaps(&range) => {
                *last = IovaRange::new(last.iova(), range.end().max(last.end()) - last.iova())?;
            }
            _ => targets.push(range),
        }
    }
    Ok(targets)
}
