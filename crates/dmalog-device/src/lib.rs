//! dmalog's device side: the DMA space a device writes guest memory through (bounds-checked,
//! every write logged on the live tracker), the [`Device`] trait a vfio-user server adapts
//! to the wire, the migration state machine, and the emulated devices.
//!
//! It sits between the core (`dmalog`: the [`dmalog::LiveLog`] writes are logged on, the
//! trackers) and a transport (`dmalog-vfio-user`'s `Server`, which fills the [`DmaSpace`]
//! from the VMM's DMA_MAP fds and adapts a [`Device`] to the wire); it knows no wire format.
//!
//! - [`DmaSpace`]: the DMA mappings by IOVA; [`DmaAccessor`]: one DMA thread's handle, whose
//!   [`DmaAccessor::write`] checks bounds, copies into the mapped memory and marks the pages
//!   (no lock, no allocation); DMA_UNMAP waits for accesses in flight.
//! - [`Device`] and [`MigrationMachine`]: what a device implements (regions, registers, IRQs,
//!   migration arcs and data) and the state machine that drives it.
//! - [`DmaEngine`] (SPEC 6.1) and [`LvuSample`] (libvfio-user's sample, SPEC 6.2).
//! - [`SharedMapping`] and [`sealed_memfd`]: memory shared with another process, copied as
//!   volatile memory, safe against a file that shrinks.
//!
//! Units: IOVAs and lengths are bytes. A minimal device on top of this crate is
//! `dmalog-vfio-user`'s `examples/minimal_device.rs` (under 100 lines).
//!
//! ```
//! use std::sync::Arc;
//!
//! use dmalog::tracker::report_words;
//! use dmalog::{DirtyTracker, InProcessTracker, IovaRange, SoftDriver};
//! use dmalog_device::{sealed_memfd, DmaBacking, DmaRegion, DmaSpace, SharedMapping};
//!
//! let driver = SoftDriver::new();
//! let space = DmaSpace::new(Arc::clone(driver.live_log()));
//! let mut tracker = InProcessTracker::new(driver);
//!
//! // 1 MiB of guest memory at IOVA 1 GiB (a server maps the VMM's fd; here our own memfd).
//! let memfd = sealed_memfd("guest", 1 << 20)?;
//! let mapping = Arc::new(SharedMapping::map(&memfd, 0, 1 << 20, true)?);
//! let backing = DmaBacking::Mapped(mapping);
//! let (iova, size) = (1 << 30, 1 << 20);
//! space.map(DmaRegion { iova, size, readable: true, writable: true, backing })?;
//!
//! tracker.start(&[IovaRange::new(iova, size)?], 4096)?;
//! let mut dma = space.accessor(); // one per DMA thread
//! dma.write(iova + 3 * 4096 + 10, b"hello")?;
//! assert!(dma.write(iova + size, b"!").is_err(), "past the mapping: a fault, no write");
//!
//! let mut bitmap = vec![0u64; report_words(size, 4096)? as usize];
//! tracker.report(IovaRange::new(iova, size)?, 4096, &mut bitmap)?;
//! assert_eq!(bitmap[0], 1 << 3);
//! let mut back = [0u8; 5];
//! dma.read(iova + 3 * 4096 + 10, &mut back)?;
//! assert_eq!(&back, b"hello");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Features: `vm-memory` adds `IoPiece::of_region` and `IoPieceMut::of_region`, pieces
//! over a vm-memory `GuestRegionMmap` (a VMM's guest memory sent and received without a
//! copy). MSRV: Rust 1.85, held by clippy's `incompatible_msrv`.

pub mod device;
pub mod dma_engine;
pub mod dma_space;
pub mod dma_table;
pub mod io_piece;
pub mod lvu_sample;
pub mod pci;
pub mod shared_memory;

pub use device::{Device, DeviceError, IrqInfo, MessageDma, MigrationMachine, RegionInfo};
pub use dma_engine::DmaEngine;
pub use dma_space::{DmaAccessor, DmaBacking, DmaFault, DmaRegion, DmaSpace, MapError};
pub use dma_table::DmaTable;
pub use io_piece::{read_pieces, write_pieces, IoPiece, IoPieceMut};
pub use lvu_sample::LvuSample;
pub use shared_memory::{sealed_memfd, CopyFault, CopyPath, SharedMapping};
