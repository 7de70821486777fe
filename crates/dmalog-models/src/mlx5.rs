//! A model of the mlx5 hardware page tracker (SPEC 5.2): both halves, device and driver,
//! with the hardware's limits and failure modes, as a [`LogDriver`].
//!
//! - The **device half** ("firmware") runs on its own thread, the one thread a tracker model starts:
//!   it owns the hardware log (marked by DMA writes through the same lock-free
//!   [`DirtyMarker`] path as the soft tracker) and, for each "modify to REPORTING over
//!   `[iova, length)`" command, walks the log and sends the dirty page addresses as 8-byte
//!   big-endian entries (high 32 bits, then low 32 bits) in messages written into receive
//!   buffers the host posted. Each message completes with a completion entry whose immediate
//!   data carries the tracker state in its top 4 bits: REPORTING while more follow, TRACKING
//!   on the last, ERROR on failure. It clears what it reports and waits (never drops) when no
//!   receive buffer is free.
//! - The **driver half** issues the modify, consumes completions in order, checks opcode and
//!   byte count (EIO on a bad one), sets `tracked_page_size` per entry in the
//!   [`IovaBitmap`], reposts the buffer, and returns when a completion says TRACKING. An
//!   "object changed" event makes it query the tracker state.
//! - **Faults** ([`Mlx5Faults`]) are injected from tests: completion-queue error, queue
//!   catastrophic error, object changed with the state ERROR, a completion carrying ERROR, a
//!   malformed message (bad byte count, oversized, bad opcode), device detach (ENOTCONN).
//!   All but detach latch the tracker into error: every REPORT is EIO until STOP and a new
//!   START. STOP always succeeds, frees everything and joins the device thread.
//!
//! Facts from Linux `drivers/vfio/pci/mlx5/cmd.c` (see `reference/kernel-notes.md` 4a); the
//! queues are modelled with channels that carry the buffers themselves, so nothing is
//! allocated per report.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tracing::{debug, warn};

use dmalog::budget::{LogBudget, DEFAULT_MAX_LOG_BYTES};
use dmalog::dirty_log::DirtyLog;
use dmalog::driver::{DirtyMarker, LiveLog, LogDriver, WriteRecorder};
use dmalog::error::{LogError, LogResult};
use dmalog::iova_bitmap::IovaBitmap;
use dmalog::ranges::{ranges_cover, IovaRange};
use dmalog::soft::{log_cost, page_spans, SoftLog};

mod caps;
pub use caps::{CapsError, Mlx5Caps, Mlx5Fault, MIN_RING_BYTES};

/// Tracker object state: tracking (idle, or the last message of a report).
pub const STATE_TRACKING: u32 = 0;
/// Tracker object state: a report is under way; more messages follow.
pub const STATE_REPORTING: u32 = 1;
/// Tracker object state: failed.
pub const STATE_ERROR: u32 = 2;
/// Completion opcode of a received SEND with immediate data (`MLX5_CQE_RESP_SEND_IMM`).
pub const OPCODE_RESP_SEND_IMM: u8 = 3;
/// Completion opcode of a responder error (`MLX5_CQE_RESP_ERR`).
pub const OPCODE_RESP_ERR: u8 = 14;
/// Bytes of one report entry.
pub const ENTRY_BYTES: usize = 8;

/// Counters of the model, for tests and benchmarks.
#[derive(Debug, Default)]
pub struct Mlx5Stats {
    /// Reports the device half carried out.
    pub reports: AtomicU64,
    /// Messages (completions) the device half sent.
    pub messages: AtomicU64,
    /// Dirty page entries the device half sent.
    pub entries: AtomicU64,
    /// Times the device half found no free receive buffer and waited for one.
    pub ring_waits: AtomicU64,
    /// Device threads currently alive.
    pub live_threads: AtomicU64,
}

#[derive(Debug, Default)]
struct FaultState {
    armed: Mutex<Option<Mlx5Fault>>,
    detached: AtomicBool,
}

