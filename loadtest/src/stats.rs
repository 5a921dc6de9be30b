//! Summaries of samples: count, mean, min, percentiles, max.
//!
//! Percentiles use the nearest-rank definition (the smallest sample with at least p% of the
//! samples at or below it), so every reported value is one that was measured; with few samples
//! p99 is simply the maximum, which is the honest answer.

use serde::Serialize;

/// A summary of samples; the value fields are `None` when there were none.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Distribution {
    pub count: usize,
    pub mean: Option<f64>,
    pub min: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

impl Distribution {
    /// Summarises `samples` (NaNs are dropped: they would poison the sort).
    pub fn of(samples: &[f64]) -> Self {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Distribution {
            count: n,
            mean: Some(v.iter().sum::<f64>() / n as f64),
            min: v.first().copied(),
            p50: Some(percentile_sorted(&v, 50.0)),
            p90: Some(percentile_sorted(&v, 90.0)),
            p99: Some(percentile_sorted(&v, 99.0)),
            max: v.last().copied(),
        }
    }
}

/// The nearest-rank `p`th percentile of sorted, non-empty `v`.
pub fn percentile_sorted(v: &[f64], p: f64) -> f64 {
    let n = v.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    v[rank.clamp(1, n) - 1]
}
