//! The report workloads: sparse and dense logs, and every tracker through `LogDriver`.

use super::*;

/// A sparse report: 1 TiB tracked at 4 KiB, `dirty_pages` dirty pages spread over it.
pub struct SparseReport {
    /// Ours.
    pub ours: DirtyLog,
    /// vm-memory.
    pub vm_memory: AtomicBitmap,
    pages: Vec<u64>,
    output: Vec<u8>,
}

impl SparseReport {
    /// The workload.
    pub fn new(dirty_pages: usize) -> Self {
        let span = TIB;
        let npages = span / PAGE;
        let mut rng = 99u64;
        let pages = (0..dirty_pages)
            .map(|_| next_random(&mut rng) % npages)
            .collect();
        SparseReport {
            ours: DirtyLog::new(0, span, PAGE).expect("1 TiB log"),
            vm_memory: AtomicBitmap::new(
                span as usize,
                NonZeroUsize::new(PAGE as usize).expect("page"),
            ),
            pages,
            output: vec![0u8; (npages / 8) as usize],
        }
    }

    /// Dirties the pages on both logs and clears the output bytes the last report set (as a
    /// consumer does with the words it has consumed). Untimed.
    pub fn prepare(&mut self) {
        for &page in &self.pages {
            self.output[(page / 8) as usize] = 0;
            self.ours.mark(page * PAGE, 1);
            self.vm_memory.set_addr_range((page * PAGE) as usize, 1);
        }
    }

    /// Our report of the whole 1 TiB into the reused output.
    pub fn ours(&mut self) {
        let mut bitmap = IovaBitmap::new(0, TIB, PAGE, &mut self.output).expect("bitmap");
        self.ours.read_and_clear(0, TIB, &mut bitmap);
    }

    /// vm-memory's `get_and_reset` of the whole bitmap.
    pub fn vm_memory(&mut self) {
        black_box(self.vm_memory.get_and_reset());
    }

    /// Dirty pages found in the output (checks the workload is real).
    pub fn reported_pages(&self) -> u64 {
        self.output.iter().map(|b| u64::from(b.count_ones())).sum()
    }
}

/// Dense reports over `span` bytes, every page dirty.
pub struct DenseReport {
    /// Bytes tracked.
    pub span: u64,
    /// Ours at 4 KiB.
    pub ours: DirtyLog,
    /// Ours at 2 MiB (for the conversion to 4 KiB reports).
    pub ours_2m: DirtyLog,
    /// vm-memory.
    pub vm_memory: AtomicBitmap,
    /// libvfio-user-like.
    pub byte_atomic: ByteAtomicLog,
    /// Per-bit loop.
    pub naive: NaiveBitLog,
    /// Output of a 4 KiB report.
    pub output: Vec<u8>,
    /// Output of a 2 MiB report.
    pub output_2m: Vec<u8>,
    source: Vec<u8>,
}

impl DenseReport {
    /// The workload (64 GiB in the target; smaller for quick checks).
    pub fn new(span: u64) -> Self {
        let bytes = (span / PAGE / 8) as usize;
        DenseReport {
            span,
            ours: DirtyLog::new(0, span, PAGE).expect("log"),
            ours_2m: DirtyLog::new(0, span, 2 * MIB).expect("log"),
            vm_memory: AtomicBitmap::new(
                span as usize,
                NonZeroUsize::new(PAGE as usize).expect("page"),
            ),
            byte_atomic: ByteAtomicLog::new(span, PAGE),
            naive: NaiveBitLog::new(span, PAGE),
            output: vec![0u8; bytes],
            output_2m: vec![0u8; bytes.div_ceil(512).max(8)],
            source: vec![0x5au8; bytes],
        }
    }

    /// Dirties every page of ours (4 KiB and 2 MiB logs). Untimed.
    pub fn prepare_ours(&mut self) {
        self.ours.mark(0, self.span);
        self.ours_2m.mark(0, self.span);
    }

    /// Dirties every page of vm-memory (one `fetch_or` per page: slow). Untimed.
    pub fn prepare_vm_memory(&mut self) {
        self.vm_memory.set_addr_range(0, self.span as usize);
    }

