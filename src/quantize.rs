//! `paligemma quantize`: a checkpoint folder whose linear layers are stored group-wise
//! quantized ([`crate::ops::linear::quant`]), so that it loads by memory map without
//! quantizing again.
//!
//! Each quantized matrix `X.weight` `[n, k]` is stored as two tensors, `X.weight.q8` or
//! `X.weight.q4` (U8, the packed values, `[n, row bytes]`) and `X.weight.scales` (F16,
//! `[n, groups]`); every other tensor is copied as it was. `config.json` gains a
//! `quantization` entry saying what was done. transformers cannot read these folders; this
//! program loads them with any `--dtype`, the quantized matrices staying quantized.

use crate::checkpoint::ModelFiles;
use crate::ops::linear::WeightFormat;
use crate::ops::linear::quant::{GROUP, QuantFormat, QuantMatrix};
use crate::paligemma::{PaliGemma, vision_format};
use crate::train::checkpoint::copy_model_files;
use crate::weights::WeightStore;
use anyhow::{Context, Result, bail};
use candle_core::Device;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use std::collections::BTreeMap;
use std::path::Path;

/// What [`quantize_checkpoint`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub quantized_matrices: usize,
    pub copied_tensors: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// Writes `files` with its linear layers quantized to `format` into the folder `out`.
pub fn quantize_checkpoint(files: &ModelFiles, format: QuantFormat, out: &Path) -> Result<Summary> {
    if files.is_big_vision() {
        bail!("quantize takes a Hub-layout checkpoint folder, not a big_vision .npz");
    }
    if out.exists() && same_dir(out, &files.dir) {
        bail!(
            "--out {} is the source checkpoint; choose another folder",
            out.display()
        );
    }
    let store = WeightStore::open(&files.weights)?;
    if store.names().any(|n| n.ends_with(".scales")) {
        bail!("{} is already quantized", files.dir.display());
    }
    let config = PaliGemma::load_config(files)?;
    let mut model =
        PaliGemma::from_store(config, &store, WeightFormat::Quant(format), &Device::Cpu)
            .with_context(|| format!("cannot load {} to quantize it", files.dir.display()))?;
    let mut quantized: BTreeMap<String, QuantMatrix> = BTreeMap::new();
    model.visit_linears_mut(&mut |name, linear| {
        if let Some(q) = linear.quantized() {
            quantized.insert(format!("{name}.weight"), q.clone());
        }
        Ok(())
    })?;

    let mut names: Vec<&str> = store.names().collect();
    names.sort_unstable();
    let mut views: Vec<(String, TensorView<'_>)> = Vec::new();
    let mut bytes_before = 0u64;
    for name in names {
        let (dtype, shape, bytes) = store.raw(name).expect("listed by the store");
        bytes_before += bytes.len() as u64;
        let view = |dtype, shape: Vec<usize>, bytes| {
            TensorView::new(dtype, shape, bytes).with_context(|| format!("tensor {name}"))
        };
        match quantized.get(name) {
            Some(q) => {
                let groups = q.k.div_ceil(GROUP);
                let values = view(Dtype::U8, vec![q.n, q.format.row_bytes(q.k)], q.values())?;
                let scales = view(Dtype::F16, vec![q.n, groups], q.scales())?;
                views.push((format!("{name}.{}", q.format.name()), values));
                views.push((format!("{name}.scales"), scales));
            }
            None => views.push((name.to_string(), view(dtype, shape.to_vec(), bytes)?)),
        }
    }
    let bytes_after = views.iter().map(|(_, v)| v.data().len() as u64).sum();
    let summary = Summary {
        quantized_matrices: quantized.len(),
        copied_tensors: views.len() - 2 * quantized.len(),
        bytes_before,
        bytes_after,
    };

    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    copy_model_files(&files.dir, out)?;
    let config_path = out.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&files.config)
            .with_context(|| format!("cannot read {}", files.config.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", files.config.display()))?;
    config["quantization"] = serde_json::json!({
        "method": "paligemma-rs group-wise",
        "format": format.name(),
        "vision_format": vision_format(WeightFormat::Quant(format)).name(),
        "group_size": GROUP,
        "scales": "f16",
    });
    std::fs::write(&config_path, serde_json::to_string_pretty(&config)? + "\n")
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let metadata = std::collections::HashMap::from([(
        "paligemma_rs_quantization".to_string(),
        format.name().to_string(),
    )]);
    let path = out.join("model.safetensors");
    let tmp = out.join("model.safetensors.partial");
    safetensors::serialize_to_file(views, Some(metadata), &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    // A sharded source leaves no index behind: the output is one file.
    let _ = std::fs::remove_file(out.join("model.safetensors.index.json"));
    Ok(summary)
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
