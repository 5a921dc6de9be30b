//! How full-attention KV caches are stored, for every backend: fixed-size blocks of
//! `block_tokens` tokens (a sequence takes blocks as it grows and gives them back when it
//! ends), in one element type ([`KvDtype`]) with one key scale and one value scale per block.
//!
//! Scales are powers of two chosen from the block's largest magnitude so far. When a new
//! token exceeds what the scale covers, the block is re-encoded at the next power of two
//! that does: for e4m3 that is a shift of the exponent, exact except where a value drops
//! below the smallest normal. f32 and bf16 blocks keep scale 1.

/// Element type of stored keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvDtype {
    F32,
    BF16,
    /// OCP FP8 E4M3 ("e4m3fn": no infinities, largest finite 448), with a per-block scale.
    Fp8E4M3,
}

impl KvDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::BF16 => 2,
            KvDtype::Fp8E4M3 => 1,
        }
    }

    /// The name `--kv-cache-dtype` takes.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::BF16 => "bf16",
            KvDtype::Fp8E4M3 => "fp8_e4m3",
        }
    }

    /// Parses a `--kv-cache-dtype` value.
    pub fn parse(s: &str) -> Option<KvDtype> {
        Some(match s {
            "f32" | "float32" => KvDtype::F32,
            "bf16" | "bfloat16" => KvDtype::BF16,
            "fp8_e4m3" | "fp8" | "fp8_e4m3fn" => KvDtype::Fp8E4M3,
            _ => return None,
        })
    }
}

/// The block layout of every KV cache a model's sequences hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheSpec {
    /// Tokens per block (≥ 1).
    pub block_tokens: usize,
    pub dtype: KvDtype,
}

impl Default for KvCacheSpec {
    /// 32 tokens of f32: exact against the reference, and at most 31 tokens of slack per
    /// sequence and layer.
    fn default() -> Self {
        KvCacheSpec {
            block_tokens: 32,
            dtype: KvDtype::F32,
        }
    }
}

impl KvCacheSpec {
    /// Blocks one attention layer needs to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens.max(1))
    }

    /// Bytes of one block (keys, values and their two f32 scales) for one layer of `row`
    /// values per token (`num_kv_heads × head_dim`).
    pub fn block_bytes(&self, row: usize) -> usize {
        2 * self.block_tokens * row * self.dtype.size() + 8
    }
}

/// Largest finite e4m3 magnitude.
pub const FP8_E4M3_MAX: f32 = 448.0;

/// The smallest power-of-two scale under which `amax` fits e4m3's range (1 for 0 or
/// non-finite input, which then saturates).
pub fn fp8_scale_for(amax: f32) -> f32 {
    if !(amax.is_finite() && amax > 0.0) {
        return 1.0;
    }
    let mut e = (amax / FP8_E4M3_MAX).log2().ceil() as i32;
    // log2 may round either way at exact powers of two: settle on the exact exponent.
    while (amax / pow2(e)) > FP8_E4M3_MAX {
        e += 1;
    }
    while e > -126 && (amax / pow2(e - 1)) <= FP8_E4M3_MAX {
        e -= 1;
    }
    pow2(e)
}

fn pow2(e: i32) -> f32 {
    2f32.powi(e.clamp(-126, 127))
}

/// Rounds `x` to the nearest e4m3 value (ties to even), saturating at ±448; NaN stays NaN.
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a.is_nan() {
        return sign | 0x7f;
    }
    if a >= FP8_E4M3_MAX {
        return sign | 0x7e;
    }
    // Subnormals are multiples of 2^-9 below 2^-6; 8 · 2^-9 rounds up into the smallest
    // normal, whose code is exactly 8.
    if a < 1.0 / 64.0 {
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let bits = a.to_bits();
    let exp = ((bits >> 23) & 0xff) as i32 - 127;
    let mant = bits & 0x7f_ffff;
    const SHIFT: u32 = 20;
    let mut m3 = mant >> SHIFT;
    let rem = mant & ((1 << SHIFT) - 1);
    let half = 1 << (SHIFT - 1);
    if rem > half || (rem == half && m3 & 1 == 1) {
        m3 += 1;
    }
    let mut biased = exp + 7;
    if m3 == 8 {
        m3 = 0;
        biased += 1;
    }
    sign | ((biased as u8) << 3) | m3 as u8
}