    /// Dirties every page of the byte-atomic and per-bit logs. Untimed.
    pub fn prepare_baselines(&mut self) {
        self.byte_atomic.mark(0, self.span);
        self.naive.mark(0, self.span);
    }

    /// Our report at `page_size` from the 4 KiB log.
    pub fn ours_at(&mut self, page_size: u64) {
        let output = if page_size == PAGE {
            &mut self.output
        } else {
            &mut self.output_2m
        };
        let mut bitmap = IovaBitmap::new(0, self.span, page_size, output).expect("bitmap");
        self.ours.read_and_clear(0, self.span, &mut bitmap);
    }

    /// Our 4 KiB report from the 2 MiB log (each bit replicated 512 times).
    pub fn ours_2m_at_4k(&mut self) {
        let mut bitmap = IovaBitmap::new(0, self.span, PAGE, &mut self.output).expect("bitmap");
        self.ours_2m.read_and_clear(0, self.span, &mut bitmap);
    }

    /// vm-memory's `get_and_reset`.
    pub fn vm_memory(&mut self) {
        black_box(self.vm_memory.get_and_reset());
    }

    /// The byte-atomic log's report.
    pub fn byte_atomic(&mut self) {
        self.byte_atomic.get_and_clear(&mut self.output);
    }

    /// The per-bit loop's report.
    pub fn naive(&mut self) {
        self.naive.get_and_clear(&mut self.output);
    }

    /// memcpy of as many bytes as the 4 KiB bitmap (the physical limit of a report).
    pub fn memcpy(&mut self) {
        self.output.copy_from_slice(black_box(&self.source));
    }

    /// memset of the 4 KiB output bitmap.
    pub fn memset(&mut self) {
        black_box(&mut self.output).fill(0xff);
    }
}

/// The same dirty pages reported through the mlx5 model (device half to driver half to
/// IovaBitmap) and through the soft driver.
pub struct TrackerReports {
    /// Bytes tracked (one range from 0).
    pub span: u64,
    /// The mlx5 model (cx7 capabilities).
    pub mlx5: Mlx5Driver,
    /// The soft driver.
    pub soft: SoftDriver,
    output: Vec<u8>,
}

impl TrackerReports {
    /// Both trackers started over `[0, span)` at 4 KiB.
    pub fn new(span: u64) -> Self {
        let range = [IovaRange::new(0, span).expect("range")];
        let mut mlx5 = Mlx5Driver::new(Mlx5Caps::cx7());
        let mut soft = SoftDriver::new();
        let (mut page_a, mut page_b) = (PAGE, PAGE);
        mlx5.start(&range, &mut page_a).expect("mlx5 start");
        soft.start(&range, &mut page_b).expect("soft start");
        TrackerReports {
            span,
            mlx5,
            soft,
            output: vec![0u8; (span / PAGE / 8) as usize],
        }
    }

    /// Dirties `pages` pages spread evenly over the span on both trackers. Untimed.
    pub fn dirty(&mut self, pages: u64) {
        use dmalog::DirtyMarker;
        let stride = (self.span / PAGE / pages.max(1)).max(1) * PAGE;
        let (mlx5, soft) = (
            self.mlx5.log().expect("started"),
            self.soft.log().expect("started"),
        );
        let mut at = 0;
        while at < self.span {
            mlx5.mark(at, 1);
            soft.mark(at, 1);
            at += stride;
        }
    }

    /// A report of the whole span through the mlx5 model.
    pub fn mlx5(&mut self) {
        let mut bitmap = IovaBitmap::new(0, self.span, PAGE, &mut self.output).expect("bitmap");
        self.mlx5
            .read_and_clear(IovaRange::new(0, self.span).expect("span"), &mut bitmap)
            .expect("mlx5 report");
    }

    /// A report of the whole span through the soft driver.
    pub fn soft(&mut self) {
        let mut bitmap = IovaBitmap::new(0, self.span, PAGE, &mut self.output).expect("bitmap");
        self.soft
            .read_and_clear(IovaRange::new(0, self.span).expect("span"), &mut bitmap)
            .expect("soft report");
    }

    /// Pages set in the output.
    pub fn reported_pages(&self) -> u64 {
        self.output.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// Clears the output. Untimed.
    pub fn clear_output(&mut self) {
        self.output.fill(0);
    }
}
