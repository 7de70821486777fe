//! `dma-engine` (SPEC 6.1): a PCI device whose only job is DMA, so that logging can be
//! tested from outside: FILL, COPY and READ ops run by a doorbell, and a background
//! workload thread that writes a deterministic sequence while the device runs.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dmalog::uapi::{DeviceState, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY};

use crate::device::{
    Device, DeviceError, IrqInfo, IrqTable, RegionInfo, IRQ_INFO_EVENTFD, PCI_CONFIG_REGION_INDEX,
    PCI_NUM_IRQS, PCI_NUM_REGIONS, REGION_READ, REGION_WRITE,
};
use crate::dma_space::{DmaAccessor, DmaSpace};

/// PCI vendor ID.
pub const VENDOR_ID: u16 = 0x1b36;
/// PCI device ID.
pub const DEVICE_ID: u16 = 0x10d1;
/// Bytes of BAR0.
pub const BAR0_SIZE: u64 = 4096;
/// "DMALOG01" as a little-endian u64.
pub const MAGIC: u64 = 0x3130_474F_4C41_4D44;

/// Register offsets in BAR0.
pub mod reg {
    /// RO magic.
    pub const MAGIC: u64 = 0x000;
    /// Destination IOVA.
    pub const DST: u64 = 0x008;
    /// Source IOVA.
    pub const SRC: u64 = 0x010;
    /// Bytes.
    pub const LEN: u64 = 0x018;
    /// Fill seed.
    pub const PATTERN: u64 = 0x020;
    /// 1 FILL, 2 COPY, 3 READ.
    pub const OP: u64 = 0x028;
    /// WO: run OP.
    pub const DOORBELL: u64 = 0x030;
    /// RO: 0 or the errno of the last op.
    pub const STATUS: u64 = 0x038;
    /// RO: FNV-1a 64 of the bytes READ read.
    pub const RESULT: u64 = 0x040;
    /// RO: total bytes written by DMA.
    pub const BYTES_WRITTEN: u64 = 0x048;
    /// RO: doorbell ops completed.
    pub const OPS_DONE: u64 = 0x050;
    /// Bit 0: raise INTx after each doorbell op.
    pub const IRQ_CTRL: u64 = 0x058;
    /// Workload IOVA base.
    pub const WL_BASE: u64 = 0x080;
    /// Workload working set, bytes.
    pub const WL_SPAN: u64 = 0x088;
    /// Workload bytes per write.
    pub const WL_SIZE: u64 = 0x090;
    /// Workload bytes per second (0: as fast as possible).
    pub const WL_RATE: u64 = 0x098;
    /// Workload seed.
    pub const WL_SEED: u64 = 0x0A0;
    /// Bit 0: run the workload.
    pub const WL_CTRL: u64 = 0x0A8;
    /// RO: workload writes done.
    pub const WL_WRITES: u64 = 0x0B0;
}

/// OP values.
pub mod op {
    /// Write LEN bytes at DST: word k = PATTERN + k.
    pub const FILL: u64 = 1;
    /// Copy LEN bytes from SRC to DST.
    pub const COPY: u64 = 2;
    /// Read LEN bytes at SRC into RESULT (FNV-1a 64).
    pub const READ: u64 = 3;
}

const NUM_REGS: usize = (reg::WL_WRITES / 8 + 1) as usize;
const STATE_MAGIC: u64 = u64::from_le_bytes(*b"DMAENGST");
/// Bytes of one saved device state record.
pub const STATE_RECORD_BYTES: usize = 8 * (NUM_REGS + 1);
const CHUNK_BYTES: usize = 64 << 10;

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

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The workload's k-th write: `(iova, fill word seed)`; None when the parameters cannot run.
pub fn workload_write(base: u64, span: u64, size: u64, seed: u64, k: u64) -> Option<(u64, u64)> {
    if size == 0 || span < size {
        return None;
    }
    let slots = span / size;
    let slot = splitmix(seed ^ k.wrapping_mul(0x2545_f491_4f6c_dd1d)) % slots;
    Some((
        base.checked_add(slot * size)?,
        splitmix(seed.wrapping_add(k)),
    ))
}

