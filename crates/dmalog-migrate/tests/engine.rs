//! The engine in process with a fake device (soft-tracked DMA, migration data in memory):
//! a migration over a socket pair verifies; a corrupt or truncated stream fails loudly on
//! the destination; a destination that dies leaves the source running with logging off.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dmalog::uapi::DeviceState;
mod common;

use common::{config, cpu_log, run_destination, spawn_destination, FakeDevice, LAYOUT};
use dmalog::{
    DirtyTracker, InProcessTracker, IovaRange, SoftDriver, TrackerError, TrackerResult,
    WriteRecorder,
};
use dmalog_migrate::stream::{
    pages_payload, FrameReader, FrameWriter, IoTimeouts, Kind, Transport,
};
use dmalog_migrate::{
    memfd_guest_untracked, migrate_source, GuestPages, LoggedGuestMemory, MigrateError, SourceVm,
};

#[test]
fn a_migration_over_a_socket_pair_verifies() {
    let src_memory = Arc::new(memfd_guest_untracked(&LAYOUT).unwrap());
    src_memory.write_at(4096, &[7u8; 100]);
    let (mut device, mut dma) = FakeDevice::new(vec![3u8; 5000]);
    let (mut cpu, _) = cpu_log();
    let (a, b) = UnixStream::pair().unwrap();
    let destination = spawn_destination(b);
    let mut replies = FrameReader::new(a.try_clone().unwrap());
    let mut out = FrameWriter::new(a, None);
    // The device writes while the migration runs (logged through its recorder).
    let writer_memory = Arc::clone(&src_memory);
    let vm = SourceVm {
        memory: &src_memory,
        device: &mut device,
        cpu: &mut cpu,
        vcpus: None,
    };
    let mut rounds = 0;
    let report = migrate_source(&config(), vm, &mut out, &mut replies, |round| {
        if !round.final_round {
            rounds += 1;
            writer_memory.write_at((1 << 32) + 8192, &[rounds as u8; 100]);
            dma.record_write((1 << 32) + 8192, 100);
        }
    })
    .unwrap();
    assert!(report.verified);
    let (dst, memory, dst_device) = destination.join().unwrap();
    assert!(dst.unwrap().verified);
    let mut page = [0u8; 100];
    memory.read_at((1 << 32) + 8192, &mut page);
    assert_eq!(
        dst_device.loaded.len(),
        5000 * 2,
        "PRE_COPY and STOP_COPY data"
    );
    assert_eq!(dst_device.state, DeviceState::Running);
    assert!(
        page.iter().all(|&b| b == page[0] && b > 0),
        "the last device write arrived"
    );
    assert_eq!(
        device.state,
        DeviceState::Stop,
        "the source device stays stopped"
    );
    assert!(!device.logging);
}

#[test]
fn a_corrupt_or_truncated_stream_fails_loudly() {
    let mut good = FrameWriter::new(Vec::new(), None);
    let hello = common::hello(&LAYOUT);
    good.write(Kind::Hello, &[&hello]).unwrap();
    // A flip in the run table (the checksum covers it; page bytes rely on TCP/TLS).
    good.write(Kind::Pages, &[&pages_payload(&[(0, 1, 0)], &[9u8; 4096])])
        .unwrap();
    let bytes = good.get_mut().clone();
    let run = |stream: &[u8]| {
        run_destination(
            &mut FrameReader::new(stream),
            &mut FrameWriter::new(Vec::new(), None),
        )
        .0
    };
    let mut corrupt = bytes.clone();
    // A byte of the run's guest address.
    let gpa_byte = corrupt.len() - 4096 - 16 + 2;
    corrupt[gpa_byte] ^= 0xff;
    assert!(matches!(
        run(&corrupt),
        Err(MigrateError::Stream(
            dmalog_migrate::stream::StreamError::Checksum { .. }
        ))
    ));
    assert!(
        matches!(
            run(&bytes[..bytes.len() - 10]),
            Err(MigrateError::Stream(_))
        ),
        "truncated"
    );
    // The source gone before its End: said as such, not as an I/O error.
    let err = run(&bytes).unwrap_err();
    assert!(
        matches!(
            &err,
            MigrateError::Stream(dmalog_migrate::stream::StreamError::PeerClosed {
                peer: "source",
                ..
            })
        ),
        "ends before End: {err}"
    );
    assert!(
        err.to_string()
            .contains("the source closed the connection in the middle of the migration"),
        "{err}"
    );
    // Pages outside guest memory are refused.
    let mut outside = FrameWriter::new(Vec::new(), None);
    outside.write(Kind::Hello, &[&hello]).unwrap();
    outside
        .write(
            Kind::Pages,
            &[&pages_payload(&[(2u64 << 32, 1, 0)], &[9u8; 4096])],
        )
        .unwrap();
    assert!(run(outside.get_mut()).is_err());
}

