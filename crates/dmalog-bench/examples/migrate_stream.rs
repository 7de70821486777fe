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
        let t = w.migrate(&words, kind == "tls", 1, true);
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
