//! The token layout PaliGemma's processor builds:
//! `<image>`×(N per image) `<bos>` prompt `"\n"` — the prefix — then, in training and
//! scoring, suffix `<eos>`. Several images (or video frames) put their blocks one after another.

use crate::config::PaliGemmaConfig;
use crate::tokenizer::Tokenizer;
use anyhow::{Result, bail};

/// A prefix, and optionally a suffix, laid out as token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    /// Tokens `0..prefix_len` form the bidirectional prefix block.
    pub prefix_len: usize,
}

impl Sequence {
    /// The suffix part (empty for a plain prefix).
    pub fn suffix(&self) -> &[u32] {
        &self.ids[self.prefix_len..]
    }
}

/// Builds the prefix for `prompt` with `n_images` images. The prompt and the `"\n"` separator
/// are tokenized together, as the processor appends `"\n"` to the prompt string.
pub fn prefix(
    tok: &Tokenizer,
    cfg: &PaliGemmaConfig,
    prompt: &str,
    n_images: usize,
) -> Result<Sequence> {
    if prompt.contains("<image>") {
        bail!(
            "the prompt contains <image>: images are placed by --image, remove it from the prompt"
        );
    }
    let mut ids = vec![cfg.image_token_index; n_images * cfg.image_seq_length()];
    ids.push(cfg.bos_token_id);
    ids.extend(tok.encode(&format!("{prompt}\n"))?);
    let prefix_len = ids.len();
    Ok(Sequence { ids, prefix_len })
}

/// Prefix plus `suffix` and the first stop token, as in training (the processor's `suffix=`).
pub fn with_suffix(
    tok: &Tokenizer,
    cfg: &PaliGemmaConfig,
    prompt: &str,
    n_images: usize,
    suffix: &str,
) -> Result<Sequence> {
    let mut seq = prefix(tok, cfg, prompt, n_images)?;
    seq.ids.extend(tok.encode(suffix)?);
    seq.ids.push(cfg.eos_token_ids[0]);
    Ok(seq)
}

/// Errors out, rather than truncating, when `len + extra` exceeds the decoder's positions.
pub fn check_length(cfg: &PaliGemmaConfig, len: usize, extra: usize) -> Result<()> {
    let max = cfg.text.max_position_embeddings;
    if len + extra > max {
        bail!(
            "the input is {len} tokens{}, more than the model's {max} positions; shorten the prompt, use fewer images{}",
            if extra > 0 {
                format!(" plus {extra} new tokens")
            } else {
                String::new()
            },
            if extra > 0 {
                " or lower --max-new-tokens"
            } else {
                ""
            }
        );
    }
    Ok(())
}