#[test]
fn a_dead_destination_leaves_the_source_running_with_logging_off() {
    let memory = memfd_guest_untracked(&LAYOUT).unwrap();
    let (mut device, _) = FakeDevice::new(vec![1u8; 10]);
    let (mut cpu, _) = cpu_log();
    let (a, b) = UnixStream::pair().unwrap();
    drop(b); // the destination is gone
    let mut replies = FrameReader::new(a.try_clone().unwrap());
    let mut out = FrameWriter::new(a, None);
    let vm = SourceVm {
        memory: &memory,
        device: &mut device,
        cpu: &mut cpu,
        vcpus: None,
    };
    let err = migrate_source(&config(), vm, &mut out, &mut replies, |_| {}).unwrap_err();
    assert!(
        err.to_string()
            .contains("the destination closed the connection in the middle of the migration"),
        "{err}"
    );
    assert_eq!(device.state, DeviceState::Running);
    assert!(!device.logging, "logging stopped");
    let _ = std::io::stdout().flush();
}

#[test]
fn range_plans() {
    let memory =
        memfd_guest_untracked(&[(0, 1 << 20), (2 << 20, 1 << 20), (1 << 32, 1 << 20)]).unwrap();
    let exact = dmalog_migrate::plan_ranges(&memory, dmalog_migrate::RangePlan::Exact, 256);
    assert_eq!(exact.len(), 3);
    let qemu = dmalog_migrate::plan_ranges(&memory, dmalog_migrate::RangePlan::Qemu, 256);
    let spans: Vec<(u64, u64)> = qemu.iter().map(|r| (r.iova(), r.end())).collect();
    assert_eq!(
        spans,
        vec![(0, 3 << 20), (1 << 32, (1 << 32) + (1 << 20))],
        "below and above 4 GiB, holes included"
    );
    let one = dmalog_migrate::plan_ranges(&memory, dmalog_migrate::RangePlan::Exact, 1);
    assert_eq!(
        (one[0].iova(), one[0].end()),
        (0, (1 << 32) + (1 << 20)),
        "clipped to the device's limit"
    );
}

/// A UNIX socket that counts the bytes written through it (no `writev` from guest
/// memory: every byte passes `write`).
struct CountedLink {
    stream: UnixStream,
    written_bytes: Arc<AtomicU64>,
}

impl std::io::Write for CountedLink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.stream.write(buf)?;
        self.written_bytes.fetch_add(n as u64, Ordering::SeqCst);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

impl std::io::Read for CountedLink {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        std::io::Read::read(&mut self.stream, buf)
    }
}

impl Transport for CountedLink {
    fn vectored_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
    fn shut_down(&self) {}
}

impl IoTimeouts for CountedLink {
    fn bound_reads(&self, timeout: Option<std::time::Duration>) -> std::io::Result<()> {
        self.stream.bound_reads(timeout)
    }
    fn bound_writes(&self, timeout: Option<std::time::Duration>) -> std::io::Result<()> {
        self.stream.bound_writes(timeout)
    }
}

/// Pages the guest writes in each pre-copy round: more than one frame's worth
/// (`MAX_PAGES_PER_FRAME` is 1024).
const ROUND_PAGES: std::ops::Range<u64> = 100..1900;

/// The vCPU log, watched: the link's written bytes at START and at each REPORT, the
/// round's [`ROUND_PAGES`] written (and logged) just before each pre-copy REPORT, and a
/// page written right after it, while the round before it may still be sending.
struct WatchedLog {
    inner: InProcessTracker<SoftDriver>,
    recorder: WriteRecorder,
    memory: Arc<LoggedGuestMemory>,
    written_bytes: Arc<AtomicU64>,
    at_start: u64,
    at_reports: Vec<u64>,
    /// The REPORTs taken while the guest runs (the final one is taken paused).
    pre_copy_reports: usize,
}

