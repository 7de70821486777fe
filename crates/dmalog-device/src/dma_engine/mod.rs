//! `dma-engine` (SPEC 6.1): a PCI device whose only job is DMA, so that logging can be
//! tested from outside: FILL, COPY and READ ops run by a doorbell, and a background
//! workload thread that writes a deterministic sequence while the device runs.
//!
//! - [`regs`]: the register map and [`DmaEngineRegs`], the driver-side helper.
//! - `workload`: the background writer and its pacing.

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use dmalog::uapi::{DeviceState, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY};

use crate::device::{
    Device, DeviceError, IrqInfo, IrqTable, RegionInfo, PCI_CONFIG_REGION_INDEX, PCI_NUM_IRQS,
    REGION_READ, REGION_WRITE,
};
use crate::dma_space::{DmaAccessor, DmaSpace};
use crate::pci::{self, ConfigSpace, MigrationBuffers};

pub mod regs;
mod workload;

use regs::NUM_REGS;
pub use regs::{
    op, reg, DmaEngineRegs, RegisterAccess, WorkloadConfig, BAR0_SIZE, DEVICE_ID, MAGIC, VENDOR_ID,
};
pub use workload::workload_write;
use workload::{fill_words, run_workload, WorkloadParams, WorkloadShared};

const STATE_MAGIC: u64 = u64::from_le_bytes(*b"DMAENGST");
/// Bytes of one saved device state record.
pub const STATE_RECORD_BYTES: usize = 8 * (NUM_REGS + 1);
const CHUNK_BYTES: usize = 64 << 10;
/// Vectors per IRQ index: INTx, MSI, no MSI-X, ERR, REQ.
const IRQ_COUNTS: [u32; PCI_NUM_IRQS as usize] = [1, 1, 0, 1, 1];
/// The configuration space bytes a driver may write: the command register.
const CONFIG_WRITABLE: std::ops::Range<usize> = 4..6;

/// FNV-1a 64 over `data`, continuing from `hash`.
pub fn fnv1a(mut hash: u64, data: &[u8]) -> u64 {
    for &byte in data {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// FNV-1a 64's offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The dma-engine device.
pub struct DmaEngine {
    regs: [u64; NUM_REGS],
    config: ConfigSpace,
    dma: DmaAccessor,
    irqs: IrqTable,
    workload: Arc<WorkloadShared>,
    workload_thread: Option<JoinHandle<()>>,
    running: bool,
    migration: MigrationBuffers,
}

impl std::fmt::Debug for DmaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaEngine")
            .field("running", &self.running)
            .field("ops_done", &self.regs[(reg::OPS_DONE / 8) as usize])
            .finish()
    }
}

impl DmaEngine {
    /// A RUNNING dma-engine doing DMA in `space`.
    pub fn new(space: &DmaSpace) -> Self {
        let workload = Arc::new(WorkloadShared::default());
        workload.lock().allowed = true;
        let thread_shared = Arc::clone(&workload);
        let thread_dma = space.accessor();
        let workload_thread = std::thread::Builder::new()
            .name("dma-engine-workload".into())
            .spawn(move || run_workload(thread_shared, thread_dma))
            .ok();
        let mut engine = DmaEngine {
            regs: [0; NUM_REGS],
            config: ConfigSpace::new(VENDOR_ID, DEVICE_ID),
            dma: space.accessor(),
            irqs: IrqTable::new(&IRQ_COUNTS),
            workload,
            workload_thread,
            running: true,
            migration: MigrationBuffers::new(
                16 * STATE_RECORD_BYTES,
                "more migration data than a dma-engine has",
            ),
        };
        engine.reset_registers();
        engine
    }

    fn reset_registers(&mut self) {
        self.regs = [0; NUM_REGS];
        self.regs[0] = MAGIC;
        self.workload.writes.store(0, Ordering::SeqCst);
        self.workload.bytes_written.store(0, Ordering::SeqCst);
        self.sync_workload();
        // BAR0 (offset 0x10) stays 0: 32-bit memory.
        self.config = ConfigSpace::new(VENDOR_ID, DEVICE_ID);
        self.config.set_u16(0x0a, 0xff00); // class: unassigned
    }

    fn reg(&self, offset: u64) -> u64 {
        self.regs[(offset / 8) as usize]
    }

    fn set_reg(&mut self, offset: u64, value: u64) {
        self.regs[(offset / 8) as usize] = value;
    }

