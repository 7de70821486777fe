//! The data path of the migration source: dirty pages from guest memory and the device's
//! migration data onto the stream. The engine (engine.rs) decides what to send and when;
//! this module only sends it.
//!
//! A round's dirty pages become Pages frames of many runs (up to [`MAX_RUNS_PER_FRAME`]
//! runs and [`MAX_PAGES_PER_FRAME`] data pages a frame). On a plaintext socket each frame
//! is one `writev`: the run table from a buffer, the page bytes straight from guest memory
//! (the kernel copies them; nothing here reads them). With TLS the page bytes are copied
//! into one reused buffer 64 KiB at a time, each chunk encrypted and sent while it is in
//! cache (rustls encrypts bytes). Zero pages (checked with volatile loads, as guest memory
//! is written concurrently; the first line of the page 16 ahead prefetched) are sent as a
//! flagged run with no bytes. With several channels the round's pages are split between them, each sent by
//! its own thread, and every channel ends the round with a Sync frame (stream.rs).

use std::io::Write;

use crate::dirty::Bitmaps;
use crate::engine::{MigrateError, SourceDevice, PAGE};
use crate::guest::{GuestPages, LoggedGuestMemory};
use crate::stream::{
    hello_payload, FrameWriter, Kind, Transport, FRAME_HEADER_BYTES, MAX_CHANNELS,
    MAX_PAGES_PER_FRAME, MAX_RUNS_PER_FRAME, MAX_ZERO_PAGES_PER_FRAME, RUN_ZERO,
};
use dmalog_device::IoPiece;

/// A random session id for a migration's Hello and Joins (not a secret: it keeps a
/// channel of one migration out of another; TLS authenticates the peer).
fn new_session_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_ok()
    {
        return u64::from_le_bytes(bytes);
    }
    // std seeds its hasher keys from the OS.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// Writes the Hello on `out` (page size, a new session, the channel count, the memory
/// layout), then opens the further channels with `connect` (1, 2, ...) and writes a Join
/// on each; returns them.
pub(crate) fn send_hello<W: Write>(
    out: &mut FrameWriter<W>,
    channels: u32,
    connect: &mut dyn FnMut(u32) -> std::io::Result<FrameWriter<W>>,
    memory: &LoggedGuestMemory,
) -> Result<Vec<FrameWriter<W>>, MigrateError> {
    if channels == 0 || channels > MAX_CHANNELS {
        return Err(MigrateError::Peer(format!(
            "1 to {MAX_CHANNELS} channels, not {channels}"
        )));
    }
    let session = new_session_id();
    let regions: Vec<(u64, u64)> = memory.regions().iter().map(|r| (r.gpa, r.size)).collect();
    let hello = hello_payload(PAGE as u32, session, channels, &regions);
    out.write(Kind::Hello, &[&hello])?;
    out.flush()?;
    (1..channels)
        .map(|index| {
            let mut channel = connect(index)?;
            channel.write(Kind::Join, &[&session.to_le_bytes(), &index.to_le_bytes()])?;
            channel.flush()?;
            Ok(channel)
        })
        .collect()
}

/// One run of the frame being built.
#[derive(Debug, Clone, Copy)]
struct Run {
    gpa: u64,
    npages: u64,
    zero: bool,
}

/// A channel's reused buffers.
#[derive(Debug, Default)]
struct ChannelBuffers {
    runs: Vec<Run>,
    table: Vec<u8>,
    scratch: Vec<u8>,
}

/// What one channel sent in a round.
#[derive(Debug, Default, Clone, Copy)]
struct Sent {
    pages: u64,
    zero_pages: u64,
    bytes: u64,
}

/// Packs pages into Pages frames on one channel.
struct FramePacker<'m, 'b, W: Write> {
    out: &'m mut FrameWriter<W>,
    memory: &'m LoggedGuestMemory,
    bufs: &'b mut ChannelBuffers,
    data_pages: u64,
    zero_pages: u64,
    pieces: Vec<IoPiece<'m>>,
}

