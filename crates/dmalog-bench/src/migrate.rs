//! The migration stream over loopback TCP (issue 11), each figure beside a plain TCP copy
//! of the same bytes measured in the same run: a whole 1 GiB guest (round 0 of an idle
//! guest, every page holding data), a round of 20,000 scattered 4 KiB pages, zero pages
//! skipped on a mostly-zero guest against sent as data, and TLS against plaintext.
//!
//! The source is [`dmalog_migrate::sender::PageStream`] (the engine's data path without
//! the device and dirty tracking), the destination [`migrate_destination_channels`] on its
//! own thread with a device that only takes its state. A migration's time runs from the
//! Hello to the destination's Resumed (all pages in its memory), less the time the
//! destination spent hashing its memory for verification.
//!
//! The baseline of the targets is a plain TCP copy of the guest's own bytes: `writev`
//! straight from the source's guest memory, `readv` straight into memory of the guest's
//! layout (populated, as the destination's is), to the same addresses, the list of which
//! the receiver is told out of band (untimed). So it pays what the migration must pay
//! (cold guest memory read, guest-sized memory written, scattered pieces for a scattered
//! round) and none of the protocol: no frames, no run tables, no zero checks. A copy from a
//! 4 MiB buffer that stays in cache into another one is kept as an informational row.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dmalog_migrate::fuzzing::LoadingDevice;
use dmalog_migrate::sender::PageStream;
use dmalog_migrate::stream::{Channel, FrameReader, FrameWriter, IoTimeouts, Kind, Transport};
use dmalog_migrate::tls::{self, ClientConfig, ServerConfig, TlsConfig};
use dmalog_migrate::{
    memfd_guest_untracked, migrate_destination_channels, DestinationReport, GuestPages, Incoming,
    LoggedGuestMemory,
};

use dmalog_device::io_piece::{advance, read_pieces, write_pieces};
use dmalog_device::{IoPiece, IoPieceMut};

use crate::workloads::{next_random, Row, Target};

const PAGE: u64 = 4096;
const GIB: u64 = 1 << 30;
/// Generous: a hang guard only.
const TIMEOUT: Duration = Duration::from_secs(60);

/// How a measured migration went.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    /// Hello to Ready (every page in place), less the destination's hashing.
    pub elapsed: Duration,
    /// Bytes on the wire, every channel.
    pub wire_bytes: u64,
    /// Pages sent as zero runs.
    pub zero_pages: u64,
    /// CPU time of the whole process (source, destination and kernel work on their
    /// behalf, loopback TCP included) from Hello to Ready, less the destination's
    /// hashing.
    pub cpu: Duration,
}

/// CPU time this process has used so far, every thread.
fn process_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// A source guest, a destination thread and a plain-copy sink, all on loopback.
pub struct MigrateLoopback {
    memory: LoggedGuestMemory,
    address: String,
    tls_address: String,
    sink_address: String,
    guest_sink_address: String,
    /// The pieces `(gpa, len_bytes)` of the next guest copy, for the guest sink.
    guest_sink_runs: Option<mpsc::Sender<Vec<(u64, u64)>>>,
    client_tls: Arc<ClientConfig>,
    _threads: Vec<JoinHandle<()>>,
}

fn listen() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen on loopback");
    let address = listener.local_addr().expect("address").to_string();
    (listener, address)
}

/// Accepts further channels on `listener` (plaintext or TLS as the main one).
fn acceptor<'l>(
    listener: &'l TcpListener,
    tls: Option<&'l Arc<ServerConfig>>,
) -> impl FnMut() -> std::io::Result<Incoming> + 'l {
    move || {
        let (tcp, _) = listener.accept()?;
        tcp.set_nodelay(true)?;
        let (reader, handle): (Box<dyn Channel>, Box<dyn Channel>) = match tls {
            Some(config) => {
                let stream = tls::accept(config, tcp, TIMEOUT).map_err(std::io::Error::other)?;
                (Box::new(stream.try_clone()?), Box::new(stream))
            }
            None => (Box::new(tcp.try_clone()?), Box::new(tcp)),
        };
        Ok(Incoming { reader, handle })
    }
}

