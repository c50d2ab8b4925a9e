//! Checkpoint tensors: memory-mapped safetensors files (one, or sharded with an index), looked
//! up under one canonical naming whatever layout wrote them.
//!
//! Canonical names are the Hub's (`vision_tower.vision_model.*`, `multi_modal_projector.*`,
//! `language_model.model.*`). transformers 5.x saves the vision tower as `vision_tower.*` and
//! names modules `model.language_model.*` in memory; both are mapped on open.

use crate::ops::linear::quant::{self, ByteSlice, QuantFormat, QuantMatrix};
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot open weights file {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a valid safetensors file (truncated or corrupt?): {reason}")]
    Corrupt { path: String, reason: String },
    #[error("{path}: {msg}")]
    Index { path: String, msg: String },
    #[error("tensor `{name}` is missing from the checkpoint")]
    Missing { name: String },
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor `{name}` has dtype {dtype:?}; only F32, BF16 and F16 weights are supported")]
    Dtype { name: String, dtype: Dtype },
    #[error("tensor `{name}`: {msg}")]
    Unusable { name: String, msg: String },
    #[error("tensor `{name}`: {source}")]
    Candle {
        name: String,
        source: candle_core::Error,
    },
}

/// Where one tensor's bytes are: a byte range of a mapped file, or bytes held in memory
/// (tensors computed at load time, e.g. from a big_vision `.npz` checkpoint).
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file, or in `owned` when it is set.
    start: usize,
    end: usize,
    owned: Option<Arc<Vec<u8>>>,
}

impl Entry {
    fn bytes<'a>(&'a self, files: &'a [(PathBuf, Arc<Mmap>)]) -> &'a [u8] {
        match &self.owned {
            Some(b) => &b[self.start..self.end],
            None => &files[self.file].1[self.start..self.end],
        }
    }
}

/// Bytes a tensor can borrow from: a file's memory map, or a buffer built at load time.
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Raw little-endian bf16 values, borrowed (from a memory map or the store's own buffer) when
/// the bytes are aligned, copied otherwise.
#[derive(Clone)]
pub enum Bf16Data {
    Mapped {
        map: SharedBytes,
        start: usize,
        len: usize,
    },
    Owned(Arc<Vec<u16>>),
}

impl Bf16Data {
    pub fn as_slice(&self) -> &[u16] {
        match self {
            Self::Mapped { map, start, len } => {
                let bytes = &(**map).as_ref()[*start..*start + 2 * len];
                // Alignment was checked when the mapping was chosen.
                unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const u16, *len) }
            }
            Self::Owned(v) => v,
        }
    }
}

impl std::fmt::Debug for Bf16Data {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Mapped { len, .. } => write!(f, "Bf16Data::Mapped({len})"),
            Self::Owned(v) => write!(f, "Bf16Data::Owned({})", v.len()),
        }
    }
}

pub struct WeightStore {
    files: Vec<(PathBuf, Arc<Mmap>)>,
    entries: HashMap<String, Entry>,
}

impl WeightStore {
    /// Opens a checkpoint's weight files: either the shards an index lists or plain files.
    pub fn open(paths: &[PathBuf]) -> Result<Self, WeightsError> {
        let mut store = WeightStore {
            files: Vec::new(),
            entries: HashMap::new(),
        };
        for path in paths {
            store.add_file(path)?;
        }
        Ok(store)
    }

