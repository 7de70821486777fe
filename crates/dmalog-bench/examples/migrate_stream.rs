//! One kind of bench migration, repeated, for profiling the stream (`perf record`):
//! `cargo run --release -p dmalog-bench --example migrate_stream -- tls|plain|scattered|one [N]
//! [alone]` (`alone`: no baseline copies between the migrations).

fn main() {
    let mut args = std::env::args().skip(1);
    let kind = args.next().unwrap_or_else(|| "plain".into());
    let times: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(3);
    let alone = args.next().as_deref() == Some("alone");
    let w = dmalog_bench::migrate::MigrateLoopback::new();
    let words = if kind == "scattered" {
        w.scattered_pages(20_000)
    } else if kind == "one" {
        w.scattered_pages(1)
    } else {
        w.all_pages()
    };
    for _ in 0..times {
        let before = thread_cpu_ns();
        let t = w.migrate(&words, kind == "tls", 1, true);
        let after = thread_cpu_ns();
        let busy: Vec<String> = after
            .iter()
            .filter_map(|(tid, ns)| {
                let was = before.iter().find(|(t, _)| t == tid).map_or(0, |b| b.1);
                (ns - was > 1_000_000).then(|| format!("{tid}: {} ms", (ns - was) / 1_000_000))
            })
            .collect();
        println!("  cpu by thread (migration and the destination's hash): {busy:?}");
        if alone {
            println!("{kind}: {:?} for {} bytes", t.elapsed, t.wire_bytes);
            continue;
        }
        let guest = w.guest_copy(&words);
        let plain = w.plain_copy(t.wire_bytes);
        println!(
            "{kind}: {:?} for {} bytes; guest copy {:?}; cache copy {:?}",
            t.elapsed, t.wire_bytes, guest, plain
        );
    }
}

/// CPU time (ns) of each thread of this process so far (`/proc/self/task/*/schedstat`).
fn thread_cpu_ns() -> Vec<(u64, u64)> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let tid = task.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            Some((tid, stat.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}
