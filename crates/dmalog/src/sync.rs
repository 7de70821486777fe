//! Atomics and the one lock of the logging hot path's neighbourhood, switched to loom's
//! model-checked versions under `--cfg loom`: every atomic the no-lost-page protocol relies
//! on (the dirty log's words and summary, the live log's generation and fences, its publish
//! lock) goes through here, so the loom models in `tests/` check them all.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::Mutex;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::Mutex;
