//! Convergence control: after each round's REPORTs the engine knows exactly what is dirty;
//! this policy turns that and the measured bandwidth into a predicted downtime and decides
//! another round, the stop, or slowing the guest down (auto-converge, as QEMU's
//! `cpu-throttle-initial` / `cpu-throttle-increment` / `max-cpu-throttle` with its
//! `throttle-trigger-threshold`). Pure: numbers in, a verdict out, no clock and no I/O, so
//! every decision is unit-tested.

use std::time::Duration;

/// Whether the engine may slow the guest down to converge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AutoConverge {
    /// Throttle the vCPUs and the device workloads that can be slowed.
    #[default]
    On,
    /// Never throttle: a migration that does not converge stops at `max_rounds`.
    Off,
}

/// The auto-converge settings (QEMU's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ThrottleParams {
    /// On or off.
    pub mode: AutoConverge,
    /// The first throttle, percent of the guest's time taken away (QEMU 20).
    pub initial_pct: u8,
    /// Added at each later step, percent (QEMU 10).
    pub increment_pct: u8,
    /// The most it takes away, percent (QEMU 99).
    pub max_pct: u8,
    /// A round dirties "too fast" when its dirty rate is above this share of the
    /// bandwidth, percent (QEMU's `throttle-trigger-threshold`, 50).
    pub trigger_threshold_pct: u8,
    /// Rounds dirtying too fast (while the predicted downtime is over the budget) per
    /// throttle step (QEMU: 2; as there, a round below the threshold does not reset the
    /// count).
    pub trigger_rounds: u32,
}

impl Default for ThrottleParams {
    fn default() -> Self {
        ThrottleParams {
            mode: AutoConverge::On,
            initial_pct: 20,
            increment_pct: 10,
            max_pct: 99,
            trigger_threshold_pct: 50,
            trigger_rounds: 2,
        }
    }
}

/// What the stop costs besides sending the dirty pages, measured on this migration's
/// device and link (ms). The engine measures the parts it can before stopping; the
/// report's [`crate::StopTimes`] shows what they turned out to be.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct FixedCosts {
    /// One device state change (measured on the change to PRE_COPY, or a MIGRATION
    /// query): the source's STOP_COPY, and twice on the destination (STOP, RUNNING).
    pub device_state_ms: f64,
    /// The last round's REPORTs of every dirty source.
    pub reports_ms: f64,
    /// The last round's device data (at least one request round trip).
    pub device_data_ms: f64,
    /// One round trip on the migration link (a Ping answered by the destination). The
    /// stop waits for two: End to Ready, and Go to Resumed.
    pub link_rtt_ms: f64,
}

impl FixedCosts {
    /// The fixed part of the downtime, ms.
    pub fn total_ms(&self) -> f64 {
        3.0 * self.device_state_ms + self.reports_ms + self.device_data_ms + 2.0 * self.link_rtt_ms
    }
}

/// What the policy decided for one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send this round's pages and look again.
    Continue,
    /// Stop the guest now: the predicted downtime fits half the budget, or the budget
    /// once the rounds stop shrinking (or at the round limit).
    Stop,
    /// Stop the guest now although the predicted downtime is over the budget: the round
    /// limit is reached (the report says the budget was not met).
    ForcedStop,
}

/// One round's verdict, with the figures it rests on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// What to do.
    pub decision: Decision,
    /// Bytes per second on the link, as measured (`None` before anything was sent).
    pub bandwidth_bytes_per_sec: Option<f64>,
    /// Bytes of distinct pages dirtied per second since the last REPORT.
    pub dirty_bytes_per_sec: f64,
    /// The downtime if the guest stopped now, ms.
    pub predicted_downtime_ms: f64,
    /// The throttle from now on, percent (0: none).
    pub throttle_pct: u8,
}

/// The convergence policy of one migration.
#[derive(Debug, Clone)]
pub struct Convergence {
    max_downtime: Duration,
    max_rounds: u32,
    throttle: ThrottleParams,
    bandwidth_bytes_per_sec: Option<f64>,
    /// Whether the figure comes from a small send or the full copy only (the first large
    /// send of a pre-copy round replaces it).
    bandwidth_provisional: bool,
    high_rounds: u32,
    throttle_pct: u8,
    /// The last round's prediction, ms (infinite before the first).
    last_predicted_ms: f64,
}

