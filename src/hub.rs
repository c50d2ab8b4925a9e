//! Downloading a checkpoint from the Hugging Face Hub into the standard cache
//! (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`), shared with the Python tools.
//!
//! `HF_TOKEN` (or the token file `huggingface-cli login` writes) authorises gated models such
//! as Google's; `HF_ENDPOINT` points at a mirror; `HF_HUB_OFFLINE=1` uses the cache only.

use crate::checkpoint::ModelFiles;
use anyhow::{Context, Result, bail};
use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use std::path::PathBuf;

const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL: [&str; 2] = ["preprocessor_config.json", "generation_config.json"];

/// Where the segmentation mask decoder is published: Google's PaliGemma demo Space.
pub const VAE_SPACE: &str = "google/paligemma-hf";
pub const VAE_FILE: &str = "vae-oid.npz";

fn api() -> Result<hf_hub::api::sync::Api> {
    let mut builder = ApiBuilder::from_env().with_progress(true);
    if let Ok(token) = std::env::var("HF_TOKEN")
        && !token.trim().is_empty()
    {
        builder = builder.with_token(Some(token.trim().to_string()));
    }
    builder
        .build()
        .context("cannot set up the Hugging Face Hub client")
}

/// The VQ-VAE weights that turn `<seg>` codes into masks, from the cache or the Hub.
pub fn download_vae() -> Result<PathBuf> {
    let repo = Repo::with_revision(VAE_SPACE.to_string(), RepoType::Space, "main".to_string());
    if offline() {
        return Cache::from_env().repo(repo).get(VAE_FILE).with_context(|| {
            format!("HF_HUB_OFFLINE is set and {VAE_FILE} of {VAE_SPACE} is not in the Hugging Face cache; pass --vae PATH")
        });
    }
    api()?.repo(repo).get(VAE_FILE).with_context(|| {
        format!("cannot download {VAE_FILE} from the Hub Space {VAE_SPACE}; pass --vae PATH")
    })
}

pub fn download(id: &str) -> Result<ModelFiles> {
    if offline() {
        return from_cache(id);
    }
    let repo = api()?.model(id.to_string());
    let fetch = |name: &str| -> Result<PathBuf> {
        repo.get(name).with_context(|| {
            format!(
                "cannot download {name} of {id} from the Hub (gated models need HF_TOKEN and an accepted licence)"
            )
        })
    };
    let config = fetch(REQUIRED[0])?;
    let tokenizer = fetch(REQUIRED[1])?;
    let weights = fetch_weights(&repo, id)?;
    let optional = |name: &str| repo.get(name).ok();
    Ok(ModelFiles {
        dir: config.parent().map(|p| p.to_path_buf()).unwrap_or_default(),
        config,
        weights,
        tokenizer,
        preprocessor: optional(OPTIONAL[0]),
        generation_config: optional(OPTIONAL[1]),
    })
}

fn fetch_weights(repo: &ApiRepo, id: &str) -> Result<Vec<PathBuf>> {
    // Sharded checkpoints have an index; single-file ones do not.
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let shards = crate::weights::WeightStore::shards_from_index(&index)?;
            shards
                .iter()
                .map(|shard| {
                    let name = shard
                        .file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or_default();
                    repo.get(name)
                        .with_context(|| format!("cannot download {name} of {id} from the Hub"))
                })
                .collect()
        }
        Err(_) => Ok(vec![repo.get("model.safetensors").with_context(|| {
            format!(
                "{id} on the Hub has neither model.safetensors nor model.safetensors.index.json"
            )
        })?]),
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"))
}

fn from_cache(id: &str) -> Result<ModelFiles> {
    let cache = Cache::from_env().repo(Repo::model(id.to_string()));
    let Some(config) = cache.get("config.json") else {
        bail!("HF_HUB_OFFLINE is set and {id} is not in the Hugging Face cache")
    };
    let dir = config.parent().map(|p| p.to_path_buf()).unwrap_or_default();
    ModelFiles::from_dir(&dir).with_context(|| format!("the cached copy of {id} is incomplete"))
}
