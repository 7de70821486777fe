//! Auto-converge end to end in process: a guest dirtying memory faster than a capped link
//! can send it converges only when the engine throttles it; without it, `max_rounds`
//! forces the stop and the report says the downtime budget was not met.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{source_guest, spawn_destination, start_vcpus, FakeDevice, Vcpus, LAYOUT};
use dmalog::{DirtyTracker, IovaRange, TrackerError, TrackerResult};
use dmalog_migrate::converge::{AutoConverge, ThrottleParams};
use dmalog_migrate::stream::{FrameReader, FrameWriter};
use dmalog_migrate::{
    migrate_source, GuestPages, LoggedGuestMemory, MigrateError, MigrationReport, RoundStats,
    SourceConfig, SourceVm, VcpuWorkload, VmMemoryTracker,
};

/// The link: 20 MB/s.
const LINK_BYTES_PER_SEC: u64 = 20_000_000;
/// The guest's working set: 2 MiB at 1 MiB, 100 ms to send, ten times the budget.
const WSS_BASE: u64 = 1 << 20;
const WSS_PAGES: u64 = 512;

/// The guest, deterministically: once a round (just before each pre-copy REPORT, see
/// [`DirtyingLog`]), it writes the share of its working set that the vCPU throttle leaves
/// it (all of it unthrottled, 5 pages at 99%), as a vCPU slowed that much would in a
/// round's time, through vm-memory (marked by the memory's bitmap, the vCPU log). A
/// running vCPU thread adds a little more (4 MB/s), slowed by the real throttle.
fn dirty_the_working_set(memory: &LoggedGuestMemory, throttle_pct: u8, round: u32) {
    let pages = WSS_PAGES * u64::from(100 - throttle_pct) / 100;
    for page in 0..pages {
        let gpa = WSS_BASE + page * 4096;
        memory.write_at(gpa, &[round as u8 + 1; 64]);
    }
}

/// The source side: its guest memory (the working set dirtied once), a fake device that
/// can be throttled, and one vCPU thread writing the working set at 4 MB/s.
fn source() -> (Arc<LoggedGuestMemory>, FakeDevice, Vcpus) {
    let (memory, regions) = source_guest(&LAYOUT);
    let (mut device, _) = FakeDevice::new(vec![5u8; 100]);
    device.can_throttle = true;
    let vcpus = start_vcpus(
        (&memory, &regions),
        (WSS_BASE, WSS_PAGES * 4096),
        4_000_000,
        3,
    );
    dirty_the_working_set(&memory, 0, 0);
    (memory, device, vcpus)
}

/// The engine settings of these tests: a 10 ms budget.
fn config(max_rounds: u32, throttle: ThrottleParams) -> SourceConfig {
    SourceConfig {
        max_downtime: Duration::from_millis(10),
        max_rounds,
        throttle,
        ..common::config()
    }
}

/// The vCPU log, with the guest's deterministic share of dirtying done just before each
/// REPORT the engine takes while the vCPUs run. The engine takes the next round's REPORTs
/// while a round's last frame still sends, so dirtying "after a round" (after its last
/// frame) would land in the REPORT after next, a round late.
struct DirtyingLog<'a> {
    log: &'a mut VmMemoryTracker,
    memory: &'a LoggedGuestMemory,
    vcpus: &'a VcpuWorkload,
    reports: u32,
    /// Whether to dirty after the next REPORT (the test's switch).
    dirtying: &'a dyn Fn(u8) -> bool,
}

