//! A minimal vfio-user device: writing LEN (BAR0 offset 8) makes it write LEN bytes of 0xd5 at
//! IOVA DST (offset 0) by DMA. dmalog's [`Server`] maps the VMM's memory, logs every write made
//! through the [`DmaAccessor`] (START / REPORT / STOP) and runs migration v2 around the registers.
//! Run: `cargo run -p dmalog-vfio-user --example minimal_device -- SOCKET`.
use std::{os::fd::OwnedFd, os::unix::net::UnixListener, sync::atomic::AtomicBool};

use dmalog::uapi::{DeviceState, MIGRATION_STOP_COPY};
use dmalog_device::{device::*, DmaAccessor};
use dmalog_vfio_user::{Server, ServerConfig};

type DeviceResult<T = ()> = Result<T, DeviceError>;

struct Filler {
    dma: DmaAccessor,
    regs: [u8; 16], // DST and LEN, little-endian; also the device's migration data
    /// None while RUNNING (DMA allowed); else the registers being saved or loaded.
    record: Option<Vec<u8>>,
}

/// Where in `regs` an access of `len` bytes at `offset` of region `index` goes.
fn register(index: u32, offset: u64, len: usize) -> DeviceResult<std::ops::Range<usize>> {
    match (index, offset, len) {
        (0, 0 | 8, 8) => Ok(offset as usize..offset as usize + 8),
        _ => Err(DeviceError::Invalid("BAR0 is two aligned u64s")),
    }
}

/// A little-endian u64 (0 unless 8 bytes, which every caller passes).
fn word(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().unwrap_or_default())
}

#[rustfmt::skip] // hand-formatted: rustfmt gives each one-line method three lines
impl Device for Filler {
    fn name(&self) -> &'static str { "filler" }
    fn num_regions(&self) -> u32 { 1 }
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let flags = REGION_READ | REGION_WRITE;
        (index == 0).then_some(RegionInfo { size: 16, flags, ..Default::default() })
    }
    fn num_irqs(&self) -> u32 { 0 }
    fn irq_info(&self, _: u32) -> Option<IrqInfo> { None }
    fn set_irq_eventfds(&mut self, _: u32, _: u32, _: Vec<Option<OwnedFd>>) -> DeviceResult {
        Err(DeviceError::Invalid("no IRQs"))
    }
    fn region_read(&mut self, index: u32, offset: u64, out: &mut [u8]) -> DeviceResult {
        out.copy_from_slice(&self.regs[register(index, offset, out.len())?]);
        Ok(())
    }
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> DeviceResult {
        self.regs[register(index, offset, data.len())?].copy_from_slice(data);
        if offset == 0 { return Ok(()); } // DST set; writing LEN rings the doorbell
        let (dst, len) = (word(&self.regs[..8]), word(&self.regs[8..]));
        if self.record.is_some() { return Err(DeviceError::Busy("stopped for migration")); }
        if len > 1 << 20 { return Err(DeviceError::Invalid("LEN over 1 MiB")); }
        // The DMA: bounds-checked, copied into the VMM's memory, its pages logged.
        let written = self.dma.write(dst, &vec![0xd5; len as usize]);
        written.map_err(|_| DeviceError::Fault("DST not mapped"))
    }
    fn reset(&mut self) -> DeviceResult { self.regs = [0; 16]; Ok(()) }
    fn abort_migration(&mut self) { self.record = None; }
    fn migration_flags(&self) -> u64 { MIGRATION_STOP_COPY }
    fn migration_arc(&mut self, from: DeviceState, to: DeviceState) -> DeviceResult {
        if from == DeviceState::Resuming {
            let record = self.record.as_deref().unwrap_or_default().try_into();
            self.regs = record.map_err(|_| DeviceError::Invalid("not one whole record"))?;
        }
        self.record = match to {
            DeviceState::Running => None,
            DeviceState::StopCopy => Some(self.regs.to_vec()),
            _ => Some(Vec::new()), // STOP, or RESUMING with nothing loaded yet
        };
        Ok(())
    }
    fn save_data(&mut self, out: &mut [u8]) -> DeviceResult<usize> {
        let Some(record) = self.record.as_mut() else { return Ok(0) };
        let n = out.len().min(record.len());
        out[..n].copy_from_slice(record.drain(..n).as_slice());
        Ok(n)
    }
    fn load_data(&mut self, data: &[u8]) -> DeviceResult {
        let Some(record) = self.record.as_mut() else { return Err(DeviceError::Busy("running")) };
        if record.len() + data.len() > 16 { return Err(DeviceError::Invalid("over 16 bytes")); }
        record.extend_from_slice(data);
        Ok(())
    }
}

fn main() -> std::io::Result<()> {
    let path = std::env::args().nth(1).unwrap_or("filler.sock".into());
    let _ = std::fs::remove_file(&path); // a socket left by an earlier run
    let listener = UnixListener::bind(&path)?;
    let mut server = Server::new(ServerConfig::default(), |space| {
        let (dma, regs, record) = (space.accessor(), [0; 16], None);
        Box::new(Filler { dma, regs, record })
    });
    println!("listening on {path}");
    server.run(&listener, &AtomicBool::new(false)) // one client after another, until killed
}
