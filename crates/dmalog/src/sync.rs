//! Atomics and the published-snapshot cell of the logging hot path's neighbourhood,
//! switched to loom's model-checked versions under `--cfg loom`: every atomic the
//! no-lost-page protocol relies on (the dirty log's words and summary, the live log's
//! generation and fences, the cell its log is published in) goes through here, so the loom
//! models in `tests/` check them all.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};

/// A published `Option<Arc<T>>`: `arc-swap`'s in normal builds.
#[cfg(not(loom))]
pub(crate) use arc_swap::ArcSwapOption;

/// Under loom, a stand-in for `arc_swap::ArcSwapOption` with the part of its API the crate
/// uses, built on a loom mutex: loom cannot see inside `arc-swap`'s own atomics, but it
/// can check the protocol around the cell. A store and a load are each one linearizable
/// step that synchronizes (release / acquire) with the other, as `arc-swap`'s are.
#[cfg(loom)]
pub(crate) struct ArcSwapOption<T> {
    cell: loom::sync::Mutex<Option<std::sync::Arc<T>>>,
}

#[cfg(loom)]
impl<T> Default for ArcSwapOption<T> {
    fn default() -> Self {
        ArcSwapOption {
            cell: loom::sync::Mutex::new(None),
        }
    }
}

#[cfg(loom)]
impl<T> ArcSwapOption<T> {
    /// Replaces the published value.
    pub(crate) fn store(&self, value: Option<std::sync::Arc<T>>) {
        *self.cell.lock().unwrap() = value;
    }

    /// The published value, with its own reference.
    pub(crate) fn load_full(&self) -> Option<std::sync::Arc<T>> {
        self.cell.lock().unwrap().clone()
    }
}