impl DirtyTracker for DirtyingLog<'_> {
    fn probe(&mut self) -> Result<bool, TrackerError> {
        self.log.probe()
    }
    fn start(&mut self, ranges: &[IovaRange], page_size: u64) -> Result<u64, TrackerError> {
        self.log.start(ranges, page_size)
    }
    fn report(&mut self, range: IovaRange, page_size: u64, bitmap: &mut [u64]) -> TrackerResult {
        let throttle = self.vcpus.throttle();
        // Once per REPORT (before its first region: what the round dirtied is in the REPORT
        // that ends it), and never once the vCPUs are paused.
        if range.iova() == 0 && !self.vcpus.is_paused() && (self.dirtying)(throttle) {
            self.reports += 1;
            dirty_the_working_set(self.memory, throttle, self.reports);
        }
        self.log.report(range, page_size, bitmap)
    }
    fn stop(&mut self) -> Result<(), TrackerError> {
        self.log.stop()
    }
}

/// Migrates the source VM (its memory, device, CPU log and vCPUs) over `link`, capped at
/// [`LINK_BYTES_PER_SEC`], calling `on_round` after each round.
fn migrate_over(
    link: UnixStream,
    config: &SourceConfig,
    (memory, device, cpu, vcpus): (
        &LoggedGuestMemory,
        &mut FakeDevice,
        &mut dyn DirtyTracker,
        &VcpuWorkload,
    ),
    on_round: impl FnMut(&RoundStats),
) -> Result<MigrationReport, MigrateError> {
    let mut replies = FrameReader::new(link.try_clone().unwrap());
    let mut out = FrameWriter::new(link, Some(LINK_BYTES_PER_SEC));
    let vm = SourceVm {
        memory,
        device,
        cpu,
        vcpus: Some(vcpus),
    };
    migrate_source(config, vm, &mut out, &mut replies, on_round)
}

/// The report, the highest vCPU throttle seen, and the device's throttles with the number
/// of states it had been set to at each.
fn migrate(mode: AutoConverge, max_rounds: u32) -> (MigrationReport, u8, Vec<(u8, usize)>) {
    let (memory, mut device, mut vcpus) = source();
    let (a, b) = UnixStream::pair().unwrap();
    let destination = spawn_destination(b);
    let config = config(
        max_rounds,
        // Quick steps, so that the test is short: 50, 70, 90, 99.
        ThrottleParams {
            mode,
            initial_pct: 50,
            increment_pct: 20,
            trigger_rounds: 1,
            ..ThrottleParams::default()
        },
    );
    let mut throttle_seen = 0u8;
    let mut cpu = DirtyingLog {
        log: &mut vcpus.cpu,
        memory: &memory,
        vcpus: &vcpus.workload,
        reports: 0,
        dirtying: &|_| true,
    };
    let vm = (
        &*memory,
        &mut device,
        &mut cpu as &mut dyn DirtyTracker,
        &vcpus.workload,
    );
    let report = migrate_over(a, &config, vm, |round| {
        if !round.final_round {
            throttle_seen = throttle_seen.max(vcpus.workload.throttle());
        }
    })
    .unwrap();
    assert!(report.verified);
    assert!(destination.join().unwrap().0.unwrap().verified);
    assert_eq!(
        vcpus.workload.throttle(),
        0,
        "the throttle is lifted after the stop"
    );
    assert_eq!(
        device.states.last(),
        Some(&dmalog::uapi::DeviceState::Stop),
        "the source device stays stopped"
    );
    let stop_copy_at = device
        .states
        .iter()
        .position(|&s| s == dmalog::uapi::DeviceState::StopCopy)
        .unwrap();
    if let Some(&(last, states_then)) = device.throttles.last() {
        assert_eq!(last, 0, "the device's own speed is back");
        assert!(
            states_then <= stop_copy_at,
            "before its state is saved: {:?} {:?}",
            device.throttles,
            device.states
        );
    }
    (report, throttle_seen, device.throttles)
}

