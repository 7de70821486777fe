//! The measured workloads and the quick run.

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::time::Instant;

use dmalog::{DirtyLog, IovaBitmap, IovaRange, LogDriver, SoftDriver};
use dmalog_models::{Mlx5Caps, Mlx5Driver};
use vm_memory::bitmap::AtomicBitmap;

use crate::baselines::{ByteAtomicLog, NaiveBitLog};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;
const PAGE: u64 = 4096;

/// One line of the benchmark report: ours against one baseline.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// What is measured.
    pub measurement: String,
    /// Ours, nanoseconds per operation.
    pub ours_ns: f64,
    /// The baseline's name.
    pub baseline: String,
    /// The baseline, nanoseconds per operation.
    pub baseline_ns: f64,
    /// `baseline_ns / ours_ns` (above 1: ours is faster).
    pub speedup: f64,
    /// The target, in words ("speedup >= 30"), or "-" for an informational row.
    pub target: String,
    /// Whether the target is met (None: informational).
    pub met: Option<bool>,
}

/// What a row must show.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target {
    /// Informational: no target.
    None,
    /// Ours at least this many times faster than the baseline.
    Faster(f64),
    /// Ours at most this many times slower than the baseline.
    Within(f64),
}

impl Row {
    pub(crate) fn new(
        measurement: &str,
        ours_ns: f64,
        baseline: &str,
        baseline_ns: f64,
        target: Target,
    ) -> Row {
        let speedup = baseline_ns / ours_ns;
        let (target, met) = target.judge(speedup);
        Row {
            measurement: measurement.to_string(),
            ours_ns,
            baseline: baseline.to_string(),
            baseline_ns,
            speedup,
            target,
            met,
        }
    }
}

impl Row {
    /// A row from paired batches: ours is `a`, the baseline `b`, the speedup the median of
    /// the pairs' ratios.
    pub(crate) fn paired(measurement: &str, paired: Paired, baseline: &str, target: Target) -> Row {
        let mut row = Row::new(
            measurement,
            paired.a_ns,
            baseline,
            paired.b_ns,
            Target::None,
        );
        row.speedup = paired.speedup;
        let (target, met) = target.judge(paired.speedup);
        row.target = target;
        row.met = met;
        row
    }
}

impl Target {
    /// The target in words, and whether `speedup` (baseline / ours) meets it.
    fn judge(self, speedup: f64) -> (String, Option<bool>) {
        match self {
            Target::None => ("-".to_string(), None),
            Target::Faster(factor) => (format!("speedup >= {factor}"), Some(speedup >= factor)),
            Target::Within(factor) => (
                format!("ours <= {factor}x baseline"),
                Some(speedup * factor >= 1.0),
            ),
        }
    }
}

/// xorshift64*, deterministic.
pub fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Nanoseconds per op: the best of `batches` batches of `ops` calls of `op`, each batch after
/// an untimed `prepare`. The best batch is the one least disturbed by other load on a
/// shared machine; ours and the baselines are measured the same way.
pub fn best_ns<S>(
    batches: usize,
    ops: u64,
    state: &mut S,
    mut prepare: impl FnMut(&mut S),
    mut op: impl FnMut(&mut S),
) -> f64 {
    let mut samples: Vec<f64> = (0..batches)
        .map(|_| {
            prepare(state);
            let start = Instant::now();
            for _ in 0..ops {
                op(state);
            }
            start.elapsed().as_nanos() as f64 / ops as f64
        })
        .collect();
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[0]
}

