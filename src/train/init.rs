//! Random initial weights from a configuration alone, for training a model from scratch
//! (`paligemma train --init DIR`, how the demo model is made).
//!
//! [`parameters`] lists every tensor a PaliGemma of a given configuration has, under its Hub
//! name, with its shape and how it starts:
//!
//! | tensors | start | why |
//! |---|---|---|
//! | linear and convolution weights, token embeddings | normal, std `initializer_range` (0.02) | transformers' `PaliGemmaPreTrainedModel._init_weights` |
//! | the last projection of every residual branch: SigLIP `out_proj` and `fc2`, Gemma `o_proj` and `down_proj` | 0 | each block starts as the identity, so the image reaches the decoder unblurred (see below) |
//! | SigLIP patch embedding | normal, std `1/√fan_in` (LeCun, as SigLIP) | patch contents of unit scale |
//! | SigLIP position embeddings | a 2-D sine/cosine code of the patch's place ([`grid_code`]), std 0.5 | positions about as visible as patch contents, near patches near vectors: detection needs them |
//! | projector weight | normal, std `0.02·h/√d` (`h` text hidden, `d` vision hidden) | image tokens reach the decoder at the scale of text embeddings (see below) |
//! | biases | 0 | |
//! | SigLIP LayerNorm weights | 1 | identity |
//! | Gemma RMSNorm weights | 0 | Gemma scales by `1 + w`, so 0 is the identity |
//! | embeddings of `<loc0000>`..`<loc1023>` (when the tokenizer has them) | a smooth code of the bin's value, same scale | see below |
//!
//! The 1024 location tokens are ordered values, but normal random rows make them 1024
//! unrelated classes that a model from scratch must learn one by one (each seen a few dozen
//! times in a small run). Starting each row as a multi-frequency sine/cosine code of `bin/1023`
//! (like a Transformer position encoding) makes near bins near vectors, through the tied output
//! head too, so what is learned for one bin carries to its neighbours.
//!
//! Why the zero branches: with every block adding a random mixture of all tokens, a fresh
//! encoder's output is dominated by what all patches share, and images differ by a few percent
//! of it; a small model from scratch then learns to answer from the text prior and ignore the
//! image (what happened to the first demo model runs). Zero branches (as in ReZero, Fixup and
//! many LLM recipes) start the encoder at `LayerNorm(patch + position)`, where images and
//! positions differ plainly, and the branches still get gradients from the first step.
//!
//! Numbers come from the seeded [`SplitMix64`] (normals by Box–Muller), so a seed gives the
//! same model on every platform up to the last bit of `ln`/`cos`.

use crate::checkpoint::ModelFiles;
use crate::config::{GemmaVersion, PaliGemmaConfig};
use crate::ops::linear::WeightFormat;
use crate::paligemma::PaliGemma;
use crate::shapes::SplitMix64;
use crate::tokenizer::{LOC_BINS, Tokenizer};
use crate::weights::WeightStore;
use anyhow::Result;
use candle_core::Device;
use safetensors::Dtype;

/// transformers' default `initializer_range` for PaliGemma.
pub const INITIALIZER_RANGE: f32 = 0.02;

/// How a tensor starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Start {
    Normal {
        std: f32,
    },
    /// Rows of a `side`×`side` patch grid (row-major) as [`grid_code`]s.
    GridCode {
        side: usize,
    },
    Zeros,
    Ones,
}

/// One tensor of the model: Hub name, shape, start.
#[derive(Debug, Clone, PartialEq)]
pub struct Parameter {
    pub name: String,
    pub shape: Vec<usize>,
    pub start: Start,
}

