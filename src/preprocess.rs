//! SigLIP image preprocessing: resize, rescale, normalise, channels first.
//!
//! Mirrors transformers 5.24's PIL image processor (`SiglipImageProcessorPil`), which is the
//! numerical reference of this crate:
//!
//! 1. resize with Pillow bicubic to the configured size ([`crate::resize`]);
//! 2. rescale: `uint8 → float64 × rescale_factor → float32` (numpy upcasts before multiplying);
//! 3. normalise in float32: `(x - float32(mean)) / float32(std)` per channel;
//! 4. lay out as `[3, H, W]`.
//!
//! Steps 2 and 3 depend only on the byte value and the channel, so they are evaluated once per
//! possible byte into a table; every IEEE operation is the same as numpy's, which makes the
//! result bit-identical.

use std::path::{Path, PathBuf};

use ::image::RgbImage;
use candle_core::{Device, Tensor};
use serde::Deserialize;
use serde_json::Value;

use crate::resize::resize_bicubic;

/// Pillow's `Image.BICUBIC`, the only resampling filter implemented.
pub const RESAMPLE_BICUBIC: u32 = 3;

/// SigLIP patch size, used to derive the image token count from the image size.
const PATCH_SIZE: u32 = 14;

/// The target size of the resize step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageSize {
    /// Squash to exactly this size (what every PaliGemma checkpoint uses).
    Exact { height: u32, width: u32 },
    /// Scale so the shorter side has this length, keeping the aspect ratio.
    ShortestEdge(u32),
}

impl ImageSize {
    /// Output `(width, height)` for a `width`×`height` input, as transformers computes it.
    pub fn output_size(&self, width: u32, height: u32) -> (u32, u32) {
        match *self {
            ImageSize::Exact {
                height: h,
                width: w,
            } => (w, h),
            ImageSize::ShortestEdge(edge) => {
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                // Python: int(size * long / short), a float64 division truncated.
                let new_long = (f64::from(edge) * f64::from(long) / f64::from(short)) as u32;
                if width <= height {
                    (edge, new_long)
                } else {
                    (new_long, edge)
                }
            }
        }
    }
}

/// Why a preprocessor configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessorConfigError {
    #[error("cannot read preprocessor config {path}: {error}")]
    Io {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("invalid JSON in preprocessor config {path}: {error}")]
    Json {
        path: PathBuf,
        #[source]
        error: serde_json::Error,
    },
    #[error(
        "preprocessor config{location}: unsupported resample filter {0} (only 3 = bicubic is \
         implemented)",
        location = .1.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default()
    )]
    UnsupportedResample(u32, Option<PathBuf>),
    #[error("preprocessor config{location}: {message}",
        location = .path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Invalid {
        message: String,
        path: Option<PathBuf>,
    },
}

/// The fields of `preprocessor_config.json` that affect `pixel_values`.
///
/// Missing fields take `SiglipImageProcessor`'s defaults: 224×224, bicubic, rescale by 1/255,
/// normalise with mean = std = 0.5, convert to RGB.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessorConfig {
    pub size: ImageSize,
    pub do_resize: bool,
    /// Pillow filter id; always [`RESAMPLE_BICUBIC`] once validated.
    pub resample: u32,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    /// Number of `<image>` tokens the processor inserts, when the file states it.
    pub image_seq_length: Option<usize>,
    /// Decoding always yields RGB ([`crate::image`]); kept for completeness.
    pub do_convert_rgb: bool,
}

impl Default for PreprocessorConfig {
    fn default() -> Self {
        PreprocessorConfig {
            size: ImageSize::Exact {
                height: 224,
                width: 224,
            },
            do_resize: true,
            resample: RESAMPLE_BICUBIC,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
            image_seq_length: None,
            do_convert_rgb: true,
        }
    }
}

/// The file as written; `size`, `image_mean` and `image_std` accept several shapes.
#[derive(Deserialize)]
struct RawConfig {
    size: Option<Value>,
    do_resize: Option<bool>,
    resample: Option<u32>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<Value>,
    image_std: Option<Value>,
    image_seq_length: Option<usize>,
    do_convert_rgb: Option<bool>,
}

