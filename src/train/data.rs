//! Fine-tuning data: JSONL lines `{"image", "prefix", "suffix"}` (the format `paligemma
//! shapes` writes), checked up front, and a deterministic example order.
//!
//! Every line is checked when the file is read — JSON, fields, the image's header, the token
//! length — so that a bad line stops the run before any training, with its line number.
//! Pixels are decoded only when a batch needs them, so a large dataset does not have to fit in
//! memory.
//!
//! The order is a pure function of `(seed, epoch)` (a Fisher–Yates shuffle driven by
//! SplitMix64, written out here so that it cannot change with a dependency's version): a
//! resumed run needs only the epoch and the position within it to continue identically.

use crate::config::PaliGemmaConfig;
use crate::preprocess::PreprocessorConfig;
use crate::prompt::{self, Sequence};
use crate::tokenizer::Tokenizer;
use crate::train::loss::Example;
use anyhow::{Context, Result, bail};
use candle_core::Device;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One checked line of a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// 1-based line number in the JSONL file, for messages.
    pub line: usize,
    pub image: PathBuf,
    pub seq: Sequence,
}

/// The checked lines of a JSONL file.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub records: Vec<Record>,
    /// Lines left out with `skip_bad`, with the reason.
    pub skipped: Vec<(usize, String)>,
}

/// What turns a line into a model input.
pub struct Encoder<'a> {
    pub tokenizer: &'a Tokenizer,
    pub config: &'a PaliGemmaConfig,
    pub preprocessor: &'a PreprocessorConfig,
}

impl Dataset {
    /// Reads and checks every line of `path` (blank lines are ignored). A bad line is an
    /// error naming it, or, with `skip_bad`, is left out and listed in [`Dataset::skipped`].
    pub fn load(path: &Path, enc: &Encoder<'_>, skip_bad: bool) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut records = Vec::new();
        let mut skipped = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match parse_line(line, base, enc) {
                Ok((image, seq)) => records.push(Record {
                    line: i + 1,
                    image,
                    seq,
                }),
                Err(e) if skip_bad => skipped.push((i + 1, format!("{e:#}"))),
                Err(e) => return Err(e.context(format!("{}, line {}", path.display(), i + 1))),
            }
        }
        if records.is_empty() {
            bail!("{} has no usable example", path.display());
        }
        Ok(Self {
            path: path.to_path_buf(),
            records,
            skipped,
        })
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The examples at `indices`, images decoded and preprocessed now.
    pub fn examples(
        &self,
        indices: &[usize],
        pre: &PreprocessorConfig,
        dev: &Device,
    ) -> Result<Vec<Example>> {
        indices
            .iter()
            .map(|&i| {
                let r = &self.records[i];
                let pixels = load_pixels(&r.image, pre, dev)
                    .with_context(|| format!("{}, line {}", self.path.display(), r.line))?;
                Ok(Example {
                    seq: r.seq.clone(),
                    pixels: Some(pixels),
                })
            })
            .collect()
    }
}

fn load_pixels(path: &Path, pre: &PreprocessorConfig, dev: &Device) -> Result<candle_core::Tensor> {
    let img = crate::image::load_image(path)?;
    Ok(pre.to_tensor(&[img], dev)?)
}

/// Checks one line: its fields, that the image file exists and has a readable header, and
/// that the tokens fit the model.
fn parse_line(line: &str, base: &Path, enc: &Encoder<'_>) -> Result<(PathBuf, Sequence)> {
    let v: Value = serde_json::from_str(line).context("not valid JSON")?;
    let field = |name: &str| -> Result<&str> {
        match v.get(name) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => bail!("field `{name}` is not a string"),
            None => bail!("field `{name}` is missing (expected image, prefix, suffix)"),
        }
    };
    let (image, prefix, suffix) = (field("image")?, field("prefix")?, field("suffix")?);
    let image = base.join(image);
    if !image.is_file() {
        bail!("image {} does not exist", image.display());
    }
    image::ImageReader::open(&image)
        .and_then(|r| r.with_guessed_format())
        .map_err(anyhow::Error::from)
        .and_then(|r| r.into_dimensions().map_err(anyhow::Error::from))
        .with_context(|| format!("image {} cannot be read", image.display()))?;
    let seq = prompt::with_suffix(enc.tokenizer, enc.config, prefix, 1, suffix)?;
    // The model reads the sequence without its last token.
    prompt::check_length(enc.config, seq.ids.len() - 1, 0)?;
    Ok((image, seq))
}

/// Where the example stream stands: the epoch and how many of its examples were used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub position: usize,
}

/// The examples of successive epochs, each epoch a fresh seeded permutation; batches run on
/// across epoch boundaries, so every batch is full.
#[derive(Debug, Clone)]
pub struct Sampler {
    len: usize,
    seed: u64,
    cursor: Cursor,
    order: Vec<usize>,
}

impl Sampler {
    pub fn new(len: usize, seed: u64, cursor: Cursor) -> Result<Self> {
        if len == 0 {
            bail!("the dataset is empty");
        }
        if cursor.position > len {
            bail!(
                "the saved data position {} is past the dataset's {len} examples",
                cursor.position
            );
        }
        Ok(Self {
            len,
            seed,
            cursor,
            order: epoch_order(len, seed, cursor.epoch),
        })
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// The next `n` example indices.
    pub fn take(&mut self, n: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.cursor.position == self.len {
                self.cursor = Cursor {
                    epoch: self.cursor.epoch + 1,
                    position: 0,
                };
                self.order = epoch_order(self.len, self.seed, self.cursor.epoch);
            }
            out.push(self.order[self.cursor.position]);
            self.cursor.position += 1;
        }
        out
    }
}

/// The permutation of `0..len` used in `epoch`.
pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut state = seed ^ epoch.wrapping_mul(0xA076_1D64_78BD_642F);
    let mut order: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        // Multiply-shift gives an index in 0..=i with negligible bias for dataset sizes.
        let j = ((splitmix64(&mut state) as u128 * (i as u128 + 1)) >> 64) as usize;
        order.swap(i, j);
    }
    order
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_seeded_permutations() {
        let a = epoch_order(50, 7, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(50, 7, 0));
        assert_ne!(a, epoch_order(50, 7, 1));
        assert_ne!(a, epoch_order(50, 8, 0));
        assert_eq!(epoch_order(1, 3, 9), vec![0]);
    }

    #[test]
    fn sampler_runs_across_epochs_and_resumes_from_its_cursor() {
        let mut s = Sampler::new(3, 1, Cursor::default()).unwrap();
        let first = s.take(4);
        let mut epoch0 = first[..3].to_vec();
        epoch0.sort();
        assert_eq!(epoch0, vec![0, 1, 2]);
        assert_eq!(
            s.cursor(),
            Cursor {
                epoch: 1,
                position: 1
            }
        );
        let rest = s.take(5);
        let mut resumed = Sampler::new(3, 1, first_cursor(&first)).unwrap();
        assert_eq!(resumed.take(5), rest);
        assert!(
            Sampler::new(
                3,
                1,
                Cursor {
                    epoch: 0,
                    position: 4
                }
            )
            .is_err()
        );
        assert!(Sampler::new(0, 1, Cursor::default()).is_err());
    }

    fn first_cursor(taken: &[usize]) -> Cursor {
        Cursor {
            epoch: (taken.len() / 3) as u64,
            position: taken.len() % 3,
        }
    }
}
