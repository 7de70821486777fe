//! `lvu-sample` (SPEC 6.2): the device of libvfio-user's `samples/server.c`, so that its
//! reference client (`samples/client.c`) can be run against dmalog as an independent check.
//!
//! BAR0 is an 8-byte `time_t`: a write sets a deadline (seconds since the epoch) and, while
//! RUNNING, arms a timer; a read returns the seconds since that time. When the timer fires
//! the device raises INTx, writes 4 x 1 KiB directly into the second DMA mapping (logged),
//! reads 2 x 2 KiB from it, and does 4 x 1 KiB DMA_WRITE and 2 x 2 KiB DMA_READ messages to
//! the first mapping. BAR1 is 16 KiB of memory, mmappable through two sparse areas. The
//! migration data is BAR1 in PRE_COPY, BAR1 then BAR0 in STOP_COPY.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dmalog::uapi::{DeviceState, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY};

use crate::device::{
    Device, DeviceError, IrqInfo, IrqTable, MessageDma, RegionInfo, IRQ_INFO_EVENTFD,
    PCI_CONFIG_REGION_INDEX, PCI_NUM_IRQS, PCI_NUM_REGIONS, REGION_MMAP, REGION_READ, REGION_WRITE,
};
use crate::dma_space::{DmaAccessor, DmaBacking, DmaSpace};
use crate::shared_memory::SharedMapping;

/// Bytes of BAR1 (SPEC 6.2; libvfio-user's sample after its BAR-size fix).
pub const BAR1_SIZE: u64 = 0x4000;
/// The sparse mmap areas of BAR1.
pub const BAR1_SPARSE: [(u64, u64); 2] = [(0, 0x1000), (0x2000, 0x1000)];
/// Bytes of one DMA transfer unit of the timer's direct and message writes.
pub const WRITE_CHUNK: usize = 1024;
/// Bytes of one read unit.
pub const READ_CHUNK: usize = 2048;

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The furthest ahead (seconds) BAR0's timer is armed; a later `time_t` leaves it unarmed
/// (about 100 years: no test or client waits that long, and every `Instant` holds it).
pub const MAX_TIMER_SECS: i64 = 100 * 366 * 24 * 3600;

/// When a timer `wait_secs` from `now` fires (at once when not positive), or None when it is
/// further ahead than [`MAX_TIMER_SECS`] or than `Instant` can hold.
fn timer_deadline(now: Instant, wait_secs: i64) -> Option<Instant> {
    if wait_secs > MAX_TIMER_SECS {
        return None;
    }
    now.checked_add(Duration::from_secs(wait_secs.max(0) as u64))
}

/// What the last timer expiry did (for tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExpiryReport {
    /// Timer expiries so far.
    pub expiries: u64,
    /// Errors of the last expiry's DMA, if any.
    pub errors: Vec<String>,
}

/// The lvu-sample device.
pub struct LvuSample {
    config: [u8; 256],
    bar0: i64,
    bar1_fd: Arc<OwnedFd>,
    bar1: SharedMapping,
    bar1_size: u64,
    dma: DmaAccessor,
    space: DmaSpace,
    irqs: IrqTable,
    running: bool,
    deadline: Option<Instant>,
    save_stream: Vec<u8>,
    save_cursor: usize,
    load_buffer: Vec<u8>,
    /// What the timer did.
    pub expiry: ExpiryReport,
}

impl std::fmt::Debug for LvuSample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LvuSample")
            .field("bar0", &self.bar0)
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl LvuSample {
    /// A RUNNING device doing DMA in `space`; BAR1 (16 KiB) lives in a memfd.
    pub fn new(space: &DmaSpace) -> std::io::Result<Self> {
        Self::with_bar1_size(space, BAR1_SIZE)
    }

    /// As [`LvuSample::new`] with another BAR1 size (older libvfio-user sample clients expect
    /// 0x3000); it must hold both sparse areas.
    pub fn with_bar1_size(space: &DmaSpace, bar1_size: u64) -> std::io::Result<Self> {
        if !(0x3000..=1 << 30).contains(&bar1_size) || bar1_size % 4096 != 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let fd = rustix::fs::memfd_create("lvu-sample-bar1", rustix::fs::MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&fd, bar1_size)?;
        let bar1 = SharedMapping::map(&fd, 0, bar1_size as usize, true)?;
        let mut config = [0u8; 256];
        config[0..2].copy_from_slice(&0xdeadu16.to_le_bytes());
        config[2..4].copy_from_slice(&0xbeefu16.to_le_bytes());
        config[0x2c..0x2e].copy_from_slice(&0xcafeu16.to_le_bytes());
        config[0x2e..0x30].copy_from_slice(&0xbabeu16.to_le_bytes());
        Ok(LvuSample {
            config,
            bar0: 0,
            bar1_fd: Arc::new(fd),
            bar1,
            bar1_size,
            dma: space.accessor(),
            space: space.clone(),
            irqs: IrqTable::new(&[1, 0, 0, 0, 0]),
            running: true,
            deadline: None,
            save_stream: Vec::new(),
            save_cursor: 0,
            load_buffer: Vec::new(),
            expiry: ExpiryReport::default(),
        })
    }

    /// Arms the timer from BAR0. BAR0 is any `time_t` a peer wrote (or sent in migration
    /// data), so the arithmetic saturates: a time in the past fires at once, one further
    /// ahead than [`MAX_TIMER_SECS`] (or than `Instant` can hold) never fires.
    fn arm(&mut self) {
        self.deadline = if self.running && self.bar0 != 0 {
            timer_deadline(Instant::now(), self.bar0.saturating_sub(now_secs()))
        } else {
            None
        };
    }

    fn bar1_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.bar1_size as usize];
        self.bar1.read(0, &mut out);
        out
    }
}

