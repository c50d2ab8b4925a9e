//! LoRA (`--train lora`): low-rank adapters on the decoder's linear layers, saved in PEFT's
//! layout.
//!
//! - Targets: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj` of
//!   every `language_model` layer (PEFT's usual Gemma set; the vision tower and the projector
//!   get none). In `adapter_config.json` they are written as a regex over module names,
//!   because PEFT's plain list would also match the vision tower's `q_proj`/`k_proj`/`v_proj`.
//! - `y = W x + (alpha / r) · B (A x)`, A `[r, in]`, B `[out, r]`, dropout 0, no bias; the base
//!   weights stay plain tensors (only the input's gradient flows through them).
//! - Initialisation as PEFT's default: B = 0 and A Kaiming-uniform with `a = √5`, i.e.
//!   uniform in `±1/√in`, drawn from a seeded generator (splitmix64, `--seed`), so values
//!   differ from torch's but the distribution is the same.
//! - Names: the Hub module `language_model.model.layers.{i}.…` is
//!   `model.language_model.layers.{i}.…` in transformers 5's in-memory model, and PEFT saves
//!   `base_model.model.{that}.lora_A.weight` / `.lora_B.weight`.

use crate::ops::linear::{Linear, LoraAdapter};
use crate::paligemma::PaliGemma;
use crate::train::params::Param;
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor, Var};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

pub const ADAPTER_FILE: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// The modules adapted, by their last name component.
pub const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// PEFT's `target_modules` as a regex (full match over module names).
pub const TARGET_REGEX: &str =
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)";

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub seed: u64,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// The PEFT key of a Hub-named adapter tensor
/// (`language_model.model.layers.0.self_attn.q_proj.lora_A.weight` →
/// `base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight`).
pub fn peft_name(hub: &str) -> String {
    match hub.strip_prefix("language_model.model.") {
        Some(rest) => format!("base_model.model.model.language_model.{rest}"),
        None => format!("base_model.model.{hub}"),
    }
}

/// The Hub name of a PEFT key; the inverse of [`peft_name`].
pub fn hub_name(peft: &str) -> Option<String> {
    let rest = peft.strip_prefix("base_model.model.")?;
    Some(match rest.strip_prefix("model.language_model.") {
        Some(r) => format!("language_model.model.{r}"),
        None => rest.to_string(),
    })
}

fn is_adapter(name: &str) -> bool {
    name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight")
}

struct SplitMix(u64);

impl SplitMix {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Attaches fresh adapters (A Kaiming-uniform, B zero) to every target layer.
pub fn attach(model: &mut PaliGemma, cfg: LoraConfig) -> Result<()> {
    if cfg.rank == 0 {
        bail!("--rank must be at least 1");
    }
    if !(cfg.alpha.is_finite() && cfg.alpha > 0.0) {
        bail!("--lora-alpha must be a finite number > 0");
    }
    let mut rng = SplitMix(cfg.seed ^ 0x4C6F_5241);
    model.visit_decoder_linears_mut(&mut |_, lin: &mut Linear| {
        let (i, o, r) = (lin.in_features(), lin.out_features(), cfg.rank);
        let bound = 1.0 / (i as f32).sqrt();
        let a: Vec<f32> = (0..r * i)
            .map(|_| (rng.next_f32() * 2.0 - 1.0) * bound)
            .collect();
        let a = Tensor::from_vec(a, (r, i), &Device::Cpu)?;
        let b = Tensor::zeros((o, r), candle_core::DType::F32, &Device::Cpu)?;
        lin.set_lora(Some(LoraAdapter {
            a,
            b,
            scale: cfg.scale(),
        }))
    })?;
    Ok(())
}

/// Attaches adapters with given values: `tensors` by PEFT key (as in `adapter_model.safetensors`),
/// every target layer must have its A and B.
pub fn attach_values(
    model: &mut PaliGemma,
    tensors: &HashMap<String, Tensor>,
    scale: f64,
) -> Result<()> {
    let mut used = 0;
    model.visit_decoder_linears_mut(&mut |name: &str, lin: &mut Linear| {
        let get = |which: &str| {
            let key = peft_name(&format!("{name}.{which}.weight"));
            tensors
                .get(&key)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg(format!("the adapter has no {key}")))
        };
        let (a, b) = (get("lora_A")?, get("lora_B")?);
        used += 2;
        lin.set_lora(Some(LoraAdapter {
            a: a.to_dtype(candle_core::DType::F32)?,
            b: b.to_dtype(candle_core::DType::F32)?,
            scale,
        }))
    })?;
    if used != tensors.len() {
        bail!(
            "the adapter holds {} tensors but the model's target layers use {used}",
            tensors.len()
        );
    }
    Ok(())
}

