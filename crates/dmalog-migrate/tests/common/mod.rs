//! Shared by the engine tests: a fake device (soft-tracked DMA, migration data in
//! memory), a small guest layout and the engine settings.

#![allow(dead_code)]

use std::time::Duration;

use dmalog::uapi::DeviceState;
use dmalog::{
    DirtyTracker, InProcessTracker, IovaRange, MigrationDevice, PendingBytes, SoftDriver,
    TrackerError, WriteRecorder,
};
use dmalog_migrate::{Mode, SourceConfig};

/// A migratable device in memory: its state, the image it saves, what it loaded.
pub struct FakeDevice {
    pub tracker: InProcessTracker<SoftDriver>,
    pub state: DeviceState,
    pub image: Vec<u8>,
    pub cursor: usize,
    pub loaded: Vec<u8>,
    pub logging: bool,
}

impl FakeDevice {
    pub fn new(image: Vec<u8>) -> (Self, WriteRecorder) {
        let driver = SoftDriver::new();
        let recorder = driver.recorder();
        (
            FakeDevice {
                tracker: InProcessTracker::new(driver),
                state: DeviceState::Running,
                image,
                cursor: 0,
                loaded: Vec::new(),
                logging: false,
            },
            recorder,
        )
    }
}

impl DirtyTracker for FakeDevice {
    fn probe(&mut self) -> Result<bool, TrackerError> {
        Ok(true)
    }
    fn start(&mut self, ranges: &[IovaRange], page_size: u64) -> Result<u64, TrackerError> {
        self.logging = true;
        self.tracker.start(ranges, page_size)
    }
    fn report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), TrackerError> {
        self.tracker.report(iova, length, page_size, bitmap)
    }
    fn stop(&mut self) -> Result<(), TrackerError> {
        self.logging = false;
        self.tracker.stop()
    }
}

impl MigrationDevice for FakeDevice {
    fn migration_flags(&mut self) -> Result<u64, TrackerError> {
        Ok(5)
    }
    fn device_state(&mut self) -> Result<DeviceState, TrackerError> {
        Ok(self.state)
    }
    fn set_device_state(&mut self, state: DeviceState) -> Result<(), TrackerError> {
        if state == DeviceState::StopCopy || state == DeviceState::PreCopy {
            self.cursor = 0;
        }
        self.state = state;
        Ok(())
    }
    fn read_migration_data(&mut self, buf: &mut [u8]) -> Result<usize, TrackerError> {
        let n = (self.image.len() - self.cursor).min(buf.len());
        buf[..n].copy_from_slice(&self.image[self.cursor..self.cursor + n]);
        self.cursor += n;
        Ok(n)
    }
    fn write_migration_data(&mut self, data: &[u8]) -> Result<(), TrackerError> {
        self.loaded.extend_from_slice(data);
        Ok(())
    }
    fn pending_migration_bytes(&mut self) -> Result<Option<PendingBytes>, TrackerError> {
        Ok(None)
    }
}

pub const LAYOUT: [(u64, u64); 2] = [(0, 8 << 20), (1 << 32, 4 << 20)];

pub fn config() -> SourceConfig {
    SourceConfig {
        ranges: dmalog_migrate::RangePlan::Exact,
        mode: Mode::PreCopy,
        max_downtime: Duration::from_millis(30),
        max_rounds: 10,
    }
}

/// The Hello payload for `layout` at 4 KiB pages.
pub fn hello(layout: &[(u64, u64)]) -> Vec<u8> {
    let mut hello = Vec::new();
    hello.extend_from_slice(&4096u32.to_le_bytes());
    hello.extend_from_slice(&(layout.len() as u32).to_le_bytes());
    for (gpa, size) in layout {
        hello.extend_from_slice(&gpa.to_le_bytes());
        hello.extend_from_slice(&size.to_le_bytes());
    }
    hello
}
