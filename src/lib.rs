//! paligemma: PaliGemma 1 and 2 in Rust.
//!
//! The modules follow the pipeline: image → patches → SigLIP → projector → Gemma (prefix-LM)
//! → decoding → task parsing.
//!
//! - loading: [`checkpoint`] (which files), [`hub`] (download), [`config`], [`weights`],
//!   [`npz`] and [`big_vision`] (Google's original `.npz` checkpoints)
//! - input: [`image`] (decode), [`resize`] (Pillow bicubic), [`preprocess`], [`video`],
//!   [`tokenizer`], [`task`] (task prompts), [`prompt`] (token layout)
//! - model: [`siglip`], [`gemma`], [`attention_mask`], [`kv_cache`], [`paligemma`], [`ops`]
//! - output: [`generate`], [`sampling`], [`score`], [`parse`] (boxes), [`vqvae`] and [`mask`]
//!   (segmentation masks), [`annotate`] (pictures)
//! - data: [`shapes`] (a synthetic dataset for fine-tuning) and [`eval`] (held-out scores on it)
//! - fine-tuning: [`train`] (trained parameters, loss, AdamW), [`ops::autodiff`] (gradients of
//!   the fused kernels)

pub mod annotate;
pub mod attention_mask;
pub mod big_vision;
pub mod checkpoint;
pub mod config;
pub mod demo;
pub mod eval;
pub mod gemma;
pub mod generate;
pub mod hub;
pub mod image;
pub mod kv_cache;
pub mod mask;
pub mod npz;
pub mod ops;
pub mod paligemma;
pub mod parse;
pub mod preprocess;
pub mod prompt;
pub mod quantize;
pub mod resize;
pub mod sampling;
pub mod score;
pub mod serve;
pub mod shapes;
pub mod siglip;
pub mod task;
pub mod tokenizer;
pub mod train;
pub mod video;
pub mod vqvae;
pub mod weights;
