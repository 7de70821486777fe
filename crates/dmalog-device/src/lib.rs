//! dmalog's device side: the DMA space a device writes guest memory through (bounds-checked,
//! every write logged on the live tracker), the [`Device`] trait a vfio-user server adapts
//! to the wire, the migration state machine, and the emulated devices.

pub mod device;
pub mod dma_engine;
pub mod dma_space;
pub mod dma_table;
pub mod lvu_sample;
pub mod shared_memory;

pub use device::{Device, DeviceError, IrqInfo, MessageDma, MigrationMachine, RegionInfo};
pub use dma_engine::DmaEngine;
pub use dma_space::{DmaAccessor, DmaBacking, DmaFault, DmaRegion, DmaSpace, MapError};
pub use dma_table::DmaTable;
pub use lvu_sample::LvuSample;
pub use shared_memory::{
    read_pieces, sealed_memfd, write_pieces, CopyFault, CopyPath, IoPiece, IoPieceMut,
    SharedMapping,
};
