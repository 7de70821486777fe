//! dmalog device side (in progress).
pub mod shared_memory;