/// The policy stops once the predicted downtime is this share of the budget: the
/// prediction rests on the last rounds' bandwidth, and a busy machine can make the stop
/// slower than them (rounds shrink geometrically, so the margin costs a round or so).
/// Between it and the budget the rounds go on while they shrink or a throttle step is
/// left.
pub const AIM_SHARE_OF_BUDGET: f64 = 0.5;

/// A round whose prediction is above this share of the last one's has stopped shrinking.
const STALLED_SHARE: f64 = 0.9;

/// Sends smaller than this are dominated by per-request latency: they do not update the
/// bandwidth (which would then predict a long stop for a few pages).
pub const MIN_BANDWIDTH_SAMPLE_BYTES: u64 = 1 << 20;

impl Convergence {
    /// A policy for a downtime budget of `max_downtime`, stopping after `max_rounds`
    /// pre-copy rounds at the latest.
    pub fn new(max_downtime: Duration, max_rounds: u32, throttle: ThrottleParams) -> Self {
        Convergence {
            max_downtime,
            max_rounds,
            throttle,
            bandwidth_bytes_per_sec: None,
            bandwidth_provisional: false,
            high_rounds: 0,
            throttle_pct: 0,
            last_predicted_ms: f64::INFINITY,
        }
    }

    /// Records that `bytes` took `secs` to send. The bandwidth follows the latest large
    /// sends (an average of the old figure and the new one, so that one hiccup on a busy
    /// machine does not swing the prediction); a small send counts only while there is
    /// no figure yet (round 0 of a guest of zero pages sends little: a low figure beats
    /// none, which would let nothing fit).
    pub fn sent(&mut self, bytes: u64, secs: f64) {
        self.sample(bytes, secs, false);
    }

    /// Records the full copy (round 0): a provisional figure that the first pre-copy
    /// round replaces. Its time goes mostly to finding zero pages, which cost no bytes on
    /// the link: as a bandwidth it would be low, and throttle a guest that converges.
    pub fn sent_full_copy(&mut self, bytes: u64, secs: f64) {
        self.sample(bytes, secs, true);
    }

    fn sample(&mut self, bytes: u64, secs: f64, provisional: bool) {
        if bytes == 0 || secs <= 0.0 || !secs.is_finite() {
            return;
        }
        let provisional = provisional || bytes < MIN_BANDWIDTH_SAMPLE_BYTES;
        if provisional && self.bandwidth_bytes_per_sec.is_some() {
            return;
        }
        let sample = bytes as f64 / secs;
        self.bandwidth_bytes_per_sec = Some(match self.bandwidth_bytes_per_sec {
            Some(old) if !self.bandwidth_provisional => (old + sample) / 2.0,
            _ => sample,
        });
        self.bandwidth_provisional = provisional;
    }

    /// The measured bandwidth, bytes per second.
    pub fn bandwidth_bytes_per_sec(&self) -> Option<f64> {
        self.bandwidth_bytes_per_sec
    }

    /// The throttle in force, percent.
    pub fn throttle_pct(&self) -> u8 {
        self.throttle_pct
    }

    /// The downtime of sending `pending_bytes` and paying `fixed`, ms (unbounded, i.e.
    /// `f64::INFINITY`, before any bandwidth is known).
    pub fn predict_downtime_ms(&self, pending_bytes: u64, fixed: &FixedCosts) -> f64 {
        let send_ms = match self.bandwidth_bytes_per_sec {
            Some(bandwidth) if bandwidth > 0.0 => pending_bytes as f64 / bandwidth * 1e3,
            _ if pending_bytes == 0 => 0.0,
            _ => f64::INFINITY,
        };
        fixed.total_ms() + send_ms
    }