impl<'m, 'b, W: Write + Transport> FramePacker<'m, 'b, W> {
    /// Adds the page at `gpa`; `extend` says it follows the previous page in guest memory
    /// (same region).
    fn push(&mut self, gpa: u64, zero: bool, extend: bool) -> Result<(), MigrateError> {
        if (!zero && self.data_pages == MAX_PAGES_PER_FRAME)
            || (zero && self.zero_pages == MAX_ZERO_PAGES_PER_FRAME)
        {
            self.flush()?;
        }
        if zero {
            self.zero_pages += 1;
        } else {
            self.data_pages += 1;
        }
        if let Some(last) = self.bufs.runs.last_mut() {
            if extend && last.zero == zero && last.gpa + last.npages * PAGE == gpa {
                last.npages += 1;
                return Ok(());
            }
        }
        if self.bufs.runs.len() == MAX_RUNS_PER_FRAME {
            // The page just counted belongs to the next frame.
            if zero {
                self.zero_pages -= 1;
            } else {
                self.data_pages -= 1;
            }
            self.flush()?;
            return self.push(gpa, zero, false);
        }
        self.bufs.runs.push(Run {
            gpa,
            npages: 1,
            zero,
        });
        Ok(())
    }

    /// Writes the frame built so far, if any.
    fn flush(&mut self) -> Result<(), MigrateError> {
        if self.bufs.runs.is_empty() {
            return Ok(());
        }
        let table = &mut self.bufs.table;
        table.clear();
        table.resize(FRAME_HEADER_BYTES, 0);
        table.extend_from_slice(&(self.bufs.runs.len() as u32).to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
        self.pieces.clear();
        for run in &self.bufs.runs {
            table.extend_from_slice(&run.gpa.to_le_bytes());
            // Fits: at most MAX_ZERO_PAGES_PER_FRAME pages.
            table.extend_from_slice(&(run.npages as u32).to_le_bytes());
            table.extend_from_slice(&(if run.zero { RUN_ZERO } else { 0 }).to_le_bytes());
            if !run.zero {
                let piece = self
                    .memory
                    .piece(run.gpa, (run.npages * PAGE) as usize)
                    .ok_or(MigrateError::Memory("page outside guest memory"))?;
                self.pieces.push(piece);
            }
        }
        self.out
            .write_pages(table, &self.pieces, &mut self.bufs.scratch)?;
        self.bufs.runs.clear();
        self.data_pages = 0;
        self.zero_pages = 0;
        Ok(())
    }
}

/// Pages the zero check asks the CPU for ahead of the one it looks at.
const ZERO_CHECK_AHEAD: usize = 16;

/// Each page of `runs` (`(gpa, npages)`): its address, and whether it follows the previous
/// one in its run.
fn pages_of(runs: &[(u64, u64)]) -> impl Iterator<Item = (u64, bool)> + '_ {
    runs.iter()
        .flat_map(|&(gpa, npages)| (0..npages).map(move |page| (gpa + page * PAGE, page > 0)))
}