/// Turns every adapter's A and B into variables (the trained parameters, Hub-named, in the
/// model's order); nothing else trains.
pub fn make_trainable(model: &mut PaliGemma) -> Result<Vec<Param>> {
    let mut params = Vec::new();
    model.visit_params_mut(&mut |name: &str, t: &mut Tensor| {
        if is_adapter(name) {
            let var = Var::from_tensor(t)?;
            *t = var.as_tensor().clone();
            params.push(Param {
                name: name.to_string(),
                var,
            });
        }
        Ok(())
    })?;
    if params.is_empty() {
        bail!("the model has no LoRA adapter");
    }
    Ok(params)
}

/// Folds every adapter into its weight (`W + (alpha/r) · B A`) and removes it.
pub fn merge(model: &mut PaliGemma) -> Result<()> {
    model.visit_decoder_linears_mut(&mut |_, lin: &mut Linear| lin.merge_lora())?;
    Ok(())
}

/// Writes `adapter_model.safetensors` (f32, PEFT keys, the training `step` in its metadata) and
/// `adapter_config.json` into `dir`.
pub fn save_adapter(
    model: &mut PaliGemma,
    cfg: LoraConfig,
    base: &str,
    dir: &Path,
    step: usize,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    model.visit_params_mut(&mut |name: &str, t: &mut Tensor| {
        if is_adapter(name) {
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            tensors.push((peft_name(name), t.dims().to_vec(), bytes));
        }
        Ok(())
    })?;
    if tensors.is_empty() {
        bail!("the model has no LoRA adapter to save");
    }
    let views = tensors
        .iter()
        .map(|(n, s, b)| Ok((n.as_str(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("step".to_string(), step.to_string()),
    ]);
    // Sorted, so that a resumed run writes the same bytes as a straight one.
    let bytes =
        crate::train::checkpoint::sorted_header(safetensors::serialize(views, Some(meta))?)?;
    write(dir, ADAPTER_FILE, &bytes)?;
    let config = json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": base,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": TARGET_REGEX,
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "inference_mode": true,
        "modules_to_save": null,
    });
    write(
        dir,
        ADAPTER_CONFIG,
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(name))
        .with_context(|| format!("cannot move {} into place", tmp.display()))?;
    Ok(())
}

/// Reads a PEFT adapter folder: its tensors by key and `lora_alpha / r`.
pub fn load_adapter(dir: &Path) -> Result<(HashMap<String, Tensor>, f64)> {
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(ADAPTER_CONFIG))
            .with_context(|| format!("cannot read {}", dir.join(ADAPTER_CONFIG).display()))?,
    )?;
    if cfg["peft_type"] != "LORA" {
        bail!("{} is not a LoRA adapter", dir.display());
    }
    let r = cfg["r"].as_f64().context("adapter_config.json has no r")?;
    let alpha = cfg["lora_alpha"]
        .as_f64()
        .context("adapter_config.json has no lora_alpha")?;
    if cfg["use_rslora"].as_bool() == Some(true) || cfg["use_dora"].as_bool() == Some(true) {
        bail!("rsLoRA and DoRA adapters are not supported");
    }
    let tensors = candle_core::safetensors::load(dir.join(ADAPTER_FILE), &Device::Cpu)?;
    Ok((tensors, alpha / r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let hub = "language_model.model.layers.3.mlp.down_proj.lora_B.weight";
        let p = peft_name(hub);
        assert_eq!(
            p,
            "base_model.model.model.language_model.layers.3.mlp.down_proj.lora_B.weight"
        );
        assert_eq!(hub_name(&p).unwrap(), hub);
    }
}
