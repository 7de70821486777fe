//! The `Device` trait: what a vfio-user server needs from an emulated device (regions,
//! config space, register access, IRQs, reset, migration data), and the migration state
//! machine that drives a device's arcs.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use dmalog::migration::{is_saving, migration_path};
use dmalog::uapi::DeviceState;

/// Region flag: readable.
pub const REGION_READ: u32 = 1;
/// Region flag: writable.
pub const REGION_WRITE: u32 = 2;
/// Region flag: mmappable (an fd comes with GET_REGION_INFO).
pub const REGION_MMAP: u32 = 4;
/// Region flag: capabilities follow the info.
pub const REGION_CAPS: u32 = 8;
/// Device flag: supports reset.
pub const DEVICE_FLAGS_RESET: u32 = 1;
/// Device flag: a PCI device.
pub const DEVICE_FLAGS_PCI: u32 = 2;
/// Region index of PCI config space.
pub const PCI_CONFIG_REGION_INDEX: u32 = 7;
/// Regions of a VFIO PCI device (BAR0-5, ROM, config, VGA).
pub const PCI_NUM_REGIONS: u32 = 9;
/// IRQ indexes of a VFIO PCI device (INTx, MSI, MSI-X, ERR, REQ).
pub const PCI_NUM_IRQS: u32 = 5;
/// IRQ info flag: eventfd signalling.
pub const IRQ_INFO_EVENTFD: u32 = 1;

/// One region as GET_REGION_INFO describes it.
#[derive(Debug, Clone, Default)]
pub struct RegionInfo {
    /// Bytes.
    pub size: u64,
    /// `REGION_*` flags.
    pub flags: u32,
    /// Sparse mmap areas `(offset, size)` within the region (a capability).
    pub sparse_mmap: Vec<(u64, u64)>,
    /// The fd to mmap, for mmappable regions.
    pub mmap_fd: Option<Arc<OwnedFd>>,
}

/// One IRQ index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IrqInfo {
    /// Vectors.
    pub count: u32,
    /// `IRQ_INFO_*` flags.
    pub flags: u32,
}