    /// Decides pre-copy round `round` (1 is the first after the full copy), whose REPORTs
    /// found `pending_bytes` dirty, dirtied over the `window_secs` since the REPORTs
    /// before.
    pub fn decide(
        &mut self,
        round: u32,
        pending_bytes: u64,
        window_secs: f64,
        fixed: &FixedCosts,
    ) -> Verdict {
        let dirty_bytes_per_sec = if window_secs > 0.0 && window_secs.is_finite() {
            pending_bytes as f64 / window_secs
        } else {
            0.0
        };
        let predicted_downtime_ms = self.predict_downtime_ms(pending_bytes, fixed);
        let budget_ms = self.max_downtime.as_secs_f64() * 1e3;
        let within_budget = predicted_downtime_ms <= budget_ms;
        // No better to wait for: the rounds stopped shrinking and auto-converge will not
        // step in (off, at its most, or the guest dirtying too slowly to trigger it).
        let stalled = predicted_downtime_ms >= self.last_predicted_ms * STALLED_SHARE
            && !self.would_throttle(dirty_bytes_per_sec);
        let aimed_at = predicted_downtime_ms <= budget_ms * AIM_SHARE_OF_BUDGET;
        let decision = if aimed_at || within_budget && (stalled || round > self.max_rounds) {
            Decision::Stop
        } else if round > self.max_rounds {
            Decision::ForcedStop
        } else {
            Decision::Continue
        };
        self.last_predicted_ms = predicted_downtime_ms;
        if decision == Decision::Continue {
            self.consider_throttle(dirty_bytes_per_sec);
        }
        Verdict {
            decision,
            bandwidth_bytes_per_sec: self.bandwidth_bytes_per_sec,
            dirty_bytes_per_sec,
            predicted_downtime_ms,
            throttle_pct: self.throttle_pct,
        }
    }

    /// Whether a round dirtying at `dirty_bytes_per_sec` counts toward a throttle step:
    /// auto-converge on, a step left, and a dirty rate above the trigger share of the
    /// bandwidth.
    fn would_throttle(&self, dirty_bytes_per_sec: f64) -> bool {
        let params = self.throttle;
        let Some(bandwidth) = self.bandwidth_bytes_per_sec else {
            return false;
        };
        params.mode == AutoConverge::On
            && self.throttle_pct < params.max_pct.min(99)
            && dirty_bytes_per_sec > bandwidth * f64::from(params.trigger_threshold_pct) / 100.0
    }

