//! Saving a fine-tuned model as a Hub-layout folder (loadable here and by transformers) and
//! the trainer's state next to it, so that a run can resume exactly.
//!
//! - `model.safetensors`: every parameter in f32 under its Hub name, straight from the model
//!   (the patch embedding back in its `[hidden, 3, p, p]` convolution shape), with metadata
//!   `format: pt` (transformers requires it) and `step`.
//! - `trainer_state.safetensors`: AdamW's moments, `{name}.exp_avg` and `{name}.exp_avg_sq`,
//!   with `step` in the metadata.
//! - `trainer_state.json`: [`TrainerState`], written last.
//!
//! Every file is written to a temporary name and renamed, so a crash never leaves a truncated
//! file; the `step` stored in all three is checked on resume, which catches a crash between
//! the renames.

use crate::paligemma::PaliGemma;
use crate::train::data::Cursor;
use crate::train::optim::{AdamW, Moments};
use anyhow::{Context, Result, bail};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

pub const MODEL_FILE: &str = "model.safetensors";
pub const STATE_FILE: &str = "trainer_state.safetensors";
pub const STATE_JSON: &str = "trainer_state.json";

/// Files copied unchanged from the source checkpoint (those it has).
const COPIED: [&str; 6] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "generation_config.json",
];

/// Everything besides tensors that a resumed run needs, and the settings it must share with
/// the interrupted one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: usize,
    /// Where the example stream stands (epoch, position in its permutation).
    pub data: Cursor,
    pub settings: Settings,
    /// Each trained parameter's own AdamW step count, in the optimizer's order.
    pub param_steps: Vec<u64>,
}

/// The flags that determine a run's result: a resumed run must be given the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub train: String,
    pub seed: u64,
    pub dataset_size: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub total_steps: usize,
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
}

impl Settings {
    /// Names the first setting that differs from the saved run's.
    pub fn check_same(&self, saved: &Settings) -> Result<()> {
        let ours = serde_json::to_value(self)?;
        let theirs = serde_json::to_value(saved)?;
        if let (Some(a), Some(b)) = (ours.as_object(), theirs.as_object()) {
            for (k, v) in a {
                if b.get(k) != Some(v) {
                    bail!(
                        "cannot resume: {k} is {v} but the saved run used {}; resume with the \
                         interrupted run's flags",
                        b.get(k).cloned().unwrap_or_default()
                    );
                }
            }
        }
        Ok(())
    }
}

/// Writes `bytes` to `dir/name` through a temporary file and a rename.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(name))
        .with_context(|| format!("cannot move {} into place", tmp.display()))?;
    Ok(())
}

/// Copies the source checkpoint's configuration and tokenizer files into `dir`.
pub fn copy_model_files(src: &Path, dir: &Path) -> Result<()> {
    for name in COPIED {
        let from = src.join(name);
        if from.is_file() {
            let bytes =
                std::fs::read(&from).with_context(|| format!("cannot read {}", from.display()))?;
            write_atomic(dir, name, &bytes)?;
        }
    }
    Ok(())
}

/// A tensor to write: Hub name, shape, little-endian f32 bytes.
pub type NamedBytes = (String, Vec<usize>, Vec<u8>);

/// Every parameter of `model` as (Hub name, shape, little-endian f32 bytes), in the model's
/// order. Takes `&mut` only because the visitor may replace tensors; this one does not.
pub fn model_tensors(model: &mut PaliGemma) -> Result<Vec<NamedBytes>> {
    let v = &model.config.vision;
    let conv = [v.hidden_size, v.num_channels, v.patch_size, v.patch_size];
    let mut out = Vec::new();
    model.visit_params_mut(&mut |name: &str, t: &mut candle_core::Tensor| {
        let shape = if name == "vision_tower.vision_model.embeddings.patch_embedding.weight" {
            conv.to_vec()
        } else {
            t.dims().to_vec()
        };
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        out.push((name.to_string(), shape, f32_bytes(&values)));
        Ok(())
    })?;
    Ok(out)
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn bytes_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn serialize(tensors: &[NamedBytes], step: usize) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            Ok((
                name.as_str(),
                TensorView::new(Dtype::F32, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("step".to_string(), step.to_string()),
    ]);
    sorted_header(safetensors::serialize(views, Some(meta))?)
}

/// The same file with its JSON header's keys in sorted order: safetensors writes the metadata
/// in hash-map order, which varies between processes, and a resumed run must give the same
/// bytes as a straight one. Reordering keeps the header's (space-padded) length.
pub(crate) fn sorted_header(mut bytes: Vec<u8>) -> Result<Vec<u8>> {
    let n = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n])?;
    let mut sorted = serde_json::to_vec(&header)?;
    if sorted.len() > n {
        bail!("safetensors header grew when sorted");
    }
    sorted.resize(n, b' ');
    bytes[8..8 + n].copy_from_slice(&sorted);
    Ok(bytes)
}

