//! A silent or stalled peer is an error within the timeout, never a hang: the source facing
//! a destination that goes quiet after the final data (the guest paused) gets its VM back
//! running (vCPUs, device RUNNING, logging off); a destination facing a silent or
//! trickling source gives up. Each test runs its side on a thread and fails if that does
//! not finish well within a hang guard.

mod common;

use dmalog::IovaRange;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{
    config, hello, run_destination, source_guest, start_vcpus, FakeDevice, Vcpus, LAYOUT,
};
use dmalog::uapi::DeviceState;
use dmalog::DirtyTracker;
use dmalog_migrate::stream::{FrameReader, FrameWriter, Kind, StreamError};
use dmalog_migrate::{migrate_source, GuestPages, MigrateError, SourceVm};

/// The time limit given to the side under test.
const TIMEOUT: Duration = Duration::from_millis(300);
/// How long the test waits for that side before calling it a hang.
const HANG_GUARD: Duration = Duration::from_secs(20);

/// Runs `f` on a thread; its result, or a test failure if it is not back within the guard.
fn within_guard<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, result) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(f());
    });
    result
        .recv_timeout(HANG_GUARD)
        .unwrap_or_else(|_| panic!("{what}: still waiting after {HANG_GUARD:?} (a hang)"))
}

/// What the source side left behind after a failed migration.
struct SourceAfter {
    err: MigrateError,
    elapsed: Duration,
    device_state: DeviceState,
    device_logging: bool,
    cpu_logging_refused: bool,
    vcpus_paused: bool,
    vcpus_wrote_again: bool,
}

/// Runs a source VM (a fake device, vCPUs writing) against `peer` (the destination's end
/// of a socket pair, handled on its own thread), with the timeout on both directions.
fn source_against(peer: impl FnOnce(UnixStream) + Send + 'static) -> SourceAfter {
    let (ours, theirs) = UnixStream::pair().unwrap();
    std::thread::spawn(move || peer(theirs));
    within_guard("the source", move || {
        let (memory, regions) = source_guest(&LAYOUT);
        // Not zero, so that round 0 is more than the socket buffers hold (zero pages
        // cost almost nothing on the wire).
        for &(gpa, size) in &LAYOUT {
            assert!(memory.write_at(gpa, &vec![0x5a; size as usize]));
        }
        let (mut device, _) = FakeDevice::new(vec![5u8; 3000]);
        let Vcpus {
            mut cpu,
            workload: vcpus,
            ..
        } = start_vcpus((&memory, &regions), (0, 1 << 20), 4 << 20, 3);
        let mut replies = FrameReader::new(ours.try_clone().unwrap()).with_timeout(TIMEOUT);
        let mut out = FrameWriter::new(ours, None).with_timeout(TIMEOUT);
        let started = Instant::now();
        let vm = SourceVm {
            memory: &memory,
            device: &mut device,
            cpu: &mut cpu,
            vcpus: Some(&vcpus),
        };
        let err = migrate_source(&config(), vm, &mut out, &mut replies, |_| {}).unwrap_err();
        let elapsed = started.elapsed();
        let mut bitmap = [0u64; 32];
        let cpu_logging_refused = cpu
            .report(IovaRange::new(0, 4096).unwrap(), 4096, &mut bitmap)
            .is_err();
        // The vCPUs run again: their write count moves (waited for, not timed; not at all
        // when they are paused).
        let before = vcpus.writes();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !vcpus.is_paused() && vcpus.writes() == before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        SourceAfter {
            err,
            elapsed,
            device_state: device.state,
            device_logging: device.logging,
            cpu_logging_refused,
            vcpus_paused: vcpus.is_paused(),
            vcpus_wrote_again: vcpus.writes() > before,
        }
    })
}

