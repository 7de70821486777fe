//! vfio-user for dmalog: the wire codec, the socket transport with fd passing, a server that
//! adapts any [`dmalog_device::Device`] to the wire with DMA logging and migration v2, and a
//! client that is a [`dmalog::DirtyTracker`] and a [`dmalog::MigrationDevice`].

pub mod client;
pub mod fuzzing;
pub mod pci_config;
pub mod server;
pub mod transport;
pub mod wire;

pub use client::{Client, ClientError};
pub use server::{Server, ServerConfig, TrackerKind, TrackerKindError};