#[test]
fn vcpus_dirtying_faster_than_the_link_converge_only_with_auto_converge() {
    let (report, throttle_seen, device_throttles) = migrate(AutoConverge::On, 20);
    let table: Vec<_> = report
        .rounds
        .iter()
        .map(|r| (r.pages_sent, r.predicted_downtime_ms, r.throttle_pct))
        .collect();
    assert!(
        !report.forced_stop,
        "converged before the round limit: {table:?}"
    );
    let last = report.rounds.last().unwrap();
    assert!(
        last.predicted_downtime_ms.unwrap() <= 10.0,
        "stopped on a fit: {table:?}"
    );
    assert!(throttle_seen >= 50, "the vCPUs were throttled: {table:?}");
    let throttles: Vec<u8> = report.rounds.iter().map(|r| r.throttle_pct).collect();
    assert!(throttles.contains(&50), "the first step: {throttles:?}");
    assert!(
        throttles.windows(2).all(|w| w[0] <= w[1]),
        "steps up only: {throttles:?}"
    );
    assert_eq!(
        device_throttles.first().map(|t| t.0),
        Some(50),
        "the device is slowed with the vCPUs: {table:?}"
    );
    assert!(report
        .rounds
        .iter()
        .all(|r| r.device_throttled == (r.throttle_pct > 0)));
    for round in &report.rounds[1..] {
        assert!(round.bandwidth_bytes_per_sec > 0.0, "{table:?}");
        assert!(round.predicted_downtime_ms.is_some());
    }

    let (report, throttle_seen, device_throttles) = migrate(AutoConverge::Off, 4);
    let table: Vec<_> = report
        .rounds
        .iter()
        .map(|r| (r.pages_sent, r.predicted_downtime_ms, r.throttle_pct))
        .collect();
    assert_eq!(throttle_seen, 0, "off: never throttled");
    assert!(device_throttles.is_empty(), "{device_throttles:?}");
    assert!(report.rounds.iter().all(|r| r.throttle_pct == 0));
    assert!(report.forced_stop, "max_rounds forced the stop: {table:?}");
    assert_eq!(
        report.rounds.len() as u32,
        4 + 2,
        "round 0, the pre-copy rounds, the final round"
    );
    assert!(!report.downtime_budget_met);
    assert!(
        report.rounds.last().unwrap().predicted_downtime_ms.unwrap() > 10.0,
        "it stopped over the budget"
    );
}

#[test]
fn a_migration_that_fails_while_throttled_gives_the_guest_its_speed_back() {
    let (memory, mut device, mut vcpus) = source();
    let (a, b) = UnixStream::pair().unwrap();
    // A destination that takes everything and answers nothing but the Pings.
    let sink = std::thread::spawn(move || common::take_frames_answering_pings(&b, |_| false));
    let cut = a.try_clone().unwrap();
    let config = config(
        50,
        ThrottleParams {
            initial_pct: 50,
            trigger_rounds: 1,
            ..ThrottleParams::default()
        },
    );
    // The link goes down as soon as a round was sent throttled; until then the guest
    // dirties its whole working set every round.
    let mut cpu = DirtyingLog {
        log: &mut vcpus.cpu,
        memory: &memory,
        vcpus: &vcpus.workload,
        reports: 0,
        dirtying: &|throttle| throttle == 0,
    };
    let vm = (
        &*memory,
        &mut device,
        &mut cpu as &mut dyn DirtyTracker,
        &vcpus.workload,
    );
    let result = migrate_over(a, &config, vm, |round| {
        if round.throttle_pct > 0 {
            let _ = cut.shutdown(std::net::Shutdown::Both);
        }
    });
    assert!(result.is_err());
    sink.join().unwrap();
    assert_eq!(
        vcpus.workload.throttle(),
        0,
        "the vCPUs run at full speed again"
    );
    assert!(!vcpus.workload.is_paused());
    assert_eq!(device.state, dmalog::uapi::DeviceState::Running);
    assert_eq!(
        device.throttles.first().map(|t| t.0),
        Some(50),
        "{:?}",
        device.throttles
    );
    assert_eq!(
        device.throttles.last().map(|t| t.0),
        Some(0),
        "the device too"
    );
}
