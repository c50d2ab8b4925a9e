//! Teacher-forced scoring: the log-probability the model gives a suffix after a prefix, in one
//! forward pass with the training mask (prefix bidirectional, suffix causal).

use crate::attention_mask::{RowLayout, additive_mask};
use crate::generate::log_probs;
use crate::paligemma::PaliGemma;
use crate::prompt::Sequence;
use anyhow::{Result, bail};
use candle_core::Tensor;

/// Logits `[len, V]` for every position of `seq`.
pub fn forward_logits(
    model: &PaliGemma,
    seq: &Sequence,
    pixels: Option<&Tensor>,
) -> Result<Tensor> {
    let features = model.row_features(&[pixels.cloned()])?.remove(0);
    let x = model.embed(&seq.ids, features.as_ref())?.unsqueeze(0)?;
    let mut row = RowLayout::default();
    for i in 0..seq.ids.len() {
        row.push(true, i < seq.prefix_len);
    }
    let mask = additive_mask(std::slice::from_ref(&row), 0, seq.ids.len(), model.device())?;
    let h = model
        .decoder()
        .forward(&x, &[row.positions()], &mask, None)?;
    Ok(model.decoder().logits(&h.squeeze(0)?)?)
}

/// `log p(suffix[t] | everything before)` for each suffix token.
pub fn suffix_logprobs(
    model: &PaliGemma,
    seq: &Sequence,
    pixels: Option<&Tensor>,
) -> Result<Vec<f32>> {
    if seq.prefix_len == 0 || seq.prefix_len >= seq.ids.len() {
        bail!("nothing to score: the suffix is empty");
    }
    let logits = forward_logits(model, seq, pixels)?;
    // Position t-1 predicts token t.
    let n = seq.ids.len() - seq.prefix_len;
    let lps = log_probs(&logits.narrow(0, seq.prefix_len - 1, n)?)?;
    Ok(lps
        .iter()
        .zip(seq.suffix())
        .map(|(lp, &t)| lp[t as usize])
        .collect())
}