    /// Going on over the aim: a round that dirties faster than the trigger share of the
    /// bandwidth counts; every `trigger_rounds` of them step the throttle up.
    fn consider_throttle(&mut self, dirty_bytes_per_sec: f64) {
        let params = self.throttle;
        if !self.would_throttle(dirty_bytes_per_sec) {
            return;
        }
        self.high_rounds += 1;
        if self.high_rounds < params.trigger_rounds.max(1) {
            return;
        }
        self.high_rounds = 0;
        let max = params.max_pct.min(99);
        self.throttle_pct = if self.throttle_pct == 0 {
            params.initial_pct.min(max)
        } else {
            self.throttle_pct
                .saturating_add(params.increment_pct)
                .min(max)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;

    fn fixed() -> FixedCosts {
        FixedCosts {
            device_state_ms: 0.1,
            reports_ms: 0.2,
            device_data_ms: 0.2,
            link_rtt_ms: 0.0,
        }
    }

    fn policy(mode: AutoConverge, max_rounds: u32) -> Convergence {
        let mut policy = Convergence::new(
            Duration::from_millis(30),
            max_rounds,
            ThrottleParams {
                mode,
                ..ThrottleParams::default()
            },
        );
        policy.sent(1000 * 1_000_000, 1.0); // 1000 MB/s
        policy
    }

    #[test]
    fn a_converging_migration_stops_once_the_rest_fits() {
        let mut policy = policy(AutoConverge::On, 30);
        // 80 MB dirty after the full copy: 80 ms at 1000 MB/s, over the 30 ms budget.
        let first = policy.decide(1, 80_000_000, 1.0, &fixed());
        assert_eq!(first.decision, Decision::Continue);
        assert!((first.predicted_downtime_ms - 80.7).abs() < 1e-6);
        assert!((first.dirty_bytes_per_sec - 80.0 * MB).abs() < 1.0);
        // 20 MB: 20.7 ms, within the budget but over the half it aims at, and shrinking:
        // one more round.
        let second = policy.decide(2, 20_000_000, 0.08, &fixed());
        assert_eq!(second.decision, Decision::Continue);
        // 5 MB: 5.7 ms.
        let third = policy.decide(3, 5_000_000, 0.02, &fixed());
        assert_eq!(third.decision, Decision::Stop);
        assert_eq!(third.throttle_pct, 0, "a converging guest is not slowed");
    }

    #[test]
    fn rounds_that_stop_shrinking_within_the_budget_stop_when_no_throttle_is_left() {
        // Off: 25 ms, then 24 ms (not 10% better): stop, within the budget.
        let mut off = policy(AutoConverge::Off, 30);
        assert_eq!(
            off.decide(1, 25_000_000, 0.1, &fixed()).decision,
            Decision::Continue
        );
        assert_eq!(
            off.decide(2, 24_000_000, 0.1, &fixed()).decision,
            Decision::Stop
        );
        // On, dirtying 240 MB/s of a 1000 MB/s link: under the trigger, nothing to wait
        // for either.
        let mut slow = policy(AutoConverge::On, 30);
        slow.decide(1, 25_000_000, 0.1, &fixed());
        assert_eq!(
            slow.decide(2, 24_000_000, 0.1, &fixed()).decision,
            Decision::Stop
        );
        // On, dirtying 600 MB/s: a throttle step will come, so it goes on.
        let mut fast = policy(AutoConverge::On, 30);
        fast.decide(1, 25_000_000, 0.04, &fixed());
        let verdict = fast.decide(2, 24_000_000, 0.04, &fixed());
        assert_eq!(verdict.decision, Decision::Continue);
        assert_eq!(verdict.throttle_pct, 20);
    }

    #[test]
    fn the_fixed_costs_count() {
        let mut policy = policy(AutoConverge::On, 30);
        let slow_device = FixedCosts {
            device_state_ms: 5.0,
            reports_ms: 2.0,
            device_data_ms: 2.0,
            link_rtt_ms: 0.0,
        };
        // 12 ms of pages fit the budget alone, not with 19 ms of device requests.
        let verdict = policy.decide(1, 12_000_000, 1.0, &slow_device);
        assert!((verdict.predicted_downtime_ms - 31.0).abs() < 1e-6);
        assert_eq!(verdict.decision, Decision::Continue);
        // 10 ms of pages: 29 ms, within the budget; the fixed part does not shrink and
        // 10 MB/s of dirtying will not throttle: stop.
        let verdict = policy.decide(2, 10_000_000, 1.0, &slow_device);
        assert!((verdict.predicted_downtime_ms - 29.0).abs() < 1e-6);
        assert_eq!(verdict.decision, Decision::Stop);
    }

    #[test]
    fn the_link_round_trip_counts_twice() {
        // End to Ready and Go to Resumed: a 10 ms link adds 20 ms to what the stop costs.
        let far = FixedCosts {
            device_state_ms: 1.0,
            reports_ms: 1.0,
            device_data_ms: 1.0,
            link_rtt_ms: 10.0,
        };
        assert!((far.total_ms() - 25.0).abs() < 1e-9);
        let mut policy = policy(AutoConverge::On, 30);
        // 6 ms of pages: 11 ms without the link, within half the budget; 31 ms with it.
        let verdict = policy.decide(1, 6_000_000, 1.0, &far);
        assert!((verdict.predicted_downtime_ms - 31.0).abs() < 1e-6);
        assert_eq!(verdict.decision, Decision::Continue);
    }

    #[test]
    fn a_dirty_rate_above_the_bandwidth_throttles_in_steps_up_to_the_cap() {
        let mut policy = policy(AutoConverge::On, 1000);
        let mut throttles = Vec::new();
        for round in 1..=40 {
            // 60 MB dirtied in 40 ms: 1500 MB/s against 1000 MB/s of link.
            let verdict = policy.decide(round, 60_000_000, 0.04, &fixed());
            assert_eq!(verdict.decision, Decision::Continue);
            throttles.push(verdict.throttle_pct);
        }
        // Every second round over the threshold steps: 20, then +10, capped at 99.
        assert_eq!(&throttles[..6], &[0, 20, 20, 30, 30, 40]);
        assert_eq!(
            throttles[15], 90,
            "the 8th step, after 16 rounds: 20 + 7 x 10"
        );
        assert_eq!(
            throttles[17], 99,
            "the 9th would be 100: capped at the maximum"
        );
        assert!(throttles[17..].iter().all(|&t| t == 99));
        assert!(throttles.windows(2).all(|w| w[0] <= w[1]), "never eased");
    }

    #[test]
    fn a_dirty_rate_under_the_threshold_does_not_throttle_and_does_not_reset_the_count() {
        let mut policy = policy(AutoConverge::On, 1000);
        // 400 MB/s dirty against 1000 MB/s: slow convergence, QEMU does not throttle.
        for round in 1..=5 {
            let verdict = policy.decide(round, 40_000_000, 0.1, &fixed());
            assert_eq!(verdict.throttle_pct, 0);
        }
        // One round over the threshold, one under, one over: two high rounds, a step.
        assert_eq!(policy.decide(6, 60_000_000, 0.04, &fixed()).throttle_pct, 0);
        assert_eq!(policy.decide(7, 40_000_000, 0.1, &fixed()).throttle_pct, 0);
        assert_eq!(
            policy.decide(8, 60_000_000, 0.04, &fixed()).throttle_pct,
            20
        );
    }

    #[test]
    fn with_auto_converge_off_max_rounds_forces_the_stop() {
        let mut policy = policy(AutoConverge::Off, 3);
        for round in 1..=3 {
            let verdict = policy.decide(round, 60_000_000, 0.04, &fixed());
            assert_eq!(verdict.decision, Decision::Continue);
            assert_eq!(verdict.throttle_pct, 0, "off means never");
        }
        let last = policy.decide(4, 60_000_000, 0.04, &fixed());
        assert_eq!(last.decision, Decision::ForcedStop);
        assert!(last.predicted_downtime_ms > 30.0);
    }

    #[test]
    fn a_fit_after_the_round_limit_is_still_a_stop_within_budget() {
        let mut policy = policy(AutoConverge::Off, 3);
        assert_eq!(
            policy.decide(9, 1_000_000, 0.04, &fixed()).decision,
            Decision::Stop
        );
    }

    #[test]
    fn the_initial_and_increment_are_the_callers_and_the_cap_holds() {
        let mut policy = Convergence::new(
            Duration::from_millis(30),
            1000,
            ThrottleParams {
                initial_pct: 50,
                increment_pct: 30,
                max_pct: 95,
                trigger_rounds: 1,
                ..ThrottleParams::default()
            },
        );
        policy.sent(100_000_000, 1.0);
        let steps: Vec<u8> = (1..=4)
            .map(|round| {
                policy
                    .decide(round, 10_000_000, 0.01, &fixed())
                    .throttle_pct
            })
            .collect();
        assert_eq!(steps, [50, 80, 95, 95]);
    }

    #[test]
    fn bandwidth_is_measured_on_large_sends_and_smoothed() {
        let mut policy = Convergence::new(Duration::from_millis(30), 30, ThrottleParams::default());
        assert_eq!(policy.bandwidth_bytes_per_sec(), None);
        assert_eq!(
            policy.predict_downtime_ms(1, &FixedCosts::default()),
            f64::INFINITY,
            "no bandwidth yet: nothing fits"
        );
        assert_eq!(policy.predict_downtime_ms(0, &FixedCosts::default()), 0.0);
        policy.sent(0, 1.0); // nothing sent: no figure
        assert_eq!(policy.bandwidth_bytes_per_sec(), None);
        // Latency-bound, but better than none: nothing would ever fit without a figure.
        policy.sent(4096, 0.001);
        assert_eq!(policy.bandwidth_bytes_per_sec(), Some(4096e3));
        policy.sent(100_000_000, 0.1);
        assert_eq!(
            policy.bandwidth_bytes_per_sec(),
            Some(1e9),
            "the first large send replaces it"
        );
        policy.sent(4096, 1.0); // latency-bound once there is a figure: ignored
        assert_eq!(policy.bandwidth_bytes_per_sec(), Some(1e9));
        // The full copy's figure holds only until a pre-copy round measures one.
        let mut policy = Convergence::new(Duration::from_millis(30), 30, ThrottleParams::default());
        policy.sent_full_copy(70_000_000, 0.5); // 1 GiB scanned, 70 MB not zero
        assert_eq!(policy.bandwidth_bytes_per_sec(), Some(140e6));
        policy.sent(60_000_000, 0.06);
        assert_eq!(policy.bandwidth_bytes_per_sec(), Some(1e9));
        policy.sent(50_000_000, 0.1);
        assert_eq!(policy.bandwidth_bytes_per_sec(), Some(0.75e9));
        policy.sent(50_000_000, 0.0); // no time: no figure
        assert_eq!(policy.bandwidth_bytes_per_sec(), Some(0.75e9));
        // No throttling without a bandwidth to compare with.
        let mut fresh = Convergence::new(Duration::from_millis(30), 30, ThrottleParams::default());
        for round in 1..=4 {
            assert_eq!(fresh.decide(round, 1 << 30, 0.01, &fixed()).throttle_pct, 0);
        }
    }
}