impl Device for LvuSample {
    fn name(&self) -> &'static str {
        "lvu-sample"
    }

    fn num_regions(&self) -> u32 {
        PCI_NUM_REGIONS
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        match index {
            0 => Some(RegionInfo {
                size: 8,
                flags: REGION_READ | REGION_WRITE,
                ..RegionInfo::default()
            }),
            1 => Some(RegionInfo {
                size: self.bar1_size,
                flags: REGION_READ | REGION_WRITE | REGION_MMAP,
                sparse_mmap: BAR1_SPARSE.to_vec(),
                mmap_fd: Some(Arc::clone(&self.bar1_fd)),
            }),
            PCI_CONFIG_REGION_INDEX => Some(RegionInfo {
                size: 256,
                flags: REGION_READ | REGION_WRITE,
                ..RegionInfo::default()
            }),
            i if i < PCI_NUM_REGIONS => Some(RegionInfo::default()),
            _ => None,
        }
    }

    fn num_irqs(&self) -> u32 {
        PCI_NUM_IRQS
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        let count = [1, 0, 0, 0, 0].get(index as usize).copied()?;
        Some(IrqInfo {
            count,
            flags: IRQ_INFO_EVENTFD,
        })
    }

    fn set_irq_eventfds(
        &mut self,
        index: u32,
        start: u32,
        fds: Vec<Option<OwnedFd>>,
    ) -> Result<(), DeviceError> {
        self.irqs.set(index, start, fds)
    }

    fn region_read(&mut self, index: u32, offset: u64, out: &mut [u8]) -> Result<(), DeviceError> {
        match index {
            0 => {
                // Saturating: BAR0 holds any value a peer wrote.
                let delta = now_secs().saturating_sub(self.bar0).to_le_bytes();
                let end = offset
                    .checked_add(out.len() as u64)
                    .filter(|&e| e <= 8)
                    .ok_or(DeviceError::Invalid("BAR0 is 8 bytes"))?;
                out.copy_from_slice(&delta[offset as usize..end as usize]);
                Ok(())
            }
            1 => {
                if !self.bar1.read(
                    usize::try_from(offset).map_err(|_| DeviceError::Invalid("offset"))?,
                    out,
                ) {
                    return Err(DeviceError::Invalid("BAR1 read out of range"));
                }
                Ok(())
            }
            PCI_CONFIG_REGION_INDEX => {
                let end = offset
                    .checked_add(out.len() as u64)
                    .filter(|&e| e <= 256)
                    .ok_or(DeviceError::Invalid("config read out of range"))?;
                out.copy_from_slice(&self.config[offset as usize..end as usize]);
                Ok(())
            }
            _ => Err(DeviceError::Invalid("no such region or empty region")),
        }
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        match index {
            0 => {
                if offset != 0 || data.len() != 8 {
                    return Err(DeviceError::Invalid("BAR0 is written as one 8-byte time_t"));
                }
                self.bar0 =
                    i64::from_le_bytes(data.try_into().map_err(|_| DeviceError::Invalid("size"))?);
                self.arm();
                Ok(())
            }
            1 => {
                if !self.bar1.write(
                    usize::try_from(offset).map_err(|_| DeviceError::Invalid("offset"))?,
                    data,
                ) {
                    return Err(DeviceError::Invalid("BAR1 write out of range"));
                }
                Ok(())
            }
            PCI_CONFIG_REGION_INDEX => {
                offset
                    .checked_add(data.len() as u64)
                    .filter(|&e| e <= 256)
                    .ok_or(DeviceError::Invalid("config write out of range"))?;
                Ok(()) // config space is read-only here
            }
            _ => Err(DeviceError::Invalid("no such region or empty region")),
        }
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.bar0 = 0;
        self.deadline = None;
        Ok(())
    }

    fn abort_migration(&mut self) {
        self.save_stream.clear();
        self.save_cursor = 0;
        self.load_buffer.clear();
        self.running = true;
        self.arm();
    }

    fn migration_flags(&self) -> u64 {
        MIGRATION_STOP_COPY | MIGRATION_PRE_COPY
    }

    fn migration_arc(&mut self, from: DeviceState, to: DeviceState) -> Result<(), DeviceError> {
        use DeviceState::*;
        match (from, to) {
            (Running, PreCopy) => {
                self.save_stream = self.bar1_bytes();
                self.save_cursor = 0;
            }
            (PreCopy, StopCopy) | (Stop, StopCopy) => {
                // As the reference: STOP_COPY's data is BAR1 then BAR0, afresh.
                self.save_stream = self.bar1_bytes();
                self.save_stream.extend_from_slice(&self.bar0.to_le_bytes());
                self.save_cursor = 0;
            }
            (Stop, Resuming) => self.load_buffer.clear(),
            (Resuming, Stop) => {
                let need = self.bar1_size as usize + 8;
                let buffer = std::mem::take(&mut self.load_buffer);
                if buffer.len() < need {
                    return Err(DeviceError::Invalid("incomplete lvu-sample state"));
                }
                let last = &buffer[buffer.len() - need..];
                self.bar1.write(0, &last[..self.bar1_size as usize]);
                self.bar0 = i64::from_le_bytes(
                    last[self.bar1_size as usize..]
                        .try_into()
                        .map_err(|_| DeviceError::Invalid("BAR0"))?,
                );
            }
            (StopCopy, Stop) | (PreCopy, Running) => {
                self.save_stream.clear();
                self.save_cursor = 0;
            }
            _ => {}
        }
        self.running = matches!(to, Running | PreCopy);
        self.arm();
        Ok(())
    }

    fn save_data(&mut self, out: &mut [u8]) -> Result<usize, DeviceError> {
        let rest = &self.save_stream[self.save_cursor..];
        let n = rest.len().min(out.len());
        out[..n].copy_from_slice(&rest[..n]);
        self.save_cursor += n;
        Ok(n)
    }

    fn load_data(&mut self, data: &[u8]) -> Result<(), DeviceError> {
        if self.load_buffer.len() + data.len() > 4 * (self.bar1_size as usize + 8) {
            return Err(DeviceError::Invalid(
                "more migration data than an lvu-sample has",
            ));
        }
        self.load_buffer.extend_from_slice(data);
        Ok(())
    }

    fn pending_data_bytes(&self) -> Option<u64> {
        Some((self.save_stream.len() - self.save_cursor) as u64)
    }

    fn next_event(&self) -> Option<Instant> {
        self.deadline
    }

    fn run_event(&mut self, dma: &mut dyn MessageDma) {
        self.deadline = None;
        self.expiry.expiries += 1;
        self.expiry.errors.clear();
        self.irqs.trigger(0, 0);
        let regions = self.space.regions();
        let mut errors = Vec::new();
        // Direct DMA to the second mapping (needs an fd): 4 x 1 KiB writes, 2 x 2 KiB reads.
        if let Some(second) = regions
            .iter()
            .nth(1)
            .filter(|r| matches!(r.backing, DmaBacking::Mapped(_)))
        {
            for i in 0..4u64 {
                let data = [0xa0 + i as u8; WRITE_CHUNK];
                // A mapping at the top of the IOVA space: the IOVA past it does not exist.
                let Some(iova) = second.iova.checked_add(i * WRITE_CHUNK as u64) else {
                    errors.push("direct write: past the end of the IOVA space".into());
                    continue;
                };
                if let Err(err) = self
                    .dma
                    .write(iova, &data[..WRITE_CHUNK.min(second.size as usize)])
                {
                    errors.push(format!("direct write: {err}"));
                }
            }
            for i in 0..2u64 {
                let mut out = [0u8; READ_CHUNK];
                let len = READ_CHUNK.min(second.size as usize);
                if let Err(err) = self.dma.read(
                    second.iova + i * READ_CHUNK as u64 % second.size.max(1),
                    &mut out[..len],
                ) {
                    errors.push(format!("direct read: {err}"));
                }
            }
        } else {
            errors.push("no second DMA mapping with an fd".into());
        }
        // Message DMA to the first mapping: 4 x 1 KiB DMA_WRITE, 2 x 2 KiB DMA_READ.
        if let Some(first) = regions.iter().next() {
            for i in 0..4u64 {
                let data = [0xb0 + i as u8; WRITE_CHUNK];
                if let Err(err) = dma.dma_write(
                    first.iova + (i * WRITE_CHUNK as u64) % first.size.max(1),
                    &data[..WRITE_CHUNK.min(first.size as usize)],
                ) {
                    errors.push(format!("DMA_WRITE: {err}"));
                }
            }
            for i in 0..2u64 {
                let mut out = [0u8; READ_CHUNK];
                let len = READ_CHUNK.min(first.size as usize);
                if let Err(err) = dma.dma_read(
                    first.iova + (i * READ_CHUNK as u64) % first.size.max(1),
                    &mut out[..len],
                ) {
                    errors.push(format!("DMA_READ: {err}"));
                }
            }
        }
        self.expiry.errors = errors;
    }
}