/// Takes one migration from `input`, replying on `out`, its further channels from
/// `accept`, into `memory` (a fresh device each time).
fn take_migration(
    memory: &LoggedGuestMemory,
    input: impl Read + IoTimeouts + Transport,
    out: impl Write + IoTimeouts,
    accept: impl FnMut() -> std::io::Result<Incoming>,
) -> Result<DestinationReport, String> {
    let mut input = FrameReader::new(input).with_timeout(TIMEOUT);
    let mut out = FrameWriter::new(out, None).with_timeout(TIMEOUT);
    migrate_destination_channels(
        memory,
        &mut LoadingDevice::default(),
        &mut |_, _| Ok(()),
        &mut input,
        &mut out,
        accept,
    )
    .map_err(|e| e.to_string())
}

/// Takes migrations on `listener` until the process ends, into one guest memory.
fn destination(listener: TcpListener, layout: Vec<(u64, u64)>, tls: Option<Arc<ServerConfig>>) {
    let memory = memfd_guest_untracked(&layout).expect("destination guest memory");
    loop {
        let Ok((tcp, _)) = listener.accept() else {
            return;
        };
        let _ = tcp.set_nodelay(true);
        let accept = acceptor(&listener, tls.as_ref());
        let result = match &tls {
            Some(config) => tls::accept(config, tcp, TIMEOUT)
                .map_err(|e| e.to_string())
                .and_then(|stream| {
                    let input = stream.try_clone().expect("clone");
                    take_migration(&memory, input, stream, accept)
                }),
            None => {
                let input = tcp.try_clone().expect("clone");
                take_migration(&memory, input, tcp, accept)
            }
        };
        assert!(
            result.as_ref().is_ok_and(|r| r.verified),
            "bench migration: {result:?}"
        );
    }
}

/// Reads `len u64` then that many bytes into a 4 MiB buffer, answers one byte; repeats.
fn sink(listener: TcpListener) {
    let mut buffer = vec![0u8; 4 << 20];
    while let Ok((mut tcp, _)) = listener.accept() {
        let mut len = [0u8; 8];
        if tcp.read_exact(&mut len).is_err() {
            continue;
        }
        let mut left = u64::from_le_bytes(len);
        while left > 0 {
            let n = (left as usize).min(buffer.len());
            if tcp.read_exact(&mut buffer[..n]).is_err() {
                break;
            }
            left -= n as u64;
        }
        let _ = tcp.write_all(&[1]);
    }
}

/// For each copy: the pieces `(gpa, len_bytes)` from `runs`, then one connection on
/// `listener` whose bytes are read straight into those pieces of a guest memory of
/// `layout` (populated), then one byte back.
fn guest_sink(
    listener: TcpListener,
    layout: Vec<(u64, u64)>,
    runs: mpsc::Receiver<Vec<(u64, u64)>>,
) {
    let memory = memfd_guest_untracked(&layout).expect("the guest sink's memory");
    for runs in runs {
        let Ok((mut tcp, _)) = listener.accept() else {
            return;
        };
        let mut pieces: Vec<IoPieceMut<'_>> = runs
            .iter()
            .map(|&(gpa, len)| memory.piece_mut(gpa, len as usize).expect("inside"))
            .collect();
        let mut first = 0;
        while first < pieces.len() {
            match read_pieces(&tcp, &pieces[first..call_end(&pieces, first)]) {
                Ok(0) | Err(_) => break,
                Ok(n) => advance(&mut pieces, &mut first, n),
            }
        }
        let _ = tcp.write_all(&[1]);
    }
}

/// Most bytes one call of the guest copy moves on either side: the migration's largest
/// frame, so that the baseline's kernel calls are no larger than the migration's.
const COPY_CALL_BYTES: u64 = 4 << 20;

