//! Rows of the report and the timing that fills them: best-of and paired medians.

use super::*;

/// One line of the benchmark report: ours against one baseline.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// What is measured.
    pub measurement: String,
    /// Ours, nanoseconds per operation.
    pub ours_ns: f64,
    /// The baseline's name.
    pub baseline: String,
    /// The baseline, nanoseconds per operation.
    pub baseline_ns: f64,
    /// `baseline_ns / ours_ns` (above 1: ours is faster).
    pub speedup: f64,
    /// The target, in words ("speedup >= 30"), or "-" for an informational row.
    pub target: String,
    /// Whether the target is met (None: informational).
    pub met: Option<bool>,
}

/// What a row must show.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target {
    /// Informational: no target.
    None,
    /// Ours at least this many times faster than the baseline.
    Faster(f64),
    /// Ours at most this many times slower than the baseline.
    Within(f64),
}

impl Row {
    pub(crate) fn new(
        measurement: &str,
        ours_ns: f64,
        baseline: &str,
        baseline_ns: f64,
        target: Target,
    ) -> Row {
        let speedup = baseline_ns / ours_ns;
        let (target, met) = target.judge(speedup);
        Row {
            measurement: measurement.to_string(),
            ours_ns,
            baseline: baseline.to_string(),
            baseline_ns,
            speedup,
            target,
            met,
        }
    }
}

impl Row {
    /// A row from paired batches: ours is `a`, the baseline `b`, the speedup the median of
    /// the pairs' ratios.
    pub(crate) fn paired(measurement: &str, paired: Paired, baseline: &str, target: Target) -> Row {
        let mut row = Row::new(
            measurement,
            paired.a_ns,
            baseline,
            paired.b_ns,
            Target::None,
        );
        row.speedup = paired.speedup;
        let (target, met) = target.judge(paired.speedup);
        row.target = target;
        row.met = met;
        row
    }
}

impl Target {
    /// The target in words, and whether `speedup` (baseline / ours) meets it.
    fn judge(self, speedup: f64) -> (String, Option<bool>) {
        match self {
            Target::None => ("-".to_string(), None),
            Target::Faster(factor) => (format!("speedup >= {factor}"), Some(speedup >= factor)),
            Target::Within(factor) => (
                format!("ours <= {factor}x baseline"),
                Some(speedup * factor >= 1.0),
            ),
        }
    }
}

/// xorshift64*, deterministic.
pub fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Nanoseconds per op: the best of `batches` batches of `ops` calls of `op`, each batch after
/// an untimed `prepare`. The best batch is the one least disturbed by other load on a
/// shared machine; ours and the baselines are measured the same way.
pub fn best_ns<S>(
    batches: usize,
    ops: u64,
    state: &mut S,
    mut prepare: impl FnMut(&mut S),
    mut op: impl FnMut(&mut S),
) -> f64 {
    let mut samples: Vec<f64> = (0..batches)
        .map(|_| {
            prepare(state);
            let start = Instant::now();
            for _ in 0..ops {
                op(state);
            }
            start.elapsed().as_nanos() as f64 / ops as f64
        })
        .collect();
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[0]
}

/// Nanoseconds per op of `a` and of `b`, and how many times faster `a` is: `batches`
/// pairs of batches of `ops` calls each (each batch after an untimed `prepare`), the two
/// batches of a pair back to back, so a slow spell of a shared machine falls on both. The
/// times are the medians over the batches; the speedup is the median over the pairs of
/// `b / a`, which one noisy pair cannot move. For rows whose met / missed must not flip
/// from run to run.
pub fn paired_median_ns<S>(
    batches: usize,
    ops: u64,
    state: &mut S,
    mut prepare: impl FnMut(&mut S),
    mut a: impl FnMut(&mut S),
    mut b: impl FnMut(&mut S),
) -> Paired {
    let mut time = |state: &mut S, op: &mut dyn FnMut(&mut S)| {
        prepare(state);
        let start = Instant::now();
        for _ in 0..ops {
            op(state);
        }
        start.elapsed().as_nanos() as f64 / ops as f64
    };
    let (mut a_ns, mut b_ns) = (Vec::with_capacity(batches), Vec::with_capacity(batches));
    for batch in 0..batches {
        // Alternate which side goes first, so neither always runs on a warmer cache.
        if batch % 2 == 0 {
            a_ns.push(time(state, &mut a));
            b_ns.push(time(state, &mut b));
        } else {
            b_ns.push(time(state, &mut b));
            a_ns.push(time(state, &mut a));
        }
    }
    let mut ratios: Vec<f64> = a_ns.iter().zip(&b_ns).map(|(a, b)| b / a).collect();
    Paired {
        a_ns: median(&mut a_ns),
        b_ns: median(&mut b_ns),
        speedup: median(&mut ratios),
    }
}

/// What [`paired_median_ns`] measured.
#[derive(Debug, Clone, Copy)]
pub struct Paired {
    /// Median nanoseconds per op of `a`.
    pub a_ns: f64,
    /// Median nanoseconds per op of `b`.
    pub b_ns: f64,
    /// Median over the pairs of `b / a` (above 1: `a` is faster).
    pub speedup: f64,
}

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(|x, y| x.total_cmp(y));
    samples[samples.len() / 2]
}
