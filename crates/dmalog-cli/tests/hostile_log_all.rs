//! A client that maps a lot while `dmalog serve` logs all DMA-mapped space (START with
//! no ranges), and one that asks for more log than the budget: every mapping's writes are
//! reported, or REPORT fails with EIO until STOP and a new START; a START above
//! `--max-log-mib` is ENOMEM and leaves logging stopped (SPEC 8).

mod common;

use dmalog::IovaRange;
use std::os::fd::AsFd;

use common::{engine_op, guest_memory, ServerProcess};
use dmalog::uapi::LoggingRange;
use dmalog::DirtyTracker;
use dmalog_vfio_user::Client;

const PAGE: u64 = 4096;
const FILL: u64 = 1;

/// Mapping `k`: one page every 64 KiB.
fn spread(k: u64) -> u64 {
    k << 16
}

fn dirty_pages(client: &mut Client, iova: u64, length: u64) -> Result<Vec<u64>, i32> {
    let mut bitmap = vec![0u64; dmalog::tracker::report_words(length, PAGE).unwrap() as usize];
    client
        .report(IovaRange::new(iova, length).unwrap(), PAGE, &mut bitmap)
        .map_err(|e| e.errno())?;
    Ok((0..length / PAGE)
        .filter(|p| bitmap[(p / 64) as usize] >> (p % 64) & 1 == 1)
        .collect())
}

#[test]
fn soft_reports_a_write_into_the_5000th_mapping_made_after_start() {
    let server = ServerProcess::start("soft");
    let mut client = server.connect();
    let memory = guest_memory(PAGE);
    assert_eq!(client.start_logging(&[], PAGE).unwrap(), PAGE);
    // 4999 message-only mappings (no fd, so neither side holds thousands of fds), then one
    // the device can write.
    for k in 0..4999 {
        client
            .dma_map(IovaRange::new(spread(k), PAGE).unwrap(), None, 0, true)
            .unwrap();
    }
    client
        .dma_map(
            IovaRange::new(spread(4999), PAGE).unwrap(),
            Some(memory.as_fd()),
            0,
            true,
        )
        .unwrap();
    assert_eq!(
        engine_op(&mut client, FILL, spread(4999) + 64, 0, 64, 0xab),
        0
    );
    assert_eq!(
        dirty_pages(&mut client, spread(4999), PAGE),
        Ok(vec![0]),
        "the write into the last mapping is reported"
    );
    assert_eq!(dirty_pages(&mut client, 0, spread(5000)), Ok(vec![]));
}

#[test]
fn soft_reports_a_write_after_map_unmap_churn() {
    let server = ServerProcess::start("soft");
    let mut client = server.connect();
    let memory = guest_memory(PAGE);
    client.start_logging(&[], PAGE).unwrap();
    for k in 0..5000 {
        client
            .dma_map(IovaRange::new(spread(k), PAGE).unwrap(), None, 0, true)
            .unwrap();
        client
            .dma_unmap(IovaRange::new(spread(k), PAGE).unwrap())
            .unwrap();
    }
    client
        .dma_map(
            IovaRange::new(spread(5000), PAGE).unwrap(),
            Some(memory.as_fd()),
            0,
            true,
        )
        .unwrap();
    assert_eq!(engine_op(&mut client, FILL, spread(5000), 0, 8, 0x5a), 0);
    assert_eq!(dirty_pages(&mut client, spread(5000), PAGE), Ok(vec![0]));
}

#[test]
fn fixed_range_trackers_fail_reports_for_a_mapping_they_cannot_cover() {
    for tracker in ["mlx5:tiny,max_num_range=1", "pds:1"] {
        let server = ServerProcess::start(tracker);
        let mut client = server.connect();
        let memory = guest_memory(16 << 20);
        client
            .dma_map(
                IovaRange::new(0, 1 << 20).unwrap(),
                Some(memory.as_fd()),
                0,
                true,
            )
            .unwrap();
        client.start_logging(&[], PAGE).unwrap();
        // Made after START outside the hardware ranges: DMA_MAP succeeds ...
        client
            .dma_map(
                IovaRange::new(8 << 20, 1 << 20).unwrap(),
                Some(memory.as_fd()),
                8 << 20,
                true,
            )
            .unwrap();
        assert_eq!(engine_op(&mut client, FILL, 8 << 20, 0, 8, 1), 0);
        // ... and every REPORT is EIO, never a silently clean page.
        assert_eq!(
            dirty_pages(&mut client, 8 << 20, 1 << 20),
            Err(libc::EIO),
            "{tracker}"
        );
        assert_eq!(
            dirty_pages(&mut client, 0, 1 << 20),
            Err(libc::EIO),
            "{tracker}"
        );
        // STOP and a new START cover it.
        client.stop().unwrap();
        client.start_logging(&[], PAGE).unwrap();
        assert_eq!(engine_op(&mut client, FILL, (8 << 20) + PAGE, 0, 8, 1), 0);
        assert_eq!(
            dirty_pages(&mut client, 8 << 20, 1 << 20),
            Ok(vec![1]),
            "{tracker}"
        );
    }
}

#[test]
fn a_start_above_max_log_mib_is_enomem_and_a_smaller_one_works() {
    for tracker in ["soft", "pds", "mlx5:unlimited"] {
        let server = ServerProcess::start_with(tracker, &["--max-log-mib", "4"]);
        let mut client = server.connect();
        let range = |length| LoggingRange { iova: 0, length };
        // 256 GiB at 4 KiB: 8 MiB of bitmap, above 4 MiB.
        let too_big = client.start_logging(&[range(256 << 30)], PAGE);
        assert_eq!(
            too_big.map_err(|e| e.errno()),
            Err(libc::ENOMEM),
            "{tracker}"
        );
        // Nothing half-started: a REPORT says logging is not started.
        assert_eq!(
            dirty_pages(&mut client, 0, 64 * PAGE),
            Err(libc::EINVAL),
            "{tracker}"
        );
        // 16 GiB: 512 KiB of bitmap (pds: two; mlx5: plus its 2 MiB receive ring).
        assert_eq!(
            client
                .start_logging(&[range(16 << 30)], PAGE)
                .map_err(|e| e.errno()),
            Ok(PAGE),
            "{tracker}"
        );
    }
}

#[test]
fn serve_rejects_an_overflowing_max_log_mib() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_dmalog"))
        .args(["serve", "--socket", "/nonexistent/dmalog-sock"])
        .args(["--max-log-mib", &u64::MAX.to_string()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--max-log-mib"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn demo_passes_max_log_mib_to_its_servers() {
    // A budget of 0 MiB: the device START is ENOMEM, so the demo migrates without device
    // tracking (every page dirty every round) and still verifies.
    let out = common::migrate::demo()
        .args(["--json", "--max-rounds", "3", "--max-log-mib", "0"])
        .output()
        .unwrap();
    // Exit 3: verified, but with all memory dirty every round the rest never fits the
    // downtime budget, and --max-rounds forces the stop.
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verified"], true);
    assert_eq!(report["downtime_budget_met"], false);
    assert_eq!(
        report["device_tracking"], false,
        "START refused by the budget"
    );
}
