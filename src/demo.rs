//! The demo model (`--model demo`): a 3.4 M-parameter PaliGemma trained from scratch on
//! synthetic shapes by `tools/train_demo.sh`, shipped inside the binary so that a fresh build
//! runs every task offline.
//!
//! Its files (`models/demo/` in the repository) are embedded at compile time and written on
//! first use to a cache folder named after their hash, from where they load like any
//! checkpoint (memory-mapped). A different build with a different demo model gets a different
//! folder, and a half-written folder is never used: files are written under temporary names
//! and the folder is renamed into place last.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The `--model` value that selects the demo model.
pub const NAME: &str = "demo";

const FILES: [(&str, &[u8]); 6] = [
    ("config.json", include_bytes!("../models/demo/config.json")),
    (
        "generation_config.json",
        include_bytes!("../models/demo/generation_config.json"),
    ),
    (
        "preprocessor_config.json",
        include_bytes!("../models/demo/preprocessor_config.json"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../models/demo/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../models/demo/tokenizer_config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../models/demo/model.safetensors"),
    ),
];

/// The folder holding the demo model's files, written there first if need be.
pub fn folder() -> Result<PathBuf> {
    let dir = cache_root().join(format!("demo-{:016x}", fingerprint()));
    if dir.join("model.safetensors").is_file() {
        return Ok(dir);
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    // Built beside its final place, then renamed: concurrent first uses each build their own
    // and one rename wins; the others find the folder in place.
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        dir.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    for (name, bytes) in FILES {
        std::fs::write(tmp.join(name), bytes)
            .with_context(|| format!("cannot write {}", tmp.join(name).display()))?;
    }
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join("model.safetensors").is_file() {
            anyhow::bail!("cannot put the demo model into {}", dir.display());
        }
    }
    Ok(dir)
}

/// `$PALIGEMMA_CACHE`, else `$XDG_CACHE_HOME/paligemma-rs`, else `~/.cache/paligemma-rs`,
/// else the system's temporary folder.
fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("PALIGEMMA_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("paligemma-rs");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".cache").join("paligemma-rs");
    }
    std::env::temp_dir().join("paligemma-rs")
}

/// FNV-1a over every embedded file: names the cache folder after the contents.
fn fingerprint() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in FILES {
        for &b in name.as_bytes().iter().chain(bytes) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}
