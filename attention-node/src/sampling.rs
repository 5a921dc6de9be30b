//! Turning logits into tokens and log-probabilities.
//!
//! Log-probabilities are always those of the model's raw distribution (before temperature,
//! top-k or top-p), as vLLM reports them by default. Sampling applies temperature, then top-k,
//! then top-p, then draws with the sequence's own seeded generator; temperature 0 is greedy
//! (ties go to the lowest token id).

use crate::rng::Rng;

pub use myriad_engine_api::{SamplingParams, TokenLogprob};

/// Natural-log softmax of `logits` (computed with an f64 sum).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = logits.iter().map(|&x| f64::from(x - m).exp()).sum();
    let lz = z.ln() as f32;
    logits.iter().map(|&x| x - m - lz).collect()
}

/// The `k` most likely tokens, most likely first (ties: lower id first).
pub fn top_logprobs(logprobs: &[f32], k: usize) -> Vec<TokenLogprob> {
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    let cmp = |a: &u32, b: &u32| {
        logprobs[*b as usize]
            .total_cmp(&logprobs[*a as usize])
            .then(a.cmp(b))
    };
    idx.select_nth_unstable_by(k - 1, cmp);
    idx.truncate(k);
    idx.sort_by(cmp);
    idx.into_iter()
        .map(|t| TokenLogprob {
            token_id: t,
            logprob: logprobs[t as usize],
        })
        .collect()
}

/// Index of the largest logit (lowest index on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Picks the next token.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut Rng) -> u32 {
    if params.temperature == 0.0 {
        return argmax(logits);
    }
    let t = params.temperature;
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, x / t))
        .collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if params.top_k > 0 {
        cand.truncate(params.top_k);
    }
    let m = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|(_, x)| f64::from(x - m).exp()).collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    if params.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= f64::from(params.top_p) {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        cand.truncate(keep);
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
    }
    let u = rng.next_f64();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return cand[i].0;
        }
    }
    cand[cand.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_normalises_and_top_is_sorted() {
        let lp = log_softmax(&[1.0, 3.0, 2.0, 3.0]);
        let s: f64 = lp.iter().map(|&x| f64::from(x).exp()).sum();
        assert!((s - 1.0).abs() < 1e-6);
        let top = top_logprobs(&lp, 3);
        assert_eq!(
            top.iter().map(|t| t.token_id).collect::<Vec<_>>(),
            vec![1, 3, 2]
        );
        assert_eq!(argmax(&[1.0, 3.0, 2.0, 3.0]), 1);
    }

    #[test]
    fn sampling_is_reproducible_and_respects_filters() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let p = SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            top_k: 5,
            seed: Some(7),
        };
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..20)
                .map(|_| sample(&logits, &p, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let allowed: Vec<u32> = top_logprobs(&log_softmax(&logits), 5)
            .iter()
            .map(|t| t.token_id)
            .collect();
        assert!(draw(3).iter().all(|t| allowed.contains(t)));
        let k1 = SamplingParams { top_k: 1, ..p };
        let mut rng = Rng::new(9);
        assert_eq!(sample(&logits, &k1, &mut rng), argmax(&logits));
    }
}
