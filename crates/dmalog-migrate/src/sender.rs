//! The data path of the migration source: dirty pages from guest memory and the device's
//! migration data onto the stream. The engine (engine.rs) decides what to send and when;
//! this module only sends it.

use std::io::Write;

use crate::dirty::Bitmaps;
use crate::engine::{MigrateError, SourceDevice, PAGE};
use crate::guest::GuestMemory;
use crate::stream::{FrameWriter, Kind};

/// Pages per Pages frame at most.
const PAGES_PER_FRAME: u64 = 256;

/// Sends guest pages and device data.
pub(crate) struct Sender<'a, W: Write> {
    pub(crate) out: &'a mut FrameWriter<W>,
    memory: &'a GuestMemory,
    buffer: Vec<u8>,
}

impl<'a, W: Write> Sender<'a, W> {
    /// A sender of `memory`'s pages on `out`.
    pub(crate) fn new(out: &'a mut FrameWriter<W>, memory: &'a GuestMemory) -> Self {
        Sender {
            out,
            memory,
            buffer: Vec::new(),
        }
    }

    /// Sends every page whose bit is set in `bitmaps`, in runs.
    pub(crate) fn send_dirty(&mut self, bitmaps: &Bitmaps) -> Result<u64, MigrateError> {
        let mut sent = 0;
        for (region, words) in self.memory.regions().iter().zip(&bitmaps.words) {
            let pages = region.size / PAGE;
            let mut page = 0u64;
            while page < pages {
                let word = words[(page / 64) as usize] >> (page % 64);
                if word == 0 {
                    page = (page / 64 + 1) * 64;
                    continue;
                }
                page += u64::from(word.trailing_zeros());
                let mut run = 0u64;
                while page + run < pages
                    && run < PAGES_PER_FRAME
                    && words[((page + run) / 64) as usize] >> ((page + run) % 64) & 1 == 1
                {
                    run += 1;
                }
                self.send_pages(region.gpa + page * PAGE, run)?;
                sent += run;
                page += run;
            }
        }
        Ok(sent)
    }

    fn send_pages(&mut self, gpa: u64, npages: u64) -> Result<(), MigrateError> {
        self.buffer.resize((npages * PAGE) as usize, 0);
        if !self.memory.read(gpa, &mut self.buffer) {
            return Err(MigrateError::Memory("page outside guest memory"));
        }
        let mut head = [0u8; 12];
        head[..8].copy_from_slice(&gpa.to_le_bytes());
        head[8..].copy_from_slice(&(npages as u32).to_le_bytes());
        self.out.write(Kind::Pages, &[&head, &self.buffer])?;
        Ok(())
    }

    /// Sends the device's migration data until it has nothing more now.
    pub(crate) fn send_device_data(
        &mut self,
        device: &mut dyn SourceDevice,
    ) -> Result<u64, MigrateError> {
        let mut chunk = vec![0u8; 64 << 10];
        let mut total = 0;
        loop {
            let n = device.read_migration_data(&mut chunk)?;
            if n == 0 {
                return Ok(total);
            }
            self.out.write(Kind::DeviceData, &[&chunk[..n]])?;
            total += n as u64;
        }
    }
}