/// Parses `size` the way transformers' `get_size_dict` does for SigLIP (`default_to_square`
/// is false there, so a bare integer means the shortest edge).
fn parse_size(value: &Value) -> Result<ImageSize, String> {
    let as_u32 = |v: &Value| {
        v.as_u64()
            .filter(|&n| n > 0 && n <= u64::from(u32::MAX))
            .map(|n| n as u32)
    };
    match value {
        Value::Number(_) => as_u32(value)
            .map(ImageSize::ShortestEdge)
            .ok_or_else(|| format!("size must be a positive integer, got {value}")),
        Value::Object(map) => {
            let field = |k: &str| map.get(k).filter(|v| !v.is_null());
            match (field("height"), field("width"), field("shortest_edge")) {
                (Some(h), Some(w), _) => match (as_u32(h), as_u32(w)) {
                    (Some(height), Some(width)) => Ok(ImageSize::Exact { height, width }),
                    _ => Err(format!(
                        "size height/width must be positive integers: {value}"
                    )),
                },
                (None, None, Some(e)) if field("longest_edge").is_none() => {
                    as_u32(e).map(ImageSize::ShortestEdge).ok_or_else(|| {
                        format!("size.shortest_edge must be a positive integer: {value}")
                    })
                }
                _ => Err(format!(
                    "unsupported size {value}: expected {{height, width}} or {{shortest_edge}}"
                )),
            }
        }
        _ => Err(format!("unsupported size {value}")),
    }
}

/// A per-channel statistic given as one number or a list of three.
fn parse_per_channel(name: &str, value: &Value) -> Result<[f64; 3], String> {
    match value {
        Value::Number(n) => n.as_f64().map(|v| [v; 3]),
        Value::Array(items) if items.len() == 3 => {
            let v: Option<Vec<f64>> = items.iter().map(Value::as_f64).collect();
            v.map(|v| [v[0], v[1], v[2]])
        }
        _ => None,
    }
    .ok_or_else(|| format!("{name} must be a number or a list of 3 numbers, got {value}"))
}

impl PreprocessorConfig {
    /// The PaliGemma configuration for a square `size` (224, 448 or 896): SigLIP defaults, and
    /// `(size / 14)²` image tokens.
    pub fn default_for_size(size: u32) -> Self {
        PreprocessorConfig {
            size: ImageSize::Exact {
                height: size,
                width: size,
            },
            image_seq_length: Some(((size / PATCH_SIZE) * (size / PATCH_SIZE)) as usize),
            ..Self::default()
        }
    }

    /// Reads `preprocessor_config.json`. `path` may be the file or the model folder holding it.
    pub fn load(path: &Path) -> Result<Self, PreprocessorConfigError> {
        let file = if path.is_dir() {
            path.join("preprocessor_config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|error| PreprocessorConfigError::Io {
            path: file.clone(),
            error,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            PreprocessorConfigError::Json { error, .. } => PreprocessorConfigError::Json {
                path: file.clone(),
                error,
            },
            PreprocessorConfigError::UnsupportedResample(r, _) => {
                PreprocessorConfigError::UnsupportedResample(r, Some(file.clone()))
            }
            PreprocessorConfigError::Invalid { message, .. } => PreprocessorConfigError::Invalid {
                message,
                path: Some(file.clone()),
            },
            other => other,
        })
    }

