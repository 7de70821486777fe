//! The one memory budget for tracker state (SPEC 8, `--max-log-mib`): every tracker charges
//! what a START allocates, and what ranges added after START allocate, against it, and
//! fails with ENOMEM before allocating anything above it.

use crate::error::{LogError, LogResult};

/// The default budget of one device's tracker state: 1 GiB (at 4 KiB pages, bitmaps for
/// 32 TiB of IOVA).
pub const DEFAULT_MAX_LOG_BYTES: u64 = 1 << 30;

/// Bytes of a bitmap of `bits` bits stored as whole u64 words.
pub fn bitmap_bytes(bits: u64) -> u64 {
    bits.div_ceil(64).saturating_mul(8)
}

/// What a tracker has charged against its budget since START.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBudget {
    max_bytes: u64,
    used_bytes: u64,
}

impl Default for LogBudget {
    fn default() -> Self {
        LogBudget::new(DEFAULT_MAX_LOG_BYTES)
    }
}

impl LogBudget {
    /// A budget of `max_bytes` with nothing charged.
    pub fn new(max_bytes: u64) -> Self {
        LogBudget {
            max_bytes,
            used_bytes: 0,
        }
    }

    /// The limit in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Bytes charged so far.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// Whether `bytes` more would fit.
    pub fn fits(&self, bytes: u64) -> bool {
        self.used_bytes
            .checked_add(bytes)
            .is_some_and(|total| total <= self.max_bytes)
    }

    /// Charges `bytes`, or fails with ENOMEM (naming `what`) and charges nothing.
    pub fn charge(&mut self, bytes: u64, what: &'static str) -> LogResult<()> {
        if !self.fits(bytes) {
            return Err(LogError::OutOfMemory(what));
        }
        self.used_bytes += bytes;
        Ok(())
    }

    /// Forgets every charge (STOP, or a failed START).
    pub fn reset(&mut self) {
        self.used_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_up_to_the_limit_exactly() {
        let mut budget = LogBudget::new(100);
        assert_eq!(budget.charge(60, "a"), Ok(()));
        assert_eq!(budget.charge(40, "b"), Ok(()), "exactly at the limit");
        assert_eq!(budget.charge(1, "c"), Err(LogError::OutOfMemory("c")));
        assert_eq!(budget.used_bytes(), 100, "a refused charge charges nothing");
        assert!(!budget.fits(u64::MAX), "no overflow");
        budget.reset();
        assert_eq!(budget.used_bytes(), 0);
        assert_eq!(bitmap_bytes(0), 0);
        assert_eq!(bitmap_bytes(65), 16);
        assert_eq!(bitmap_bytes(u64::MAX), u64::MAX.div_ceil(64) * 8);
    }
}