/// The test handle of a [`Mlx5Driver`]: inject faults, detach the device, read counters.
#[derive(Debug, Clone)]
pub struct Mlx5Faults {
    faults: Arc<FaultState>,
    stats: Arc<Mlx5Stats>,
}

impl Mlx5Faults {
    /// Arms `fault` for the next REPORT (replacing any armed one).
    pub fn inject(&self, fault: Mlx5Fault) {
        *self.faults.armed.lock().unwrap_or_else(|p| p.into_inner()) = Some(fault);
    }

    /// Detaches the device (the PF disabled the VF): START and REPORT fail with ENOTCONN.
    pub fn detach(&self) {
        self.faults.detached.store(true, Ordering::SeqCst);
    }

    /// Re-attaches the device.
    pub fn reattach(&self) {
        self.faults.detached.store(false, Ordering::SeqCst);
    }

    /// The model's counters.
    pub fn stats(&self) -> &Mlx5Stats {
        &self.stats
    }
}

/// One receive buffer (a receive WQE and the memory it points to).
#[derive(Debug)]
struct RecvBuffer {
    wqe_index: u32,
    bytes: Box<[u8]>,
}

/// One completion entry, carrying the buffer it completes.
#[derive(Debug)]
struct Completion {
    opcode: u8,
    byte_count: u32,
    immediate: u32,
    buffer: RecvBuffer,
}

/// What the host's completion/event queue delivers.
#[derive(Debug)]
enum HostEvent {
    Completion(Completion),
    CompletionQueueError,
    Catastrophic,
    ObjectChanged,
}

/// A firmware command.
#[derive(Debug)]
enum Command {
    /// Modify the tracker object to REPORTING over `[iova, iova+length)`.
    ModifyReporting { iova: u64, length: u64 },
}

/// The device half.
struct Firmware {
    log: Arc<SoftLog>,
    commands: Receiver<Command>,
    posted: Receiver<RecvBuffer>,
    events: Sender<HostEvent>,
    object_state: Arc<AtomicU32>,
    max_msg_size: usize,
    faults: Arc<FaultState>,
    stats: Arc<Mlx5Stats>,
}

/// Why the device half stopped a report early: the host went away (STOP).
struct HostGone;

impl Firmware {
    fn run(self) {
        self.stats.live_threads.fetch_add(1, Ordering::SeqCst);
        while let Ok(Command::ModifyReporting { iova, length }) = self.commands.recv() {
            if self.report(iova, length).is_err() {
                break;
            }
        }
        self.stats.live_threads.fetch_sub(1, Ordering::SeqCst);
    }

    fn send(&self, event: HostEvent) -> Result<(), HostGone> {
        self.events.send(event).map_err(|_| HostGone)
    }

    /// A free receive buffer, waiting for the host to post one if none is free.
    fn next_buffer(&self) -> Result<RecvBuffer, HostGone> {
        match self.posted.try_recv() {
            Ok(buffer) => Ok(buffer),
            Err(mpsc::TryRecvError::Empty) => {
                self.stats.ring_waits.fetch_add(1, Ordering::Relaxed);
                self.posted.recv().map_err(|_| HostGone)
            }
            Err(mpsc::TryRecvError::Disconnected) => Err(HostGone),
        }
    }

    fn complete(
        &self,
        buffer: RecvBuffer,
        byte_count: usize,
        state: u32,
        fault: &mut Option<Mlx5Fault>,
    ) -> Result<(), HostGone> {
        let mut completion = Completion {
            opcode: OPCODE_RESP_SEND_IMM,
            byte_count: byte_count as u32,
            immediate: state << 28,
            buffer,
        };
        match fault.take() {
            Some(Mlx5Fault::CompletionError) => completion.immediate = STATE_ERROR << 28,
            Some(Mlx5Fault::MalformedMessage) => completion.byte_count = byte_count as u32 | 3,
            Some(Mlx5Fault::OversizedMessage) => {
                completion.byte_count = (completion.buffer.bytes.len() + ENTRY_BYTES) as u32
            }
            Some(Mlx5Fault::BadOpcode) => completion.opcode = OPCODE_RESP_ERR,
            other => *fault = other,
        }
        if completion.immediate >> 28 == STATE_ERROR {
            self.object_state.store(STATE_ERROR, Ordering::SeqCst);
        }
        self.stats.messages.fetch_add(1, Ordering::Relaxed);
        self.send(HostEvent::Completion(completion))
    }