    /// Parses the JSON text of a `preprocessor_config.json`; unknown keys are ignored.
    pub fn from_json(text: &str) -> Result<Self, PreprocessorConfigError> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|error| PreprocessorConfigError::Json {
                path: PathBuf::new(),
                error,
            })?;
        let invalid = |message: String| PreprocessorConfigError::Invalid {
            message,
            path: None,
        };
        let d = Self::default();
        let config = PreprocessorConfig {
            size: match &raw.size {
                Some(v) if !v.is_null() => parse_size(v).map_err(invalid)?,
                _ => d.size,
            },
            do_resize: raw.do_resize.unwrap_or(d.do_resize),
            resample: raw.resample.unwrap_or(d.resample),
            do_rescale: raw.do_rescale.unwrap_or(d.do_rescale),
            rescale_factor: raw.rescale_factor.unwrap_or(d.rescale_factor),
            do_normalize: raw.do_normalize.unwrap_or(d.do_normalize),
            image_mean: match &raw.image_mean {
                Some(v) if !v.is_null() => parse_per_channel("image_mean", v).map_err(invalid)?,
                _ => d.image_mean,
            },
            image_std: match &raw.image_std {
                Some(v) if !v.is_null() => parse_per_channel("image_std", v).map_err(invalid)?,
                _ => d.image_std,
            },
            image_seq_length: raw.image_seq_length,
            do_convert_rgb: raw.do_convert_rgb.unwrap_or(d.do_convert_rgb),
        };
        if config.do_resize && config.resample != RESAMPLE_BICUBIC {
            return Err(PreprocessorConfigError::UnsupportedResample(
                config.resample,
                None,
            ));
        }
        Ok(config)
    }

    /// `(width, height)` of the preprocessed image for a `width`×`height` input.
    pub fn output_size(&self, width: u32, height: u32) -> (u32, u32) {
        if self.do_resize {
            self.size.output_size(width, height)
        } else {
            (width, height)
        }
    }

    /// The float value byte `v` of channel `channel` becomes, with numpy's operation order and
    /// precisions.
    pub fn normalized_value(&self, v: u8, channel: usize) -> f32 {
        let x = if self.do_rescale {
            (f64::from(v) * self.rescale_factor) as f32
        } else {
            f32::from(v)
        };
        if self.do_normalize {
            (x - self.image_mean[channel] as f32) / self.image_std[channel] as f32
        } else {
            x
        }
    }

    /// [`Self::normalized_value`] for every byte value, per channel.
    pub fn value_table(&self) -> [[f32; 256]; 3] {
        std::array::from_fn(|c| std::array::from_fn(|v| self.normalized_value(v as u8, c)))
    }

    /// Resizes (when configured) and normalises one image into CHW `f32` values,
    /// `3 * H * W` long, where `(W, H)` is [`Self::output_size`].
    pub fn pixel_values(&self, img: &RgbImage) -> Vec<f32> {
        let (w, h) = self.output_size(img.width(), img.height());
        let resized;
        let img = if (w, h) == img.dimensions() {
            img
        } else {
            resized = resize_bicubic(img, w, h);
            &resized
        };
        let table = self.value_table();
        let raw = img.as_raw();
        let plane = w as usize * h as usize;
        let mut out = vec![0f32; 3 * plane];
        for (c, (dst, lut)) in out.chunks_exact_mut(plane.max(1)).zip(&table).enumerate() {
            for (o, px) in dst.iter_mut().zip(raw.chunks_exact(3)) {
                *o = lut[px[c] as usize];
            }
        }
        out
    }

    /// Preprocesses a batch into a `[n, 3, H, W]` `f32` tensor on `device`. All images must
    /// come out the same size (always the case with an exact `size`).
    pub fn to_tensor(&self, images: &[RgbImage], device: &Device) -> candle_core::Result<Tensor> {
        use rayon::prelude::*;
        let Some(first) = images.first() else {
            candle_core::bail!("to_tensor: no images to preprocess");
        };
        let (w, h) = self.output_size(first.width(), first.height());
        if let Some(other) = images
            .iter()
            .find(|im| self.output_size(im.width(), im.height()) != (w, h))
        {
            let (ow, oh) = self.output_size(other.width(), other.height());
            candle_core::bail!(
                "to_tensor: images preprocess to different sizes ({w}x{h} and {ow}x{oh}); \
                 batch them separately"
            );
        }
        let per_image: Vec<Vec<f32>> = images.par_iter().map(|im| self.pixel_values(im)).collect();
        let data: Vec<f32> = per_image.concat();
        Tensor::from_vec(data, (images.len(), 3, h as usize, w as usize), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_siglip() {
        let c = PreprocessorConfig::from_json("{}").unwrap();
        assert_eq!(c, PreprocessorConfig::default());
        assert_eq!(
            c.size,
            ImageSize::Exact {
                height: 224,
                width: 224
            }
        );
        assert_eq!(c.rescale_factor, 1.0 / 255.0);
    }

    #[test]
    fn paligemma_config_parses() {
        let text = r#"{
            "do_convert_rgb": null, "do_normalize": true, "do_rescale": true, "do_resize": true,
            "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
            "image_seq_length": 1024, "image_std": [0.5, 0.5, 0.5],
            "processor_class": "PaliGemmaProcessor", "resample": 3,
            "rescale_factor": 0.00392156862745098, "size": {"height": 448, "width": 448}
        }"#;
        let c = PreprocessorConfig::from_json(text).unwrap();
        assert_eq!(c, PreprocessorConfig::default_for_size(448));
        assert_eq!(c.image_seq_length, Some(1024));
    }

    #[test]
    fn other_resample_is_a_clear_error() {
        let err = PreprocessorConfig::from_json(r#"{"resample": 2}"#).unwrap_err();
        assert!(
            err.to_string().contains("unsupported resample filter 2"),
            "{err}"
        );
    }

    #[test]
    fn size_shapes() {
        assert_eq!(
            parse_size(&serde_json::json!(300)).unwrap(),
            ImageSize::ShortestEdge(300)
        );
        assert_eq!(
            parse_size(&serde_json::json!({"shortest_edge": 300})).unwrap(),
            ImageSize::ShortestEdge(300)
        );
        assert!(parse_size(&serde_json::json!({"longest_edge": 300})).is_err());
        assert!(parse_size(&serde_json::json!({"height": 0, "width": 3})).is_err());
        let e = PreprocessorConfig::from_json(r#"{"image_mean": [1, 2]}"#).unwrap_err();
        assert!(e.to_string().contains("image_mean"), "{e}");
    }

    #[test]
    fn shortest_edge_keeps_aspect_ratio_with_truncation() {
        let s = ImageSize::ShortestEdge(224);
        assert_eq!(s.output_size(640, 480), (298, 224));
        assert_eq!(s.output_size(480, 640), (224, 298));
        assert_eq!(s.output_size(100, 100), (224, 224));
    }

    #[test]
    fn default_normalisation_is_v_over_255_times_2_minus_1() {
        // transformers-reference.md §2.2: bit-identical over all bytes in f32.
        let c = PreprocessorConfig::default();
        for v in 0..=255u8 {
            assert_eq!(
                c.normalized_value(v, 0).to_bits(),
                ((f32::from(v) / 255.0) * 2.0 - 1.0).to_bits(),
                "v={v}"
            );
        }
    }

    #[test]
    fn pixel_values_are_channels_first() {
        let c = PreprocessorConfig {
            do_resize: false,
            do_normalize: false,
            do_rescale: false,
            ..Default::default()
        };
        let img = RgbImage::from_fn(2, 1, |x, _| ::image::Rgb([x as u8, 10 + x as u8, 20]));
        assert_eq!(c.pixel_values(&img), vec![0.0, 1.0, 10.0, 11.0, 20.0, 20.0]);
    }

    #[test]
    fn to_tensor_shape_and_errors() {
        let c = PreprocessorConfig::default_for_size(28);
        let imgs = vec![RgbImage::new(5, 7), RgbImage::new(30, 2)];
        let t = c.to_tensor(&imgs, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 3, 28, 28]);
        assert!(c.to_tensor(&[], &Device::Cpu).is_err());
        let keep = PreprocessorConfig {
            do_resize: false,
            ..c
        };
        assert!(keep.to_tensor(&imgs, &Device::Cpu).is_err());
    }
}
