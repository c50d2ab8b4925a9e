//! Finding a checkpoint's files: a local folder in the Hub's layout, a big_vision `.npz`
//! file, or a Hub id downloaded into the standard Hugging Face cache.

use anyhow::{Result, bail};
use std::path::{Path, PathBuf};

/// The files of one PaliGemma checkpoint.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    /// `config.json`. For a big_vision `.npz`: its `<stem>.config.json` sidecar when there is
    /// one, else the `.npz` itself (the configuration is then inferred from the tensor shapes).
    pub config: PathBuf,
    /// safetensors files, or one big_vision `.npz`.
    pub weights: Vec<PathBuf>,
    pub tokenizer: PathBuf,
    pub preprocessor: Option<PathBuf>,
    pub generation_config: Option<PathBuf>,
}

const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";

impl ModelFiles {
    /// `spec` is `demo` (the model built into the binary, see [`crate::demo`]), a folder, a
    /// big_vision `.npz` file, or a Hub id such as `google/paligemma2-3b-mix-224`.
    pub fn resolve(spec: &str) -> Result<Self> {
        if spec == crate::demo::NAME {
            return Self::from_dir(&crate::demo::folder()?);
        }
        let path = Path::new(spec);
        if path.is_dir() {
            return Self::from_dir(path);
        }
        if path.is_file() && is_npz(path) {
            return Self::from_npz(path);
        }
        if path.exists() {
            bail!(
                "--model {spec}: expected a checkpoint folder or a big_vision .npz file, found another file"
            );
        }
        if looks_like_hub_id(spec) {
            return crate::hub::download(spec);
        }
        bail!("--model {spec}: no such folder, and not a Hub id of the form owner/name")
    }

    /// A folder holding `config.json`, `tokenizer.json`, and `model.safetensors` or a sharded
    /// `model.safetensors.index.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut files = Self::without_weights(dir)?;
        files.weights = if dir.join(INDEX).is_file() {
            let shards = crate::weights::WeightStore::shards_from_index(&dir.join(INDEX))?;
            if let Some(missing) = shards.iter().find(|s| !s.is_file()) {
                bail!(
                    "{} lists {}, which does not exist",
                    dir.join(INDEX).display(),
                    missing.display()
                );
            }
            shards
        } else if dir.join(SINGLE).is_file() {
            vec![dir.join(SINGLE)]
        } else {
            bail!(
                "checkpoint folder {} has neither {SINGLE} nor {INDEX}",
                dir.display()
            )
        };
        Ok(files)
    }

    /// A folder that describes a model but holds no weights yet (`config.json`,
    /// `tokenizer.json`, optional preprocessor and generation configs): what training from
    /// scratch starts from.
    pub fn without_weights(dir: &Path) -> Result<Self> {
        let need = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                bail!("checkpoint folder {} has no {name}", dir.display())
            }
        };
        let optional = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        Ok(Self {
            dir: dir.to_path_buf(),
            config: need("config.json")?,
            weights: Vec::new(),
            tokenizer: need("tokenizer.json")?,
            preprocessor: optional("preprocessor_config.json"),
            generation_config: optional("generation_config.json"),
        })
    }

    /// A big_vision checkpoint: the `.npz`, `tokenizer.json` beside it (big_vision ships a
    /// SentencePiece model, which we do not read), and optional sidecars named after it:
    /// `<stem>.config.json` (values the shapes cannot tell, checked against them),
    /// `<stem>.generation_config.json` and `<stem>.preprocessor_config.json`.
    pub fn from_npz(npz: &Path) -> Result<Self> {
        let dir = npz
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let tokenizer = dir.join("tokenizer.json");
        if !tokenizer.is_file() {
            bail!(
                "{} has no tokenizer.json beside it: big_vision checkpoints do not include the \
                 tokenizer. Put PaliGemma's tokenizer.json (from any PaliGemma checkpoint on the \
                 Hub, e.g. google/paligemma-3b-pt-224; PaliGemma 1 and 2 share it) into {}",
                npz.display(),
                dir.display()
            );
        }
        let sidecar = |name: &str| {
            let stem = npz.file_stem().unwrap_or_default().to_string_lossy();
            Some(dir.join(format!("{stem}.{name}"))).filter(|p| p.is_file())
        };
        Ok(Self {
            config: sidecar("config.json").unwrap_or_else(|| npz.to_path_buf()),
            weights: vec![npz.to_path_buf()],
            tokenizer,
            preprocessor: sidecar("preprocessor_config.json"),
            generation_config: sidecar("generation_config.json"),
            dir,
        })
    }

    /// Whether the weights are a big_vision `.npz` (see [`ModelFiles::from_npz`]).
    pub fn is_big_vision(&self) -> bool {
        matches!(self.weights.as_slice(), [w] if is_npz(w))
    }

    /// Size of the weight files in bytes, for messages and progress.
    pub fn weights_bytes(&self) -> u64 {
        self.weights
            .iter()
            .filter_map(|p| p.metadata().ok())
            .map(|m| m.len())
            .sum()
    }
}

fn is_npz(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npz"))
}

/// `owner/name` with the characters the Hub allows.
pub fn looks_like_hub_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    ok(owner) && ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_recognised() {
        assert!(looks_like_hub_id("google/paligemma2-3b-mix-224"));
        assert!(looks_like_hub_id("google/paligemma-3b-pt-224"));
        assert!(!looks_like_hub_id("paligemma"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("./x"));
        assert!(!looks_like_hub_id("../models/x"));
        assert!(!looks_like_hub_id("/abs/path"));
    }

    #[test]
    fn missing_pieces_are_named() {
        let dir = std::env::temp_dir().join(format!("pg-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = ModelFiles::from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
        let err = ModelFiles::from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
