//! Random initial weights from a configuration alone, for training a model from scratch
//! (`paligemma train --init DIR`, how the demo model is made).
//!
//! [`parameters`] lists every tensor a PaliGemma of a given configuration has, under its Hub
//! name, with its shape and how it starts:
//!
//! | tensors | start | why |
//! |---|---|---|
//! | linear and convolution weights, token embeddings | normal, std `initializer_range` (0.02) | transformers' `PaliGemmaPreTrainedModel._init_weights` |
//! | SigLIP position embeddings | normal, std `1/√hidden` | transformers' SigLIP init: positions must be visible next to patch contents from the first step |
//! | biases | 0 | |
//! | SigLIP LayerNorm weights | 1 | identity |
//! | Gemma RMSNorm weights | 0 | Gemma scales by `1 + w`, so 0 is the identity |
//!
//! Numbers come from the seeded [`SplitMix64`] (normals by Box–Muller), so a seed gives the
//! same model on every platform up to the last bit of `ln`/`cos`.

use crate::checkpoint::ModelFiles;
use crate::config::{GemmaVersion, PaliGemmaConfig};
use crate::ops::linear::WeightFormat;
use crate::paligemma::PaliGemma;
use crate::shapes::SplitMix64;
use crate::weights::WeightStore;
use anyhow::Result;
use candle_core::Device;
use safetensors::Dtype;

/// transformers' default `initializer_range` for PaliGemma.
pub const INITIALIZER_RANGE: f32 = 0.02;

/// How a tensor starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Start {
    Normal { std: f32 },
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
    add(
        format!("{p}.embeddings.patch_embedding.weight"),
        vec![d, v.num_channels, v.patch_size, v.patch_size],
        normal,
    );
    add(
        format!("{p}.embeddings.patch_embedding.bias"),
        vec![d],
        Start::Zeros,
    );
    add(
        format!("{p}.embeddings.position_embedding.weight"),
        vec![patches, d],
        Start::Normal {
            std: 1.0 / (d as f32).sqrt(),
        },
    );
    let linear = |add: &mut dyn FnMut(String, Vec<usize>, Start), name: String, i, o| {
        add(format!("{name}.weight"), vec![o, i], normal);
        add(format!("{name}.bias"), vec![o], Start::Zeros);
    };
    for l in 0..v.num_hidden_layers {
        let l = format!("{p}.encoder.layers.{l}");
        for norm in ["layer_norm1", "layer_norm2"] {
            add(format!("{l}.{norm}.weight"), vec![d], Start::Ones);
            add(format!("{l}.{norm}.bias"), vec![d], Start::Zeros);
        }
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            linear(&mut add, format!("{l}.self_attn.{proj}"), d, d);
        }
        linear(&mut add, format!("{l}.mlp.fc1"), d, v.intermediate_size);
        linear(&mut add, format!("{l}.mlp.fc2"), v.intermediate_size, d);
    }
    add(format!("{p}.post_layernorm.weight"), vec![d], Start::Ones);
    add(format!("{p}.post_layernorm.bias"), vec![d], Start::Zeros);
    linear(
        &mut add,
        "multi_modal_projector.linear".into(),
        d,
        config.projection_dim,
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
        for (proj, i, o) in [
            ("self_attn.q_proj", h, q),
            ("self_attn.k_proj", h, kv),
            ("self_attn.v_proj", h, kv),
            ("self_attn.o_proj", q, h),
            ("mlp.gate_proj", h, t.intermediate_size),
            ("mlp.up_proj", h, t.intermediate_size),
            ("mlp.down_proj", t.intermediate_size, h),
        ] {
            add(format!("{l}.{proj}.weight"), vec![o, i], normal);
        }
    }
    add(format!("{p}.norm.weight"), vec![h], Start::Zeros);
    out
}

/// A store holding freshly initialised f32 weights for `config`, drawn with `seed`.
pub fn random_weights(config: &PaliGemmaConfig, seed: u64) -> Result<WeightStore> {
    let mut rng = SplitMix64::new(seed);
    let tensors = parameters(config)
        .into_iter()
        .map(|p| {
            let n: usize = p.shape.iter().product();
            let values: Vec<f32> = match p.start {
                Start::Zeros => vec![0.0; n],
                Start::Ones => vec![1.0; n],
                Start::Normal { std } => (0..n).map(|_| std * standard_normal(&mut rng)).collect(),
            };
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (p.name, Dtype::F32, p.shape, bytes)
        })
        .collect();
    Ok(WeightStore::from_owned(tensors)?)
}

/// A model for the configuration in `files` (see [`PaliGemma::load_config`]) with random f32
/// weights drawn with `seed`.
pub fn random_model(files: &ModelFiles, seed: u64, device: &Device) -> Result<PaliGemma> {
    let config = PaliGemma::load_config(files)?;
    let store = random_weights(&config, seed)?;
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