/// The end of the pieces from `first` that one call of the guest copy moves (at least
/// one; pieces are at most [`COPY_CALL_BYTES`]).
fn call_end<D>(pieces: &[dmalog_device::io_piece::Piece<'_, D>], first: usize) -> usize {
    let mut bytes = 0u64;
    let mut end = first;
    while end < pieces.len() && bytes + pieces[end].len() as u64 <= COPY_CALL_BYTES {
        bytes += pieces[end].len() as u64;
        end += 1;
    }
    end.max(first + 1).min(pieces.len())
}

/// The runs `(gpa, len_bytes)` of the pages set in `words` (one bitmap per region), none
/// over [`COPY_CALL_BYTES`].
fn runs_of(memory: &impl GuestPages, words: &[Vec<u64>]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (region, bits) in memory.regions().iter().zip(words) {
        for page in 0..region.size / PAGE {
            if bits[(page / 64) as usize] & (1 << (page % 64)) == 0 {
                continue;
            }
            let gpa = region.gpa + page * PAGE;
            match runs.last_mut() {
                Some(last) if last.0 + last.1 == gpa && page > 0 && last.1 < COPY_CALL_BYTES => {
                    last.1 += PAGE
                }
                _ => runs.push((gpa, PAGE)),
            }
        }
    }
    runs
}

impl MigrateLoopback {
    /// A 1 GiB guest (3/4 at GPA 0, 1/4 at 4 GiB), every page holding data.
    pub fn new() -> Self {
        Self::with_guest_bytes(GIB)
    }

    /// A guest of `guest_bytes` (page-aligned; 3/4 at GPA 0, 1/4 at 4 GiB), every page
    /// holding data.
    pub fn with_guest_bytes(guest_bytes: u64) -> Self {
        let layout = dmalog_migrate::default_layout(guest_bytes);
        let memory = memfd_guest_untracked(&layout).expect("source guest memory");
        let mut chunk = vec![0u8; 4 << 20];
        let mut rng = 0x9e37_79b9u64;
        for &(gpa, size) in &layout {
            let mut done = 0;
            while done < size {
                for word in chunk.chunks_exact_mut(8) {
                    word.copy_from_slice(&(next_random(&mut rng) | 1).to_le_bytes());
                }
                let n = (size - done).min(chunk.len() as u64) as usize;
                assert!(memory.write_at(gpa + done, &chunk[..n]));
                done += n as u64;
            }
        }
        let ca = dmalog_migrate::pki::Authority::new("bench CA").expect("CA");
        let server = ca.server(&["127.0.0.1".into()]).expect("server cert");
        let client = ca.client("bench source").expect("client cert");
        let server_tls = TlsConfig::from_pem(&ca.cert_pem, &server.cert_pem, &server.key_pem)
            .and_then(|c| c.server_config())
            .expect("server TLS");
        let client_tls = TlsConfig::from_pem(&ca.cert_pem, &client.cert_pem, &client.key_pem)
            .and_then(|c| c.client_config())
            .expect("client TLS");
        let (plain, address) = listen();
        let (secure, tls_address) = listen();
        let (sink_listener, sink_address) = listen();
        let (guest_sink_listener, guest_sink_address) = listen();
        let (runs_sender, runs) = mpsc::channel();
        let threads = vec![
            {
                let layout = layout.clone();
                std::thread::spawn(move || guest_sink(guest_sink_listener, layout, runs))
            },
            {
                let layout = layout.clone();
                std::thread::spawn(move || destination(plain, layout, None))
            },
            std::thread::spawn(move || destination(secure, layout, Some(server_tls))),
            std::thread::spawn(move || sink(sink_listener)),
        ];
        let w = MigrateLoopback {
            memory,
            address,
            tls_address,
            sink_address,
            guest_sink_address,
            guest_sink_runs: Some(runs_sender),
            client_tls,
            _threads: threads,
        };
        // Untimed: waits for the destinations' guest memory, warms both paths.
        let one = w.scattered_pages(1);
        w.migrate(&one, false, 1, true);
        w.migrate(&one, true, 1, true);
        w
    }

    /// The source guest.
    pub fn memory(&self) -> &LoggedGuestMemory {
        &self.memory
    }

    /// Bitmaps (one per region) with every page set.
    pub fn all_pages(&self) -> Vec<Vec<u64>> {
        self.memory
            .regions()
            .iter()
            .map(|r| {
                let pages = r.size / PAGE;
                let mut words = vec![u64::MAX; pages.div_ceil(64) as usize];
                if pages % 64 != 0 {
                    *words.last_mut().expect("a word") = (1 << (pages % 64)) - 1;
                }
                words
            })
            .collect()
    }

    /// Bitmaps with `npages` distinct pages set at random.
    pub fn scattered_pages(&self, npages: u64) -> Vec<Vec<u64>> {
        let mut words: Vec<Vec<u64>> = self
            .memory
            .regions()
            .iter()
            .map(|r| vec![0u64; (r.size / PAGE).div_ceil(64) as usize])
            .collect();
        let total: u64 = self.memory.total_bytes() / PAGE;
        let mut rng = 0x5eed_u64;
        let mut set = 0;
        while set < npages {
            let mut page = next_random(&mut rng) % total;
            for (region, bits) in self.memory.regions().iter().zip(words.iter_mut()) {
                let pages = region.size / PAGE;
                if page < pages {
                    let (word, bit) = ((page / 64) as usize, page % 64);
                    if bits[word] & (1 << bit) == 0 {
                        bits[word] |= 1 << bit;
                        set += 1;
                    }
                    break;
                }
                page -= pages;
            }
        }
        words
    }

    fn connect(
        &self,
        tls: bool,
        rate_bytes_per_sec: Option<u64>,
    ) -> std::io::Result<FrameWriter<BenchLink>> {
        let address = if tls {
            &self.tls_address
        } else {
            &self.address
        };
        let tcp = TcpStream::connect(address)?;
        tcp.set_nodelay(true)?;
        let link = if tls {
            BenchLink::Tls(
                tls::connect(&self.client_tls, "127.0.0.1", tcp, TIMEOUT)
                    .map_err(std::io::Error::other)?,
            )
        } else {
            BenchLink::Plain(tcp)
        };
        Ok(FrameWriter::new(link, rate_bytes_per_sec).with_timeout(TIMEOUT))
    }

    /// One migration of the pages in `words` (one round, then End) on `channels`
    /// connections.
    pub fn migrate(
        &self,
        words: &[Vec<u64>],
        tls: bool,
        channels: u32,
        skip_zero: bool,
    ) -> Transfer {
        self.migrate_capped(words, (tls, channels, skip_zero), None)
    }

    /// As [`MigrateLoopback::migrate`] (`tls`, `channels`, `skip_zero`), each channel
    /// capped at `rate_bytes_per_sec` (a link slower than loopback).
    pub fn migrate_capped(
        &self,
        words: &[Vec<u64>],
        (tls, channels, skip_zero): (bool, u32, bool),
        rate_bytes_per_sec: Option<u64>,
    ) -> Transfer {
        let mut out = self
            .connect(tls, rate_bytes_per_sec)
            .expect("connect the source");
        let mut replies =
            FrameReader::new(out.get_mut().try_clone().expect("clone")).with_timeout(TIMEOUT);
        let started = Instant::now();
        let cpu_before = process_cpu();
        let mut connect = |_| self.connect(tls, rate_bytes_per_sec);
        let mut stream =
            PageStream::start(&mut out, channels, &mut connect, &self.memory).expect("Hello");
        stream.set_skip_zero(skip_zero);
        stream.send_round(words).expect("the round");
        stream.end().expect("End");
        let zero_pages = stream.zero_pages();
        let wire_bytes = stream.bytes();
        // The destination has every page once it is Ready (it resumes only on Go).
        let ready = replies.read().expect("Ready");
        let elapsed = started.elapsed();
        let cpu = process_cpu().saturating_sub(cpu_before);
        assert_eq!(ready.kind, Kind::Ready);
        let hash_ns = ready
            .payload
            .get(..8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        out.write(Kind::Go, &[]).expect("Go");
        out.flush().expect("flush");
        assert_eq!(replies.read().expect("Resumed").kind, Kind::Resumed);
        out.write(Kind::Verified, &[&[1]]).expect("Verified");
        out.flush().expect("flush");
        Transfer {
            elapsed: elapsed.saturating_sub(Duration::from_nanos(hash_ns)),
            wire_bytes,
            zero_pages,
            cpu: cpu.saturating_sub(Duration::from_nanos(hash_ns)),
        }
    }

    /// A plain TCP copy of the guest's pages set in `words`, from where they are in the
    /// source's guest memory to the same places in the guest sink's (one `writev` and
    /// `readv` of up to 1024 pieces at a time on each side), until its answer.
    pub fn guest_copy(&self, words: &[Vec<u64>]) -> Duration {
        let runs = runs_of(&self.memory, words);
        let told = self
            .guest_sink_runs
            .as_ref()
            .expect("a guest sink")
            .send(runs.clone());
        told.expect("the guest sink runs");
        let mut tcp = TcpStream::connect(&self.guest_sink_address).expect("connect the sink");
        tcp.set_nodelay(true).expect("nodelay");
        let mut pieces: Vec<IoPiece<'_>> = runs
            .iter()
            .map(|&(gpa, len)| self.memory.piece(gpa, len as usize).expect("inside"))
            .collect();
        let started = Instant::now();
        let mut first = 0;
        while first < pieces.len() {
            let n = write_pieces(&tcp, &pieces[first..call_end(&pieces, first)]).expect("copy");
            assert!(n > 0, "the guest sink closed");
            advance(&mut pieces, &mut first, n);
        }
        let mut ack = [0u8; 1];
        tcp.read_exact(&mut ack).expect("the sink's answer");
        started.elapsed()
    }

    /// A plain TCP copy of `len_bytes` from a 4 MiB buffer to the cache sink (which reads
    /// into another 4 MiB buffer), until its answer: both ends stay in cache.
    pub fn plain_copy(&self, len_bytes: u64) -> Duration {
        let mut tcp = TcpStream::connect(&self.sink_address).expect("connect the sink");
        tcp.set_nodelay(true).expect("nodelay");
        let buffer = vec![0x5au8; 4 << 20];
        let started = Instant::now();
        tcp.write_all(&len_bytes.to_le_bytes()).expect("length");
        let mut left = len_bytes;
        while left > 0 {
            let n = (left as usize).min(buffer.len());
            tcp.write_all(&buffer[..n]).expect("copy");
            left -= n as u64;
        }
        let mut ack = [0u8; 1];
        tcp.read_exact(&mut ack).expect("the sink's answer");
        started.elapsed()
    }
}

impl Default for MigrateLoopback {
    fn default() -> Self {
        Self::new()
    }
}

/// The source's connection: plaintext or TLS.
enum BenchLink {
    Plain(TcpStream),
    Tls(tls::TlsStream),
}

impl BenchLink {
    fn try_clone(&self) -> std::io::Result<Self> {
        Ok(match self {
            BenchLink::Plain(s) => BenchLink::Plain(s.try_clone()?),
            BenchLink::Tls(s) => BenchLink::Tls(s.try_clone()?),
        })
    }
}

impl Read for BenchLink {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            BenchLink::Plain(s) => s.read(buf),
            BenchLink::Tls(s) => s.read(buf),
        }
    }
}