/// Nanoseconds per op of `a` and of `b`, and how many times faster `a` is: `batches`
/// pairs of batches of `ops` calls each (each batch after an untimed `prepare`), the two
/// batches of a pair back to back, so a slow spell of a shared machine falls on both. The
/// times are the medians over the batches; the speedup is the median over the pairs of
/// `b / a`, which one noisy pair cannot move. For rows whose met / missed must not flip
/// from run to run.
pub fn paired_median_ns<S>(
    batches: usize,
    ops: u64,
    state: &mut S,
    mut prepare: impl FnMut(&mut S),
    mut a: impl FnMut(&mut S),
    mut b: impl FnMut(&mut S),
) -> Paired {
    let mut time = |state: &mut S, op: &mut dyn FnMut(&mut S)| {
        prepare(state);
        let start = Instant::now();
        for _ in 0..ops {
            op(state);
        }
        start.elapsed().as_nanos() as f64 / ops as f64
    };
    let (mut a_ns, mut b_ns) = (Vec::with_capacity(batches), Vec::with_capacity(batches));
    for batch in 0..batches {
        // Alternate which side goes first, so neither always runs on a warmer cache.
        if batch % 2 == 0 {
            a_ns.push(time(state, &mut a));
            b_ns.push(time(state, &mut b));
        } else {
            b_ns.push(time(state, &mut b));
            a_ns.push(time(state, &mut a));
        }
    }
    let mut ratios: Vec<f64> = a_ns.iter().zip(&b_ns).map(|(a, b)| b / a).collect();
    Paired {
        a_ns: median(&mut a_ns),
        b_ns: median(&mut b_ns),
        speedup: median(&mut ratios),
    }
}

/// What [`paired_median_ns`] measured.
#[derive(Debug, Clone, Copy)]
pub struct Paired {
    /// Median nanoseconds per op of `a`.
    pub a_ns: f64,
    /// Median nanoseconds per op of `b`.
    pub b_ns: f64,
    /// Median over the pairs of `b / a` (above 1: `a` is faster).
    pub speedup: f64,
}

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(|x, y| x.total_cmp(y));
    samples[samples.len() / 2]
}

/// Marking writes of `write_bytes` at random page-aligned offsets in 1 GiB, on every log.
pub struct MarkRandom {
    /// Bytes per write.
    pub write_bytes: u64,
    /// Ours.
    pub ours: DirtyLog,
    /// vm-memory.
    pub vm_memory: AtomicBitmap,
    /// libvfio-user-like.
    pub byte_atomic: ByteAtomicLog,
    /// Per-bit loop.
    pub naive: NaiveBitLog,
    offsets: Vec<u64>,
    cursor: usize,
}

impl MarkRandom {
    /// The workload for writes of `write_bytes`.
    pub fn new(write_bytes: u64) -> Self {
        let span = GIB;
        let mut rng = 0x1234_5678u64;
        let offsets = (0..1 << 16)
            .map(|_| (next_random(&mut rng) % ((span - write_bytes) / PAGE)) * PAGE)
            .collect();
        MarkRandom {
            write_bytes,
            ours: DirtyLog::new(0, span, PAGE).expect("1 GiB log"),
            vm_memory: AtomicBitmap::new(
                span as usize,
                NonZeroUsize::new(PAGE as usize).expect("page"),
            ),
            byte_atomic: ByteAtomicLog::new(span, PAGE),
            naive: NaiveBitLog::new(span, PAGE),
            offsets,
            cursor: 0,
        }
    }

    #[inline]
    fn next_offset(&mut self) -> u64 {
        self.cursor = (self.cursor + 1) & (self.offsets.len() - 1);
        self.offsets[self.cursor]
    }

    /// One mark on ours.
    #[inline]
    pub fn ours(&mut self) {
        let iova = self.next_offset();
        self.ours.mark(iova, self.write_bytes);
    }

    /// One DMA-write record on ours (fence plus mark).
    #[inline]
    pub fn ours_record_write(&mut self) {
        let iova = self.next_offset();
        self.ours.record_write(iova, self.write_bytes);
    }

    /// One mark on vm-memory.
    #[inline]
    pub fn vm_memory(&mut self) {
        let iova = self.next_offset();
        self.vm_memory
            .set_addr_range(iova as usize, self.write_bytes as usize);
    }

    /// One mark on the byte-atomic log.
    #[inline]
    pub fn byte_atomic(&mut self) {
        let iova = self.next_offset();
        self.byte_atomic.mark(iova, self.write_bytes);
    }

