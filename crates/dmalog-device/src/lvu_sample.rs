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
    Device, DeviceError, IrqInfo, IrqTable, MessageDma, RegionInfo, PCI_CONFIG_REGION_INDEX,
    PCI_NUM_IRQS, REGION_MMAP, REGION_READ, REGION_WRITE,
};
use crate::dma_space::{DmaAccessor, DmaBacking, DmaSpace};
use crate::pci::{self, ConfigSpace, MigrationBuffers};
use crate::shared_memory::{sealed_memfd, SharedMapping};

/// Bytes of BAR1 (SPEC 6.2; libvfio-user's sample after its BAR-size fix).
pub const BAR1_SIZE: u64 = 0x4000;
/// The sparse mmap areas of BAR1.
pub const BAR1_SPARSE: [(u64, u64); 2] = [(0, 0x1000), (0x2000, 0x1000)];
/// Bytes of one DMA transfer unit of the timer's direct and message writes.
pub const WRITE_CHUNK: usize = 1024;
/// Bytes of one read unit.
pub const READ_CHUNK: usize = 2048;
/// Vectors per IRQ index: INTx only.
const IRQ_COUNTS: [u32; PCI_NUM_IRQS as usize] = [1, 0, 0, 0, 0];

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

/// A BAR1 access `[offset, offset + count)` as a mapping offset; EINVAL past the end.
fn bar1_offset(offset: u64, count: usize, bar1_size: u64) -> Result<usize, DeviceError> {
    offset
        .checked_add(count as u64)
        .filter(|&end| end <= bar1_size)
        .ok_or(DeviceError::Invalid("BAR1 access out of range"))?;
    Ok(offset as usize)
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
    config: ConfigSpace,
    bar0: i64,
    bar1_fd: Arc<OwnedFd>,
    bar1: SharedMapping,
    bar1_size: u64,
    dma: DmaAccessor,
    space: DmaSpace,
    irqs: IrqTable,
    running: bool,
    deadline: Option<Instant>,
    migration: MigrationBuffers,
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
        // Sealed: the client gets this fd and must not be able to shrink it under our
        // mapping (SIGBUS) or grow it.
        let fd = sealed_memfd("lvu-sample-bar1", bar1_size)?;
        let bar1 = SharedMapping::map(&fd, 0, bar1_size as usize, true)?;
        let mut config = ConfigSpace::new(0xdead, 0xbeef);
        config.set_u16(0x2c, 0xcafe); // subsystem vendor
        config.set_u16(0x2e, 0xbabe); // subsystem
        Ok(LvuSample {
            config,
            bar0: 0,
            bar1_fd: Arc::new(fd),
            bar1,
            bar1_size,
            dma: space.accessor(),
            space: space.clone(),
            irqs: IrqTable::new(&IRQ_COUNTS),
            running: true,
            deadline: None,
            migration: MigrationBuffers::new(
                4 * (bar1_size as usize + 8),
                "more migration data than an lvu-sample has",
            ),
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

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        pci::region_info(index, |bar| match bar {
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
            _ => None,
        })
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        self.irqs.info(index)
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
                let offset = bar1_offset(offset, out.len(), self.bar1_size)?;
                self.bar1
                    .try_read(offset, out)
                    .map_err(|_| DeviceError::Fault("BAR1 memory is gone"))
            }
            PCI_CONFIG_REGION_INDEX => self.config.read(offset, out),
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
                let offset = bar1_offset(offset, data.len(), self.bar1_size)?;
                self.bar1
                    .try_write(offset, data)
                    .map_err(|_| DeviceError::Fault("BAR1 memory is gone"))
            }
            // Config space is read-only here.
            PCI_CONFIG_REGION_INDEX => self.config.write(offset, data, 0..0),
            _ => Err(DeviceError::Invalid("no such region or empty region")),
        }
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.bar0 = 0;
        self.deadline = None;
        Ok(())
    }

    fn abort_migration(&mut self) {
        self.migration.clear();
        self.running = true;
        self.arm();
    }

    fn migration_flags(&self) -> u64 {
        MIGRATION_STOP_COPY | MIGRATION_PRE_COPY
    }

    fn migration_arc(&mut self, from: DeviceState, to: DeviceState) -> Result<(), DeviceError> {
        use DeviceState::*;
        match (from, to) {
            (Running, PreCopy) => self.migration.save(self.bar1_bytes()),
            (PreCopy, StopCopy) | (Stop, StopCopy) => {
                // As the reference: STOP_COPY's data is BAR1 then BAR0, afresh.
                self.migration.save(self.bar1_bytes());
                self.migration.save_more(&self.bar0.to_le_bytes());
            }
            (Stop, Resuming) => self.migration.clear_load(),
            (Resuming, Stop) => {
                let need = self.bar1_size as usize + 8;
                let buffer = self.migration.take_loaded();
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
            (StopCopy, Stop) | (PreCopy, Running) => self.migration.clear_save(),
            _ => {}
        }
        self.running = matches!(to, Running | PreCopy);
        self.arm();
        Ok(())
    }

    fn save_data(&mut self, out: &mut [u8]) -> Result<usize, DeviceError> {
        Ok(self.migration.read_saved(out))
    }

    fn load_data(&mut self, data: &[u8]) -> Result<(), DeviceError> {
        self.migration.load(data)
    }

    fn pending_data_bytes(&self) -> Option<u64> {
        Some(self.migration.pending_bytes())
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
