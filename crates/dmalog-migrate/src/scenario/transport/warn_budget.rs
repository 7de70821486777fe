//! A budget for the destination's warnings about strangers: anyone who can reach the port
//! can open connections as fast as the destination accepts them, and a warning each would
//! grow the log as fast.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Warnings about strangers logged per [`WARN_WINDOW`]; the rest are counted.
pub(super) const WARNINGS_PER_WINDOW: u32 = 16;

/// The window [`WARNINGS_PER_WINDOW`] counts in.
pub(super) const WARN_WINDOW: Duration = Duration::from_secs(1);

/// Shared by the acceptor and each connection's thread.
#[derive(Clone, Default)]
pub(super) struct WarnBudget(Arc<Mutex<Window>>);

#[derive(Default)]
struct Window {
    started: Option<Instant>,
    logged: u32,
    /// Warnings left out since the last one logged.
    suppressed: u64,
}

impl WarnBudget {
    /// Whether a warning may be logged now: `Some(n)`, the warnings left out before it
    /// (to log with it), or `None` (counted, left out).
    pub(super) fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut window = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if window
            .started
            .is_none_or(|started| now.saturating_duration_since(started) >= WARN_WINDOW)
        {
            window.started = Some(now);
            window.logged = 0;
        }
        if window.logged >= WARNINGS_PER_WINDOW {
            window.suppressed += 1;
            return None;
        }
        window.logged += 1;
        Some(std::mem::take(&mut window.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_warnings_is_held_to_the_budget_and_the_rest_counted() {
        let budget = WarnBudget::default();
        let start = Instant::now();
        for _ in 0..WARNINGS_PER_WINDOW {
            assert_eq!(budget.allow_at(start), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(budget.allow_at(start + WARN_WINDOW / 2), None);
        }
        // The next window logs again, first telling how many were left out.
        assert_eq!(budget.allow_at(start + WARN_WINDOW), Some(1000));
        assert_eq!(budget.allow_at(start + WARN_WINDOW), Some(0));
    }
}