/// Sends `runs` (`(gpa, npages)`, each inside one region) on `out`, then the round's Sync.
fn send_share<W: Write + Transport>(
    out: &mut FrameWriter<W>,
    memory: &LoggedGuestMemory,
    runs: &[(u64, u64)],
    skip_zero: bool,
    bufs: &mut ChannelBuffers,
    (round, tail): (u32, Option<&(dyn Fn() + Sync)>),
) -> Result<Sent, MigrateError> {
    let bytes_before = out.bytes();
    let mut sent = Sent::default();
    let mut packer = FramePacker {
        out,
        memory,
        bufs,
        data_pages: 0,
        zero_pages: 0,
        pieces: Vec::with_capacity(MAX_RUNS_PER_FRAME),
    };
    packer.bufs.runs.clear();
    // The zero check reads each page's first line: with the lines of the pages
    // `ZERO_CHECK_AHEAD` further on already asked for, it does not wait on one cache
    // miss after the other (scattered pages, or any page's first line).
    let mut ahead = pages_of(runs).skip(ZERO_CHECK_AHEAD);
    let mut pages_left: u64 = runs.iter().map(|r| r.1).sum();
    let mut tail = tail;
    for (at, extend) in pages_of(runs) {
        if pages_left <= MAX_PAGES_PER_FRAME {
            if let Some(cue) = tail.take() {
                cue();
            }
        }
        pages_left -= 1;
        if let Some((next, _)) = ahead.next() {
            if let Some(piece) = memory.piece(next, 64) {
                piece.prefetch();
            }
        }
        let zero = skip_zero
            && memory
                .is_zero(at, PAGE as usize)
                .ok_or(MigrateError::Memory("page outside guest memory"))?;
        sent.zero_pages += u64::from(zero);
        packer.push(at, zero, extend)?;
    }
    sent.pages = runs.iter().map(|r| r.1).sum();
    if let Some(cue) = tail {
        cue();
    }
    packer.flush()?;
    out.write(Kind::Sync, &[&round.to_le_bytes()])?;
    out.flush()?;
    sent.bytes = out.bytes() - bytes_before;
    Ok(sent)
}

/// Sends guest pages and device data.
pub struct Sender<'a, W: Write> {
    /// Channel 0: the control frames and a share of the pages.
    pub(crate) out: &'a mut FrameWriter<W>,
    extra: Vec<FrameWriter<W>>,
    memory: &'a LoggedGuestMemory,
    round: u32,
    skip_zero: bool,
    zero_pages: u64,
    runs: Vec<(u64, u64)>,
    buffers: Vec<ChannelBuffers>,
}

impl<'a, W: Write + Transport + Send> Sender<'a, W> {
    /// A sender of `memory`'s pages on `out` and the further channels `extra` (after
    /// [`send_hello`]).
    pub(crate) fn new(
        out: &'a mut FrameWriter<W>,
        extra: Vec<FrameWriter<W>>,
        memory: &'a LoggedGuestMemory,
    ) -> Self {
        let channels = extra.len() + 1;
        Sender {
            out,
            extra,
            memory,
            round: 0,
            skip_zero: true,
            zero_pages: 0,
            runs: Vec::new(),
            buffers: (0..channels).map(|_| ChannelBuffers::default()).collect(),
        }
    }

    /// Sends every page whose bit is set in `bitmaps`, split between the channels, each
    /// channel ending with the round's Sync. Returns the pages sent (zero pages included).
    /// Bytes on every channel are counted on the main writer.
    pub(crate) fn send_dirty(&mut self, bitmaps: &Bitmaps) -> Result<u64, MigrateError> {
        self.send_words(&bitmaps.words, None)
    }

    /// As [`Sender::send_dirty`], calling `tail` once when the main channel has no more
    /// than its last frame of the round left to write (at once for a round of one frame):
    /// the engine's cue to take the next round's REPORTs while the round drains.
    pub(crate) fn send_dirty_with_tail(
        &mut self,
        bitmaps: &Bitmaps,
        tail: &(dyn Fn() + Sync),
    ) -> Result<u64, MigrateError> {
        self.send_words(&bitmaps.words, Some(tail))
    }