/// Every tensor of a model with this configuration, vision tower first, in a fixed order.
pub fn parameters(config: &PaliGemmaConfig) -> Vec<Parameter> {
    let mut out = Vec::new();
    let mut add =
        |name: String, shape: Vec<usize>, start: Start| out.push(Parameter { name, shape, start });
    let normal = Start::Normal {
        std: INITIALIZER_RANGE,
    };

    let v = &config.vision;
    let d = v.hidden_size;
    let p = "vision_tower.vision_model";
    let patches = (v.image_size / v.patch_size).pow(2);
    let fan_in = v.num_channels * v.patch_size * v.patch_size;
    add(
        format!("{p}.embeddings.patch_embedding.weight"),
        vec![d, v.num_channels, v.patch_size, v.patch_size],
        Start::Normal {
            std: 1.0 / (fan_in as f32).sqrt(),
        },
    );
    add(
        format!("{p}.embeddings.patch_embedding.bias"),
        vec![d],
        Start::Zeros,
    );
    add(
        format!("{p}.embeddings.position_embedding.weight"),
        vec![patches, d],
        Start::GridCode {
            side: v.image_size / v.patch_size,
        },
    );
    let linear = |add: &mut dyn FnMut(String, Vec<usize>, Start), name: String, i, o, w| {
        add(format!("{name}.weight"), vec![o, i], w);
        add(format!("{name}.bias"), vec![o], Start::Zeros);
    };
    for l in 0..v.num_hidden_layers {
        let l = format!("{p}.encoder.layers.{l}");
        for norm in ["layer_norm1", "layer_norm2"] {
            add(format!("{l}.{norm}.weight"), vec![d], Start::Ones);
            add(format!("{l}.{norm}.bias"), vec![d], Start::Zeros);
        }
        for proj in ["q_proj", "k_proj", "v_proj"] {
            linear(&mut add, format!("{l}.self_attn.{proj}"), d, d, normal);
        }
        linear(
            &mut add,
            format!("{l}.self_attn.out_proj"),
            d,
            d,
            Start::Zeros,
        );
        linear(
            &mut add,
            format!("{l}.mlp.fc1"),
            d,
            v.intermediate_size,
            normal,
        );
        linear(
            &mut add,
            format!("{l}.mlp.fc2"),
            v.intermediate_size,
            d,
            Start::Zeros,
        );
    }
    add(format!("{p}.post_layernorm.weight"), vec![d], Start::Ones);
    add(format!("{p}.post_layernorm.bias"), vec![d], Start::Zeros);
    // PaliGemma divides image features by √(text hidden) where text embeddings are multiplied
    // by it; a 0.02 projector would make image tokens ~√h·√h/√d times smaller than text tokens
    // in the decoder's residual stream (17× for the demo), and the first attention outputs
    // would drown them. This std gives image and text tokens the same scale.
    let text_hidden = config.text.hidden_size as f32;
    linear(
        &mut add,
        "multi_modal_projector.linear".into(),
        d,
        config.projection_dim,
        Start::Normal {
            std: INITIALIZER_RANGE * text_hidden / (d as f32).sqrt(),
        },
    );

    let t = &config.text;
    let h = t.hidden_size;
    let p = "language_model.model";
    add(
        format!("{p}.embed_tokens.weight"),
        vec![t.vocab_size, h],
        normal,
    );
    let mut norms = vec!["input_layernorm", "post_attention_layernorm"];
    if t.version == GemmaVersion::Gemma2 {
        norms.extend(["pre_feedforward_layernorm", "post_feedforward_layernorm"]);
    }
    let (q, kv) = (
        t.num_attention_heads * t.head_dim,
        t.num_key_value_heads * t.head_dim,
    );
    for l in 0..t.num_hidden_layers {
        let l = format!("{p}.layers.{l}");
        for norm in &norms {
            add(format!("{l}.{norm}.weight"), vec![h], Start::Zeros);
        }
        for (proj, i, o, start) in [
            ("self_attn.q_proj", h, q, normal),
            ("self_attn.k_proj", h, kv, normal),
            ("self_attn.v_proj", h, kv, normal),
            ("self_attn.o_proj", q, h, Start::Zeros),
            ("mlp.gate_proj", h, t.intermediate_size, normal),
            ("mlp.up_proj", h, t.intermediate_size, normal),
            ("mlp.down_proj", t.intermediate_size, h, Start::Zeros),
        ] {
            add(format!("{l}.{proj}.weight"), vec![o, i], start);
        }
    }
    add(format!("{p}.norm.weight"), vec![h], Start::Zeros);
    out
}

