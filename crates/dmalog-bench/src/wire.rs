//! Workloads of the vfio-user server (issue targets of the wire): a REPORT round trip over a
//! UNIX socket against a plain socket transfer of the same bytes, and dma-engine FILL
//! throughput with logging on against logging off.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;

use dmalog::{DirtyTracker, InProcessTracker, IovaRange, SoftDriver, WriteRecorder};
use dmalog_device::dma_engine::{op, reg};
use dmalog_device::{
    Device as DeviceTrait, DmaBacking, DmaEngine, DmaRegion, DmaSpace, SharedMapping,
};
use dmalog_vfio_user::{Client, Server, ServerConfig};

/// Bytes of the report page.
const PAGE: u64 = 4096;
/// The largest message payload both ends accept (the split size of a REPORT).
pub const SPLIT_BYTES: u32 = 1 << 20;

/// A REPORT of `span` bytes at 4 KiB from a `dmalog` server in another thread, over a UNIX
/// socket, and the plain transfer of the same bitmap bytes over another socket.
pub struct SocketReport {
    span: u64,
    client: Option<Client>,
    server_thread: Option<JoinHandle<()>>,
    recorder: WriteRecorder,
    words: Vec<u64>,
    plain_client: UnixStream,
    plain_thread: Option<JoinHandle<()>>,
    plain_buffer: Vec<u8>,
}

impl SocketReport {
    /// A server with the soft tracker logging `[0, span)` and a client connected to it.
    pub fn new(span: u64) -> Self {
        let config = ServerConfig {
            max_data_xfer_size: SPLIT_BYTES,
            ..ServerConfig::default()
        };
        let mut server = Server::new(config, |space| Box::new(DmaEngine::new(space)));
        let recorder = server.recorder();
        let (client_end, server_end) = UnixStream::pair().expect("socket pair");
        let server_thread = std::thread::spawn(move || server.serve(server_end));
        let mut client = Client::with_stream(client_end, SPLIT_BYTES).expect("negotiate");
        client
            .start(&[IovaRange::new(0, span).expect("range")], PAGE)
            .expect("START");
        let bitmap_bytes = (span / PAGE).div_ceil(8) as usize;

        // The baseline: a 16-byte request, answered with the bitmap's bytes in messages of
        // at most SPLIT_BYTES.
        let (plain_client, mut plain_server) = UnixStream::pair().expect("socket pair");
        let plain_thread = std::thread::spawn(move || {
            let payload = vec![0xA5u8; bitmap_bytes];
            let mut request = [0u8; 16];
            while plain_server.read_exact(&mut request).is_ok() {
                for piece in payload.chunks(SPLIT_BYTES as usize) {
                    if plain_server.write_all(piece).is_err() {
                        return;
                    }
                }
            }
        });
        SocketReport {
            span,
            client: Some(client),
            server_thread: Some(server_thread),
            recorder,
            words: vec![0u64; bitmap_bytes.div_ceil(8)],
            plain_client,
            plain_thread: Some(plain_thread),
            plain_buffer: vec![0u8; bitmap_bytes],
        }
    }

    /// Bytes of the bitmap each report carries.
    pub fn bitmap_bytes(&self) -> u64 {
        (self.span / PAGE).div_ceil(8)
    }

    /// Marks every page dirty on the server's log and zeroes the caller's bitmap (which a
    /// report ORs into). Untimed.
    pub fn dirty_all(&mut self) {
        self.recorder.record_write(0, self.span);
        self.words.fill(0);
    }

    /// One REPORT of the whole span, split transparently by the client.
    pub fn report(&mut self) {
        self.client
            .as_mut()
            .expect("connected")
            .report(
                IovaRange::new(0, self.span).expect("span checked in new"),
                PAGE,
                &mut self.words,
            )
            .expect("REPORT");
    }