impl Write for BenchLink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            BenchLink::Plain(s) => s.write(buf),
            BenchLink::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            BenchLink::Plain(s) => s.flush(),
            BenchLink::Tls(s) => s.flush(),
        }
    }
}

impl dmalog_migrate::stream::IoTimeouts for BenchLink {
    fn bound_reads(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        match self {
            BenchLink::Plain(s) => s.bound_reads(timeout),
            BenchLink::Tls(s) => s.bound_reads(timeout),
        }
    }
    fn bound_writes(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        match self {
            BenchLink::Plain(s) => s.bound_writes(timeout),
            BenchLink::Tls(s) => s.bound_writes(timeout),
        }
    }
}

impl dmalog_migrate::stream::Transport for BenchLink {
    fn vectored_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match self {
            BenchLink::Plain(s) => s.vectored_fd(),
            BenchLink::Tls(s) => s.vectored_fd(),
        }
    }
    fn shut_down(&self) {
        match self {
            BenchLink::Plain(s) => s.shut_down(),
            BenchLink::Tls(s) => s.shut_down(),
        }
    }
    fn read_into_piece(&self, piece: &IoPieceMut<'_>) -> Option<std::io::Result<usize>> {
        match self {
            BenchLink::Plain(s) => s.read_into_piece(piece),
            BenchLink::Tls(s) => s.read_into_piece(piece),
        }
    }
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

