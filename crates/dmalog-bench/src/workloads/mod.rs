//! The measured workloads and the quick run.

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::time::Instant;

use dmalog::{DirtyLog, IovaBitmap, IovaRange, LogDriver, SoftDriver};
use dmalog_models::{Mlx5Caps, Mlx5Driver};
use vm_memory::bitmap::AtomicBitmap;

use crate::baselines::{ByteAtomicLog, NaiveBitLog};

pub(crate) const KIB: u64 = 1024;
pub(crate) const MIB: u64 = 1024 * KIB;
pub(crate) const GIB: u64 = 1024 * MIB;
pub(crate) const TIB: u64 = 1024 * GIB;
pub(crate) const PAGE: u64 = 4096;

mod mark;
mod quick;
mod report;
mod timing;

pub use mark::*;
pub use quick::*;
pub use report::*;
pub use timing::*;