fn assert_source_runs_again(after: &SourceAfter) {
    assert_eq!(after.device_state, DeviceState::Running, "{}", after.err);
    assert!(!after.device_logging, "device logging stopped");
    assert!(after.cpu_logging_refused, "vCPU logging stopped");
    assert!(!after.vcpus_paused, "vCPUs resumed");
    assert!(after.vcpus_wrote_again, "vCPUs write again");
}

#[test]
fn a_destination_silent_after_the_final_data_gives_the_source_its_vm_back() {
    let (release, hold) = mpsc::channel::<()>();
    let after = source_against(move |theirs| {
        // Take every frame up to End, then say nothing (the socket stays open).
        common::take_frames_answering_pings(&theirs, |frame| frame.kind == Kind::End);
        let _ = hold.recv_timeout(HANG_GUARD);
        drop(theirs);
    });
    drop(release);
    assert!(
        matches!(after.err, MigrateError::Stream(StreamError::TimedOut(t)) if t == TIMEOUT),
        "{}",
        after.err
    );
    assert!(after.err.to_string().contains("300 ms"), "{}", after.err);
    assert!(after.elapsed < HANG_GUARD);
    assert_source_runs_again(&after);
}

#[test]
fn a_destination_silent_after_the_source_s_go_keeps_the_source_paused() {
    let (release, hold) = mpsc::channel::<()>();
    let after = source_against(move |theirs| {
        // Ready after End (any hashes), then silence once Go has come: the source cannot
        // know whether the guest runs here.
        let mut input = FrameReader::new(theirs.try_clone().unwrap());
        let mut out = FrameWriter::new(theirs.try_clone().unwrap(), None);
        while let Ok(frame) = input.read() {
            match frame.kind {
                Kind::End => {
                    out.write(Kind::Ready, &[&0u64.to_le_bytes()]).unwrap();
                    out.flush().unwrap();
                }
                Kind::Go => break,
                Kind::Ping => {
                    out.write(Kind::Pong, &[&frame.payload]).unwrap();
                    out.flush().unwrap();
                }
                _ => {}
            }
        }
        let _ = hold.recv_timeout(HANG_GUARD);
        drop(theirs);
    });
    drop(release);
    assert!(
        matches!(&after.err, MigrateError::Unconfirmed(inner) if matches!(**inner, MigrateError::Stream(StreamError::TimedOut(_)))),
        "{}",
        after.err
    );
    assert!(
        after.err.to_string().contains("stays paused"),
        "{}",
        after.err
    );
    // Never on both hosts: the guest stays paused here, logging off.
    assert!(after.vcpus_paused, "vCPUs stay paused");
    assert_eq!(after.device_state, DeviceState::Stop);
    assert!(!after.device_logging, "device logging stopped");
    assert!(after.cpu_logging_refused, "vCPU logging stopped");
}

#[test]
fn a_destination_that_stops_reading_gives_the_source_its_vm_back() {
    let (release, hold) = mpsc::channel::<()>();
    let after = source_against(move |theirs| {
        // Read the Hello and answer the Pings, then nothing: the socket buffer fills and
        // the source's writes block.
        let mut pings = 0;
        common::take_frames_answering_pings(&theirs, |frame| {
            pings += u32::from(frame.kind == Kind::Ping);
            u64::from(pings) == dmalog_migrate::engine::LINK_PINGS
        });
        let _ = hold.recv_timeout(HANG_GUARD);
        drop(theirs);
    });
    drop(release);
    assert!(
        matches!(&after.err, MigrateError::Stream(StreamError::Io(io)) if io.kind() == std::io::ErrorKind::TimedOut),
        "{}",
        after.err
    );
    assert_source_runs_again(&after);
}

/// Runs the destination against `peer` (the source's end) with the timeout.
fn destination_against(
    peer: impl FnOnce(UnixStream) + Send + 'static,
) -> Result<dmalog_migrate::DestinationReport, MigrateError> {
    let (ours, theirs) = UnixStream::pair().unwrap();
    std::thread::spawn(move || peer(theirs));
    within_guard("the destination", move || {
        let mut input = FrameReader::new(ours.try_clone().unwrap()).with_timeout(TIMEOUT);
        let mut out = FrameWriter::new(ours, None).with_timeout(TIMEOUT);
        run_destination(&mut input, &mut out).0
    })
}