    /// Pushes the workload registers and the run permission to the workload thread, and
    /// waits until it is idle if it may no longer run.
    fn sync_workload(&mut self) {
        let mut control = self.workload.lock();
        control.params = WorkloadParams {
            base: self.reg(reg::WL_BASE),
            span: self.reg(reg::WL_SPAN),
            size: self.reg(reg::WL_SIZE),
            rate: self.reg(reg::WL_RATE),
            seed: self.reg(reg::WL_SEED),
        };
        control.enabled = self.reg(reg::WL_CTRL) & 1 != 0;
        control.allowed = self.running;
        self.workload.changed.notify_all();
        while control.busy && !(control.enabled && control.allowed) {
            control = self
                .workload
                .changed
                .wait(control)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn run_op(&mut self) {
        if !self.running {
            self.set_reg(reg::STATUS, libc::EBUSY as u64);
            return;
        }
        let (dst, src, len) = (self.reg(reg::DST), self.reg(reg::SRC), self.reg(reg::LEN));
        let mut status = 0u64;
        let mut written = 0u64;
        let mut result = 0u64;
        let mut chunk = vec![0u8; CHUNK_BYTES.min(len.max(1).min(CHUNK_BYTES as u64) as usize)];
        match self.reg(reg::OP) {
            op::FILL | op::COPY => {
                let mut done = 0u64;
                while done < len {
                    let piece = (len - done).min(chunk.len() as u64) as usize;
                    let buf = &mut chunk[..piece];
                    if self.reg(reg::OP) == op::FILL {
                        fill_words(buf, self.reg(reg::PATTERN), done / 8);
                    } else if src
                        .checked_add(done)
                        .map(|at| self.dma.read(at, buf))
                        .is_none_or(|r| r.is_err())
                    {
                        status = libc::EFAULT as u64;
                        break;
                    }
                    let Some(at) = dst.checked_add(done) else {
                        status = libc::EFAULT as u64;
                        break;
                    };
                    match self.dma.write(at, buf) {
                        Ok(()) => {
                            written += piece as u64;
                            done += piece as u64;
                        }
                        Err(fault) => {
                            written += fault.done;
                            status = libc::EFAULT as u64;
                            break;
                        }
                    }
                }
            }
            op::READ => {
                let mut hash = FNV_OFFSET;
                let mut done = 0u64;
                while done < len {
                    let piece = (len - done).min(chunk.len() as u64) as usize;
                    let buf = &mut chunk[..piece];
                    if src
                        .checked_add(done)
                        .map(|at| self.dma.read(at, buf))
                        .is_none_or(|r| r.is_err())
                    {
                        status = libc::EFAULT as u64;
                        break;
                    }
                    hash = fnv1a(hash, buf);
                    done += piece as u64;
                }
                if status == 0 {
                    result = hash;
                }
            }
            _ => status = libc::EINVAL as u64,
        }
        self.set_reg(reg::STATUS, status);
        self.set_reg(reg::RESULT, result);
        // Counters wrap: migration data may have restored them to any value.
        self.set_reg(
            reg::BYTES_WRITTEN,
            self.reg(reg::BYTES_WRITTEN).wrapping_add(written),
        );
        self.set_reg(reg::OPS_DONE, self.reg(reg::OPS_DONE).wrapping_add(1));
        if self.reg(reg::IRQ_CTRL) & 1 != 0 {
            self.irqs.trigger(0, 0);
        }
    }

    fn read_register(&self, offset: u64) -> u64 {
        match offset {
            reg::WL_WRITES => self.workload.writes.load(Ordering::SeqCst),
            reg::BYTES_WRITTEN => {
                let workload = self.workload.bytes_written.load(Ordering::SeqCst);
                self.reg(reg::BYTES_WRITTEN).wrapping_add(workload)
            }
            reg::DOORBELL => 0,
            _ => self.reg(offset),
        }
    }

    fn state_record(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(STATE_RECORD_BYTES);
        out.extend_from_slice(&STATE_MAGIC.to_le_bytes());
        for index in 0..NUM_REGS {
            out.extend_from_slice(&self.read_register(index as u64 * 8).to_le_bytes());
        }
        out
    }

    fn apply_record(&mut self, record: &[u8]) -> Result<(), DeviceError> {
        let word =
            |i: usize| u64::from_le_bytes(record[8 * i..8 * i + 8].try_into().unwrap_or_default());
        if record.len() != STATE_RECORD_BYTES || word(0) != STATE_MAGIC || word(1) != MAGIC {
            return Err(DeviceError::Invalid("not a dma-engine state record"));
        }
        for index in 0..NUM_REGS {
            self.regs[index] = word(1 + index);
        }
        // Workload bytes are folded into BYTES_WRITTEN by the record.
        self.workload.bytes_written.store(0, Ordering::SeqCst);
        self.workload
            .writes
            .store(self.regs[(reg::WL_WRITES / 8) as usize], Ordering::SeqCst);
        self.sync_workload();
        Ok(())
    }
}

impl Drop for DmaEngine {
    fn drop(&mut self) {
        {
            let mut control = self.workload.lock();
            control.shutdown = true;
            self.workload.changed.notify_all();
        }
        if let Some(thread) = self.workload_thread.take() {
            let _ = thread.join();
        }
    }
}

impl Device for DmaEngine {
    fn name(&self) -> &'static str {
        "dma-engine"
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        pci::region_info(index, |bar| {
            (bar == 0).then(|| RegionInfo {
                size: BAR0_SIZE,
                flags: REGION_READ | REGION_WRITE,
                ..RegionInfo::default()
            })
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
                if out.len() != 8 || offset % 8 != 0 || offset >= BAR0_SIZE {
                    return Err(DeviceError::Invalid(
                        "registers are read as aligned 8-byte words",
                    ));
                }
                let value = if offset < NUM_REGS as u64 * 8 {
                    self.read_register(offset)
                } else {
                    0
                };
                out.copy_from_slice(&value.to_le_bytes());
                Ok(())
            }
            PCI_CONFIG_REGION_INDEX => self.config.read(offset, out),
            _ => Err(DeviceError::Invalid("no such region or empty region")),
        }
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        match index {
            0 => {
                if data.len() != 8 || offset % 8 != 0 || offset >= BAR0_SIZE {
                    return Err(DeviceError::Invalid(
                        "registers are written as aligned 8-byte words",
                    ));
                }
                let value =
                    u64::from_le_bytes(data.try_into().map_err(|_| DeviceError::Invalid("size"))?);
                match offset {
                    reg::DST | reg::SRC | reg::LEN | reg::PATTERN | reg::OP | reg::IRQ_CTRL => {
                        self.set_reg(offset, value)
                    }
                    reg::WL_BASE
                    | reg::WL_SPAN
                    | reg::WL_SIZE
                    | reg::WL_RATE
                    | reg::WL_SEED
                    | reg::WL_CTRL => {
                        self.set_reg(offset, value);
                        self.sync_workload();
                    }
                    reg::DOORBELL => self.run_op(),
                    _ => {} // read-only and unused registers ignore writes
                }
                Ok(())
            }
            PCI_CONFIG_REGION_INDEX => self.config.write(offset, data, CONFIG_WRITABLE),
            _ => Err(DeviceError::Invalid("no such region or empty region")),
        }
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.reset_registers();
        Ok(())
    }

    fn abort_migration(&mut self) {
        self.migration.clear();
        self.running = true;
        self.sync_workload();
    }

    fn migration_flags(&self) -> u64 {
        MIGRATION_STOP_COPY | MIGRATION_PRE_COPY
    }

    fn migration_arc(&mut self, from: DeviceState, to: DeviceState) -> Result<(), DeviceError> {
        use DeviceState::*;
        match (from, to) {
            (Running, PreCopy) => self.migration.save(self.state_record()),
            (PreCopy, StopCopy) | (Stop, StopCopy) => {
                self.running = false;
                self.sync_workload();
                if from == Stop {
                    self.migration.clear_save();
                }
                let record = self.state_record();
                self.migration.save_more(&record);
            }
            (Stop, Resuming) => self.migration.clear_load(),
            (Resuming, Stop) => {
                let buffer = self.migration.take_loaded();
                if buffer.is_empty() || buffer.len() % STATE_RECORD_BYTES != 0 {
                    return Err(DeviceError::Invalid("incomplete dma-engine state"));
                }
                self.apply_record(&buffer[buffer.len() - STATE_RECORD_BYTES..])?;
            }
            (StopCopy, Stop) | (PreCopy, Running) => self.migration.clear_save(),
            _ => {}
        }
        self.running = matches!(to, Running | PreCopy);
        self.sync_workload();
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
}
