//! What a source migration reports: each round's figures (pages by source, bytes, the
//! bandwidth, dirty rate and predicted downtime the policy decided on, the throttle), the
//! whole migration's (downtime, whether the budget was met), and where the downtime went.

use crate::engine::Mode;

/// One pre-copy round.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RoundStats {
    /// 0 is the full copy; the last one is the final (stopped) round.
    pub round: u32,
    /// Pages only the device dirtied.
    pub pages_device: u64,
    /// Pages only the vCPUs dirtied.
    pub pages_cpu: u64,
    /// Pages both dirtied (sent once).
    pub pages_both: u64,
    /// Pages sent.
    pub pages_sent: u64,
    /// Bytes sent in the round (pages, device data, framing).
    pub bytes_sent: u64,
    /// Device migration data bytes sent in the round.
    pub device_bytes: u64,
    /// Wall time of the round, ms.
    pub round_ms: f64,
    /// Time spent in REPORTs, ms.
    pub report_ms: f64,
    /// Whether this was the final round (guest stopped).
    pub final_round: bool,
    /// REPORT errors in this round (each: range treated as dirty, tracking restarted).
    pub report_errors: u32,
    /// The link's bandwidth as measured so far, bytes per second (what the prediction
    /// uses; 0 before anything was sent).
    pub bandwidth_bytes_per_sec: f64,
    /// Distinct pages dirtied per second since the REPORTs before, in bytes.
    pub dirty_bytes_per_sec: f64,
    /// The downtime had the guest stopped at this round's REPORTs, ms (none for round 0
    /// and stop-and-copy; for the final round, the prediction it stopped on, next to
    /// its actual `round_ms`).
    pub predicted_downtime_ms: Option<f64>,
    /// The vCPU throttle while this round was sent, percent of their time (auto-converge).
    pub throttle_pct: u8,
    /// Whether the device's own workload was slowed by the same share in this round.
    pub device_throttled: bool,
}

/// What a migration did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MigrationReport {
    /// The mode.
    pub mode: Mode,
    /// Whether the destination's memory hashes matched the source's.
    pub verified: bool,
    /// From pausing the vCPUs to the destination device RUNNING with all pages in place.
    pub downtime_ms: f64,
    /// The whole migration, ms (verification excluded).
    pub total_ms: f64,
    /// Bytes on the stream.
    pub bytes_sent: u64,
    /// Guest memory bytes.
    pub guest_bytes: u64,
    /// Rounds.
    pub rounds: Vec<RoundStats>,
    /// Whether device dirty tracking was used (false: fell back to "all dirty").
    pub device_tracking: bool,
    /// Whether the device went through PRE_COPY (false: it offers no PRE_COPY, or the mode
    /// is stop-and-copy; its state moved in STOP_COPY only).
    pub device_pre_copy: bool,
    /// Device migration data bytes sent, all rounds.
    pub device_bytes: u64,
    /// The downtime budget, ms.
    pub max_downtime_ms: f64,
    /// Whether the migration stopped because the rest fitted the budget and the downtime
    /// did stay within it (false: `max_rounds` forced the stop, or the stop took longer).
    pub downtime_budget_met: bool,
    /// Whether `max_rounds` forced the stop with the predicted downtime over the budget.
    pub forced_stop: bool,
    /// Where the downtime went.
    pub stop: StopTimes,
    /// One round trip on the migration link, measured before round 0 (ms); the predicted
    /// downtime counts two.
    pub link_rtt_ms: f64,
}

/// The downtime, phase by phase (ms): they add up to the downtime.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct StopTimes {
    /// Pausing the vCPUs.
    pub pause_ms: f64,
    /// The device to STOP_COPY (its DMA ends).
    pub stop_copy_ms: f64,
    /// The final REPORTs of every dirty source.
    pub reports_ms: f64,
    /// Sending the last dirty pages.
    pub pages_ms: f64,
    /// Sending the device's STOP_COPY data and End.
    pub device_data_ms: f64,
    /// From End sent to the destination's Resumed (its last writes, device load and
    /// resume, the link's round trip), its hashing excluded.
    pub destination_ms: f64,
}
