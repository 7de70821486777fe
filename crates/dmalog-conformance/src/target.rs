//! What the suite runs against: a device reached the way its users reach it.

use dmalog::user_memory::SegmentedUserMemory;
use dmalog::{IovaRange, LogDriver, LoggingCore, WriteRecorder};

/// Which device the factory must build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// A device whose DMA writes are tracked.
    Logging,
    /// A device without DMA logging (every logging feature is ENOTTY).
    NoLogging,
}

/// A device under test, reached the way its users reach it.
pub trait ConformanceTarget {
    /// Sends a vfio-user DEVICE_FEATURE payload (argsz, flags, data); returns the reply's
    /// feature payload or the errno.
    fn feature_vfio_user(&mut self, request: &[u8]) -> Result<Vec<u8>, i32>;

    /// Sends a kernel-dialect feature with pointers into `user`; `None` when the target has
    /// no kernel dialect (a vfio-user server).
    fn feature_kernel(
        &mut self,
        request: &mut [u8],
        user: &mut SegmentedUserMemory,
    ) -> Option<Result<(), i32>>;

    /// Has the device write `[iova, iova+len_bytes)` by DMA (inside `[0, SUITE_SPAN)`).
    fn dma_write(&mut self, iova: u64, len_bytes: u64);

    /// Declares a DMA mapping of `[iova, iova+len_bytes)` (for "log all DMA-mapped space").
    fn dma_map(&mut self, iova: u64, len_bytes: u64);

    /// The vfio-user `max_data_xfer_size` the target negotiated, in bytes.
    fn max_data_xfer_size(&self) -> u64;

    /// Whether mappings made after a "log all" START are tracked (soft: yes; hardware
    /// trackers with fixed ranges: no, and one outside those ranges makes every REPORT
    /// EIO until STOP and a new START).
    fn tracks_mappings_added_after_start(&self) -> bool {
        true
    }
}

/// How a [`CoreTarget`]'s device writes: `(iova, len_bytes)` of a write whose data the
/// writer puts in memory before recording it.
pub type DmaWriter = Box<dyn FnMut(u64, u64)>;

/// A [`ConformanceTarget`] over a logging core in this process; DMA writes go through a
/// [`WriteRecorder`] exactly as a device's would (or through a [`DmaWriter`] of the
/// caller's, such as guest-memory writes that log themselves).
pub struct CoreTarget<D> {
    /// The core under test.
    pub core: LoggingCore<D>,
    writer: Option<DmaWriter>,
    max_data_xfer_size: u64,
    added_after_start: bool,
}

impl<D: LogDriver> CoreTarget<D> {
    /// A target over `core`, recording DMA writes through `recorder` (None: no logging).
    pub fn new(core: LoggingCore<D>, recorder: Option<WriteRecorder>) -> Self {
        let writer = recorder.map(|mut recorder| -> DmaWriter {
            Box::new(move |iova, len_bytes| recorder.record_write(iova, len_bytes))
        });
        Self::with_dma_writer(core, writer)
    }

    /// A target over `core` whose device writes through `writer` (None: no logging).
    pub fn with_dma_writer(core: LoggingCore<D>, writer: Option<DmaWriter>) -> Self {
        CoreTarget {
            core,
            writer,
            max_data_xfer_size: 1 << 20,
            added_after_start: true,
        }
    }

    /// Declares that this driver's ranges are fixed at START: a mapping added after a "log
    /// all" START outside them is not tracked, and REPORT fails with EIO instead.
    pub fn with_fixed_ranges(mut self) -> Self {
        self.added_after_start = false;
        self
    }
}

impl<D: LogDriver> ConformanceTarget for CoreTarget<D> {
    fn feature_vfio_user(&mut self, request: &[u8]) -> Result<Vec<u8>, i32> {
        let mut reply = Vec::new();
        self.core
            .handle_vfio_user(request, self.max_data_xfer_size, &mut reply)
            .map_err(|e| e.errno())?;
        Ok(reply)
    }

    fn feature_kernel(
        &mut self,
        request: &mut [u8],
        user: &mut SegmentedUserMemory,
    ) -> Option<Result<(), i32>> {
        Some(
            self.core
                .handle_kernel(request, user)
                .map_err(|e| e.errno()),
        )
    }

    fn dma_write(&mut self, iova: u64, len_bytes: u64) {
        if let Some(writer) = self.writer.as_mut() {
            writer(iova, len_bytes);
        }
    }

    fn dma_map(&mut self, iova: u64, len_bytes: u64) {
        if let Ok(range) = IovaRange::new(iova, len_bytes) {
            self.core.dma_mapped(range);
        }
    }

    fn max_data_xfer_size(&self) -> u64 {
        self.max_data_xfer_size
    }

    fn tracks_mappings_added_after_start(&self) -> bool {
        self.added_after_start
    }
}

/// The factory of in-process targets over a driver: `new_driver` builds a stopped driver
/// and a recorder of its DMA writes, for [`Variant::Logging`]; [`Variant::NoLogging`] is a
/// core without logging. `fixed_ranges` as in [`CoreTarget::with_fixed_ranges`].
pub fn core_targets<D: LogDriver + 'static>(
    mut new_driver: impl FnMut() -> (D, WriteRecorder),
    fixed_ranges: bool,
) -> impl FnMut(Variant) -> Box<dyn ConformanceTarget> {
    move |variant| match variant {
        Variant::Logging => {
            let (driver, recorder) = new_driver();
            let target = CoreTarget::new(LoggingCore::new(driver), Some(recorder));
            Box::new(if fixed_ranges {
                target.with_fixed_ranges()
            } else {
                target
            })
        }
        Variant::NoLogging => Box::new(CoreTarget::new(LoggingCore::<D>::unsupported(), None)),
    }
}