/// A store holding freshly initialised f32 weights for `config`, drawn with `seed`; when
/// `first_loc` is the id of `<loc0000>` (followed by the other 1023), those embedding rows
/// start as [`loc_code`]s.
pub fn random_weights(
    config: &PaliGemmaConfig,
    seed: u64,
    first_loc: Option<u32>,
) -> Result<WeightStore> {
    let mut rng = SplitMix64::new(seed);
    let embed = "language_model.model.embed_tokens.weight";
    let tensors = parameters(config)
        .into_iter()
        .map(|p| {
            let n: usize = p.shape.iter().product();
            let mut values: Vec<f32> = match p.start {
                Start::Zeros => vec![0.0; n],
                Start::Ones => vec![1.0; n],
                Start::Normal { std } => (0..n).map(|_| std * standard_normal(&mut rng)).collect(),
                Start::GridCode { side } => {
                    let d = p.shape[1];
                    (0..side * side)
                        .flat_map(|i| grid_code(i % side, i / side, side, d))
                        .collect()
                }
            };
            if let (true, Some(first)) = (p.name == embed, first_loc) {
                let h = p.shape[1];
                for bin in 0..LOC_BINS {
                    let row = (first + bin) as usize * h;
                    if row + h <= values.len() {
                        values[row..row + h].copy_from_slice(&loc_code(bin, h));
                    }
                }
            }
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (p.name, Dtype::F32, p.shape, bytes)
        })
        .collect();
    Ok(WeightStore::from_owned(tensors)?)
}

/// The starting embedding of `<loc{bin}>`: `[sin(ω_k·t), cos(ω_k·t)]` pairs of `t = bin/1023`,
/// with `ω_k = π·256^(k/(K−1))` for `K = hidden/2` frequencies (wavelengths from twice the
/// range down to about 8 bins), scaled to the per-value std of the other rows.
pub fn loc_code(bin: u32, hidden: usize) -> Vec<f32> {
    let t = f64::from(bin) / f64::from(LOC_BINS - 1);
    let pairs = hidden / 2;
    let scale = f64::from(INITIALIZER_RANGE) * std::f64::consts::SQRT_2;
    let mut row = vec![0.0f32; hidden];
    for k in 0..pairs {
        let w = std::f64::consts::PI * 256f64.powf(k as f64 / (pairs.max(2) - 1) as f64);
        row[2 * k] = (scale * (w * t).sin()) as f32;
        row[2 * k + 1] = (scale * (w * t).cos()) as f32;
    }
    row
}

/// Per-value std of the starting position embeddings: positions about as visible as patch
/// contents, which detection needs.
pub const POSITION_STD: f64 = 0.5;

/// The starting position embedding of the patch in column `x`, row `y` of a `side`×`side`
/// grid: for `K = dim/4` frequencies `ω_k = π·side^(k/(K−1))` (wavelengths from twice the image
/// down to two patches), `[sin ω_k·u, cos ω_k·u, sin ω_k·v, cos ω_k·v]` of the patch centre
/// `(u, v)` in `[0, 1]²`, scaled to per-value std [`POSITION_STD`] (big_vision's `sincos2d`
/// idea with wavelengths fitted to the grid). Neighbouring patches start with similar vectors,
/// so what is learned about one position carries to the next; dimensions past `4K` are 0.
pub fn grid_code(x: usize, y: usize, side: usize, dim: usize) -> Vec<f32> {
    let quads = dim / 4;
    let scale = POSITION_STD * std::f64::consts::SQRT_2;
    let centre = |i: usize| (i as f64 + 0.5) / side as f64;
    let (u, v) = (centre(x), centre(y));
    let mut row = vec![0.0f32; dim];
    for k in 0..quads {
        let w = std::f64::consts::PI * (side as f64).powf(k as f64 / (quads.max(2) - 1) as f64);
        row[4 * k] = (scale * (w * u).sin()) as f32;
        row[4 * k + 1] = (scale * (w * u).cos()) as f32;
        row[4 * k + 2] = (scale * (w * v).sin()) as f32;
        row[4 * k + 3] = (scale * (w * v).cos()) as f32;
    }
    row
}

