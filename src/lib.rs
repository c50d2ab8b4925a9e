//! paligemma: PaliGemma 1 and 2 in Rust.
//!
//! The modules follow the pipeline: image → patches → SigLIP → projector → Gemma (prefix-LM)
//! → decoding.
//!
//! - loading: [`checkpoint`] (which files), [`hub`] (download), [`config`], [`weights`]
//! - input: [`image`] (decode), [`resize`] (Pillow bicubic), [`preprocess`], [`tokenizer`],
//!   [`prompt`] (token layout)
//! - model: [`siglip`], [`gemma`], [`attention_mask`], [`kv_cache`], [`paligemma`], [`ops`]
//! - output: [`generate`], [`sampling`], [`score`]

pub mod attention_mask;
pub mod checkpoint;
pub mod config;
pub mod gemma;
pub mod generate;
pub mod hub;
pub mod image;
pub mod kv_cache;
pub mod ops;
pub mod paligemma;
pub mod preprocess;
pub mod prompt;
pub mod resize;
pub mod sampling;
pub mod score;
pub mod siglip;
pub mod tokenizer;
pub mod weights;
