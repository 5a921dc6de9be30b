//! Partial rotary position embedding, half-split ("rotate_half") convention.
//!
//! Angles are computed in f32 the way transformers does (`angle = position · inv_freq`, f32),
//! from the frequencies of [`crate::rope::frequencies`], so long positions round exactly as the
//! reference does.

/// `(cos, sin)` of every angle for position `pos`, times `scale` (YaRN's attention factor;
/// 1 for plain RoPE).
pub fn angles(pos: usize, inv_freq: &[f32], scale: f32, cos: &mut [f32], sin: &mut [f32]) {
    let p = pos as f32;
    for ((c, s), f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
        let a = p * f;
        *c = a.cos() * scale;
        *s = a.sin() * scale;
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
        let (f, _) = crate::rope::frequencies(8, 10_000.0, None);
        let (mut c, mut s) = (vec![0.0; 4], vec![0.0; 4]);
        angles(0, &f, 1.0, &mut c, &mut s);
        let mut x = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        let orig = x.clone();
        apply(&mut x, &c, &s);
        assert_eq!(x, orig);
        angles(123, &f, 1.0, &mut c, &mut s);
        apply(&mut x, &c, &s);
        let n0: f32 = orig[..8].iter().map(|v| v * v).sum();
        let n1: f32 = x[..8].iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-3);
        assert_eq!(&x[8..], &orig[8..]);
    }
}
