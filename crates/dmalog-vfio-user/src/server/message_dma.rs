//! Server-to-client DMA: DMA_READ/DMA_WRITE commands on the connection, for memory the
//! device reaches through messages (DMA_MAP without an fd), and the device's own events
//! that do such DMA.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use dmalog_device::{DeviceError, MessageDma};
use tracing::warn;

use super::Server;
use crate::transport::{Message, RecvError, Transport};
use crate::wire::*;

/// Most client messages kept while the server waits for the client's reply to its own
/// DMA_READ/DMA_WRITE (SPEC 8: per-client queues are bounded). A client that sends more
/// before answering is dropped: the reply it owes is behind its flood in the stream, so
/// back-pressure (not reading) would only stall until the reply timeout.
pub const DEFERRED_MAX_MESSAGES: usize = 64;
/// Most payload bytes kept in those messages (16 one-MiB writes).
pub const DEFERRED_MAX_BYTES: usize = 16 << 20;

/// Server-to-client DMA over the connection: DMA_READ/DMA_WRITE commands, split at the
/// negotiated transfer size. Client commands that arrive meanwhile are kept for later, up
/// to [`DEFERRED_MAX_MESSAGES`] and [`DEFERRED_MAX_BYTES`]. A client that exceeds them, or
/// does not answer within the reply timeout, has its DMA failed (EIO to the device) and
/// the connection dropped (`broken`): after a timeout a late reply would be out of step.
struct ConnectionDma<'a> {
    transport: &'a mut Transport,
    deferred: &'a mut VecDeque<Message>,
    deferred_bytes: usize,
    next_id: u16,
    max_xfer: u32,
    reply_timeout: Duration,
    broken: bool,
}

impl ConnectionDma<'_> {
    fn exchange(&mut self, command: u16, payload: &[u8]) -> Result<Vec<u8>, DeviceError> {
        if self.broken {
            return Err(DeviceError::Io("connection lost"));
        }
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        if self
            .transport
            .send(Header::command(id, command), payload, &[])
            .is_err()
        {
            self.broken = true;
            return Err(DeviceError::Io("connection lost"));
        }
        let deadline = Instant::now() + self.reply_timeout;
        loop {
            let message = match self.recv_before(deadline) {
                Ok(message) => message,
                Err(err) => {
                    self.broken = true;
                    return Err(err);
                }
            };
            if message.header.kind() == TYPE_REPLY
                && message.header.msg_id == id
                && message.header.cmd == command
            {
                if message.header.flags & FLAG_ERROR != 0 {
                    return Err(DeviceError::Io("the client refused the DMA"));
                }
                return Ok(message.payload);
            }
            self.deferred_bytes = self.deferred_bytes.saturating_add(message.payload.len());
            self.deferred.push_back(message);
            if self.deferred.len() > DEFERRED_MAX_MESSAGES
                || self.deferred_bytes > DEFERRED_MAX_BYTES
            {
                warn!(
                    messages = self.deferred.len(),
                    bytes = self.deferred_bytes,
                    "the client keeps sending instead of answering the server's DMA request; \
                     dropping the connection"
                );
                self.broken = true;
                return Err(DeviceError::Io("the client flooded instead of answering"));
            }
        }
    }

    /// The next message, or an error if none has come whole by `deadline`.
    fn recv_before(&mut self, deadline: Instant) -> Result<Message, DeviceError> {
        let timed_out = || {
            warn!("the client did not answer the server's DMA request in time; dropping it");
            DeviceError::Io("the client did not answer a DMA request in time")
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out());
            }
            match wait_readable(self.transport.stream(), left) {
                Ok(true) => break,
                Ok(false) => {} // the deadline, or a signal: look again
                Err(_) => return Err(DeviceError::Io("connection lost")),
            }
        }
        // The message has begun: the socket's read timeout (the peer timeout, set in
        // `serve`) ends a client that stops half-way.
        match self.transport.recv() {
            Ok(message) => Ok(message),
            Err(RecvError::Stalled) => Err(timed_out()),
            Err(_) => Err(DeviceError::Io("connection lost")),
        }
    }
}

impl MessageDma for ConnectionDma<'_> {
    fn dma_read(&mut self, iova: u64, out: &mut [u8]) -> Result<(), DeviceError> {
        let chunk = self.max_xfer.max(1) as usize;
        for (i, piece) in out.chunks_mut(chunk).enumerate() {
            let addr = iova
                .checked_add((i * chunk) as u64)
                .ok_or(DeviceError::Invalid("IOVA wraps"))?;
            let reply = self.exchange(
                cmd::DMA_READ,
                &DmaAccess {
                    addr,
                    count: piece.len() as u64,
                }
                .encode(),
            )?;
            let data = reply
                .get(DmaAccess::BYTES..)
                .filter(|d| d.len() == piece.len())
                .ok_or(DeviceError::Io("short DMA_READ reply"))?;
            piece.copy_from_slice(data);
        }
        Ok(())
    }

    fn dma_write(&mut self, iova: u64, data: &[u8]) -> Result<(), DeviceError> {
        let chunk = self.max_xfer.max(1) as usize;
        for (i, piece) in data.chunks(chunk).enumerate() {
            let addr = iova
                .checked_add((i * chunk) as u64)
                .ok_or(DeviceError::Invalid("IOVA wraps"))?;
            let mut payload = DmaAccess {
                addr,
                count: piece.len() as u64,
            }
            .encode();
            payload.extend_from_slice(piece);
            self.exchange(cmd::DMA_WRITE, &payload)?;
        }
        Ok(())
    }
}

impl Server {
    /// Runs the device's due event with message DMA over this connection.
    pub(super) fn run_device_event(
        &mut self,
        transport: &mut Transport,
        deferred: &mut VecDeque<Message>,
    ) -> bool {
        let deferred_bytes = deferred.iter().map(|m| m.payload.len()).sum();
        let mut dma = ConnectionDma {
            transport,
            deferred,
            deferred_bytes,
            next_id: 0x8000,
            max_xfer: self.negotiated_xfer,
            reply_timeout: self.config.peer_timeout,
            broken: false,
        };
        self.device.run_event(&mut dma);
        !dma.broken
    }
}
