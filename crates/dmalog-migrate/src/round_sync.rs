//! The destination's per-round barrier across the channels of one migration (stream.rs):
//! a channel that reads its Sync of round k waits until every channel has read its Sync
//! of round k, so that no page of round k+1 is applied while an older copy of it (round
//! k, another channel) may still be on the way. Every wait is bounded by the stream's
//! timeout, and a failed or finished channel releases the others with an error.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::engine::MigrateError;
use crate::stream::{Kind, StreamError};

#[derive(Debug, Default)]
struct State {
    /// Rounds every channel has passed.
    complete: u32,
    /// Channels waiting at the barrier of round `complete`.
    arrived: u32,
    /// The first channel that failed.
    failed: Option<usize>,
    /// Channels that read their End.
    finished: u32,
}

/// The barrier.
#[derive(Debug)]
pub(crate) struct RoundSync {
    channels: u32,
    timeout: Duration,
    state: Mutex<State>,
    changed: Condvar,
}

impl RoundSync {
    /// A barrier for `channels` channels; a wait longer than `timeout` fails.
    pub(crate) fn new(channels: u32, timeout: Duration) -> Self {
        RoundSync {
            channels,
            timeout,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every unlock: a panic elsewhere does not poison it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Channel `channel` read the Sync of `round`: returns once every channel has.
    pub(crate) fn arrive(&self, channel: usize, round: u32) -> Result<(), MigrateError> {
        let refused = |why| {
            MigrateError::Stream(StreamError::Refused {
                kind: Kind::Sync,
                why,
            })
        };
        let mut state = self.lock();
        if state.failed.is_some() {
            return Err(other_failed());
        }
        if state.finished > 0 {
            return Err(refused("a round marker after a channel ended"));
        }
        if round != state.complete {
            return Err(refused("round marker out of order"));
        }
        if round == u32::MAX {
            // No round after it to count (2^32 markers: cheap for a hostile source).
            return Err(refused("too many rounds"));
        }
        state.arrived += 1;
        if state.arrived == self.channels {
            state.arrived = 0;
            state.complete += 1;
            self.changed.notify_all();
            return Ok(());
        }
        let deadline = Instant::now().checked_add(self.timeout);
        while state.complete == round && state.failed.is_none() && state.finished == 0 {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                drop(state);
                self.fail(channel);
                return Err(MigrateError::Stream(StreamError::TimedOut(self.timeout)));
            }
            state = match left {
                Some(left) => {
                    self.changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.changed.wait(state).unwrap_or_else(|e| e.into_inner()),
            };
        }
        if state.complete > round {
            Ok(())
        } else if state.failed.is_some() {
            Err(other_failed())
        } else {
            Err(refused(
                "a channel ended before every channel's round marker",
            ))
        }
    }

    /// Channel `channel` failed: every waiting channel is released with an error.
    pub(crate) fn fail(&self, channel: usize) {
        let mut state = self.lock();
        state.failed.get_or_insert(channel);
        self.changed.notify_all();
    }

    /// A channel read its End.
    pub(crate) fn finish(&self) {
        self.lock().finished += 1;
        self.changed.notify_all();
    }

    /// An error once any channel failed: a channel checks before it applies a frame, so
    /// that nothing more is applied and it ends at its next frame, not at its timeout.
    pub(crate) fn check(&self) -> Result<(), MigrateError> {
        match self.lock().failed {
            Some(_) => Err(other_failed()),
            None => Ok(()),
        }
    }

    /// The first channel that failed.
    pub(crate) fn failed(&self) -> Option<usize> {
        self.lock().failed
    }
}

fn other_failed() -> MigrateError {
    MigrateError::Peer("another channel of this migration failed".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_barrier_holds_until_every_channel_arrives_and_fails_cleanly() {
        let sync = RoundSync::new(2, Duration::from_secs(10));
        std::thread::scope(|s| {
            let waiter = s.spawn(|| sync.arrive(1, 0));
            // Channel 1 waits for channel 0.
            std::thread::sleep(Duration::from_millis(20));
            assert!(!waiter.is_finished());
            sync.arrive(0, 0).unwrap();
            waiter.join().unwrap().unwrap();
        });
        assert_eq!(sync.lock().complete, 1);
        assert!(sync.arrive(0, 0).is_err(), "an old round");
        // A failure releases a waiter.
        std::thread::scope(|s| {
            let waiter = s.spawn(|| sync.arrive(0, 1));
            std::thread::sleep(Duration::from_millis(20));
            sync.fail(1);
            assert!(waiter.join().unwrap().is_err());
        });
        assert_eq!(sync.failed(), Some(1));
        // The last round number a u32 holds: refused, no overflow (a source sending 2^32
        // markers, 20 bytes each, reaches it).
        let sync = RoundSync::new(1, Duration::from_secs(10));
        sync.lock().complete = u32::MAX;
        assert!(matches!(
            sync.arrive(0, u32::MAX),
            Err(MigrateError::Stream(StreamError::Refused {
                why: "too many rounds",
                ..
            }))
        ));
        // A short timeout.
        let sync = RoundSync::new(2, Duration::from_millis(10));
        assert!(matches!(
            sync.arrive(0, 0),
            Err(MigrateError::Stream(StreamError::TimedOut(_)))
        ));
    }
}