    /// One mark on the per-bit loop.
    #[inline]
    pub fn naive(&mut self) {
        let iova = self.next_offset();
        self.naive.mark(iova, self.write_bytes);
    }
}

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
            .read_and_clear(0, self.span, &mut bitmap)
            .expect("mlx5 report");
    }

    /// A report of the whole span through the soft driver.
    pub fn soft(&mut self) {
        let mut bitmap = IovaBitmap::new(0, self.span, PAGE, &mut self.output).expect("bitmap");
        self.soft
            .read_and_clear(0, self.span, &mut bitmap)
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

/// With this environment variable set (to anything), [`quick_run`] runs only the vfio-user
/// REPORT row.
pub const ONLY_REPORT_ROW_ENV: &str = "DMALOG_BENCH_ONLY_REPORT";

/// The quick subset behind `dmalog bench`: every target row plus informational baselines.
/// `progress` is told the name of each measurement as it starts. Runs in well under a
/// minute on 2 cores. See [`ONLY_REPORT_ROW_ENV`].
pub fn quick_run(mut progress: impl FnMut(&str)) -> Vec<Row> {
    let mut rows = Vec::new();
    let batches = 11;
    if std::env::var_os(ONLY_REPORT_ROW_ENV).is_some() {
        // Tuning the wire: the one row, in seconds rather than minutes.
        rows.push(socket_report_row(batches, &mut progress));
        return rows;
    }

    // The mark rows measure what a DMA write costs: `record_write`, its SeqCst fence
    // included (the load-first mark needs StoreLoad ordering after the data, so one fence
    // per write is the floor on x86). The median ratio of many short back-to-back pairs of
    // batches keeps met / missed stable from run to run on a shared machine.
    mark_rows(
        &mut rows,
        &mut progress,
        MarkRows {
            write_bytes: 64 * KIB,
            what: "mark 64 KiB writes at random offsets in 1 GiB",
            label: "64 KiB",
            pages: "16 pages",
            target: 4.0,
            with_naive: true,
        },
    );
    mark_rows(
        &mut rows,
        &mut progress,
        MarkRows {
            write_bytes: PAGE,
            what: "mark single 4 KiB pages at random offsets in 1 GiB",
            label: "4 KiB",
            pages: "1 page",
            target: 1.0,
            with_naive: false,
        },
    );

    crate::vm_memory::quick_rows(&mut rows, &mut progress);

    progress("sparse report: 1 TiB at 4 KiB, 1000 dirty pages");
    let mut w = SparseReport::new(1000);
    let ours = best_ns(batches, 1, &mut w, |w| w.prepare(), |w| w.ours());
    let found = w.reported_pages();
    let vmm = best_ns(5, 1, &mut w, |w| w.prepare(), |w| w.vm_memory());
    assert!(found > 990, "the sparse report found {found} pages");
    push_against(
        &mut rows,
        "sparse report 1 TiB @4 KiB, 1000 dirty",
        ours,
        &[("vm-memory get_and_reset", vmm, Target::Faster(100.0))],
    );
    drop(w);

    progress("dense report: 64 GiB at 4 KiB, all dirty");
    let mut w = DenseReport::new(64 * GIB);
    let ours = best_ns(
        batches,
        1,
        &mut w,
        |w| w.prepare_ours(),
        |w| w.ours_at(PAGE),
    );
    let vmm = best_ns(3, 1, &mut w, |w| w.prepare_vm_memory(), |w| w.vm_memory());
    let bytes = best_ns(
        batches,
        1,
        &mut w,
        |w| w.prepare_baselines(),
        |w| w.byte_atomic(),
    );
    let memcpy = best_ns(batches, 1, &mut w, |_| {}, |w| w.memcpy());
    push_against(
        &mut rows,
        "dense report 64 GiB @4 KiB, all dirty",
        ours,
        &[
            ("vm-memory get_and_reset", vmm, Target::Faster(1.0)),
            ("byte-atomic (libvfio-user)", bytes, Target::None),
            (
                "memcpy of the bitmap (physical limit)",
                memcpy,
                Target::None,
            ),
        ],
    );

    progress("page-size conversion");
    let at_2m = best_ns(
        batches,
        1,
        &mut w,
        |w| w.prepare_ours(),
        |w| w.ours_at(2 * MIB),
    );
    push_against(
        &mut rows,
        "4 KiB log reported at 2 MiB, 64 GiB",
        at_2m,
        &[("same log reported at 4 KiB", ours, Target::Within(3.0))],
    );
    let to_4k = best_ns(
        batches,
        1,
        &mut w,
        |w| w.prepare_ours(),
        |w| w.ours_2m_at_4k(),
    );
    let memset = best_ns(batches, 1, &mut w, |_| {}, |w| w.memset());
    push_against(
        &mut rows,
        "2 MiB log reported at 4 KiB, 64 GiB",
        to_4k,
        &[("memset of the output bitmap", memset, Target::Within(3.0))],
    );
    drop(w);

    progress("mlx5 model: report pipeline");
    let entries = 1u64 << 20;
    let mut w = TrackerReports::new(entries * PAGE);
    let mlx5 = best_ns(
        batches,
        1,
        &mut w,
        |w| {
            w.clear_output();
            w.dirty(entries)
        },
        |w| w.mlx5(),
    );
    assert_eq!(
        w.reported_pages(),
        entries,
        "the mlx5 pipeline reported every page"
    );
    let soft = best_ns(batches, 1, &mut w, |w| w.dirty(entries), |w| w.soft());
    // The target is a rate: 50 M entries/s is this many ns for the batch.
    let target_ns = entries as f64 / 50e6 * 1e9;
    push_against(
        &mut rows,
        "mlx5 report pipeline, 1 Mi dirty entries",
        mlx5,
        &[
            ("the 50 M entries/s target", target_ns, Target::Faster(1.0)),
            ("soft driver, same pages", soft, Target::None),
        ],
    );
    drop(w);

    progress("mlx5 model: empty report over 2^42 bytes");
    let mut w = TrackerReports::new(1 << 42);
    let mlx5 = best_ns(batches, 1, &mut w, |_| {}, |w| w.mlx5());
    let soft = best_ns(batches, 1, &mut w, |_| {}, |w| w.soft());
    push_against(
        &mut rows,
        "mlx5 empty report, 2^42 bytes at 4 KiB",
        mlx5,
        &[("soft driver, same report", soft, Target::Within(2.0))],
    );
    drop(w);

    rows.push(socket_report_row(batches, &mut progress));

    for (write_bytes, label, ops) in [(4 * KIB, "4 KiB", 4096), (MIB, "1 MiB", 32)] {
        progress(&format!("dma-engine FILL of {label}, logging on and off"));
        let mut w = crate::wire::FillThroughput::new(write_bytes);
        // Off and on alternate, so that a slow spell of the shared machine does not fall on
        // one side only.
        let (mut off, mut on) = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            off = off.min(best_ns(batches, ops, &mut w, |_| {}, |w| w.fill()));
            w.set_logging(true);
            on = on.min(best_ns(batches, ops, &mut w, |_| {}, |w| w.fill()));
            assert_eq!(w.status(), 0, "the FILLs succeeded");
            w.set_logging(false);
        }
        rows.push(Row::new(
            &format!("dma-engine FILL {label}, logging on"),
            on,
            "same FILLs, logging off",
            off,
            Target::Faster(0.9),
        ));
    }
    rows
}

