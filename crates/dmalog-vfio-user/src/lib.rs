//! vfio-user for dmalog: the wire codec, the socket transport with fd passing, a server that
//! adapts any [`dmalog_device::Device`] to the wire with DMA logging and migration v2, and a
//! client that is a [`dmalog::DirtyTracker`] and a [`dmalog::MigrationDevice`].
//!
//! Device side, [`Server`]: give it a device built over its DMA space and a socket; it maps
//! the client's memory from DMA_MAP's fds, runs the logging features (PROBE / START / REPORT /
//! STOP, SPEC 3) on the tracker its caller gives it ([`ServedTracker`]: the soft tracker by
//! default, or any [`dmalog::LogDriver`]), and migration v2 around the device's
//! `save_data` / `load_data`. VMM side, [`Client`]: connect, `dma_map` guest memory
//! by fd, then drive logging and migration through the dmalog traits, as with any other
//! dirty source. Units: IOVAs, sizes and page sizes in bytes; REPORT bitmaps are `u64` words,
//! one bit per page (see [`dmalog::tracker::report_words`]).
//!
//! `examples/minimal_device.rs` is a complete device in under 100 lines and
//! `examples/minimal_vmm.rs` the VMM that maps, STARTs, has it write, REPORTs and STOPs
//! (`tests/examples.rs` runs the pair). In one process, over a socket pair:
//!
//! ```
//! use std::os::fd::AsFd;
//! use std::os::unix::net::UnixStream;
//!
//! use dmalog::tracker::report_words;
//! use dmalog::{DirtyTracker, IovaRange};
//! use dmalog_device::dma_engine::{op, reg};
//! use dmalog_device::{sealed_memfd, DmaEngine};
//! use dmalog_vfio_user::{Client, Server, ServerConfig};
//!
//! let (vmm_end, device_end) = UnixStream::pair()?;
//! let device = std::thread::spawn(move || {
//!     let mut server = Server::new(ServerConfig::default(), |space| {
//!         Box::new(DmaEngine::new(space))
//!     });
//!     server.serve(device_end); // until the client hangs up
//! });
//!
//! let guest = sealed_memfd("guest", 1 << 20)?; // 1 MiB at IOVA 0, shared with the device
//! let mut client = Client::with_stream(vmm_end, 1 << 20)?;
//! let mapped = IovaRange::new(0, 1 << 20)?;
//! client.dma_map(mapped, Some(guest.as_fd()), 0, true)?;
//! let page_size = client.start(&[mapped], 4096)?;
//!
//! // dma-engine's FILL: 8 KiB from IOVA 0x5000 (pages 5 and 6), run by the doorbell.
//! for (offset, value) in [(reg::DST, 0x5000), (reg::LEN, 8192), (reg::OP, op::FILL)] {
//!     client.write_u64(0, offset, value)?;
//! }
//! client.write_u64(0, reg::DOORBELL, 1)?;
//! assert_eq!(client.read_u64(0, reg::STATUS)?, 0);
//!
//! let mut bitmap = vec![0u64; report_words(1 << 20, page_size)? as usize];
//! client.report(IovaRange::new(0, 1 << 20)?, page_size, &mut bitmap)?;
//! assert_eq!(bitmap[0], 0b11 << 5);
//! client.stop()?;
//! drop(client);
//! device.join().unwrap();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Features
//! - `testing` (off by default): `fuzzing`, the entry points the fuzz targets and the
//!   replay test drive (the server fed a byte stream, the client against a scripted server).
//!
//! MSRV: Rust 1.85, held by clippy's `incompatible_msrv`.

pub mod client;
#[cfg(feature = "testing")]
pub mod fuzzing;
pub mod pci_config;
pub mod server;
pub mod transport;
pub mod wire;

pub use client::{Client, ClientError};
pub use server::{ServedTracker, Server, ServerConfig};
