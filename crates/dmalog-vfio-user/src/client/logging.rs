//! DMA logging from the VMM side: PROBE, START, STOP and REPORTs split into pipelined
//! messages that fit the negotiated transfer size, written straight into the caller's
//! bitmap; the client as a [`DirtyTracker`].

use dmalog::report_split::report_parts;
use dmalog::tracker::checked_report_words;
use dmalog::uapi::{
    feature_request, LoggingRange, UapiStruct, UserLoggingControl, UserLoggingReport,
    FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP, FEATURE_GET,
    FEATURE_HEADER_BYTES, FEATURE_PROBE, FEATURE_SET, USER_REPORT_BYTES,
};
use dmalog::{DirtyTracker, IovaRange, TrackerError, TrackerResult};

use super::{Client, ClientError};
use crate::wire::*;

impl Client {
    /// Whether the device supports DMA logging.
    pub fn probe_dma_logging(&mut self) -> Result<bool, ClientError> {
        match self.device_feature(&feature_request(
            8,
            FEATURE_DMA_LOGGING_START | FEATURE_SET | FEATURE_PROBE,
            &[],
        )) {
            Ok(_) => Ok(true),
            Err(ClientError::Refused {
                errno: libc::ENOTTY,
                ..
            }) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// START with raw ranges (empty: log all DMA-mapped space); returns the chosen page size.
    pub fn start_logging(
        &mut self,
        ranges: &[LoggingRange],
        page_size: u64,
    ) -> Result<u64, ClientError> {
        let payload = UserLoggingControl::encode(page_size, ranges);
        let request = feature_request(
            (FEATURE_HEADER_BYTES + payload.len()) as u32,
            FEATURE_DMA_LOGGING_START | FEATURE_SET,
            &payload,
        );
        let reply = self.device_feature(&request)?;
        let chosen = dmalog::uapi::read_u64(&reply, FEATURE_HEADER_BYTES)
            .map_err(|_| ClientError::Protocol("short START reply"))?;
        // Callers divide by it and shift by its log: only a power of two is a page size.
        if !chosen.is_power_of_two() {
            return Err(ClientError::Protocol(
                "START reply: page size not a power of two",
            ));
        }
        self.logging_page_size = Some(chosen);
        Ok(chosen)
    }

    /// Sends one REPORT request for `[iova, iova+length)` whose bitmap is `bitmap_words`
    /// long; returns its message id.
    fn send_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap_words: usize,
    ) -> Result<u16, ClientError> {
        let argsz = (FEATURE_HEADER_BYTES + USER_REPORT_BYTES + bitmap_words * 8) as u32;
        let request = feature_request(
            argsz,
            FEATURE_DMA_LOGGING_REPORT | FEATURE_GET,
            &UserLoggingReport {
                iova,
                length,
                page_size,
            }
            .encode(),
        );
        self.send_command(cmd::DEVICE_FEATURE, &request, &[])
    }

    /// Takes the reply to REPORT `id` and ORs its bitmap into `words`.
    fn take_report(&mut self, id: u16, words: &mut [u64]) -> Result<(), ClientError> {
        // Where the caller's bitmap is still all zeros (a fresh bitmap, the usual case), ORing
        // the reply in is a copy: the kernel writes the bitmap straight into the caller's
        // words, with no pass over a receive buffer. (The feature header and the echoed
        // request before it are not checked on either path.)
        // (The wire's bitmap is little-endian words: only there are they the host's bytes.)
        let fresh = cfg!(target_endian = "little")
            && words
                .chunks(512)
                .all(|chunk| chunk.iter().fold(0, |acc, &word| acc | word) == 0);
        let reply = if fresh {
            let mut prefix = [0u8; FEATURE_HEADER_BYTES + USER_REPORT_BYTES];
            let direct = dmalog::tracker::words_as_bytes(words);
            self.await_reply_into(cmd::DEVICE_FEATURE, id, &mut prefix, direct)?
        } else {
            Some(self.await_reply(cmd::DEVICE_FEATURE, id)?)
        };
        let Some((reply, _)) = reply else {
            return Ok(());
        };
        let bitmap = reply
            .get(FEATURE_HEADER_BYTES + USER_REPORT_BYTES..)
            .ok_or(ClientError::Protocol("short REPORT reply"))?;
        if bitmap.len() != words.len() * 8 {
            return Err(ClientError::Protocol("REPORT bitmap of the wrong size"));
        }
        for (word, bytes) in words.iter_mut().zip(bitmap.chunks_exact(8)) {
            let mut le = [0u8; 8];
            le.copy_from_slice(bytes);
            *word |= u64::from_le_bytes(le);
        }
        self.transport.recycle(reply);
        Ok(())
    }
}

/// REPORT requests a split report keeps in flight: the server builds the next part while
/// this side copies the last one. Small, so that the requests always fit in the socket's
/// buffer while the server blocks on sending a reply.
const REPORT_PIPELINE_DEPTH: usize = 4;

impl DirtyTracker for Client {
    fn probe(&mut self) -> Result<bool, TrackerError> {
        Ok(self.probe_dma_logging()?)
    }