/// Fills `out` with the 8-byte little-endian words `first, first+1, ...` (a partial last
/// word is cut), starting at word index `word0`.
fn fill_words(out: &mut [u8], first: u64, word0: u64) {
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let word = first.wrapping_add(word0 + i as u64).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct WorkloadParams {
    base: u64,
    span: u64,
    size: u64,
    rate: u64,
    seed: u64,
}

#[derive(Debug, Default)]
struct WorkloadControl {
    params: WorkloadParams,
    enabled: bool,
    allowed: bool,
    busy: bool,
    shutdown: bool,
}

#[derive(Debug, Default)]
struct WorkloadShared {
    control: Mutex<WorkloadControl>,
    changed: Condvar,
    writes: AtomicU64,
    bytes_written: AtomicU64,
}

impl WorkloadShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, WorkloadControl> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The workload's pacing: the bytes written since a window opened, at one rate. A new
/// rate opens a new window: kept, a lower rate would owe the time of every byte written at
/// the old one, and the workload would stall for a share of all the time since the window
/// opened (a throttle of 20% after 2 s of running: 0.5 s without a write).
#[derive(Debug, Clone, Copy)]
struct Pacer {
    start: Instant,
    bytes: u64,
    rate: u64,
}

impl Pacer {
    fn new(now: Instant) -> Self {
        Pacer {
            start: now,
            bytes: 0,
            rate: 0,
        }
    }

    /// Opens a new window at `now`.
    fn restart(&mut self, now: Instant) {
        self.start = now;
        self.bytes = 0;
    }

    /// Counts a write of `bytes` made at `rate` bytes per second; returns when the next
    /// write is due (`now` or later).
    fn wrote(&mut self, now: Instant, rate: u64, bytes: u64) -> Instant {
        if rate != self.rate {
            self.rate = rate;
            self.restart(now);
        }
        self.bytes = self.bytes.saturating_add(bytes);
        // Any rate a peer set: a quotient past what a Duration holds is "forever".
        let due = Duration::try_from_secs_f64(self.bytes as f64 / rate.max(1) as f64)
            .unwrap_or(Duration::MAX);
        self.start
            .checked_add(due)
            .unwrap_or(now + Duration::from_secs(3600))
            .max(now)
    }
}

fn run_workload(shared: Arc<WorkloadShared>, mut dma: DmaAccessor) {
    let mut buffer = Vec::new();
    let mut pacer = Pacer::new(Instant::now());
    loop {
        let params = {
            let mut control = shared.lock();
            while !(control.shutdown || control.enabled && control.allowed) {
                control = shared
                    .changed
                    .wait(control)
                    .unwrap_or_else(|p| p.into_inner());
                pacer.restart(Instant::now());
            }
            if control.shutdown {
                return;
            }
            control.busy = true;
            control.params
        };
        let k = shared.writes.load(Ordering::SeqCst);
        let outcome = workload_write(params.base, params.span, params.size, params.seed, k);
        let ok = match outcome {
            Some((iova, first)) => {
                buffer.resize(params.size.min(1 << 24) as usize, 0);
                fill_words(&mut buffer, first, 0);
                dma.write(iova, &buffer).is_ok()
            }
            None => false,
        };
        {
            let mut control = shared.lock();
            control.busy = false;
            if ok {
                shared.writes.fetch_add(1, Ordering::SeqCst);
                shared
                    .bytes_written
                    .fetch_add(buffer.len() as u64, Ordering::SeqCst);
            } else {
                control.enabled = false; // bad parameters or an unmapped IOVA: stop
            }
            shared.changed.notify_all();
        }
        if params.rate > 0 {
            let due = pacer.wrote(Instant::now(), params.rate, buffer.len() as u64);
            // Sleep until the rate allows the next write, in steps short enough to notice a
            // shutdown, a stop or new parameters (any WL_RATE, however small, is honoured).
            loop {
                let now = Instant::now();
                if due <= now {
                    break;
                }
                std::thread::sleep((due - now).min(Duration::from_millis(100)));
                let control = shared.lock();
                if control.shutdown
                    || !(control.enabled && control.allowed)
                    || control.params.rate != params.rate
                {
                    pacer.restart(Instant::now());
                    break;
                }
            }
        } else {
            pacer.rate = 0; // unlimited: a later rate starts afresh
        }
    }
}

/// The dma-engine device.
pub struct DmaEngine {
    regs: [u64; NUM_REGS],
    config: [u8; 256],
    dma: DmaAccessor,
    irqs: IrqTable,
    workload: Arc<WorkloadShared>,
    workload_thread: Option<JoinHandle<()>>,
    running: bool,
    save_stream: Vec<u8>,
    save_cursor: usize,
    load_buffer: Vec<u8>,
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
            config: [0; 256],
            dma: space.accessor(),
            irqs: IrqTable::new(&[1, 1, 0, 1, 1]),
            workload,
            workload_thread,
            running: true,
            save_stream: Vec::new(),
            save_cursor: 0,
            load_buffer: Vec::new(),
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
        self.config = [0; 256];
        self.config[0..2].copy_from_slice(&VENDOR_ID.to_le_bytes());
        self.config[2..4].copy_from_slice(&DEVICE_ID.to_le_bytes());
        self.config[0x0a..0x0c].copy_from_slice(&0xff00u16.to_le_bytes()); // class: unassigned
        self.config[0x10..0x14].copy_from_slice(&0u32.to_le_bytes()); // BAR0: 32-bit memory
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

    fn num_regions(&self) -> u32 {
        PCI_NUM_REGIONS
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        match index {
            0 => Some(RegionInfo {
                size: BAR0_SIZE,
                flags: REGION_READ | REGION_WRITE,
                ..RegionInfo::default()
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
        let count = [1, 1, 0, 1, 1].get(index as usize).copied()?;
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
            PCI_CONFIG_REGION_INDEX => {
                let end = offset
                    .checked_add(data.len() as u64)
                    .filter(|&e| e <= 256)
                    .ok_or(DeviceError::Invalid("config write out of range"))?;
                // Only the command register (offset 4, 2 bytes) is writable.
                for (i, &byte) in data.iter().enumerate() {
                    let at = offset as usize + i;
                    if (4..6).contains(&at) {
                        self.config[at] = byte;
                    }
                }
                let _ = end;
                Ok(())
            }
            _ => Err(DeviceError::Invalid("no such region or empty region")),
        }
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.reset_registers();
        Ok(())
    }

    fn abort_migration(&mut self) {
        self.save_stream.clear();
        self.save_cursor = 0;
        self.load_buffer.clear();
        self.running = true;
        self.sync_workload();
    }

    fn migration_flags(&self) -> u64 {
        MIGRATION_STOP_COPY | MIGRATION_PRE_COPY
    }

    fn migration_arc(&mut self, from: DeviceState, to: DeviceState) -> Result<(), DeviceError> {
        use DeviceState::*;
        match (from, to) {
            (Running, PreCopy) => {
                self.save_stream = self.state_record();
                self.save_cursor = 0;
            }
            (PreCopy, StopCopy) | (Stop, StopCopy) => {
                self.running = false;
                self.sync_workload();
                if from == Stop {
                    self.save_stream.clear();
                    self.save_cursor = 0;
                }
                let record = self.state_record();
                self.save_stream.extend_from_slice(&record);
            }
            (Stop, Resuming) => self.load_buffer.clear(),
            (Resuming, Stop) => {
                let buffer = std::mem::take(&mut self.load_buffer);
                if buffer.is_empty() || buffer.len() % STATE_RECORD_BYTES != 0 {
                    return Err(DeviceError::Invalid("incomplete dma-engine state"));
                }
                self.apply_record(&buffer[buffer.len() - STATE_RECORD_BYTES..])?;
            }
            (StopCopy, Stop) | (PreCopy, Running) => {
                self.save_stream.clear();
                self.save_cursor = 0;
            }
            _ => {}
        }
        self.running = matches!(to, Running | PreCopy);
        self.sync_workload();
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
        if self.load_buffer.len() + data.len() > 16 * STATE_RECORD_BYTES {
            return Err(DeviceError::Invalid(
                "more migration data than a dma-engine has",
            ));
        }
        self.load_buffer.extend_from_slice(data);
        Ok(())
    }

    fn pending_data_bytes(&self) -> Option<u64> {
        Some((self.save_stream.len() - self.save_cursor) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::Pacer;
    use std::time::{Duration, Instant};

    #[test]
    fn a_lower_rate_paces_from_now_instead_of_owing_the_past() {
        let start = Instant::now();
        let mut pacer = Pacer::new(start);
        // Two seconds at 100 MB/s, 1 MB a write, each on time.
        let mut now = start;
        for _ in 0..200 {
            now += Duration::from_millis(10);
            assert!(pacer.wrote(now, 100_000_000, 1_000_000) <= now + Duration::from_millis(10));
        }
        // Throttled by 20%: the next write is due one write's time at the new rate later,
        // not after the 0.5 s the old window would owe at 80 MB/s.
        now += Duration::from_millis(10);
        let due = pacer.wrote(now, 80_000_000, 1_000_000);
        assert_eq!(due, now + Duration::from_micros(12_500));
        // The same rate again keeps the window.
        let later = now + Duration::from_millis(1);
        assert_eq!(
            pacer.wrote(later, 80_000_000, 1_000_000),
            now + Duration::from_millis(25)
        );
    }

    #[test]
    fn an_absurd_rate_or_size_is_a_long_wait_not_a_panic() {
        let now = Instant::now();
        let mut pacer = Pacer::new(now);
        assert!(pacer.wrote(now, 1, u64::MAX) > now);
        assert!(pacer.wrote(now, u64::MAX, u64::MAX) >= now);
    }
}