    /// As [`Sender::send_dirty_with_tail`], from one bitmap (`u64` words, bit n = page n)
    /// per region, with or without a cue.
    pub(crate) fn send_words(
        &mut self,
        words: &[Vec<u64>],
        tail: Option<&(dyn Fn() + Sync)>,
    ) -> Result<u64, MigrateError> {
        collect_runs(self.memory, words, &mut self.runs);
        let round = self.round;
        self.round += 1;
        let shares = split_runs(&self.runs, self.extra.len() + 1);
        let (main_bufs, extra_bufs) = self
            .buffers
            .split_first_mut()
            .expect("one buffer set per channel");
        let memory = self.memory;
        let skip_zero = self.skip_zero;
        let (main, others) = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .extra
                .iter_mut()
                .zip(extra_bufs.iter_mut())
                .zip(shares.iter().skip(1))
                .map(|((out, bufs), share)| {
                    scope.spawn(move || {
                        send_share(out, memory, share, skip_zero, bufs, (round, None))
                    })
                })
                .collect();
            let main = send_share(
                self.out,
                memory,
                shares.first().map_or(&[][..], |s| s),
                skip_zero,
                main_bufs,
                (round, tail),
            );
            let others: Vec<_> = handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or(Err(MigrateError::Memory("a channel's sender panicked")))
                })
                .collect();
            (main, others)
        });
        let mut total = main?;
        for sent in others {
            let sent = sent?;
            total.pages += sent.pages;
            total.zero_pages += sent.zero_pages;
            self.out.add_channel_bytes(sent.bytes);
        }
        self.zero_pages += total.zero_pages;
        Ok(total.pages)
    }

    /// Sends the device's migration data until it has nothing more now.
    pub(crate) fn send_device_data(
        &mut self,
        device: &mut dyn SourceDevice,
    ) -> Result<u64, MigrateError> {
        let mut chunk = vec![0u8; 64 << 10];
        let mut total = 0;
        loop {
            let n = device.read_migration_data(&mut chunk)?;
            if n == 0 {
                return Ok(total);
            }
            self.out.write(Kind::DeviceData, &[&chunk[..n]])?;
            total += n as u64;
        }
    }

    /// The end of the stream: End on every channel (the main one last), flushed.
    pub(crate) fn end(&mut self) -> Result<(), MigrateError> {
        for channel in self.extra.iter_mut() {
            let before = channel.bytes();
            channel.write(Kind::End, &[])?;
            channel.flush()?;
            self.out.add_channel_bytes(channel.bytes() - before);
        }
        self.out.write(Kind::End, &[])?;
        self.out.flush()?;
        Ok(())
    }
}

/// Guest pages over a migration stream without the engine (no device, no dirty tracking):
/// the Hello, rounds of pages from bitmaps, the End; a destination takes it as a migration
/// without device data. For benchmarks and tools.
pub struct PageStream<'a, W: Write> {
    sender: Sender<'a, W>,
}

impl<'a, W: Write + Transport + Send> PageStream<'a, W> {
    /// Sends the Hello on `out` and opens `channels - 1` further channels with `connect`.
    pub fn start(
        out: &'a mut FrameWriter<W>,
        channels: u32,
        connect: &mut dyn FnMut(u32) -> std::io::Result<FrameWriter<W>>,
        memory: &'a LoggedGuestMemory,
    ) -> Result<Self, MigrateError> {
        let extra = send_hello(out, channels, connect, memory)?;
        Ok(PageStream {
            sender: Sender::new(out, extra, memory),
        })
    }

    /// Whether zero pages go as flagged runs without bytes (the default) or as data.
    pub fn set_skip_zero(&mut self, skip_zero: bool) {
        self.sender.skip_zero = skip_zero;
    }

    /// Sends one round: the pages whose bits are set in `words` (one bitmap of `u64`
    /// words per region, bit n = page n). Returns the pages sent.
    pub fn send_round(&mut self, words: &[Vec<u64>]) -> Result<u64, MigrateError> {
        self.sender.send_words(words, None)
    }

    /// Zero pages sent without their bytes so far.
    pub fn zero_pages(&self) -> u64 {
        self.sender.zero_pages
    }

    /// Bytes written so far, every channel.
    pub fn bytes(&self) -> u64 {
        self.sender.out.bytes()
    }