impl DirtyTracker for WatchedLog {
    fn probe(&mut self) -> Result<bool, TrackerError> {
        self.inner.probe()
    }
    fn start(&mut self, ranges: &[IovaRange], page_size: u64) -> Result<u64, TrackerError> {
        self.at_start = self.written_bytes.load(Ordering::SeqCst);
        self.inner.start(ranges, page_size)
    }
    fn report(&mut self, range: IovaRange, page_size: u64, bitmap: &mut [u64]) -> TrackerResult {
        if range.iova() != 0 {
            return self.inner.report(range, page_size, bitmap);
        }
        // Where the link is when the REPORT is asked for.
        let at_link = self.written_bytes.load(Ordering::SeqCst);
        let pre_copy = self.at_reports.len() < self.pre_copy_reports;
        // What the guest wrote during the round ends it: two frames of pages, so that the
        // round's last frame is a part of it (a round of one small frame may be on the link
        // before any REPORT could be taken).
        if pre_copy {
            let fill = [0xc0 | self.at_reports.len() as u8; 4096];
            for page in ROUND_PAGES {
                self.memory.write_at(page * 4096, &fill);
                self.recorder.record_write(page * 4096, 4096);
            }
        }
        let result = self.inner.report(range, page_size, bitmap);
        self.at_reports.push(at_link);
        // Not after the final REPORT (the guest is paused then).
        if pre_copy {
            let fill = self.at_reports.len() as u8;
            self.memory.write_at(12 * 4096, &[fill; 4096]);
            self.recorder.record_write(12 * 4096, 4096);
        }
        result
    }
    fn stop(&mut self) -> Result<(), TrackerError> {
        self.inner.stop()
    }
}

/// A budget no round fits, auto-converge off: `max_rounds` pre-copy rounds, then the
/// forced stop.
fn no_round_fits(max_rounds: u32) -> dmalog_migrate::SourceConfig {
    dmalog_migrate::SourceConfig {
        max_downtime: std::time::Duration::from_micros(1),
        max_rounds,
        throttle: dmalog_migrate::converge::ThrottleParams {
            mode: dmalog_migrate::converge::AutoConverge::Off,
            ..Default::default()
        },
        ..config()
    }
}

/// The next round's REPORTs are taken while a round still sends (its last frame left, as
/// QEMU's multifd syncs its bitmap while the channels drain): a pre-copy REPORT sees fewer
/// bytes on the link than the round before it ends with (on a serial engine it sees that
/// round's every byte). A page written right after each such REPORT, while that round
/// was still going out, arrives: no dirty page is lost to the overlap.
#[test]
fn the_next_rounds_reports_overlap_the_end_of_a_round_and_lose_no_page() {
    let memory = Arc::new(memfd_guest_untracked(&LAYOUT).unwrap());
    memory.write_at(0, &vec![0x5a; 1 << 20]);
    let (mut device, mut dma) = FakeDevice::new(vec![3u8; 5000]);
    let (inner, recorder) = cpu_log();
    let written_bytes = Arc::new(AtomicU64::new(0));
    let mut cpu = WatchedLog {
        inner,
        recorder,
        memory: Arc::clone(&memory),
        written_bytes: Arc::clone(&written_bytes),
        at_start: 0,
        at_reports: Vec::new(),
        // Rounds 1 to 5: `max_rounds` (4) pre-copy rounds, and the one that forces the stop.
        pre_copy_reports: 5,
    };
    let (a, b) = UnixStream::pair().unwrap();
    let destination = spawn_destination(b);
    let mut replies = FrameReader::new(a.try_clone().unwrap());
    let mut out = FrameWriter::new(
        CountedLink {
            stream: a,
            written_bytes,
        },
        None,
    );
    let writer_memory = Arc::clone(&memory);
    let vm = SourceVm {
        memory: &memory,
        device: &mut device,
        cpu: &mut cpu,
        vcpus: None,
    };
    // The device dirties 300 pages a round: several frames of pages each round. A budget
    // no round fits: pre-copy rounds until the last resort.
    let config = no_round_fits(4);
    let mut round_count = 0u8;
    let report = migrate_source(&config, vm, &mut out, &mut replies, |round| {
        if !round.final_round {
            round_count += 1;
            for page in 0..300u64 {
                writer_memory.write_at((1 << 32) + page * 4096, &[round_count; 64]);
                dma.record_write((1 << 32) + page * 4096, 64);
            }
        }
    })
    .unwrap();
    assert!(report.verified);
    let (dst, dst_memory, _) = destination.join().unwrap();
    assert!(dst.unwrap().verified);
    let mut page = [0u8; 4096];
    dst_memory.read_at(12 * 4096, &mut page);
    assert_eq!(
        cpu.at_reports.len(),
        cpu.pre_copy_reports + 1,
        "and the final one"
    );
    assert!(
        page.iter().all(|&b| b as usize == cpu.pre_copy_reports),
        "the page written after the last pre-copy REPORT arrived"
    );
    // Pre-copy REPORT k (for round k + 1) against where round k ended on the link. On two
    // cores the engine's thread may wake after the sender wrote its last frame, so not
    // every REPORT overlaps; on a serial engine none does.
    let mut round_end = cpu.at_start;
    let pre_copy = &cpu.at_reports[..report.rounds.len() - 1];
    assert!(pre_copy.len() >= 4, "{} rounds", report.rounds.len());
    let mut overlapped = Vec::new();
    for (&at_report, round) in pre_copy.iter().zip(&report.rounds) {
        round_end += round.bytes_sent;
        overlapped.push(at_report < round_end);
    }
    assert!(
        overlapped.iter().filter(|&&o| o).count() * 2 >= overlapped.len(),
        "at least half the REPORTs were taken while their round was on the link: {overlapped:?}"
    );
}