/// Pushes one row per baseline: `measurement` at `ours_ns` against each
/// `(baseline, baseline_ns, target)`, in order.
fn push_against(
    rows: &mut Vec<Row>,
    measurement: &str,
    ours_ns: f64,
    baselines: &[(&str, f64, Target)],
) {
    for &(baseline, baseline_ns, target) in baselines {
        rows.push(Row::new(
            measurement,
            ours_ns,
            baseline,
            baseline_ns,
            target,
        ));
    }
}

/// One size of the mark rows.
struct MarkRows {
    write_bytes: u64,
    /// What the progress line says.
    what: &'static str,
    /// The write size in words ("64 KiB").
    label: &'static str,
    /// The pages one write covers, in words ("16 pages").
    pages: &'static str,
    /// The speedup `record_write` must show over vm-memory.
    target: f64,
    /// Whether the per-bit loop is measured too.
    with_naive: bool,
}

/// The mark rows for writes of `size.write_bytes` at random offsets in 1 GiB:
/// `record_write` against vm-memory (paired batches), then the bare mark against
/// vm-memory, the byte-atomic tracker and (`with_naive`) the per-bit loop.
fn mark_rows(rows: &mut Vec<Row>, progress: &mut impl FnMut(&str), size: MarkRows) {
    let (batches, mark_batches, ops) = (11, 101, 1 << 13);
    progress(size.what);
    let mut w = MarkRandom::new(size.write_bytes);
    let paired = paired_median_ns(
        mark_batches,
        ops,
        &mut w,
        |_| {},
        |w| w.ours_record_write(),
        |w| w.vm_memory(),
    );
    let vmm = paired.b_ns;
    let ours = best_ns(batches, ops, &mut w, |_| {}, |w| w.ours());
    let bytes = best_ns(batches, ops, &mut w, |_| {}, |w| w.byte_atomic());
    let naive = size
        .with_naive
        .then(|| best_ns(batches, ops, &mut w, |_| {}, |w| w.naive()));
    let label = size.label;
    rows.push(Row::paired(
        &format!(
            "record_write {label} ({}, fence + mark), random, 1 GiB",
            size.pages
        ),
        paired,
        "vm-memory set_addr_range",
        Target::Faster(size.target),
    ));
    let mut baselines = vec![
        ("vm-memory set_addr_range", vmm, Target::None),
        ("byte-atomic (libvfio-user)", bytes, Target::None),
    ];
    baselines.extend(naive.map(|naive| ("per-bit loop", naive, Target::None)));
    push_against(
        rows,
        &format!("mark {label} (no fence), random, 1 GiB"),
        ours,
        &baselines,
    );
}