    fn report(&self, iova: u64, length: u64) -> Result<(), HostGone> {
        self.stats.reports.fetch_add(1, Ordering::Relaxed);
        let mut fault = self
            .faults
            .armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match fault {
            Some(Mlx5Fault::CompletionQueueError) => {
                return self.send(HostEvent::CompletionQueueError)
            }
            Some(Mlx5Fault::Catastrophic) => return self.send(HostEvent::Catastrophic),
            Some(Mlx5Fault::ObjectChangedError) => {
                self.object_state.store(STATE_ERROR, Ordering::SeqCst);
                return self.send(HostEvent::ObjectChanged);
            }
            Some(Mlx5Fault::ObjectChangedBenign) => {
                fault = None;
                self.object_state.store(STATE_REPORTING, Ordering::SeqCst);
                self.send(HostEvent::ObjectChanged)?;
            }
            _ => self.object_state.store(STATE_REPORTING, Ordering::SeqCst),
        }
        let entries_per_msg = self.max_msg_size / ENTRY_BYTES;
        let mut current: Option<(RecvBuffer, usize)> = None;
        let mut outcome = Ok(());
        let mut entries = 0u64;
        self.log.drain_pages(iova, length, |page| {
            if outcome.is_err() {
                return; // the host is gone; the log is being torn down
            }
            let (mut buffer, used) = match current.take() {
                Some(slot) => slot,
                None => match self.next_buffer() {
                    Ok(buffer) => (buffer, 0),
                    Err(gone) => {
                        outcome = Err(gone);
                        return;
                    }
                },
            };
            let at = used * ENTRY_BYTES;
            // dirty_address_high:32 then dirty_address_low:32, both big-endian: the u64
            // in big-endian order.
            buffer.bytes[at..at + ENTRY_BYTES].copy_from_slice(&page.to_be_bytes());
            let used = used + 1;
            entries += 1;
            if used == entries_per_msg {
                outcome = self.complete(buffer, used * ENTRY_BYTES, STATE_REPORTING, &mut fault);
            } else {
                current = Some((buffer, used));
            }
        });
        self.stats.entries.fetch_add(entries, Ordering::Relaxed);
        outcome?;
        let (buffer, used) = match current {
            Some(slot) => slot,
            None => (self.next_buffer()?, 0),
        };
        self.object_state.store(STATE_TRACKING, Ordering::SeqCst);
        self.complete(buffer, used * ENTRY_BYTES, STATE_TRACKING, &mut fault)
    }
}

/// The host's side of one started tracker.
struct Session {
    log: Arc<SoftLog>,
    /// The hardware ranges (sorted, disjoint), fixed at START.
    ranges: Vec<IovaRange>,
    tracked_page_size: u64,
    max_msg_size: usize,
    commands: Option<Sender<Command>>,
    posted: Option<Sender<RecvBuffer>>,
    events: Receiver<HostEvent>,
    object_state: Arc<AtomicU32>,
    firmware: Option<JoinHandle<()>>,
    next_wqe: u32,
    wqe_count: u32,
    is_err: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        // Closing both queues ends the device thread wherever it waits: for a command, or
        // for a free receive buffer in the middle of a report.
        self.commands.take();
        self.posted.take();
        if let Some(firmware) = self.firmware.take() {
            if firmware.join().is_err() {
                warn!("mlx5 model: device thread panicked");
            }
        }
    }
}

impl Session {
    fn fail(&mut self, why: &'static str) -> LogError {
        if !self.is_err {
            warn!(why, "mlx5 tracker moved to error state");
        }
        self.is_err = true;
        LogError::TrackerError(why)
    }

