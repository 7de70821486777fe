//! The quick run behind `dmalog bench`.

use super::*;

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
