//! The fine-tuning loss, as big_vision's trainer computes it.
//!
//! Each example is `[image tokens] <bos> prefix "\n" suffix <eos>` (a [`Sequence`] from
//! [`crate::prompt::with_suffix`]). The model reads the sequence without its last token, with
//! the prefix-LM mask (prefix bidirectional, suffix causal); position `t` predicts token
//! `t + 1`, and only the suffix tokens and `<eos>` are scored. The loss is the mean of
//! `−log p` over each example's scored tokens, then the mean over examples
//! ([`Reduction::PerExample`], big_vision); transformers' `labels=` loss instead averages over
//! all the batch's scored tokens ([`Reduction::PerToken`]). They agree for a batch of one or
//! for equal suffix lengths.
//!
//! Rows are padded on the right, as fine-tuning recipes pad: real tokens keep positions
//! `1..n` and padding keys are masked, so padding changes no logit that is scored.

use crate::attention_mask::{RowLayout, additive_mask};
use crate::ops::autodiff;
use crate::paligemma::PaliGemma;
use crate::prompt::{Sequence, check_length};
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};

/// One training example: its token layout and the pixel values `[n_images, 3, R, R]` of the
/// images its `<image>` tokens stand for.
#[derive(Debug, Clone)]
pub struct Example {
    pub seq: Sequence,
    pub pixels: Option<Tensor>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reduction {
    /// Mean over each example's scored tokens, then over examples (big_vision).
    #[default]
    PerExample,
    /// Mean over all scored tokens of the batch (transformers' `labels=` loss).
    PerToken,
}

/// A batch laid out for one forward pass (no tensors: the pure part of the loss).
#[derive(Debug, Clone, PartialEq)]
pub struct Collated {
    /// Model inputs per row, right-padded to one length.
    pub ids: Vec<Vec<u32>>,
    pub rows: Vec<RowLayout>,
    /// Flat index `row · len + t` of every scored prediction, row by row.
    pub positions: Vec<u32>,
    /// The token each of those positions must predict.
    pub targets: Vec<u32>,
    /// Each prediction's weight in the loss (they sum to 1).
    pub weights: Vec<f32>,
    /// Number of scored tokens per example.
    pub scored: Vec<usize>,
}

impl Collated {
    /// Length of every row.
    pub fn len(&self) -> usize {
        self.ids.first().map_or(0, |r| r.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Lays out `seqs` as model inputs (each without its last token), right-padded with `pad_id`,
/// and lists the predictions to score with their weights.
pub fn collate(seqs: &[&Sequence], pad_id: u32, reduction: Reduction) -> Result<Collated> {
    if seqs.is_empty() {
        bail!("the batch is empty");
    }
    for (i, s) in seqs.iter().enumerate() {
        if s.prefix_len == 0 || s.prefix_len >= s.ids.len() {
            bail!(
                "example {i} has nothing to learn: a non-empty prefix and at least one suffix \
                 token (<eos>) are needed, got {} tokens with a {}-token prefix",
                s.ids.len(),
                s.prefix_len
            );
        }
    }
    let len = seqs.iter().map(|s| s.ids.len() - 1).max().unwrap_or(0);
    let total: usize = seqs.iter().map(|s| s.ids.len() - s.prefix_len).sum();
    let mut out = Collated {
        ids: Vec::with_capacity(seqs.len()),
        rows: Vec::with_capacity(seqs.len()),
        positions: Vec::with_capacity(total),
        targets: Vec::with_capacity(total),
        weights: Vec::with_capacity(total),
        scored: Vec::with_capacity(seqs.len()),
    };
    for (r, s) in seqs.iter().enumerate() {
        let n = s.ids.len() - 1;
        let mut ids = s.ids[..n].to_vec();
        ids.resize(len, pad_id);
        let mut row = RowLayout::default();
        for t in 0..len {
            row.push(t < n, t < s.prefix_len);
        }
        let scored = s.ids.len() - s.prefix_len;
        let weight = match reduction {
            Reduction::PerExample => 1.0 / (scored * seqs.len()) as f64,
            Reduction::PerToken => 1.0 / total as f64,
        } as f32;
        for t in s.prefix_len - 1..n {
            out.positions.push((r * len + t) as u32);
            out.targets.push(s.ids[t + 1]);
            out.weights.push(weight);
        }
        out.ids.push(ids);
        out.rows.push(row);
        out.scored.push(scored);
    }
    Ok(out)
}

/// The loss of a batch and what it is made of.
#[derive(Debug, Clone)]
pub struct Loss {
    /// Scalar; call `backward()` on it for the trained parameters' gradients.
    pub loss: Tensor,
    /// Mean `−log p` of each example's scored tokens.
    pub example_losses: Vec<f32>,
    pub scored_tokens: usize,
}

/// The fine-tuning loss of `examples` (one forward pass, right-padded batch).
pub fn loss(model: &PaliGemma, examples: &[Example], reduction: Reduction) -> Result<Loss> {
    let seqs: Vec<&Sequence> = examples.iter().map(|e| &e.seq).collect();
    let c = collate(&seqs, model.config.pad_token_id, reduction)?;
    check_length(&model.config, c.len(), 0)?;
    let vocab = model.config.text.vocab_size;
    if let Some(bad) = c.targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("token id {bad} is outside the vocabulary of {vocab}");
    }
    let dev = model.device();
    let pixels: Vec<Option<Tensor>> = examples.iter().map(|e| e.pixels.clone()).collect();
    let features = model.row_features(&pixels)?;
    let embedded = c
        .ids
        .iter()
        .zip(&features)
        .enumerate()
        .map(|(i, (ids, f))| {
            model
                .embed(ids, f.as_ref())
                .with_context(|| format!("example {i}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let x = Tensor::stack(&embedded, 0)?;
    let mask = additive_mask(&c.rows, 0, c.len(), dev)?;
    let positions: Vec<Vec<u32>> = c.rows.iter().map(RowLayout::positions).collect();
    let hidden = model.decoder().forward(&x, &positions, &mask, None)?;
    let (b, l, h) = hidden.dims3()?;
    // Only scored positions go through the output head (the vocabulary is large).
    let scored = hidden
        .reshape((b * l, h))?
        .index_select(&u32_tensor(&c.positions, dev)?, 0)?;
    let logprobs = autodiff::log_softmax_last_dim(&model.decoder().logits(&scored)?)?;
    let n = c.targets.len();
    let picked = logprobs
        .gather(&u32_tensor(&c.targets, dev)?.reshape((n, 1))?, 1)?
        .squeeze(1)?;
    let weights = Tensor::from_slice(&c.weights, n, dev)?;
    let loss = (picked.mul(&weights)?.sum_all()? * -1.0)?;
    Ok(Loss {
        loss,
        example_losses: example_means(&picked.to_vec1::<f32>()?, &c.scored),
        scored_tokens: n,
    })
}

fn u32_tensor(v: &[u32], dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, v.len(), dev)?)
}

/// `−mean` of consecutive runs of `logprobs`, `counts[i]` long.
fn example_means(logprobs: &[f32], counts: &[usize]) -> Vec<f32> {
    let mut at = 0;
    counts
        .iter()
        .map(|&k| {
            let sum: f64 = logprobs[at..at + k].iter().map(|&v| v as f64).sum();
            at += k;
            (-sum / k as f64) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(ids: &[u32], prefix_len: usize) -> Sequence {
        Sequence {
            ids: ids.to_vec(),
            prefix_len,
        }
    }

    #[test]
    fn rows_are_right_padded_and_only_suffix_predictions_scored() {
        // [img img bos p \n] [s1 s2 eos]  and  [img bos \n] [eos]
        let a = seq(&[9, 9, 2, 5, 8, 20, 21, 1], 5);
        let b = seq(&[9, 2, 8, 1], 3);
        let c = collate(&[&a, &b], 0, Reduction::PerExample).unwrap();
        assert_eq!(
            c.ids,
            vec![vec![9, 9, 2, 5, 8, 20, 21], vec![9, 2, 8, 0, 0, 0, 0]]
        );
        assert_eq!(
            c.rows[1].valid,
            vec![true, true, true, false, false, false, false]
        );
        assert_eq!(
            c.rows[0].prefix,
            vec![true, true, true, true, true, false, false]
        );
        assert_eq!(
            c.rows[1].prefix,
            vec![true, true, true, false, false, false, false]
        );
        // row 0: positions 4, 5, 6 predict s1, s2, eos; row 1: position 2 predicts eos.
        assert_eq!(c.positions, vec![4, 5, 6, 7 + 2]);
        assert_eq!(c.targets, vec![20, 21, 1, 1]);
        assert_eq!(c.weights, vec![1.0 / 6.0, 1.0 / 6.0, 1.0 / 6.0, 0.5]);
        assert_eq!(c.scored, vec![3, 1]);
        let t = collate(&[&a, &b], 0, Reduction::PerToken).unwrap();
        assert_eq!(t.weights, vec![0.25; 4]);
    }

    #[test]
    fn examples_without_a_suffix_or_prefix_are_refused() {
        for bad in [seq(&[9, 2, 8], 3), seq(&[9, 2, 8], 0), seq(&[], 0)] {
            assert!(collate(&[&bad], 0, Reduction::PerExample).is_err());
        }
        assert!(collate(&[], 0, Reduction::PerExample).is_err());
    }

    #[test]
    fn example_means_group_consecutive_runs() {
        assert_eq!(example_means(&[-1.0, -3.0, -0.5], &[2, 1]), vec![2.0, 0.5]);
    }
}