/// Every e4m3 code's value.
pub static E4M3_TO_F32: [f32; 256] = e4m3_table();

const fn e4m3_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        let exp = ((i >> 3) & 0xf) as u32;
        let m = (i & 7) as u32;
        let magnitude = if exp == 15 && m == 7 {
            f32::NAN
        } else if exp == 0 {
            // m · 2^-9, exactly: m · 2^-3 as a normal f32 times 2^-6.
            f32::from_bits((127 - 9) << 23) * m as f32
        } else {
            // (1 + m/8) · 2^(exp-7): an f32 with that exponent and m as its top mantissa bits.
            f32::from_bits(((exp + 127 - 7) << 23) | (m << 20))
        };
        t[i] = if i & 0x80 != 0 { -magnitude } else { magnitude };
        i += 1;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_finite_code_round_trips() {
        for code in 0..=255u8 {
            let v = E4M3_TO_F32[code as usize];
            if v.is_nan() {
                continue;
            }
            let back = f32_to_e4m3(v);
            // -0 and +0 are distinct codes with equal values.
            assert_eq!(E4M3_TO_F32[back as usize], v, "code {code:#04x} = {v}");
        }
        assert_eq!(E4M3_TO_F32[0x7e], 448.0);
        assert_eq!(E4M3_TO_F32[0x01], 2f32.powi(-9));
        assert_eq!(E4M3_TO_F32[0x08], 2f32.powi(-6));
        assert_eq!(E4M3_TO_F32[0x38], 1.0);
    }

    #[test]
    fn encoding_picks_the_nearest_value() {
        let finite: Vec<f32> = E4M3_TO_F32
            .iter()
            .copied()
            .filter(|v| !v.is_nan())
            .collect();
        let mut x = -500.0f32;
        while x < 500.0 {
            let got = E4M3_TO_F32[f32_to_e4m3(x) as usize];
            let clamped = x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX);
            let best = finite
                .iter()
                .map(|v| (v - clamped).abs())
                .fold(f32::INFINITY, f32::min);
            assert!(
                ((got - clamped).abs() - best).abs() <= f32::EPSILON * best.max(1e-6),
                "{x} -> {got}, nearest is {best} away"
            );
            x += 0.0137;
        }
    }

    #[test]
    fn scales_are_the_smallest_covering_power_of_two() {
        for amax in [1e-30f32, 0.001, 0.5, 1.0, 447.0, 448.0, 449.0, 896.0, 1e6] {
            let s = fp8_scale_for(amax);
            assert_eq!(s.log2().fract(), 0.0, "{amax}: {s}");
            assert!(amax / s <= FP8_E4M3_MAX, "{amax}: {s}");
            assert!(
                amax / (s / 2.0) > FP8_E4M3_MAX,
                "{amax}: {s} is not the smallest"
            );
        }
        assert_eq!(fp8_scale_for(0.0), 1.0);
    }

    #[test]
    fn specs_count_blocks_and_bytes() {
        let spec = KvCacheSpec {
            block_tokens: 16,
            dtype: KvDtype::BF16,
        };
        assert_eq!(spec.blocks_for(0), 0);
        assert_eq!(spec.blocks_for(16), 1);
        assert_eq!(spec.blocks_for(17), 2);
        assert_eq!(spec.block_bytes(8), 2 * 16 * 8 * 2 + 8);
        for d in [KvDtype::F32, KvDtype::BF16, KvDtype::Fp8E4M3] {
            assert_eq!(KvDtype::parse(d.name()), Some(d));
        }
    }
}
