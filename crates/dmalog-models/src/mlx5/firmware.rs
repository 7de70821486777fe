//! The device half of the model ("firmware"): its own thread, the hardware log, and the
//! report walk that fills the receive buffers the host posted and completes each with the
//! tracker state.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use dmalog::ranges::IovaRange;
use dmalog::soft::SoftLog;

use super::{
    FaultState, Mlx5Fault, Mlx5Stats, ENTRY_BYTES, OPCODE_RESP_ERR, OPCODE_RESP_SEND_IMM,
    STATE_ERROR, STATE_REPORTING, STATE_TRACKING,
};

/// One receive buffer (a receive WQE and the memory it points to).
#[derive(Debug)]
pub(super) struct RecvBuffer {
    pub(super) wqe_index: u32,
    pub(super) bytes: Box<[u8]>,
}

/// One completion entry, carrying the buffer it completes.
#[derive(Debug)]
pub(super) struct Completion {
    pub(super) opcode: u8,
    pub(super) byte_count: u32,
    pub(super) immediate: u32,
    pub(super) buffer: RecvBuffer,
}

/// What the host's completion/event queue delivers.
#[derive(Debug)]
pub(super) enum HostEvent {
    Completion(Completion),
    CompletionQueueError,
    Catastrophic,
    ObjectChanged,
}

/// A firmware command.
#[derive(Debug)]
pub(super) enum Command {
    /// Modify the tracker object to REPORTING over a range.
    ModifyReporting(IovaRange),
}

/// The device half.
pub(super) struct Firmware {
    pub(super) log: Arc<SoftLog>,
    pub(super) commands: Receiver<Command>,
    pub(super) posted: Receiver<RecvBuffer>,
    pub(super) events: Sender<HostEvent>,
    pub(super) object_state: Arc<AtomicU32>,
    pub(super) max_msg_size: usize,
    pub(super) faults: Arc<FaultState>,
    pub(super) stats: Arc<Mlx5Stats>,
}

/// Why the device half stopped a report early: the host went away (STOP).
pub(super) struct HostGone;

impl Firmware {
    pub(super) fn run(self) {
        self.stats.live_threads.fetch_add(1, Ordering::SeqCst);
        while let Ok(Command::ModifyReporting(range)) = self.commands.recv() {
            if self.report(range).is_err() {
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

    fn report(&self, range: IovaRange) -> Result<(), HostGone> {
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
        self.log.drain_pages(range, |page| {
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
