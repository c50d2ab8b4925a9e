//! Choosing the next token from log-probabilities: greedy, or sampling with temperature,
//! top-k and top-p (applied in that order, as transformers does) from a seeded generator.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The index of the largest value; the first one on ties (as `torch.argmax`).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

pub struct LogitsSampler {
    temperature: f32,
    top_k: Option<usize>,
    top_p: Option<f32>,
    rng: StdRng,
}

impl LogitsSampler {
    pub fn new(temperature: f32, top_k: Option<usize>, top_p: Option<f32>, seed: u64) -> Self {
        Self {
            temperature,
            top_k,
            top_p,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Draws a token from log-probabilities (or logits: only differences matter).
    pub fn sample(&mut self, logprobs: &[f32]) -> u32 {
        if self.temperature <= 0.0 {
            return argmax(logprobs);
        }
        let probs = filtered_probs(logprobs, self.temperature, self.top_k, self.top_p);
        let u: f64 = self.rng.random();
        pick(&probs, u)
    }
}

/// Candidate `(id, probability)` pairs after temperature, top-k and top-p, renormalised, in
/// descending probability.
pub fn filtered_probs(
    logprobs: &[f32],
    temperature: f32,
    top_k: Option<usize>,
    top_p: Option<f32>,
) -> Vec<(u32, f64)> {
    let mut cand: Vec<(u32, f64)> = logprobs
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite())
        .map(|(i, &v)| (i as u32, v as f64 / temperature as f64))
        .collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if let Some(k) = top_k.filter(|&k| k > 0) {
        cand.truncate(k.max(1));
    }
    let max = cand.first().map_or(0.0, |c| c.1);
    let mut total = 0.0;
    for c in &mut cand {
        c.1 = (c.1 - max).exp();
        total += c.1;
    }
    for c in &mut cand {
        c.1 /= total;
    }
    if let Some(p) = top_p.filter(|&p| p < 1.0) {
        // Keep the smallest head whose mass reaches p (always at least one token).
        let mut mass = 0.0;
        let keep = cand
            .iter()
            .position(|c| {
                mass += c.1;
                mass >= p as f64
            })
            .map_or(cand.len(), |i| i + 1);
        cand.truncate(keep);
        let kept: f64 = cand.iter().map(|c| c.1).sum();
        for c in &mut cand {
            c.1 /= kept;
        }
    }
    cand
}

/// Inverse-CDF draw with `u` in [0, 1).
fn pick(probs: &[(u32, f64)], u: f64) -> u32 {
    let mut acc = 0.0;
    for &(id, p) in probs {
        acc += p;
        if u < acc {
            return id;
        }
    }
    probs.last().map_or(0, |c| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_first_of_ties() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, 1.0]), 1);
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let lp: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let k2 = filtered_probs(&lp, 1.0, Some(2), None);
        assert_eq!(k2.iter().map(|c| c.0).collect::<Vec<_>>(), vec![0, 1]);
        assert!((k2[0].1 - 0.625).abs() < 1e-6);
        let p = filtered_probs(&lp, 1.0, None, Some(0.79));
        assert_eq!(p.iter().map(|c| c.0).collect::<Vec<_>>(), vec![0, 1]);
        let p = filtered_probs(&lp, 1.0, None, Some(0.81));
        assert_eq!(p.len(), 3);
    }

    #[test]
    fn temperature_sharpens_and_seed_repeats() {
        let lp: Vec<f32> = [0.6f32, 0.4].iter().map(|p| p.ln()).collect();
        let cold = filtered_probs(&lp, 0.1, None, None);
        assert!(cold[0].1 > 0.98);
        let draw = |seed| {
            let mut s = LogitsSampler::new(1.0, None, None, seed);
            (0..32).map(|_| s.sample(&lp)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }
}