    fn start(&mut self, ranges: &[IovaRange], page_size: u64) -> Result<u64, TrackerError> {
        let raw: Vec<LoggingRange> = ranges.iter().map(|r| LoggingRange::from(*r)).collect();
        Ok(self.start_logging(&raw, page_size)?)
    }

    /// Splits reports whose reply would exceed `max_data_xfer_size` at 64-page boundaries.
    fn report(&mut self, range: IovaRange, page_size: u64, bitmap: &mut [u64]) -> TrackerResult {
        let (iova, length) = (range.iova(), range.length());
        let need_words = checked_report_words(length, page_size, bitmap.len())?;
        let room_words = (self.max_data_xfer_size as u64)
            .saturating_sub((FEATURE_HEADER_BYTES + USER_REPORT_BYTES) as u64)
            / 8;
        let max_part_len_bytes = room_words
            .max(1)
            .saturating_mul(64)
            .saturating_mul(page_size);
        let mut parts = report_parts(range, page_size, Some(max_part_len_bytes))?.peekable();
        // Pipelined: up to REPORT_PIPELINE_DEPTH parts in flight. After a refusal no more
        // parts are sent; the ones in flight are still taken so the stream stays in step.
        let mut in_flight = std::collections::VecDeque::with_capacity(REPORT_PIPELINE_DEPTH);
        let mut refused: Option<ClientError> = None;
        while parts.peek().is_some() || !in_flight.is_empty() {
            if refused.is_none() && in_flight.len() < REPORT_PIPELINE_DEPTH {
                if let Some(part) = parts.next() {
                    let (iova, len_bytes) = (part.range.iova(), part.range.length());
                    let id = self.send_report(iova, len_bytes, page_size, part.words)?;
                    in_flight.push_back((id, part));
                    continue;
                }
            }
            let Some((id, part)) = in_flight.pop_front() else {
                break; // refused, nothing left in flight
            };
            match self.take_report(id, part.words_of(bitmap)) {
                Ok(()) => {}
                Err(err @ ClientError::Refused { .. }) => {
                    refused.get_or_insert(err);
                }
                Err(err) => return Err(err.into()),
            }
        }
        if let Some(err) = refused {
            return Err(err.into());
        }
        // Pages this client wrote for the server (DMA_WRITE messages) are dirty too.
        let bytes = dmalog::tracker::words_as_bytes(&mut bitmap[..need_words as usize]);
        let mut merged = dmalog::IovaBitmap::new(iova, length, page_size, bytes)?;
        for mapping in &self.mappings {
            mapping.writes.read_and_clear(iova, length, &mut merged);
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), TrackerError> {
        self.logging_page_size = None;
        self.device_feature(&feature_request(
            8,
            FEATURE_DMA_LOGGING_STOP | FEATURE_SET,
            &[],
        ))?;
        Ok(())
    }
}