    /// Ends the stream (End on every channel).
    pub fn end(&mut self) -> Result<(), MigrateError> {
        self.sender.end()
    }
}

/// The dirty runs `(gpa, npages)` of `words` (one bitmap per region of `memory`) into
/// `runs` (cleared first; reused so that a round allocates nothing once warm).
fn collect_runs(memory: &LoggedGuestMemory, words: &[Vec<u64>], runs: &mut Vec<(u64, u64)>) {
    runs.clear();
    for (region, words) in memory.regions().iter().zip(words) {
        let pages = region.size / PAGE;
        let mut page = 0u64;
        while page < pages {
            let word = words[(page / 64) as usize] >> (page % 64);
            if word == 0 {
                page = (page / 64 + 1) * 64;
                continue;
            }
            page += u64::from(word.trailing_zeros());
            if page >= pages {
                break;
            }
            let mut run = 0u64;
            while page + run < pages {
                let at = page + run;
                let rest = !(words[(at / 64) as usize] >> (at % 64));
                // Ones from bit `at` on: count them a word at a time.
                let ones = u64::from(rest.trailing_zeros()).min(64 - at % 64);
                run += ones;
                if ones < 64 - at % 64 {
                    break;
                }
            }
            let run = run.min(pages - page);
            runs.push((region.gpa + page * PAGE, run));
            page += run;
        }
    }
}

/// `runs` split into `channels` shares of about equal page counts (a run may be split).
fn split_runs(runs: &[(u64, u64)], channels: usize) -> Vec<Vec<(u64, u64)>> {
    if channels <= 1 {
        return vec![runs.to_vec()];
    }
    let total: u64 = runs.iter().map(|r| r.1).sum();
    let per_share = total.div_ceil(channels as u64).max(1);
    let mut shares = vec![Vec::new(); channels];
    let (mut share, mut filled) = (0usize, 0u64);
    for &(mut gpa, mut npages) in runs {
        while npages > 0 {
            let take = npages.min(per_share - filled);
            shares[share].push((gpa, take));
            gpa += take * PAGE;
            npages -= take;
            filled += take;
            if filled == per_share && share + 1 < channels {
                share += 1;
                filled = 0;
            }
        }
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_found_across_word_edges_and_split_evenly() {
        let memory =
            crate::guest::memfd_guest_untracked(&[(0, 256 * PAGE), (1 << 32, 64 * PAGE)]).unwrap();
        let mut words = vec![vec![0u64; 4], vec![0u64; 1]];
        // Pages 3, 60..=130 (across two word edges), 255; page 0 and 63 of region 1.
        words[0][0] = 1 << 3 | !0u64 << 60;
        words[0][1] = !0;
        words[0][2] = 0b111;
        words[0][3] = 1 << 63;
        words[1][0] = 1 | 1 << 63;
        let mut runs = Vec::new();
        collect_runs(&memory, &words, &mut runs);
        let page = |n: u64| n * PAGE;
        assert_eq!(
            runs,
            vec![
                (page(3), 1),
                (page(60), 71),
                (page(255), 1),
                (1 << 32, 1),
                ((1 << 32) + page(63), 1)
            ]
        );
        let shares = split_runs(&runs, 3);
        let counts: Vec<u64> = shares.iter().map(|s| s.iter().map(|r| r.1).sum()).collect();
        assert_eq!(counts, vec![25, 25, 25]);
        assert_eq!(shares[0][1], (page(60), 24));
        assert_eq!(shares[1][0], (page(84), 25));
        let all: Vec<(u64, u64)> = shares.concat();
        assert_eq!(all.iter().map(|r| r.1).sum::<u64>(), 75);
        // Page by page, each marked as following the previous one within its run only.
        let pages: Vec<(u64, bool)> = pages_of(&[(page(3), 2), (page(9), 1)]).collect();
        assert_eq!(
            pages,
            vec![(page(3), false), (page(4), true), (page(9), false)]
        );
    }
}