/// A model for the configuration in `files` (see [`PaliGemma::load_config`]) with random f32
/// weights drawn with `seed` (location tokens coded as in [`random_weights`] when the
/// tokenizer has all 1024 in a row).
pub fn random_model(files: &ModelFiles, seed: u64, device: &Device) -> Result<PaliGemma> {
    let config = PaliGemma::load_config(files)?;
    let tokenizer = Tokenizer::from_file(&files.tokenizer)?;
    let first_loc = tokenizer.token_id("<loc0000>").filter(|&first| {
        (0..LOC_BINS).all(|b| tokenizer.token_id(&format!("<loc{b:04}>")) == Some(first + b))
    });
    let store = random_weights(&config, seed, first_loc)?;
    PaliGemma::from_store(config, &store, WeightFormat::F32, device)
}

/// One draw of N(0, 1) by the Box–Muller transform (the cosine half; the sine half is dropped
/// to keep the generator's state a function of the count of draws only).
fn standard_normal(rng: &mut SplitMix64) -> f32 {
    // 53-bit uniforms in (0, 1]: never 0, so the logarithm is finite.
    let u1 = ((rng.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
    let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_bins_get_near_codes() {
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let code = |b| loc_code(b, 192);
        let norm = dot(&code(500), &code(500));
        let cos = |a, b| dot(&code(a), &code(b)) / norm;
        // Every row has the same norm: sin² + cos² per pair.
        assert!((dot(&code(0), &code(0)) - norm).abs() < 1e-6);
        assert!(cos(500, 501) > 0.95, "{}", cos(500, 501));
        assert!(cos(500, 510) > cos(500, 530));
        assert!(cos(500, 530) > cos(500, 900));
        assert!(cos(500, 900).abs() < 0.2, "{}", cos(500, 900));
        // Per-value std as the normal rows': 0.02.
        let std = (norm / 192.0).sqrt();
        assert!((std - 0.02).abs() < 1e-4, "{std}");
    }

    #[test]
    fn near_patches_get_near_codes() {
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let code = |x, y| grid_code(x, y, 8, 128);
        let norm = dot(&code(3, 3), &code(3, 3));
        let cos =
            |a: (usize, usize), b: (usize, usize)| dot(&code(a.0, a.1), &code(b.0, b.1)) / norm;
        assert!((dot(&code(0, 7), &code(0, 7)) - norm).abs() < 1e-4);
        assert!(cos((3, 3), (4, 3)) > cos((3, 3), (6, 3)));
        assert!(cos((3, 3), (3, 4)) > cos((3, 3), (3, 7)));
        // Moving along x and along y changes different halves of each quadruple equally.
        assert!((cos((3, 3), (4, 3)) - cos((3, 3), (3, 4))).abs() < 1e-5);
        let std = (f64::from(norm) / 128.0).sqrt();
        assert!((std - POSITION_STD).abs() < 1e-4, "{std}");
        // Dimensions past the last whole quadruple stay zero.
        assert_eq!(grid_code(1, 2, 8, 130)[128..], [0.0, 0.0]);
    }

    #[test]
    fn normals_have_unit_moments() {
        let mut rng = SplitMix64::new(7);
        let xs: Vec<f64> = (0..200_000)
            .map(|_| f64::from(standard_normal(&mut rng)))
            .collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
        assert!(xs.iter().all(|x| x.is_finite()));
    }
}