    /// Reads `model.safetensors.index.json` and returns the shard paths it names, in order.
    pub fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>, WeightsError> {
        let shown = index.display().to_string();
        let err = |msg: String| WeightsError::Index {
            path: shown.clone(),
            msg,
        };
        let text = std::fs::read_to_string(index).map_err(|source| WeightsError::Open {
            path: shown.clone(),
            source,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| err("has no `weight_map` object".into()))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<String> = Vec::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| err(format!("`weight_map.{name}` is not a file name")))?;
            if !shards.iter().any(|s| s == file) {
                shards.push(file.to_string());
            }
        }
        shards.sort();
        Ok(shards.into_iter().map(|s| dir.join(s)).collect())
    }

    fn add_file(&mut self, path: &Path) -> Result<(), WeightsError> {
        let shown = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| WeightsError::Open {
            path: shown.clone(),
            source,
        })?;
        // Safety: the file is opened read-only; a concurrent writer is outside our control,
        // as for every memory-mapped loader.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| WeightsError::Open {
            path: shown.clone(),
            source,
        })?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| WeightsError::Corrupt {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
        let data_start = 8 + header_len;
        let index = self.files.len();
        for (name, info) in metadata.tensors() {
            let entry = Entry {
                file: index,
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: data_start + info.data_offsets.0,
                end: data_start + info.data_offsets.1,
                owned: None,
            };
            if let Some(canonical) = canonical_name(&name) {
                self.entries.insert(canonical, entry);
            }
        }
        self.files.push((path.to_path_buf(), Arc::new(map)));
        Ok(())
    }

    /// A store of tensors held in memory, given under their canonical (Hub) names as raw
    /// little-endian bytes of an F32, BF16 or F16 dtype.
    pub fn from_owned(
        tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    ) -> Result<Self, WeightsError> {
        let mut entries = HashMap::new();
        for (name, dtype, shape, bytes) in tensors {
            let want = shape.iter().product::<usize>() * dtype.bitsize() / 8;
            if bytes.len() != want {
                return Err(WeightsError::Corrupt {
                    path: name,
                    reason: format!(
                        "{} bytes for shape {shape:?} of {dtype:?}, expected {want}",
                        bytes.len()
                    ),
                });
            }
            let end = bytes.len();
            entries.insert(
                name,
                Entry {
                    file: 0,
                    dtype,
                    shape,
                    start: 0,
                    end,
                    owned: Some(Arc::new(bytes)),
                },
            );
        }
        Ok(Self {
            files: Vec::new(),
            entries,
        })
    }

    /// A tensor's stored dtype, shape and raw little-endian bytes.
    pub fn raw(&self, name: &str) -> Option<(Dtype, &[usize], &[u8])> {
        let e = self.entries.get(name)?;
        Some((e.dtype, &e.shape, e.bytes(&self.files)))
    }

    /// Canonical names of every tensor in the store.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|s| s.as_str())
    }

    fn entry(&self, name: &str, shape: &[usize]) -> Result<&Entry, WeightsError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| WeightsError::Missing {
                name: name.to_string(),
            })?;
        if e.shape != shape {
            return Err(WeightsError::Shape {
                name: name.to_string(),
                found: e.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        Ok(e)
    }

    /// Loads a tensor of the given shape as f32.
    pub fn f32(
        &self,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor, WeightsError> {
        let e = self.entry(name, shape)?;
        let bytes = e.bytes(&self.files);
        let values: Vec<f32> = match e.dtype {
            Dtype::F32 => widen(bytes, 4, |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            Dtype::BF16 => widen(bytes, 2, |c| {
                half::bf16::from_le_bytes([c[0], c[1]]).to_f32()
            }),
            Dtype::F16 => widen(bytes, 2, |c| {
                half::f16::from_le_bytes([c[0], c[1]]).to_f32()
            }),
            dtype => {
                return Err(WeightsError::Dtype {
                    name: name.into(),
                    dtype,
                });
            }
        };
        Tensor::from_vec(values, shape, device).map_err(|source| WeightsError::Candle {
            name: name.into(),
            source,
        })
    }

    /// Loads a tensor as bf16 bits: borrowed from the map when the file stores aligned bf16,
    /// rounded (to nearest even) from f32/f16 otherwise.
    pub fn bf16(&self, name: &str, shape: &[usize]) -> Result<Bf16Data, WeightsError> {
        let e = self.entry(name, shape)?;
        let bytes = e.bytes(&self.files);
        let len = shape.iter().product();
        let owned: Vec<u16> = match e.dtype {
            Dtype::BF16 if (bytes.as_ptr() as usize).is_multiple_of(2) => {
                let map: SharedBytes = match &e.owned {
                    Some(owned) => owned.clone(),
                    None => self.files[e.file].1.clone(),
                };
                return Ok(Bf16Data::Mapped {
                    map,
                    start: e.start,
                    len,
                });
            }
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect(),
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| {
                    half::bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_bits()
                })
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| {
                    let v = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                    half::bf16::from_f32(v).to_bits()
                })
                .collect(),
            dtype => {
                return Err(WeightsError::Dtype {
                    name: name.into(),
                    dtype,
                });
            }
        };
        Ok(Bf16Data::Owned(Arc::new(owned)))
    }
}

impl WeightStore {
    /// Quantizes the stored matrix `name` `[n, k]` (F32, BF16 or F16), a row at a time.
    pub fn quantize(
        &self,
        name: &str,
        n: usize,
        k: usize,
        format: QuantFormat,
    ) -> Result<QuantMatrix, WeightsError> {
        let e = self.entry(name, &[n, k])?;
        let bytes = e.bytes(&self.files);
        let width = match e.dtype {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            dtype => {
                return Err(WeightsError::Dtype {
                    name: name.into(),
                    dtype,
                });
            }
        };
        let dtype = e.dtype;
        let fill = |r: usize, dst: &mut [f32]| {
            let src = &bytes[r * k * width..(r + 1) * k * width];
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(width)) {
                *d = match dtype {
                    Dtype::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                    Dtype::BF16 => f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16),
                    _ => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                };
            }
        };
        QuantMatrix::quantize_rows(format, n, k, &fill).map_err(|e| WeightsError::Unusable {
            name: name.to_string(),
            msg: e.to_string(),
        })
    }

    /// The matrix `name` `[n, k]` as `paligemma quantize` stores it (`{name}.q8` or
    /// `{name}.q4` with `{name}.scales`), borrowed from the memory map; `None` when the
    /// checkpoint holds it unquantized.
    pub fn quantized(
        &self,
        name: &str,
        n: usize,
        k: usize,
    ) -> Result<Option<QuantMatrix>, WeightsError> {
        let Some((format, values)) = [QuantFormat::Q8, QuantFormat::Q4]
            .into_iter()
            .find_map(|f| Some((f, self.entries.get(&format!("{name}.{}", f.name()))?)))
        else {
            return Ok(None);
        };
        let scales_name = format!("{name}.scales");
        let scales = self
            .entries
            .get(&scales_name)
            .ok_or(WeightsError::Missing {
                name: scales_name.clone(),
            })?;
        let check = |what: String, e: &Entry, dtype: Dtype, cols: usize| {
            if e.dtype != dtype {
                return Err(WeightsError::Unusable {
                    name: what.clone(),
                    msg: format!("stored as {:?}, expected {dtype:?}", e.dtype),
                });
            }
            if e.shape != [n, cols] {
                return Err(WeightsError::Shape {
                    name: what,
                    found: e.shape.clone(),
                    expected: vec![n, cols],
                });
            }
            Ok(())
        };
        check(
            format!("{name}.{}", format.name()),
            values,
            Dtype::U8,
            format.row_bytes(k),
        )?;
        check(
            scales_name.clone(),
            scales,
            Dtype::F16,
            quant::padded(k) / quant::GROUP,
        )?;
        let slice = |e: &Entry| {
            let bytes: SharedBytes = match &e.owned {
                Some(owned) => owned.clone(),
                None => self.files[e.file].1.clone(),
            };
            ByteSlice::new(bytes, e.start, e.end - e.start)
        };
        QuantMatrix::from_parts(format, n, k, slice(values), slice(scales))
            .map(Some)
            .map_err(|e| WeightsError::Unusable {
                name: name.to_string(),
                msg: e.to_string(),
            })
    }
}