    /// Consumes one completion: sets a bit per entry, reposts the buffer, returns the
    /// tracker state it carries.
    fn consume(&mut self, completion: Completion, bitmap: &mut IovaBitmap<'_>) -> LogResult<u32> {
        if completion.opcode != OPCODE_RESP_SEND_IMM {
            return Err(self.fail("completion with an unexpected opcode"));
        }
        // Buffers are reposted in the order they complete, so completions name the receive
        // WQEs round-robin.
        if completion.buffer.wqe_index != self.next_wqe {
            return Err(self.fail("completion out of order"));
        }
        self.next_wqe = (self.next_wqe + 1) % self.wqe_count;
        let size = completion.byte_count as usize;
        if size > self.max_msg_size || size > completion.buffer.bytes.len() {
            return Err(self.fail("message larger than its receive buffer"));
        }
        if size % ENTRY_BYTES != 0 {
            return Err(self.fail("message not a whole number of entries"));
        }
        let state = completion.immediate >> 28;
        for entry in completion.buffer.bytes[..size].chunks_exact(ENTRY_BYTES) {
            let mut raw = [0u8; ENTRY_BYTES];
            raw.copy_from_slice(entry);
            bitmap.set(u64::from_be_bytes(raw), self.tracked_page_size);
        }
        if let Some(posted) = &self.posted {
            // A closed queue means the device thread is gone; the next wait notices.
            let _ = posted.send(completion.buffer);
        }
        Ok(state)
    }
}

/// The mlx5 tracker model as a driver of the logging core.
pub struct Mlx5Driver {
    caps: Mlx5Caps,
    live: Arc<LiveLog>,
    faults: Arc<FaultState>,
    stats: Arc<Mlx5Stats>,
    session: Option<Session>,
    budget: LogBudget,
}

impl std::fmt::Debug for Mlx5Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mlx5Driver")
            .field("caps", &self.caps)
            .field("started", &self.session.is_some())
            .field("error", &self.session.as_ref().is_some_and(|s| s.is_err))
            .finish()
    }
}

impl Mlx5Driver {
    /// A stopped tracker with capabilities `caps` and its own [`LiveLog`].
    pub fn new(caps: Mlx5Caps) -> Self {
        Self::with_live_log(caps, LiveLog::new())
    }

    /// A stopped tracker publishing its hardware log into `live` (shared with the device's
    /// DMA writers).
    pub fn with_live_log(caps: Mlx5Caps, live: Arc<LiveLog>) -> Self {
        Mlx5Driver {
            caps,
            live,
            faults: Arc::default(),
            stats: Arc::default(),
            session: None,
            budget: LogBudget::new(DEFAULT_MAX_LOG_BYTES),
        }
    }

    /// Caps the memory of the tracker state one START allocates: the modelled hardware
    /// log (which a real device keeps in its own memory; here it is ours) and the host's
    /// receive ring. START fails with ENOMEM above it.
    pub fn with_max_log_bytes(mut self, max_log_bytes: u64) -> Self {
        self.budget = LogBudget::new(max_log_bytes);
        self
    }

    /// Bytes of tracker state the started tracker holds (what the budget is charged).
    pub fn used_bytes(&self) -> u64 {
        self.budget.used_bytes()
    }

    /// The capabilities.
    pub fn caps(&self) -> &Mlx5Caps {
        &self.caps
    }

    /// A recorder for one DMA writer thread (marks the hardware log).
    pub fn recorder(&self) -> WriteRecorder {
        self.live.recorder()
    }

    /// The live log writers record through.
    pub fn live_log(&self) -> &Arc<LiveLog> {
        &self.live
    }

    /// The fault-injection and statistics handle.
    pub fn faults(&self) -> Mlx5Faults {
        Mlx5Faults {
            faults: Arc::clone(&self.faults),
            stats: Arc::clone(&self.stats),
        }
    }

