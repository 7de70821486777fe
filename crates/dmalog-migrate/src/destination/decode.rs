//! The destination's decoders of the source's payloads (Hello, Pages): every number
//! checked against the frame's limits before it sizes, indexes or addresses anything.

use super::*;

/// A decoded Hello: the source's page size, session, channels and memory map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The source's page size, bytes.
    pub page_size: u32,
    /// The migration's id, which every further channel's Join repeats.
    pub session: u64,
    /// Connections the migration uses, 1 to [`MAX_CHANNELS`].
    pub channels: u32,
    /// `(gpa, size)` of each region.
    pub regions: Vec<(u64, u64)>,
}

pub(super) fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

pub(super) fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        bytes.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

pub(super) fn refused(kind: Kind, why: &'static str) -> MigrateError {
    MigrateError::Stream(StreamError::Refused { kind, why })
}

/// Decodes a Hello payload: `page_size u32, count u32, session u64, channels u32,
/// reserved u32 (0)`, then `count` times `gpa u64, size u64`, nothing more.
pub fn decode_hello(payload: &[u8]) -> Result<Hello, MigrateError> {
    let malformed = || MigrateError::Stream(StreamError::Malformed(Kind::Hello));
    let page_size = le_u32(payload, 0).ok_or_else(malformed)?;
    let count = le_u32(payload, 4).ok_or_else(malformed)? as usize;
    let session = le_u64(payload, 8).ok_or_else(malformed)?;
    let channels = le_u32(payload, 16).ok_or_else(malformed)?;
    let reserved = le_u32(payload, 20).ok_or_else(malformed)?;
    // The frame limit bounds the payload, so `count` is checked against what was sent
    // before any arithmetic on it.
    let rest = payload.len() - HELLO_HEAD_BYTES;
    if rest / 16 != count || rest % 16 != 0 {
        return Err(malformed());
    }
    if reserved != 0 {
        return Err(refused(Kind::Hello, "reserved field is not zero"));
    }
    if channels == 0 || channels > MAX_CHANNELS {
        return Err(refused(Kind::Hello, "channel count out of range"));
    }
    let regions = (0..count)
        .map(|i| {
            let at = HELLO_HEAD_BYTES + 16 * i;
            Some((le_u64(payload, at)?, le_u64(payload, at + 8)?))
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(malformed)?;
    Ok(Hello {
        page_size,
        session,
        channels,
        regions,
    })
}

/// One run of a Pages frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun<'a> {
    /// Guest address of the first page.
    pub gpa: u64,
    /// Pages.
    pub npages: u64,
    /// The bytes (`npages` pages), `None` for a zero run.
    pub data: Option<&'a [u8]>,
}

/// Decodes a Pages payload (stream.rs): 1 to [`MAX_RUNS_PER_FRAME`] runs, each of at least
/// one page at a page-aligned address that does not wrap, flags [`RUN_ZERO`] or none, at
/// most [`MAX_PAGES_PER_FRAME`] data pages and [`MAX_ZERO_PAGES_PER_FRAME`] zero pages,
/// and exactly the data pages' bytes after the table. Whether the runs lie in guest memory
/// is the caller's check.
pub fn decode_pages(payload: &[u8]) -> Result<Vec<PageRun<'_>>, MigrateError> {
    let (table, data_bytes) = decode_table(payload)?;
    let mut data = payload.get(table_end(table.len())..).unwrap_or_default();
    if data.len() as u64 != data_bytes {
        return Err(refused(
            Kind::Pages,
            "data length differs from the page count",
        ));
    }
    Ok(table
        .into_iter()
        .map(|run| {
            let bytes = (!run.zero).then(|| {
                // Lengths checked above: the runs' bytes add up to the data.
                let (bytes, rest) = data.split_at((run.npages * PAGE) as usize);
                data = rest;
                bytes
            });
            PageRun {
                gpa: run.gpa,
                npages: run.npages,
                data: bytes,
            }
        })
        .collect())
}

/// One run of a Pages frame's table.
#[derive(Debug, Clone, Copy)]
pub(super) struct RunHead {
    pub(super) gpa: u64,
    pub(super) npages: u64,
    pub(super) zero: bool,
}

pub(super) fn table_end(nruns: usize) -> usize {
    PAGES_HEAD_BYTES + nruns * RUN_BYTES
}

/// Decodes a Pages frame's head and run table (`payload` may hold page data after it):
/// the runs, checked as [`decode_pages`] says, and the page data bytes they need.
pub(super) fn decode_table(payload: &[u8]) -> Result<(Vec<RunHead>, u64), MigrateError> {
    let malformed = || MigrateError::Stream(StreamError::Malformed(Kind::Pages));
    let nruns = le_u32(payload, 0).ok_or_else(malformed)? as usize;
    let reserved = le_u32(payload, 4).ok_or_else(malformed)?;
    if nruns == 0 || nruns > MAX_RUNS_PER_FRAME {
        return Err(refused(Kind::Pages, "run count out of range"));
    }
    if reserved != 0 {
        return Err(refused(Kind::Pages, "reserved field is not zero"));
    }
    // nruns <= MAX_RUNS_PER_FRAME: no overflow.
    if payload.len() < table_end(nruns) {
        return Err(malformed());
    }
    let (mut data_pages, mut zero_pages) = (0u64, 0u64);
    let mut runs = Vec::with_capacity(nruns);
    for i in 0..nruns {
        let at = PAGES_HEAD_BYTES + i * RUN_BYTES;
        let gpa = le_u64(payload, at).ok_or_else(malformed)?;
        let npages = u64::from(le_u32(payload, at + 8).ok_or_else(malformed)?);
        let flags = le_u32(payload, at + 12).ok_or_else(malformed)?;
        if npages == 0 {
            return Err(refused(Kind::Pages, "a run of no pages"));
        }
        if gpa % PAGE != 0 {
            return Err(refused(Kind::Pages, "guest address not page-aligned"));
        }
        if flags & !RUN_ZERO != 0 {
            return Err(refused(Kind::Pages, "unknown run flags"));
        }
        // npages < 2^32: the product fits in 64 bits.
        if gpa.checked_add(npages * PAGE).is_none() {
            return Err(refused(Kind::Pages, "run wraps around the address space"));
        }
        let zero = flags & RUN_ZERO != 0;
        if zero {
            zero_pages += npages;
            if zero_pages > MAX_ZERO_PAGES_PER_FRAME {
                return Err(refused(Kind::Pages, "too many zero pages in one frame"));
            }
        } else {
            data_pages += npages;
            if data_pages > MAX_PAGES_PER_FRAME {
                return Err(refused(Kind::Pages, "too many pages in one frame"));
            }
        }
        runs.push(RunHead { gpa, npages, zero });
    }
    Ok((runs, data_pages * PAGE))
}