    /// Pages set in the last report.
    pub fn reported_pages(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// One plain round trip of the same bytes.
    pub fn plain_transfer(&mut self) {
        self.plain_client
            .write_all(&[0u8; 16])
            .expect("plain request");
        self.plain_client
            .read_exact(&mut self.plain_buffer)
            .expect("plain reply");
    }
}

impl Drop for SocketReport {
    fn drop(&mut self) {
        // Closing the sockets ends both server threads.
        if let Some(mut client) = self.client.take() {
            let _ = client.stop();
        }
        let _ = self.plain_client.shutdown(std::net::Shutdown::Both);
        if let Some(thread) = self.plain_thread.take() {
            let _ = thread.join();
        }
        if let Some(thread) = self.server_thread.take() {
            let _ = thread.join();
        }
    }
}

/// dma-engine FILL ops of `write_bytes` through its registers, on a 64 MiB memfd, with a
/// soft tracker that is logging or not.
pub struct FillThroughput {
    device: DmaEngine,
    tracker: InProcessTracker<SoftDriver>,
    span: u64,
    write_bytes: u64,
    next_dst: u64,
}

impl FillThroughput {
    /// The device with 64 MiB of DMA-mapped memory (populated, so page faults are not
    /// measured); logging is off.
    pub fn new(write_bytes: u64) -> Self {
        let span = 64u64 << 20;
        // Sealed, as dmalog's own guest memory: the direct copy path.
        let memory = dmalog_device::sealed_memfd("dmalog-bench-fill", span).expect("memfd");
        let mapping = SharedMapping::map_populated(&memory, 0, span as usize, true).expect("mmap");
        let driver = SoftDriver::new();
        let space = DmaSpace::new(Arc::clone(driver.live_log()));
        space
            .map(DmaRegion {
                iova: 0,
                size: span,
                readable: true,
                writable: true,
                backing: DmaBacking::Mapped(Arc::new(mapping)),
            })
            .expect("map");
        let mut device = DmaEngine::new(&space);
        let mut set = |offset: u64, value: u64| {
            device
                .region_write(0, offset, &value.to_le_bytes())
                .expect("register write");
        };
        set(reg::LEN, write_bytes);
        set(reg::PATTERN, 0x5eed);
        set(reg::OP, op::FILL);
        FillThroughput {
            device,
            tracker: InProcessTracker::new(driver),
            span,
            write_bytes,
            next_dst: 0,
        }
    }

    /// Starts (`true`) or stops logging of the whole 64 MiB.
    pub fn set_logging(&mut self, on: bool) {
        if on {
            self.tracker
                .start(&[IovaRange::new(0, self.span).expect("range")], PAGE)
                .expect("START");
        } else {
            self.tracker.stop().expect("STOP");
        }
    }

    /// One FILL at the next destination (the writes walk the 64 MiB in turn).
    pub fn fill(&mut self) {
        let dst = self.next_dst;
        self.next_dst = (dst + self.write_bytes) % self.span;
        self.device
            .region_write(0, reg::DST, &dst.to_le_bytes())
            .expect("DST");
        self.device
            .region_write(0, reg::DOORBELL, &1u64.to_le_bytes())
            .expect("doorbell");
    }

    /// The status register of the last op (0: it wrote everything).
    pub fn status(&mut self) -> u64 {
        let mut bytes = [0u8; 8];
        self.device
            .region_read(0, reg::STATUS, &mut bytes)
            .expect("STATUS");
        u64::from_le_bytes(bytes)
    }

    /// Pages the tracker reports dirty now (and clears).
    pub fn dirty_pages(&mut self) -> u64 {
        let mut words = vec![0u64; (self.span / PAGE).div_ceil(64) as usize];
        self.tracker
            .report(
                IovaRange::new(0, self.span).expect("span checked in new"),
                PAGE,
                &mut words,
            )
            .expect("REPORT");
        words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_report_carries_every_dirty_page() {
        let mut w = SocketReport::new(1 << 32);
        w.dirty_all();
        w.report();
        assert_eq!(w.reported_pages(), (1 << 32) / PAGE);
        w.words.fill(0);
        w.report();
        assert_eq!(w.reported_pages(), 0, "the report cleared the log");
        w.plain_transfer();
        w.plain_transfer();
    }

    #[test]
    fn fills_are_logged_only_while_logging() {
        let mut w = FillThroughput::new(1 << 20);
        w.fill();
        assert_eq!(w.status(), 0);
        w.set_logging(true);
        w.fill();
        w.fill();
        assert_eq!(w.status(), 0);
        assert_eq!(w.dirty_pages(), 2 * (1 << 20) / PAGE);
        w.set_logging(false);
    }
}