/// The vfio-user REPORT row: 64 GiB at 4 KiB, all dirty, over a UNIX socket, against a
/// plain transfer of the same bytes.
fn socket_report_row(batches: usize, progress: &mut impl FnMut(&str)) -> Row {
    progress("vfio-user: REPORT of 64 GiB over a UNIX socket");
    let span = 64 * GIB;
    let mut w = crate::wire::SocketReport::new(span);
    let report = best_ns(batches, 1, &mut w, |w| w.dirty_all(), |w| w.report());
    assert_eq!(
        w.reported_pages(),
        span / PAGE,
        "every page crossed the socket"
    );
    let plain = best_ns(batches, 1, &mut w, |_| {}, |w| w.plain_transfer());
    let row = Row::new(
        "vfio-user REPORT 64 GiB @4 KiB, all dirty (2 MiB, split at 1 MiB)",
        report,
        "plain socket transfer of the same bytes",
        plain,
        Target::Faster(0.5),
    );
    drop(w);
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ours and every baseline do the same work: the same pages come out.
    #[test]
    fn dense_workload_outputs_agree() {
        let span = 64 * MIB;
        let mut w = DenseReport::new(span);
        w.prepare_ours();
        w.ours_at(PAGE);
        assert!(w.output.iter().all(|&b| b == 0xff), "ours at 4 KiB");
        w.prepare_ours();
        w.ours_at(2 * MIB);
        assert!(
            w.output_2m[..(span / (2 * MIB) / 8) as usize]
                .iter()
                .all(|&b| b == 0xff),
            "ours at 2 MiB"
        );
        w.output.fill(0);
        w.ours_2m_at_4k();
        assert!(w.output.iter().all(|&b| b == 0xff), "2 MiB log at 4 KiB");
        w.prepare_vm_memory();
        assert!(
            w.vm_memory
                .get_and_reset()
                .iter()
                .all(|&word| word == u64::MAX),
            "vm-memory"
        );
        w.prepare_baselines();
        w.output.fill(0);
        w.byte_atomic();
        assert!(w.output.iter().all(|&b| b == 0xff), "byte-atomic");
        w.output.fill(0);
        w.naive();
        assert!(w.output.iter().all(|&b| b == 0xff), "per-bit loop");
    }

    #[test]
    fn sparse_workload_reports_its_pages() {
        let mut w = SparseReport::new(100);
        w.prepare();
        w.ours();
        assert!(w.reported_pages() >= 99 && w.reported_pages() <= 100);
        let words = w.vm_memory.get_and_reset();
        let ones: u32 = words.iter().map(|w| w.count_ones()).sum();
        assert_eq!(u64::from(ones), w.reported_pages());
    }

    #[test]
    fn mark_workloads_mark_the_same_pages() {
        let mut w = MarkRandom::new(64 * KIB);
        let mut v = MarkRandom::new(64 * KIB);
        for _ in 0..100 {
            w.ours();
            v.vm_memory();
        }
        let vm: Vec<u64> = v.vm_memory.get_and_reset();
        let mut ours = vec![0u8; (GIB / PAGE / 8) as usize];
        let mut bitmap = IovaBitmap::new(0, GIB, PAGE, &mut ours).unwrap();
        w.ours.read_and_clear(0, GIB, &mut bitmap);
        let ours_words: Vec<u64> = ours
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert!(
            ours_words == vm,
            "ours and vm-memory marked different pages"
        );
        assert!(vm.iter().any(|&w| w != 0));
    }
}
