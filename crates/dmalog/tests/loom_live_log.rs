//! loom model of the live log: a DMA writer's `WriteRecorder::record_write` racing a START
//! or STOP (`LiveLog::publish`) and a report. The generation counter, the fences and the
//! cell the log is published in (`arc-swap`, a loom shim of it here) go through
//! `crate::sync`, so loom checks all of them.
//!
//! Opt-in: `RUSTFLAGS="--cfg loom" cargo test -p dmalog --test loom_live_log --release`.
#![cfg(loom)]

use dmalog::{DirtyLog, DirtyMarker, IovaBitmap, LiveLog};
use loom::sync::atomic::{AtomicU64, Ordering};
use loom::thread;
use std::sync::Arc;

const PAGE: u64 = 4096;
const LEN: u64 = 128 * PAGE;
const PAGE_5: u128 = 1 << 5;

/// One range's dirty log, published as the live log's marker.
struct Log(DirtyLog);

impl DirtyMarker for Log {
    fn mark(&self, iova: u64, len: u64) {
        self.0.mark(iova, len);
    }
}

fn report(log: &Log) -> u128 {
    let mut buf = [0u8; 16];
    let mut bitmap = IovaBitmap::new(0, LEN, PAGE, &mut buf).unwrap();
    log.0.read_and_clear(0, LEN, &mut bitmap);
    u128::from_le_bytes(buf)
}

/// What a migration source does after START: copy all of guest memory (here one word of
/// it), then report and copy what the report names, then (writers quiesced) a final report.
/// A write is lost when its data is in none of the copies: not in the bulk copy after the
/// START, and its page is in no report after which the data was visible.
fn migrate_after_start(
    live: &LiveLog,
    log: &Arc<Log>,
    data: &AtomicU64,
    writer: thread::JoinHandle<()>,
) {
    live.publish(Some(Arc::clone(log) as Arc<dyn DirtyMarker>));
    let bulk_copy = data.load(Ordering::Relaxed);
    let first = report(log);
    let copy_after_first = data.load(Ordering::Relaxed);
    writer.join().unwrap();
    let last = report(log);
    assert_eq!((first | last) & !PAGE_5, 0, "only page 5 was written");
    assert!(
        bulk_copy == 1 || (first & PAGE_5 != 0 && copy_after_first == 1) || last & PAGE_5 != 0,
        "a write racing START is in neither the copy after START nor the log \
         (bulk {bulk_copy}, first report {first:#x} then copy {copy_after_first})"
    );
}

/// A write races the START that publishes the log (the recorder has seen no log yet).
#[test]
fn a_write_racing_start_is_copied_or_logged() {
    loom::model(|| {
        let live = LiveLog::new();
        let log = Arc::new(Log(DirtyLog::new(0, LEN, PAGE).unwrap()));
        let data = Arc::new(AtomicU64::new(0));
        let writer = {
            let (mut recorder, data) = (live.recorder(), Arc::clone(&data));
            thread::spawn(move || {
                data.store(1, Ordering::Relaxed);
                recorder.record_write(5 * PAGE, 1);
            })
        };
        migrate_after_start(&live, &log, &data, writer);
    });
}

/// A writer still holding the log of an earlier START races a STOP and a new START: it must
/// not mark the retired log and be lost, whatever generation it reads.
#[test]
fn a_write_racing_stop_and_restart_is_copied_or_logged() {
    loom::model(|| {
        let live = LiveLog::new();
        let retired = Arc::new(Log(DirtyLog::new(0, LEN, PAGE).unwrap()));
        live.publish(Some(Arc::clone(&retired) as Arc<dyn DirtyMarker>));
        let mut recorder = live.recorder();
        recorder.record_write(70 * PAGE, 1); // caches the first log
        assert!(recorder.is_logging());
        let log = Arc::new(Log(DirtyLog::new(0, LEN, PAGE).unwrap()));
        let data = Arc::new(AtomicU64::new(0));
        let writer = {
            let data = Arc::clone(&data);
            thread::spawn(move || {
                data.store(1, Ordering::Relaxed);
                recorder.record_write(5 * PAGE, 1);
            })
        };
        live.publish(None);
        migrate_after_start(&live, &log, &data, writer);
    });
}
