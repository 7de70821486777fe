//! A device author's own `LogDriver`, handed to the server through the tracker factory, is
//! what START, REPORT and STOP run on over the wire.

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dmalog::tracker::report_words;
use dmalog::{DirtyMarker, DirtyTracker, IovaBitmap, IovaRange, LiveLog, LogDriver, LogResult};
use dmalog_device::dma_engine::{op, reg};
use dmalog_device::{sealed_memfd, DmaEngine};
use dmalog_vfio_user::{Client, ServedTracker, Server, ServerConfig};

/// The one page size this driver tracks at, whatever the hint (the soft tracker would take
/// the 4 KiB hint).
const PAGE_BYTES: u64 = 16 << 10;

/// Dirty pages as a set of page numbers: slow, simple, and not one of dmalog's trackers.
#[derive(Default)]
struct PageSet(Mutex<BTreeSet<u64>>);

impl DirtyMarker for PageSet {
    fn mark(&self, iova: u64, len: u64) {
        let Some(last) = len.checked_sub(1).and_then(|l| iova.checked_add(l)) else {
            return;
        };
        let mut pages = self.0.lock().unwrap();
        pages.extend(iova / PAGE_BYTES..=last / PAGE_BYTES);
    }
}

struct SetDriver {
    live: Arc<LiveLog>,
    pages: Arc<PageSet>,
    reports: Arc<AtomicUsize>,
}

impl LogDriver for SetDriver {
    fn start(&mut self, _ranges: &[IovaRange], page_size: &mut u64) -> LogResult<()> {
        *page_size = PAGE_BYTES;
        self.live
            .publish(Some(Arc::clone(&self.pages) as Arc<dyn DirtyMarker>));
        Ok(())
    }

    fn stop(&mut self) {
        self.live.publish(None);
        self.pages.0.lock().unwrap().clear();
    }

    fn read_and_clear(&mut self, range: IovaRange, bitmap: &mut IovaBitmap<'_>) -> LogResult<()> {
        self.reports.fetch_add(1, Ordering::SeqCst);
        let (iova, end) = (range.iova(), range.end());
        let mut pages = self.pages.0.lock().unwrap();
        let wanted: Vec<u64> = pages
            .range(iova / PAGE_BYTES..end.div_ceil(PAGE_BYTES))
            .copied()
            .collect();
        for page in wanted {
            bitmap.set(page * PAGE_BYTES, PAGE_BYTES);
            pages.remove(&page);
        }
        Ok(())
    }
}

#[test]
fn a_custom_log_driver_is_served_and_reported_through_the_wire() {
    let reports = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&reports);
    let mut server = Server::with_tracker(
        ServerConfig::default(),
        move |live| {
            ServedTracker::new(SetDriver {
                live: Arc::clone(live),
                pages: Arc::default(),
                reports: counted,
            })
        },
        |space| Box::new(DmaEngine::new(space)),
    );
    let (vmm_end, device_end) = UnixStream::pair().unwrap();
    let device = std::thread::spawn(move || server.serve(device_end));

    let guest = sealed_memfd("guest", 1 << 20).unwrap();
    let mut client = Client::with_stream(vmm_end, 1 << 20).unwrap();
    client
        .dma_map(
            IovaRange::new(0, 1 << 20).unwrap(),
            Some(guest.as_fd()),
            0,
            true,
        )
        .unwrap();
    assert!(client.probe().unwrap());
    let guest_range = IovaRange::new(0, 1 << 20).unwrap();
    let page_size = client.start(&[guest_range], 4096).unwrap();
    assert_eq!(
        page_size, PAGE_BYTES,
        "the custom driver chose the page size"
    );

    // FILL 8 KiB at 0x5000: inside the custom driver's page 1 ([16 KiB, 32 KiB)).
    for (offset, value) in [(reg::DST, 0x5000), (reg::LEN, 8192), (reg::OP, op::FILL)] {
        client.write_u64(0, offset, value).unwrap();
    }
    client.write_u64(0, reg::DOORBELL, 1).unwrap();
    assert_eq!(client.read_u64(0, reg::STATUS).unwrap(), 0);

    let mut bitmap = vec![0u64; report_words(1 << 20, page_size).unwrap() as usize];
    client.report(guest_range, page_size, &mut bitmap).unwrap();
    assert_eq!(bitmap[0], 0b10);
    assert!(bitmap[1..].iter().all(|&w| w == 0));
    assert_eq!(
        reports.load(Ordering::SeqCst),
        1,
        "the REPORT reached the driver"
    );

    // Read and cleared: the next REPORT is clean.
    let mut again = vec![0u64; bitmap.len()];
    client.report(guest_range, page_size, &mut again).unwrap();
    assert!(again.iter().all(|&w| w == 0));
    client.stop().unwrap();
    drop(client);
    device.join().unwrap();
}

#[test]
fn a_server_without_a_tracker_answers_enotty_to_the_logging_features() {
    let mut server = Server::with_tracker(
        ServerConfig::default(),
        |_| ServedTracker::none(),
        |space| Box::new(DmaEngine::new(space)),
    );
    let (vmm_end, device_end) = UnixStream::pair().unwrap();
    let device = std::thread::spawn(move || server.serve(device_end));
    let mut client = Client::with_stream(vmm_end, 1 << 20).unwrap();
    assert!(!client.probe().unwrap());
    drop(client);
    device.join().unwrap();
}
