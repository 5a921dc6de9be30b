//! Rotary frequencies, the same for every backend: plain RoPE (`1 / θ^(2i/rot)`) and YaRN
//! (spec §2.4), computed with transformers' precision (frequencies and the ramp in f32, the
//! correction range in f64), so long positions round exactly as the reference does.

use crate::backend::YarnScaling;

/// The inverse frequencies of `rotary_dim` rotated dims (`rotary_dim / 2` values) and the
/// factor cos and sin are multiplied by (1 without YaRN).
pub fn frequencies(rotary_dim: usize, theta: f32, yarn: Option<&YarnScaling>) -> (Vec<f32>, f32) {
    let half = rotary_dim / 2;
    // θ^(2i/rot), f32 as torch computes `base ** (arange(0, dim, 2) / dim)`.
    let pos_freqs: Vec<f32> = (0..half)
        .map(|i| theta.powf((2 * i) as f32 / rotary_dim as f32))
        .collect();
    let Some(y) = yarn else {
        return (pos_freqs.iter().map(|p| 1.0 / p).collect(), 1.0);
    };
    let (low, high) = correction_range(y, rotary_dim, f64::from(theta));
    let high = if low == high { high + 0.001 } else { high };
    let factor = y.factor as f32;
    let freqs = pos_freqs
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let extrapolation = 1.0 / p;
            let interpolation = 1.0 / (factor * p);
            let ramp = ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
            let keep = 1.0 - ramp;
            interpolation * (1.0 - keep) + extrapolation * keep
        })
        .collect();
    (freqs, y.attention_factor as f32)
}

/// The dims between which YaRN ramps from kept to interpolated frequencies: where the
/// wavelength makes `beta_fast` and `beta_slow` rotations over the trained context.
fn correction_range(y: &YarnScaling, rotary_dim: usize, theta: f64) -> (f64, f64) {
    let dim = rotary_dim as f64;
    let l0 = y.original_max_position_embeddings as f64;
    let dim_for = |rotations: f64| {
        dim * (l0 / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
    };
    let (mut low, mut high) = (dim_for(y.beta_fast), dim_for(y.beta_slow));
    if y.truncate {
        low = low.floor();
        high = high.ceil();
    }
    (low.max(0.0), high.min(dim - 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yarn(factor: f64, original: usize) -> YarnScaling {
        YarnScaling {
            factor,
            original_max_position_embeddings: original,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: 0.1 * factor.ln() + 1.0,
            truncate: true,
        }
    }

    #[test]
    fn plain_rope_is_the_inverse_power() {
        let (f, scale) = frequencies(8, 10_000.0, None);
        assert_eq!(scale, 1.0);
        assert_eq!(f[0], 1.0);
        assert_eq!(f[2], 1.0 / 10_000f32.powf(0.5));
    }

    /// The released models' setting on their rotary dims: fast dims keep their frequency,
    /// slow dims are divided by the factor, and the ramp in between is monotone.
    #[test]
    fn yarn_keeps_fast_dims_and_interpolates_slow_ones() {
        let theta = 10_000_000f32;
        let (plain, _) = frequencies(64, theta, None);
        let y = yarn(4.0, 262_144);
        let (f, scale) = frequencies(64, theta, Some(&y));
        assert!((scale - (0.1 * 4f32.ln() + 1.0)).abs() < 1e-7);
        let (low, high) = correction_range(&y, 64, f64::from(theta));
        // d(32) = 64·ln(262144/(64π)) / (2·ln 1e7) = 14.24…, d(1) = 21.12…
        assert_eq!((low, high), (14.0, 22.0));
        for i in 0..32 {
            let ratio = plain[i] / f[i];
            if i <= 14 {
                assert_eq!(f[i], plain[i], "dim {i} is kept");
            } else if i >= 22 {
                assert!(
                    (ratio - 4.0).abs() < 1e-5,
                    "dim {i} is interpolated: {ratio}"
                );
            } else {
                assert!(
                    ratio > 1.0 && ratio < 4.0,
                    "dim {i} is on the ramp: {ratio}"
                );
            }
        }
        for w in f.windows(2) {
            assert!(w[1] < w[0], "frequencies stay decreasing");
        }
    }

    #[test]
    fn a_collapsed_range_still_ramps_without_dividing_by_zero() {
        // A context so short that both correction dims fall below 0: every dim is kept.
        let y = yarn(2.0, 1);
        let (f, _) = frequencies(16, 10_000.0, Some(&y));
        assert_eq!(f, frequencies(16, 10_000.0, None).0);
    }
}