/// Decodes little-endian values of `width` bytes in parallel (multi-GB checkpoints).
fn widen(bytes: &[u8], width: usize, decode: impl Fn(&[u8]) -> f32 + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; bytes.len() / width];
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * width))
        .for_each(|(dst, src)| {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(width)) {
                *d = decode(c);
            }
        });
    out
}

/// Maps a stored tensor name to the Hub layout; `None` for tensors PaliGemma does not use
/// (the tied `lm_head`, which some exporters write anyway).
pub fn canonical_name(stored: &str) -> Option<String> {
    if stored.ends_with("lm_head.weight") {
        return None;
    }
    // In-memory transformers 5.x names (`model.` wrapper).
    let name = stored.strip_prefix("model.").filter(|rest| {
        rest.starts_with("language_model.")
            || rest.starts_with("vision_tower.")
            || rest.starts_with("multi_modal_projector.")
    });
    let name = match name {
        Some(rest) if rest.starts_with("language_model.") => {
            format!("language_model.model.{}", &rest["language_model.".len()..])
        }
        Some(rest) => rest.to_string(),
        None => stored.to_string(),
    };
    if let Some(rest) = name.strip_prefix("vision_tower.")
        && !rest.starts_with("vision_model.")
    {
        return Some(format!("vision_tower.vision_model.{rest}"));
    }
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    /// A safetensors file holding `values` as F32, BF16 and F16 tensors.
    fn write_three_dtypes(values: &[f32]) -> PathBuf {
        let f32b: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bf16b: Vec<u8> = values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let f16b: Vec<u8> = values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let shape = vec![values.len()];
        let views = vec![
            (
                "a.f32",
                TensorView::new(Dtype::F32, shape.clone(), &f32b).unwrap(),
            ),
            (
                "b.bf16",
                TensorView::new(Dtype::BF16, shape.clone(), &bf16b).unwrap(),
            ),
            ("c.f16", TensorView::new(Dtype::F16, shape, &f16b).unwrap()),
        ];
        let path =
            std::env::temp_dir().join(format!("pg-weights-{}.safetensors", std::process::id()));
        safetensors::serialize_to_file(views, None, &path).unwrap();
        path
    }

    #[test]
    fn f32_bf16_and_f16_tensors_load_exactly() {
        // All exactly representable in bf16 and f16.
        let values = [1.5f32, -2.25, 0.0, 0.125, -1024.0, 3.0];
        let path = write_three_dtypes(&values);
        let store = WeightStore::open(std::slice::from_ref(&path)).unwrap();
        let dev = Device::Cpu;
        for name in ["a.f32", "b.bf16", "c.f16"] {
            let t: Vec<f32> = store
                .f32(name, &[values.len()], &dev)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(t, values, "{name}");
            let b = store.bf16(name, &[values.len()]).unwrap();
            let widened: Vec<f32> = b
                .as_slice()
                .iter()
                .map(|&x| half::bf16::from_bits(x).to_f32())
                .collect();
            assert_eq!(widened, values, "{name}");
        }
        assert!(matches!(
            store.bf16("b.bf16", &[values.len()]).unwrap(),
            Bf16Data::Mapped { .. }
        ));
        let err = store.f32("a.f32", &[2, 3], &dev).unwrap_err().to_string();
        assert!(err.contains("a.f32") && err.contains("[6]"), "{err}");
        let err = store.f32("nope", &[1], &dev).unwrap_err().to_string();
        assert!(err.contains("`nope` is missing"), "{err}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn every_layout_maps_to_hub_names() {
        let hub = "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight";
        assert_eq!(canonical_name(hub).unwrap(), hub);
        assert_eq!(
            canonical_name("vision_tower.encoder.layers.0.mlp.fc1.weight").unwrap(),
            hub
        );
        assert_eq!(
            canonical_name("model.vision_tower.encoder.layers.0.mlp.fc1.weight").unwrap(),
            hub
        );
        assert_eq!(
            canonical_name("model.language_model.layers.3.self_attn.q_proj.weight").unwrap(),
            "language_model.model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            canonical_name("language_model.model.norm.weight").unwrap(),
            "language_model.model.norm.weight"
        );
        assert_eq!(
            canonical_name("model.multi_modal_projector.linear.bias").unwrap(),
            "multi_modal_projector.linear.bias"
        );
        assert!(canonical_name("lm_head.weight").is_none());
        assert!(canonical_name("language_model.lm_head.weight").is_none());
    }
}