    /// The hardware log while started (for in-process writers that mark directly).
    pub fn log(&self) -> Option<&Arc<SoftLog>> {
        self.session.as_ref().map(|s| &s.log)
    }

    fn detached(&self) -> bool {
        self.faults.detached.load(Ordering::SeqCst)
    }
}

impl Drop for Mlx5Driver {
    fn drop(&mut self) {
        self.stop();
    }
}

impl LogDriver for Mlx5Driver {
    fn start(&mut self, ranges: &[IovaRange], page_size: &mut u64) -> LogResult<()> {
        if self.detached() {
            return Err(LogError::Detached);
        }
        if self.session.is_some() {
            return Err(LogError::Invalid("tracker already started"));
        }
        let caps = self.caps;
        let log_page = ((*page_size).max(1).ilog2() as u8)
            .clamp(caps.log_min_page_size, caps.log_max_page_size);
        let tracked_page_size = 1u64 << log_page;
        if ranges.is_empty() {
            // "Log all DMA-mapped space" with nothing mapped: the hardware ranges are fixed,
            // so the tracker covers nothing until a STOP and a new START.
            warn!("mlx5 tracker started with no ranges: nothing is tracked");
        }
        if ranges.len() > caps.max_num_range as usize {
            return Err(LogError::Unsupported("more ranges than max_num_range"));
        }
        // log2(next power of two of the summed lengths), gaps between merged ranges count.
        let total: u128 = ranges.iter().map(|r| u128::from(r.length())).sum();
        let log_addr_space = total.next_power_of_two().trailing_zeros();
        if log_addr_space < u32::from(caps.log_min_addr_space)
            || log_addr_space > u32::from(caps.log_max_addr_space)
        {
            return Err(LogError::Unsupported(
                "address space outside the tracker's limits",
            ));
        }
        self.budget.reset();
        let cost = ranges.iter().fold(caps.ring_bytes(), |sum: u64, range| {
            sum.saturating_add(log_cost(range.length(), tracked_page_size))
        });
        self.budget
            .charge(cost, "mlx5 tracker state above the memory budget")?;
        let started = self.start_charged(ranges, tracked_page_size, log_addr_space);
        if started.is_err() {
            self.budget.reset();
        }
        started?;
        *page_size = tracked_page_size;
        Ok(())
    }

    fn stop(&mut self) {
        if self.session.take().is_some() {
            self.live.publish(None);
            debug!("mlx5 tracker stopped");
        }
        self.budget.reset();
    }

    fn read_and_clear(
        &mut self,
        iova: u64,
        length: u64,
        bitmap: &mut IovaBitmap<'_>,
    ) -> LogResult<()> {
        self.session_report(iova, length, bitmap)
    }

    fn max_ranges(&self) -> usize {
        self.caps.max_num_range as usize
    }

    /// The hardware ranges are fixed at START: a mapping wholly inside them is already
    /// covered (Ok); any other is not (`Unsupported`, and the logging core latches the log
    /// into error).
    fn add_range(&mut self, range: IovaRange) -> LogResult<()> {
        let session = self
            .session
            .as_ref()
            .ok_or(LogError::Invalid("tracker not started"))?;
        if ranges_cover(&session.ranges, range) {
            Ok(())
        } else {
            Err(LogError::Unsupported(
                "mapping outside the hardware ranges fixed at START",
            ))
        }
    }
}