/// The destination gave up: a frame did not arrive within the timeout.
fn assert_timed_out(result: Result<dmalog_migrate::DestinationReport, MigrateError>) {
    assert!(
        matches!(result, Err(MigrateError::Stream(StreamError::TimedOut(_)))),
        "{:?}",
        result.err()
    );
}

#[test]
fn a_destination_facing_a_silent_source_times_out() {
    let (release, hold) = mpsc::channel::<()>();
    let result = destination_against(move |theirs| {
        // Connected, a Hello, then silence with the socket open.
        let mut out = FrameWriter::new(theirs, None);
        out.write(Kind::Hello, &[&hello(&LAYOUT)]).unwrap();
        let _ = hold.recv_timeout(HANG_GUARD);
    });
    drop(release);
    assert_timed_out(result);
}

#[test]
fn a_trickling_source_does_not_hold_the_destination() {
    // One byte of a frame header every 50 ms: each read returns in time, but the frame
    // never completes within the limit.
    let (release, hold) = mpsc::channel::<()>();
    let result = destination_against(move |mut theirs| {
        let mut frame = FrameWriter::new(Vec::new(), None);
        frame.write(Kind::Hello, &[&hello(&LAYOUT)]).unwrap();
        for byte in frame.get_mut().iter() {
            if theirs.write_all(&[*byte]).is_err()
                || hold.recv_timeout(Duration::from_millis(50)).is_ok()
            {
                return;
            }
        }
    });
    drop(release);
    assert_timed_out(result);
}

#[test]
fn a_destination_that_aborts_and_hangs_up_is_reported_with_its_reason() {
    let after = source_against(|theirs| {
        // Refuse after the Hello, say why, and close while the source is still writing.
        let _ = FrameReader::new(theirs.try_clone().unwrap()).read();
        let mut out = FrameWriter::new(theirs, None);
        let _ = out.write(Kind::Abort, &[b"not today\x1b[2J"]);
    });
    assert!(
        matches!(&after.err, MigrateError::Peer(why) if why == "aborted: not today\\u{1b}[2J"),
        "{}",
        after.err
    );
    assert_source_runs_again(&after);
}

#[test]
fn a_silent_device_is_not_asked_again_before_the_vcpus_resume() {
    // The device server stops answering at the stop (STOP_COPY times out): each further
    // request would wait out the timeout again with the guest paused.
    let (memory, regions) = source_guest(&LAYOUT);
    let (mut device, _) = FakeDevice::new(vec![1u8; 10]);
    let Vcpus {
        mut cpu,
        workload: vcpus,
        ..
    } = start_vcpus((&memory, &regions), (0, 1 << 20), 1 << 20, 1);
    let (ours, theirs) = UnixStream::pair().unwrap();
    std::thread::spawn(move || common::take_frames_answering_pings(&theirs, |_| false));
    let mut replies = FrameReader::new(ours.try_clone().unwrap()).with_timeout(TIMEOUT);
    let mut out = FrameWriter::new(ours, None).with_timeout(TIMEOUT);
    let mut config = config();
    config.mode = dmalog_migrate::Mode::StopAndCopy;
    device.silent = true;
    let vm = SourceVm {
        memory: &memory,
        device: &mut device,
        cpu: &mut cpu,
        vcpus: Some(&vcpus),
    };
    let err = migrate_source(&config, vm, &mut out, &mut replies, |_| {}).unwrap_err();
    assert!(matches!(err, MigrateError::DeviceSilent(_)), "{err}");
    assert!(!vcpus.is_paused());
    // Only the STOP_COPY request was made silently (it failed first); none after.
    assert_eq!(device.calls_while_silent, 1);
}