/// Medians (ns) of `batches` interleaved runs of each of `runs` (the order rotates from
/// batch to batch, so that load and cache state hit each alike).
fn interleaved<const N: usize>(
    batches: usize,
    runs: [&mut dyn FnMut() -> Duration; N],
) -> [f64; N] {
    let mut ns: [Vec<f64>; N] = std::array::from_fn(|_| Vec::new());
    for batch in 0..batches {
        for k in 0..N {
            let i = (batch + k) % N;
            ns[i].push(runs[i]().as_nanos() as f64);
        }
    }
    ns.map(median)
}

/// Medians (ns) of `batches` interleaved runs of `a` and `b`.
fn paired(
    batches: usize,
    mut a: impl FnMut() -> Duration,
    mut b: impl FnMut() -> Duration,
) -> (f64, f64) {
    let [a_ns, b_ns] = interleaved(batches, [&mut a, &mut b]);
    (a_ns, b_ns)
}

/// The fair baseline's name.
const GUEST_COPY: &str = "plain TCP copy of the same bytes, guest memory to guest-sized memory";
/// The informational baseline's name.
const CACHE_COPY: &str = "plain TCP copy, 4 MiB buffer to 4 MiB buffer (in cache)";

/// The migration rows, medians of `batches` interleaved batches.
pub fn rows(batches: usize, progress: &mut impl FnMut(&str)) -> Vec<Row> {
    let mut rows = Vec::new();
    progress("migration: a 1 GiB guest for the stream rows");
    let w = MigrateLoopback::new();
    let all = w.all_pages();
    let guest_bytes = w.memory().total_bytes();

    progress("migration: 1 GiB guest, plaintext, against a plain TCP copy");
    let [ours, guest, cache] = interleaved(
        batches,
        [
            &mut || w.migrate(&all, false, 1, true).elapsed,
            &mut || w.guest_copy(&all),
            &mut || w.plain_copy(guest_bytes),
        ],
    );
    let one_gib = "migration of a 1 GiB guest (data in every page), loopback TCP";
    rows.push(Row::new(
        one_gib,
        ours,
        GUEST_COPY,
        guest,
        Target::Faster(0.8),
    ));
    rows.push(Row::new(one_gib, ours, CACHE_COPY, cache, Target::None));
    let (two, guest_again) = paired(
        batches,
        || w.migrate(&all, false, 2, true).elapsed,
        || w.guest_copy(&all),
    );
    rows.push(Row::new(
        "migration of a 1 GiB guest, --channels 2",
        two,
        GUEST_COPY,
        guest_again,
        Target::None,
    ));

    progress("migration: a round of 20,000 scattered 4 KiB pages");
    let scattered = w.scattered_pages(20_000);
    // A round is short (tens of ms): a scheduling hiccup on a shared machine moves one
    // sample by half, so thrice the batches (still well under a second).
    let [ours, guest, cache] = interleaved(
        3 * batches,
        [
            &mut || w.migrate(&scattered, false, 1, true).elapsed,
            &mut || w.guest_copy(&scattered),
            &mut || w.plain_copy(20_000 * PAGE),
        ],
    );
    let round = "a round of 20,000 scattered 4 KiB pages";
    rows.push(Row::new(
        round,
        ours,
        "plain TCP copy of the same pages, from and to their places in guest-sized memory",
        guest,
        Target::Faster(0.7),
    ));
    rows.push(Row::new(round, ours, CACHE_COPY, cache, Target::None));

    progress("migration: TLS against plaintext, 1 GiB guest");
    let (mut secure_cpu, mut plain_cpu) = (Vec::new(), Vec::new());
    let (secure, plain) = paired(
        batches,
        || {
            let t = w.migrate(&all, true, 1, true);
            secure_cpu.push(t.cpu.as_nanos() as f64);
            t.elapsed
        },
        || {
            let t = w.migrate(&all, false, 1, true);
            plain_cpu.push(t.cpu.as_nanos() as f64);
            t.elapsed
        },
    );
    rows.push(Row::new(
        "TLS 1.3 migration of a 1 GiB guest",
        secure,
        "the same migration in plaintext",
        plain,
        Target::Faster(0.7),
    ));
    // On loopback both ends share the machine's cores: the time above is bound by CPU,
    // and this is what TLS costs in it.
    rows.push(Row::new(
        "CPU time of the TLS 1.3 migration, both ends and their loopback TCP",
        median(secure_cpu),
        "CPU time of the same migration in plaintext",
        median(plain_cpu),
        Target::None,
    ));
    progress("migration: TLS against plaintext on a 10 Gb/s link");
    // A real link between two hosts: is TLS fast enough to fill it?
    const TEN_GBIT_BYTES_PER_SEC: u64 = 1_250_000_000;
    let (secure, plain) = paired(
        batches,
        || {
            w.migrate_capped(&all, (true, 1, true), Some(TEN_GBIT_BYTES_PER_SEC))
                .elapsed
        },
        || {
            w.migrate_capped(&all, (false, 1, true), Some(TEN_GBIT_BYTES_PER_SEC))
                .elapsed
        },
    );
    rows.push(Row::new(
        "TLS 1.3 migration of a 1 GiB guest, link capped at 10 Gb/s",
        secure,
        "the same migration in plaintext, capped alike",
        plain,
        Target::None,
    ));
    progress("migration: zero pages on a mostly-zero 1 GiB guest");
    // 1 page in 20 keeps its data; the rest is zeroed.
    let zeros = vec![0u8; PAGE as usize];
    for region in w.memory().regions() {
        for page in (0..region.size / PAGE).filter(|p| p % 20 != 0) {
            assert!(w.memory().write_at(region.gpa + page * PAGE, &zeros));
        }
    }
    let (mut skip_bytes, mut full_bytes) = (0, 0);
    let (skipped, sent) = paired(
        batches,
        || {
            let t = w.migrate(&all, false, 1, true);
            skip_bytes = t.wire_bytes;
            t.elapsed
        },
        || {
            let t = w.migrate(&all, false, 1, false);
            full_bytes = t.wire_bytes;
            t.elapsed
        },
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    rows.push(Row::new(
        &format!(
            "zero pages skipped, 1 GiB guest 95% zero: {:.1} MiB on the wire vs {:.0} MiB",
            mib(skip_bytes),
            mib(full_bytes)
        ),
        skipped,
        "the same guest with zero pages sent as data",
        sent,
        Target::Faster(1.0),
    ));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scattered_bitmaps_have_exactly_the_pages_asked_for() {
        // A small guest: the bench's bitmaps, not its timings.
        let memory = memfd_guest_untracked(&[(0, 64 * PAGE), (1 << 32, 64 * PAGE)]).unwrap();
        let w = MigrateLoopback {
            memory,
            address: String::new(),
            tls_address: String::new(),
            sink_address: String::new(),
            guest_sink_address: String::new(),
            guest_sink_runs: None,
            client_tls: {
                let ca = dmalog_migrate::pki::Authority::new("t").unwrap();
                let leaf = ca.client("t").unwrap();
                TlsConfig::from_pem(&ca.cert_pem, &leaf.cert_pem, &leaf.key_pem)
                    .unwrap()
                    .client_config()
                    .unwrap()
            },
            _threads: Vec::new(),
        };
        let ones =
            |words: &[Vec<u64>]| -> u32 { words.iter().flatten().map(|w| w.count_ones()).sum() };
        assert_eq!(ones(&w.scattered_pages(100)), 100);
        assert_eq!(ones(&w.all_pages()), 128);
        // The guest copy's pieces: the same pages, adjacent ones joined, none across the
        // regions' edge.
        let runs = runs_of(&w.memory, &w.all_pages());
        assert_eq!(runs, vec![(0, 64 * PAGE), (1 << 32, 64 * PAGE)]);
        let bytes: u64 = runs_of(&w.memory, &w.scattered_pages(100))
            .iter()
            .map(|r| r.1)
            .sum();
        assert_eq!(bytes, 100 * PAGE);
        // One call of the guest copy moves at most COPY_CALL_BYTES, at least one piece.
        let page = [0u8; PAGE as usize];
        let pages = vec![IoPiece::from_bytes(&page); 2000];
        assert_eq!(call_end(&pages, 0), 1024);
        assert_eq!(call_end(&pages, 1990), 2000);
        let big = vec![0u8; 2 * COPY_CALL_BYTES as usize];
        assert_eq!(call_end(&[IoPiece::from_bytes(&big)], 0), 1);
    }

    #[test]
    fn the_bench_migrations_run_the_engines_protocol_to_the_end() {
        // Small, so that the default test run notices when the stream's protocol moves on
        // (the bench's source speaks it by hand) without timing anything.
        let w = MigrateLoopback::with_guest_bytes(8 << 20);
        let all = w.all_pages();
        for (tls, channels) in [(false, 1), (true, 1), (false, 2)] {
            let transfer = w.migrate(&all, tls, channels, true);
            assert!(
                transfer.wire_bytes >= 8 << 20,
                "tls {tls}, {channels} channels: {} bytes",
                transfer.wire_bytes
            );
        }
        // The baselines run to their answers.
        w.guest_copy(&all);
        w.guest_copy(&w.scattered_pages(100));
        w.plain_copy(1 << 20);
    }
}