impl Mlx5Driver {
    /// START after the budget is charged: allocates the log and the ring, starts the
    /// device thread and publishes the log.
    fn start_charged(
        &mut self,
        ranges: &[IovaRange],
        tracked_page_size: u64,
        log_addr_space: u32,
    ) -> LogResult<()> {
        let caps = self.caps;
        // Ranges aligned to a smaller hint may share a tracked page: one log for them.
        let spans = page_spans(ranges, tracked_page_size)?;
        let mut logs = Vec::with_capacity(spans.len());
        for (start, end) in spans {
            logs.push(DirtyLog::new(start, end - start, tracked_page_size)?);
        }
        let log = Arc::new(SoftLog::fixed(logs));
        // The receive ring: max(2 MiB, 4 x max_msg_size) in max_msg_size buffers, all posted.
        let max_msg_size = caps.max_msg_size();
        let buffers = (caps.ring_bytes() / max_msg_size as u64) as usize;
        let (posted_tx, posted_rx) = mpsc::channel();
        for wqe_index in 0..buffers {
            let mut bytes = Vec::new();
            bytes
                .try_reserve_exact(max_msg_size)
                .map_err(|_| LogError::OutOfMemory("mlx5 receive ring"))?;
            bytes.resize(max_msg_size, 0);
            let buffer = RecvBuffer {
                wqe_index: wqe_index as u32,
                bytes: bytes.into_boxed_slice(),
            };
            posted_tx
                .send(buffer)
                .map_err(|_| LogError::OutOfMemory("mlx5 receive ring"))?;
        }
        let (commands_tx, commands_rx) = mpsc::channel();
        let (events_tx, events_rx) = mpsc::channel();
        let object_state = Arc::new(AtomicU32::new(STATE_TRACKING));
        let firmware = Firmware {
            log: Arc::clone(&log),
            commands: commands_rx,
            posted: posted_rx,
            events: events_tx,
            object_state: Arc::clone(&object_state),
            max_msg_size,
            faults: Arc::clone(&self.faults),
            stats: Arc::clone(&self.stats),
        };
        let thread = std::thread::Builder::new()
            .name("mlx5-firmware".into())
            .spawn(move || firmware.run())
            .map_err(|_| LogError::OutOfMemory("mlx5 device thread"))?;
        self.live
            .publish(Some(Arc::clone(&log) as Arc<dyn DirtyMarker>));
        self.session = Some(Session {
            log,
            ranges: ranges.to_vec(),
            tracked_page_size,
            max_msg_size,
            commands: Some(commands_tx),
            posted: Some(posted_tx),
            events: events_rx,
            object_state,
            firmware: Some(thread),
            next_wqe: 0,
            wqe_count: buffers as u32,
            is_err: false,
        });
        debug!(
            tracked_page_size,
            ranges = ranges.len(),
            log_addr_space,
            buffers,
            "mlx5 tracker started"
        );
        Ok(())
    }

    /// REPORT: the modify command, then the completions until TRACKING.
    fn session_report(
        &mut self,
        iova: u64,
        length: u64,
        bitmap: &mut IovaBitmap<'_>,
    ) -> LogResult<()> {
        let detached = self.detached();
        let session = self
            .session
            .as_mut()
            .ok_or(LogError::Invalid("tracker not started"))?;
        if detached {
            return Err(LogError::Detached);
        }
        if session.is_err {
            return Err(LogError::TrackerError("tracker in error state"));
        }
        let command = Command::ModifyReporting { iova, length };
        if session
            .commands
            .as_ref()
            .is_none_or(|commands| commands.send(command).is_err())
        {
            return Err(session.fail("device thread gone"));
        }
        loop {
            let event = match session.events.recv() {
                Ok(event) => event,
                Err(_) => return Err(session.fail("device thread gone")),
            };
            let state = match event {
                HostEvent::Completion(completion) => session.consume(completion, bitmap)?,
                HostEvent::CompletionQueueError => {
                    return Err(session.fail("completion queue error"))
                }
                HostEvent::Catastrophic => return Err(session.fail("queue catastrophic error")),
                // Query the object: firmware may have moved it without a completion.
                HostEvent::ObjectChanged => match session.object_state.load(Ordering::SeqCst) {
                    STATE_ERROR => STATE_ERROR,
                    // Still reporting, or done with the last completion on its way: keep
                    // consuming until the TRACKING completion arrives.
                    _ => STATE_REPORTING,
                },
            };
            match state {
                STATE_REPORTING => continue,
                STATE_TRACKING => return Ok(()),
                STATE_ERROR => return Err(session.fail("tracker reported ERROR")),
                _ => return Err(session.fail("unknown tracker state")),
            }
        }
    }
}
