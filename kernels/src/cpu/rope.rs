//! Partial rotary position embedding, half-split ("rotate_half") convention.
//!
//! Frequencies and angles are computed in f32 the way transformers does
//! (`inv_freq = 1 / θ^(2i/rot)`, `angle = position · inv_freq`, both f32), so long positions
//! round exactly as the reference does.

/// Inverse frequencies for `rotary_dim` rotated dims (`rotary_dim / 2` values).
pub fn inv_freq(rotary_dim: usize, theta: f32) -> Vec<f32> {
    let half = rotary_dim / 2;
    (0..half)
        .map(|i| {
            let exponent = (2 * i) as f32 / rotary_dim as f32;
            1.0 / theta.powf(exponent)
        })
        .collect()
}

/// `(cos, sin)` of every angle for position `pos`.
pub fn angles(pos: usize, inv_freq: &[f32], cos: &mut [f32], sin: &mut [f32]) {
    let p = pos as f32;
    for ((c, s), f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
        let a = p * f;
        *c = a.cos();
        *s = a.sin();
    }
}

/// Rotates the first `2 · cos.len()` dims of `x`: pairs `(i, i + half)`.
pub fn apply(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i] + a * sin[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() {
        let f = inv_freq(8, 10_000.0);
        let (mut c, mut s) = (vec![0.0; 4], vec![0.0; 4]);
        angles(0, &f, &mut c, &mut s);
        let mut x = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        let orig = x.clone();
        apply(&mut x, &c, &s);
        assert_eq!(x, orig);
        angles(123, &f, &mut c, &mut s);
        apply(&mut x, &c, &s);
        let n0: f32 = orig[..8].iter().map(|v| v * v).sum();
        let n1: f32 = x[..8].iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-3);
        assert_eq!(&x[8..], &orig[8..]);
    }
}