/// How long the REPORT taken during round 1 (the second pre-copy REPORT) takes.
const SLOW_REPORT: std::time::Duration = std::time::Duration::from_millis(1500);

/// The vCPU log: the guest writes pages 100..1900 (7 MiB, more than a bandwidth sample
/// needs) before the first pre-copy REPORT, and the REPORT that overlaps round 1 is slow.
struct SlowSecondReport {
    inner: InProcessTracker<SoftDriver>,
    recorder: WriteRecorder,
    memory: Arc<LoggedGuestMemory>,
    reports: u32,
}

impl DirtyTracker for SlowSecondReport {
    fn probe(&mut self) -> Result<bool, TrackerError> {
        self.inner.probe()
    }
    fn start(&mut self, ranges: &[IovaRange], page_size: u64) -> Result<u64, TrackerError> {
        self.inner.start(ranges, page_size)
    }
    fn report(&mut self, range: IovaRange, page_size: u64, bitmap: &mut [u64]) -> TrackerResult {
        if range.iova() == 0 {
            self.reports += 1;
            match self.reports {
                1 => {
                    for page in ROUND_PAGES {
                        self.memory.write_at(page * 4096, &[0x77; 4096]);
                        self.recorder.record_write(page * 4096, 4096);
                    }
                }
                2 => std::thread::sleep(SLOW_REPORT),
                _ => {}
            }
        }
        self.inner.report(range, page_size, bitmap)
    }
    fn stop(&mut self) -> Result<(), TrackerError> {
        self.inner.stop()
    }
}

/// The bandwidth the policy measures is the link's: a REPORT that overlaps a round and
/// outlasts it does not count as time the round's bytes took (it would make the link
/// look several times slower, the predicted downtime as many times longer).
#[test]
fn a_slow_overlapped_report_does_not_count_in_the_rounds_bandwidth() {
    let memory = Arc::new(memfd_guest_untracked(&LAYOUT).unwrap());
    let (mut device, _dma) = FakeDevice::new(vec![3u8; 5000]);
    let (inner, recorder) = cpu_log();
    let mut cpu = SlowSecondReport {
        inner,
        recorder,
        memory: Arc::clone(&memory),
        reports: 0,
    };
    let (a, b) = UnixStream::pair().unwrap();
    let destination = spawn_destination(b);
    let mut replies = FrameReader::new(a.try_clone().unwrap());
    let mut out = FrameWriter::new(a, None);
    let vm = SourceVm {
        memory: &memory,
        device: &mut device,
        cpu: &mut cpu,
        vcpus: None,
    };
    // No round fits: rounds 1 and 2, then the forced stop.
    let config = no_round_fits(2);
    let report = migrate_source(&config, vm, &mut out, &mut replies, |_| {}).unwrap();
    assert!(report.verified);
    assert!(destination.join().unwrap().0.unwrap().verified);
    let round_1 = &report.rounds[1];
    assert!(round_1.pages_sent >= ROUND_PAGES.end - ROUND_PAGES.start);
    // Round 2 is decided on round 1's sample alone (round 0's is provisional). With the
    // REPORT's 1.5 s in it the sample is under 5 MB/s; 7 MiB on a socket pair take far
    // less than a quarter of that time even on a loaded machine.
    let slowest_link = round_1.bytes_sent as f64 / SLOW_REPORT.as_secs_f64();
    let measured = report.rounds[2].bandwidth_bytes_per_sec;
    assert!(
        measured > 4.0 * slowest_link,
        "round 1 measured at {measured:.0} B/s: the REPORT's time counted as the link's \
         ({slowest_link:.0} B/s with all of it)"
    );
}