/// Saves the model and the configuration files: the folder is then a checkpoint by itself.
pub fn save_model(model: &mut PaliGemma, src: &Path, dir: &Path, step: usize) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    copy_model_files(src, dir)?;
    write_atomic(dir, MODEL_FILE, &serialize(&model_tensors(model)?, step)?)
}

/// Saves the model, the optimizer's moments and `state` (the JSON last).
pub fn save(
    model: &mut PaliGemma,
    opt: &AdamW,
    state: &TrainerState,
    src: &Path,
    dir: &Path,
) -> Result<()> {
    save_model(model, src, dir, state.step)?;
    save_state(opt, state, dir)
}

/// Saves the optimizer's moments and `state` (the JSON last), after the trained weights.
pub fn save_state(opt: &AdamW, state: &TrainerState, dir: &Path) -> Result<()> {
    let mut tensors = Vec::new();
    for (p, m) in opt.params().iter().zip(opt.moments()) {
        let shape = p.var.dims().to_vec();
        tensors.push((
            format!("{}.exp_avg", p.name),
            shape.clone(),
            f32_bytes(&m.m),
        ));
        tensors.push((format!("{}.exp_avg_sq", p.name), shape, f32_bytes(&m.v)));
    }
    write_atomic(dir, STATE_FILE, &serialize(&tensors, state.step)?)?;
    write_atomic(
        dir,
        STATE_JSON,
        serde_json::to_string_pretty(state)?.as_bytes(),
    )
}

/// Whether `dir` holds a trainer state to resume from.
pub fn has_state(dir: &Path) -> bool {
    dir.join(STATE_JSON).is_file()
}

/// Reads `dir`'s trainer state and checks the tensor files (the moments and `weights`, the
/// trained weights' file) were saved at the same step.
pub fn load_state(dir: &Path, weights: &str) -> Result<(TrainerState, Vec<u8>)> {
    let path = dir.join(STATE_JSON);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let state: TrainerState = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a trainer state", path.display()))?;
    let moments = std::fs::read(dir.join(STATE_FILE))
        .with_context(|| format!("cannot read {}", dir.join(STATE_FILE).display()))?;
    for (name, bytes) in [
        (STATE_FILE, moments.as_slice()),
        (weights, &std::fs::read(dir.join(weights))?[..]),
    ] {
        let step = saved_step(bytes).with_context(|| format!("{}", dir.join(name).display()))?;
        if step != Some(state.step) {
            bail!(
                "{} was saved at step {step:?} but {STATE_JSON} at step {}: the save was \
                 interrupted; restore the folder from a backup",
                dir.join(name).display(),
                state.step
            );
        }
    }
    Ok((state, moments))
}

fn saved_step(bytes: &[u8]) -> Result<Option<usize>> {
    let (_, meta) = SafeTensors::read_metadata(bytes)?;
    Ok(meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse().ok()))
}

/// Puts the saved moments and step counts into `opt`.
pub fn restore_optimizer(opt: &mut AdamW, state: &TrainerState, moments: &[u8]) -> Result<()> {
    let st = SafeTensors::deserialize(moments)?;
    if state.param_steps.len() != opt.params().len() {
        bail!(
            "the saved optimizer trains {} parameters, this run {}",
            state.param_steps.len(),
            opt.params().len()
        );
    }
    let read = |name: &str| -> Result<Vec<f32>> {
        let t = st
            .tensor(name)
            .with_context(|| format!("{STATE_FILE} has no {name}"))?;
        if t.dtype() != Dtype::F32 {
            bail!("{name} in {STATE_FILE} is not f32");
        }
        Ok(bytes_f32(t.data()))
    };
    let moments = opt
        .params()
        .iter()
        .zip(&state.param_steps)
        .map(|(p, &steps)| {
            Ok(Moments {
                m: read(&format!("{}.exp_avg", p.name))?,
                v: read(&format!("{}.exp_avg_sq", p.name))?,
                steps,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    opt.restore(state.step, moments)
}