/// Why a device operation failed; carried to the wire as an errno.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Bad region, offset, size, alignment, or state (EINVAL).
    #[error("invalid: {0}")]
    Invalid(&'static str),
    /// The device cannot do it now (EBUSY).
    #[error("busy: {0}")]
    Busy(&'static str),
    /// Unsupported (ENOTSUP).
    #[error("not supported: {0}")]
    NotSupported(&'static str),
    /// The device failed internally (EIO).
    #[error("device error: {0}")]
    Io(&'static str),
    /// Memory behind the access is gone, e.g. a shared file shrank (EFAULT).
    #[error("bad address: {0}")]
    Fault(&'static str),
}

impl DeviceError {
    /// The errno for a wire reply.
    pub fn errno(&self) -> i32 {
        match self {
            DeviceError::Invalid(_) => libc::EINVAL,
            DeviceError::Busy(_) => libc::EBUSY,
            DeviceError::NotSupported(_) => libc::ENOTSUP,
            DeviceError::Io(_) => libc::EIO,
            DeviceError::Fault(_) => libc::EFAULT,
        }
    }
}

/// DMA the server carries out with messages on the connection (DMA_READ/DMA_WRITE to the
/// client), for memory the device cannot (or chooses not to) reach directly.
pub trait MessageDma {
    /// Reads client memory at `iova`.
    fn dma_read(&mut self, iova: u64, out: &mut [u8]) -> Result<(), DeviceError>;
    /// Writes client memory at `iova` (the client records the pages as dirty).
    fn dma_write(&mut self, iova: u64, data: &[u8]) -> Result<(), DeviceError>;
}

/// An emulated device behind a vfio-user server. DMA goes through the device's own
/// [`crate::DmaSpace`] accessors; migration arcs are driven by [`MigrationMachine`].
pub trait Device: Send {
    /// A short name (`dma-engine`, `lvu-sample`).
    fn name(&self) -> &'static str;
    /// `DEVICE_FLAGS_*`.
    fn flags(&self) -> u32 {
        DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET
    }
    /// Number of regions (a PCI device's by default: BAR0-5, ROM, config, VGA).
    fn num_regions(&self) -> u32 {
        PCI_NUM_REGIONS
    }
    /// A region's info (None: no such index).
    fn region_info(&self, index: u32) -> Option<RegionInfo>;
    /// Number of IRQ indexes (a PCI device's by default: INTx, MSI, MSI-X, ERR, REQ).
    fn num_irqs(&self) -> u32 {
        PCI_NUM_IRQS
    }
    /// An IRQ index's info.
    fn irq_info(&self, index: u32) -> Option<IrqInfo>;
    /// Sets eventfds for vectors `[start, start + fds.len())` of IRQ `index` (None: unset).
    fn set_irq_eventfds(
        &mut self,
        index: u32,
        start: u32,
        fds: Vec<Option<OwnedFd>>,
    ) -> Result<(), DeviceError>;
    /// REGION_READ.
    fn region_read(&mut self, index: u32, offset: u64, out: &mut [u8]) -> Result<(), DeviceError>;
    /// REGION_WRITE.
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError>;
    /// DEVICE_RESET: registers to defaults. The migration side of a reset is
    /// [`Device::abort_migration`], which [`MigrationMachine::reset`] calls after this.
    fn reset(&mut self) -> Result<(), DeviceError>;
    /// Leaves whatever migration state the device is in for RUNNING without an arc: drops
    /// the save stream and any partial load, and lets the device do DMA again. Registers
    /// are kept. Used by DEVICE_RESET and when the client disconnects, so that a failed or
    /// abandoned migration (RESUMING with bad data, STOP_COPY never finished) cannot strand
    /// the device.
    fn abort_migration(&mut self);
    /// MIGRATION flags (`MIGRATION_STOP_COPY | MIGRATION_PRE_COPY`...).
    fn migration_flags(&self) -> u64;
    /// One direct arc of the migration state machine. In STOP, STOP_COPY and RESUMING the
    /// device must do no DMA by the time this returns.
    fn migration_arc(&mut self, from: DeviceState, to: DeviceState) -> Result<(), DeviceError>;
    /// The next migration data in PRE_COPY or STOP_COPY (0: nothing more now / the end).
    fn save_data(&mut self, out: &mut [u8]) -> Result<usize, DeviceError>;
    /// Migration data received in RESUMING (checked when leaving RESUMING).
    fn load_data(&mut self, data: &[u8]) -> Result<(), DeviceError>;
    /// Bytes of migration data the device still holds for the current state, if known.
    fn pending_data_bytes(&self) -> Option<u64> {
        None
    }

    /// When the device next wants to act on its own (a timer), if ever.
    fn next_event(&self) -> Option<std::time::Instant> {
        None
    }

    /// Acts on the event that fell due, with message DMA through the connection.
    fn run_event(&mut self, dma: &mut dyn MessageDma) {
        let _ = dma;
    }
}

/// The migration state of a device and the rules for moving it and for migration data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationMachine {
    state: DeviceState,
}

impl Default for MigrationMachine {
    fn default() -> Self {
        MigrationMachine {
            state: DeviceState::Running,
        }
    }
}

impl MigrationMachine {
    /// The current state.
    pub fn state(&self) -> DeviceState {
        self.state
    }

    /// Moves `device` to `target` along the shortest path, arc by arc; a failing arc leaves
    /// the last state reached and returns its error (EINVAL for impossible targets), except
    /// an internal device failure (EIO), after which the device is in ERROR (as the kernel
    /// uAPI says: the arc could not be done nor undone) until [`MigrationMachine::reset`].
    pub fn set_state(
        &mut self,
        device: &mut dyn Device,
        target: DeviceState,
    ) -> Result<(), DeviceError> {
        if target == DeviceState::PreCopy
            && device.migration_flags() & dmalog::uapi::MIGRATION_PRE_COPY == 0
        {
            return Err(DeviceError::Invalid("PRE_COPY not supported"));
        }
        let path = migration_path(self.state, target)
            .map_err(|_| DeviceError::Invalid("no such migration arc"))?;
        for pair in path.windows(2) {
            if let Err(err) = device.migration_arc(pair[0], pair[1]) {
                if matches!(err, DeviceError::Io(_)) {
                    self.state = DeviceState::Error;
                }
                return Err(err);
            }
            self.state = pair[1];
        }
        Ok(())
    }

    /// DEVICE_RESET: the device's registers to defaults and, from any state (ERROR
    /// included), the migration state to RUNNING with no migration data kept, as a Linux
    /// driver leaves a device after a reset. Logging is the server's to stop.
    pub fn reset(&mut self, device: &mut dyn Device) -> Result<(), DeviceError> {
        device.reset()?;
        device.abort_migration();
        self.state = DeviceState::Running;
        Ok(())
    }

    /// The client went away: any migration in progress is abandoned (RUNNING, partial
    /// data dropped); the registers are kept.
    pub fn abort(&mut self, device: &mut dyn Device) {
        if self.state != DeviceState::Running {
            device.abort_migration();
            self.state = DeviceState::Running;
        }
    }

    /// MIG_DATA_READ: only in PRE_COPY and STOP_COPY.
    pub fn read_data(&self, device: &mut dyn Device, out: &mut [u8]) -> Result<usize, DeviceError> {
        if !is_saving(self.state) {
            return Err(DeviceError::Invalid(
                "migration data is read only in PRE_COPY or STOP_COPY",
            ));
        }
        device.save_data(out)
    }

    /// MIG_DATA_WRITE: only in RESUMING.
    pub fn write_data(&self, device: &mut dyn Device, data: &[u8]) -> Result<(), DeviceError> {
        if self.state != DeviceState::Resuming {
            return Err(DeviceError::Invalid(
                "migration data is written only in RESUMING",
            ));
        }
        device.load_data(data)
    }

    /// Whether the device may do DMA in this state.
    pub fn dma_allowed(&self) -> bool {
        matches!(self.state, DeviceState::Running | DeviceState::PreCopy)
    }
}

/// Eventfds of a device's IRQ vectors.
#[derive(Debug, Default)]
pub struct IrqTable {
    fds: Vec<Vec<Option<OwnedFd>>>,
}

impl IrqTable {
    /// A table for `counts[i]` vectors of each index.
    pub fn new(counts: &[u32]) -> Self {
        IrqTable {
            fds: counts
                .iter()
                .map(|&n| (0..n).map(|_| None).collect())
                .collect(),
        }
    }

    /// GET_IRQ_INFO of `index`: its vectors, signalled by eventfd; `None` past the table.
    pub fn info(&self, index: u32) -> Option<IrqInfo> {
        let vectors = self.fds.get(index as usize)?;
        Some(IrqInfo {
            count: vectors.len() as u32,
            flags: IRQ_INFO_EVENTFD,
        })
    }

    /// Sets (or clears) eventfds; EINVAL when the vectors do not exist.
    pub fn set(
        &mut self,
        index: u32,
        start: u32,
        fds: Vec<Option<OwnedFd>>,
    ) -> Result<(), DeviceError> {
        let vectors = self
            .fds
            .get_mut(index as usize)
            .ok_or(DeviceError::Invalid("no such IRQ index"))?;
        let end = (start as usize)
            .checked_add(fds.len())
            .ok_or(DeviceError::Invalid("IRQ range"))?;
        if end > vectors.len() {
            return Err(DeviceError::Invalid("IRQ vectors out of range"));
        }
        for (slot, fd) in vectors[start as usize..end].iter_mut().zip(fds) {
            *slot = fd;
        }
        Ok(())
    }

    /// Signals vector `vector` of `index` (adds 1 to its eventfd); false if none is set.
    pub fn trigger(&self, index: u32, vector: u32) -> bool {
        match self
            .fds
            .get(index as usize)
            .and_then(|v| v.get(vector as usize))
            .and_then(Option::as_ref)
        {
            Some(fd) => rustix::io::write(fd, &1u64.to_ne_bytes()).is_ok(),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device whose arcs into `failing` fail with `error`.
    struct ArcFails {
        failing: DeviceState,
        error: DeviceError,
        resets: u32,
        aborts: u32,
    }

    impl Device for ArcFails {
        fn name(&self) -> &'static str {
            "arc-fails"
        }
        fn num_regions(&self) -> u32 {
            0
        }
        fn region_info(&self, _: u32) -> Option<RegionInfo> {
            None
        }
        fn num_irqs(&self) -> u32 {
            0
        }
        fn irq_info(&self, _: u32) -> Option<IrqInfo> {
            None
        }
        fn set_irq_eventfds(
            &mut self,
            _: u32,
            _: u32,
            _: Vec<Option<OwnedFd>>,
        ) -> Result<(), DeviceError> {
            Err(DeviceError::Invalid("no IRQs"))
        }
        fn region_read(&mut self, _: u32, _: u64, _: &mut [u8]) -> Result<(), DeviceError> {
            Err(DeviceError::Invalid("no regions"))
        }
        fn region_write(&mut self, _: u32, _: u64, _: &[u8]) -> Result<(), DeviceError> {
            Err(DeviceError::Invalid("no regions"))
        }
        fn reset(&mut self) -> Result<(), DeviceError> {
            self.resets += 1;
            Ok(())
        }
        fn abort_migration(&mut self) {
            self.aborts += 1;
        }
        fn migration_flags(&self) -> u64 {
            dmalog::uapi::MIGRATION_STOP_COPY
        }
        fn migration_arc(&mut self, _: DeviceState, to: DeviceState) -> Result<(), DeviceError> {
            if to == self.failing {
                return Err(self.error.clone());
            }
            Ok(())
        }
        fn save_data(&mut self, _: &mut [u8]) -> Result<usize, DeviceError> {
            Ok(0)
        }
        fn load_data(&mut self, _: &[u8]) -> Result<(), DeviceError> {
            Ok(())
        }
    }

    #[test]
    fn an_internal_arc_failure_is_error_and_reset_leaves_it_for_running() {
        let mut device = ArcFails {
            failing: DeviceState::StopCopy,
            error: DeviceError::Io("firmware"),
            resets: 0,
            aborts: 0,
        };
        let mut machine = MigrationMachine::default();
        assert!(machine
            .set_state(&mut device, DeviceState::StopCopy)
            .is_err());
        assert_eq!(machine.state(), DeviceState::Error);
        // ERROR is left only by a reset.
        assert!(machine
            .set_state(&mut device, DeviceState::Running)
            .is_err());
        assert_eq!(machine.state(), DeviceState::Error);
        machine.reset(&mut device).unwrap();
        assert_eq!(machine.state(), DeviceState::Running);
        assert_eq!((device.resets, device.aborts), (1, 1));
        assert!(machine.dma_allowed());
    }

    #[test]
    fn invalid_data_keeps_the_state_and_abort_returns_to_running() {
        let mut device = ArcFails {
            failing: DeviceState::Stop,
            error: DeviceError::Invalid("incomplete state"),
            resets: 0,
            aborts: 0,
        };
        let mut machine = MigrationMachine::default();
        device.failing = DeviceState::Error; // no failure on the way in
        machine
            .set_state(&mut device, DeviceState::Resuming)
            .unwrap();
        device.failing = DeviceState::Stop;
        assert!(machine.set_state(&mut device, DeviceState::Stop).is_err());
        assert_eq!(machine.state(), DeviceState::Resuming, "the original state");
        machine.abort(&mut device);
        assert_eq!(machine.state(), DeviceState::Running);
        assert_eq!((device.resets, device.aborts), (0, 1), "registers kept");
        machine.abort(&mut device);
        assert_eq!(device.aborts, 1, "nothing to abort in RUNNING");
    }
}
