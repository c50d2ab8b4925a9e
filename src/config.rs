//! Model configuration, read from a checkpoint's `config.json`.
//!
//! Fields a checkpoint omits take the defaults of the transformers 5.24 config classes
//! (`PaliGemmaConfig`, `SiglipVisionConfig`, `GemmaConfig`, `Gemma2Config`): a sub-config given
//! as a dict is built from its own class defaults, not from PaliGemma's fallback sub-config.

use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path}: {msg}")]
    Invalid { path: String, msg: String },
}

/// The SigLIP image encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
}

impl VisionConfig {
    /// Patches per side of the square input.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Tokens one image contributes to the decoder's sequence.
    pub fn num_image_tokens(&self) -> usize {
        self.grid() * self.grid()
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// Which Gemma generation the text decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmaVersion {
    /// PaliGemma 1: Gemma 1 (`model_type: gemma`).
    Gemma1,
    /// PaliGemma 2: Gemma 2 (`model_type: gemma2`): sandwich norms and soft-capping.
    Gemma2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_pytorch_tanh` / `gelu_new`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact erf form.
    GeluErf,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Some(Self::GeluTanh),
            "gelu" => Some(Self::GeluErf),
            _ => None,
        }
    }
}

/// The Gemma decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub version: GemmaVersion,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2` (Gemma 2) instead of
    /// `head_dim^-1/2` (Gemma 1).
    pub query_pre_attn_scalar: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    /// Read for completeness; not applied, following big_vision (see DECISIONS.md §4).
    pub sliding_window: Option<usize>,
}

impl TextConfig {
    pub fn attention_scale(&self) -> f64 {
        match self.query_pre_attn_scalar {
            Some(s) => s.powf(-0.5),
            None => (self.head_dim as f64).powf(-0.5),
        }
    }
}

/// A whole PaliGemma checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct PaliGemmaConfig {
    pub vision: VisionConfig,
    pub text: TextConfig,
    pub image_token_index: u32,
    pub projection_dim: usize,
    pub bos_token_id: u32,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: u32,
}

impl PaliGemmaConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::from_json_str(&text).map_err(|e| match e {
            ConfigError::Json { source, .. } => ConfigError::Json {
                path: shown,
                source,
            },
            ConfigError::Invalid { msg, .. } => ConfigError::Invalid { path: shown, msg },
            other => other,
        })
    }

    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let root: Value = serde_json::from_str(text).map_err(|source| ConfigError::Json {
            path: "config.json".into(),
            source,
        })?;
        parse_root(&root).map_err(|msg| ConfigError::Invalid {
            path: "config.json".into(),
            msg,
        })
    }

    /// The number of `<image>` tokens one image expands to.
    pub fn image_seq_length(&self) -> usize {
        self.vision.num_image_tokens()
    }
}

/// A JSON object with typed, defaulted field access.
struct Fields<'a> {
    obj: &'a serde_json::Map<String, Value>,
    scope: &'static str,
}

impl<'a> Fields<'a> {
    fn new(v: &'a Value, scope: &'static str) -> Result<Self, String> {
        v.as_object()
            .map(|obj| Self { obj, scope })
            .ok_or_else(|| format!("`{scope}` must be a JSON object"))
    }

    fn present(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize, String> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                format!(
                    "`{}.{key}` must be a non-negative integer, got {v}",
                    self.scope
                )
            }),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64, String> {
        self.opt_f64(key).map(|v| v.unwrap_or(default))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, String> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("`{}.{key}` must be a number, got {v}", self.scope)),
        }
    }

    fn str_or(&self, key: &str, default: &'a str) -> Result<&'a str, String> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| format!("`{}.{key}` must be a string, got {v}", self.scope)),
        }
    }

    fn activation(&self, key: &str, default: &'a str) -> Result<Activation, String> {
        let name = self.str_or(key, default)?;
        Activation::parse(name)
            .ok_or_else(|| format!("`{}.{key}`: unsupported activation {name:?}", self.scope))
    }

    /// Token ids may be a single integer or a list (`eos_token_id: [1, 107]`).
    fn ids(&self, key: &str, default: &[u32]) -> Result<Vec<u32>, String> {
        let bad = || {
            format!(
                "`{}.{key}` must be a token id or a list of them",
                self.scope
            )
        };
        match self.present(key) {
            None => Ok(default.to_vec()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|n| n as u32).ok_or_else(bad))
                .collect(),
            Some(v) => v.as_u64().map(|n| vec![n as u32]).ok_or_else(bad),
        }
    }
}

fn parse_root(root: &Value) -> Result<PaliGemmaConfig, String> {
    let f = Fields::new(root, "config")?;
    let model_type = f.str_or("model_type", "")?;
    if model_type != "paligemma" {
        return Err(format!(
            "model_type is {model_type:?}, expected \"paligemma\": this is not a PaliGemma checkpoint"
        ));
    }
    let projection_dim = f.usize_or("projection_dim", 2048)?;
    let vision = match f.present("vision_config") {
        Some(v) => parse_vision(v)?,
        None => default_vision(),
    };
    let text = match f.present("text_config") {
        Some(v) => parse_text(v)?,
        None => default_text(),
    };
    check_shapes(&vision, &text, projection_dim)?;
    let first = |ids: Vec<u32>, key: &str| {
        ids.first()
            .copied()
            .ok_or_else(|| format!("`config.{key}` is an empty list"))
    };
    let eos_token_ids = f.ids("eos_token_id", &[1])?;
    if eos_token_ids.is_empty() {
        return Err("`config.eos_token_id` is an empty list".into());
    }
    Ok(PaliGemmaConfig {
        image_token_index: f.usize_or("image_token_index", 256000)? as u32,
        bos_token_id: first(f.ids("bos_token_id", &[2])?, "bos_token_id")?,
        pad_token_id: first(f.ids("pad_token_id", &[0])?, "pad_token_id")?,
        eos_token_ids,
        projection_dim,
        vision,
        text,
    })
}

/// `SiglipVisionConfig` with PaliGemma's fallback values, used when `vision_config` is absent.
fn default_vision() -> VisionConfig {
    VisionConfig {
        hidden_size: 1152,
        intermediate_size: 4096,
        num_hidden_layers: 27,
        num_attention_heads: 16,
        num_channels: 3,
        image_size: 224,
        patch_size: 14,
        layer_norm_eps: 1e-6,
        hidden_act: Activation::GeluTanh,
    }
}

fn parse_vision(v: &Value) -> Result<VisionConfig, String> {
    let f = Fields::new(v, "vision_config")?;
    let model_type = f.str_or("model_type", "siglip_vision_model")?;
    if model_type != "siglip_vision_model" {
        return Err(format!(
            "vision_config.model_type is {model_type:?}, expected \"siglip_vision_model\""
        ));
    }
    // Defaults of SiglipVisionConfig itself (a dict does not inherit PaliGemma's fallback).
    Ok(VisionConfig {
        hidden_size: f.usize_or("hidden_size", 768)?,
        intermediate_size: f.usize_or("intermediate_size", 3072)?,
        num_hidden_layers: f.usize_or("num_hidden_layers", 12)?,
        num_attention_heads: f.usize_or("num_attention_heads", 12)?,
        num_channels: f.usize_or("num_channels", 3)?,
        image_size: f.usize_or("image_size", 224)?,
        patch_size: f.usize_or("patch_size", 16)?,
        layer_norm_eps: f.f64_or("layer_norm_eps", 1e-6)?,
        hidden_act: f.activation("hidden_act", "gelu_pytorch_tanh")?,
    })
}

/// `GemmaConfig` with PaliGemma's fallback values, used when `text_config` is absent.
fn default_text() -> TextConfig {
    TextConfig {
        version: GemmaVersion::Gemma1,
        vocab_size: 257152,
        hidden_size: 2048,
        intermediate_size: 16384,
        num_hidden_layers: 18,
        num_attention_heads: 8,
        num_key_value_heads: 1,
        head_dim: 256,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        max_position_embeddings: 8192,
        hidden_act: Activation::GeluTanh,
        query_pre_attn_scalar: None,
        attn_logit_softcapping: None,
        final_logit_softcapping: None,
        sliding_window: None,
    }
}

fn parse_text(v: &Value) -> Result<TextConfig, String> {
    let f = Fields::new(v, "text_config")?;
    let version = match f.str_or("model_type", "gemma")? {
        "gemma" => GemmaVersion::Gemma1,
        "gemma2" => GemmaVersion::Gemma2,
        other => {
            return Err(format!(
                "text_config.model_type is {other:?}; PaliGemma uses \"gemma\" or \"gemma2\""
            ));
        }
    };
    // Newer configs nest rope_theta in `rope_parameters`; older ones keep it at the top.
    let rope_theta = match f.present("rope_parameters") {
        Some(p) => Fields::new(p, "text_config.rope_parameters")?.f64_or("rope_theta", 10000.0)?,
        None => f.f64_or("rope_theta", 10000.0)?,
    };
    // The class defaults of GemmaConfig and Gemma2Config differ only in sizes and in the
    // name of the activation field.
    let (hidden, intermediate, layers, heads, kv_heads, act_key) = match version {
        GemmaVersion::Gemma1 => (3072, 24576, 28, 16, 16, "hidden_act"),
        GemmaVersion::Gemma2 => (2304, 9216, 26, 8, 4, "hidden_activation"),
    };
    let gemma2 = version == GemmaVersion::Gemma2;
    Ok(TextConfig {
        version,
        vocab_size: f.usize_or("vocab_size", 256000)?,
        hidden_size: f.usize_or("hidden_size", hidden)?,
        intermediate_size: f.usize_or("intermediate_size", intermediate)?,
        num_hidden_layers: f.usize_or("num_hidden_layers", layers)?,
        num_attention_heads: f.usize_or("num_attention_heads", heads)?,
        num_key_value_heads: f.usize_or("num_key_value_heads", kv_heads)?,
        head_dim: f.usize_or("head_dim", 256)?,
        rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
        rope_theta,
        max_position_embeddings: f.usize_or("max_position_embeddings", 8192)?,
        hidden_act: f.activation(act_key, "gelu_pytorch_tanh")?,
        query_pre_attn_scalar: gemma2
            .then(|| f.f64_or("query_pre_attn_scalar", 256.0))
            .transpose()?,
        attn_logit_softcapping: if gemma2 {
            softcap(&f, "attn_logit_softcapping", 50.0)?
        } else {
            None
        },
        final_logit_softcapping: if gemma2 {
            softcap(&f, "final_logit_softcapping", 30.0)?
        } else {
            None
        },
        sliding_window: gemma2
            .then(|| f.usize_or("sliding_window", 4096))
            .transpose()?,
    })
}

/// A soft-cap is on by default in Gemma 2; an explicit `null` turns it off.
fn softcap(f: &Fields, key: &str, default: f64) -> Result<Option<f64>, String> {
    match f.obj.get(key) {
        None => Ok(Some(default)),
        Some(Value::Null) => Ok(None),
        Some(_) => f.opt_f64(key),
    }
}

fn check_shapes(v: &VisionConfig, t: &TextConfig, projection_dim: usize) -> Result<(), String> {
    let positive = [
        ("vision_config.hidden_size", v.hidden_size),
        ("vision_config.num_hidden_layers", v.num_hidden_layers),
        ("vision_config.num_attention_heads", v.num_attention_heads),
        ("vision_config.patch_size", v.patch_size),
        ("vision_config.image_size", v.image_size),
        ("text_config.hidden_size", t.hidden_size),
        ("text_config.num_hidden_layers", t.num_hidden_layers),
        ("text_config.num_attention_heads", t.num_attention_heads),
        ("text_config.num_key_value_heads", t.num_key_value_heads),
        ("text_config.head_dim", t.head_dim),
        ("text_config.vocab_size", t.vocab_size),
    ];
    if let Some((name, _)) = positive.iter().find(|(_, n)| *n == 0) {
        return Err(format!("`{name}` must be positive"));
    }
    if !v.hidden_size.is_multiple_of(v.num_attention_heads) {
        return Err(format!(
            "vision hidden_size {} is not divisible by its {} heads",
            v.hidden_size, v.num_attention_heads
        ));
    }
    if !v.image_size.is_multiple_of(v.patch_size) {
        return Err(format!(
            "vision image_size {} is not a multiple of patch_size {}",
            v.image_size, v.patch_size
        ));
    }
    if !t.num_attention_heads.is_multiple_of(t.num_key_value_heads) {
        return Err(format!(
            "text num_attention_heads {} is not a multiple of num_key_value_heads {}",
            t.num_attention_heads, t.num_key_value_heads
        ));
    }
    if !t.head_dim.is_multiple_of(2) {
        return Err(format!(
            "text head_dim {} must be even for RoPE",
            t.head_dim
        ));
    }
    if projection_dim != t.hidden_size {
        return Err(format!(
            "projection_dim {projection_dim} differs from text hidden_size {}",
            t.hidden_size
        ));
    }
    Ok(())
}

/// `generation_config.json`: only the stop tokens matter here.
#[derive(Debug, Deserialize, Default)]
pub struct GenerationDefaults {
    #[serde(default)]
    pub eos_token_id: Option<Value>,
}

impl GenerationDefaults {
    /// The eos ids a checkpoint's `generation_config.json` lists, if it lists any; transformers
    /// prefers them to `config.json`'s.
    pub fn load_eos(path: &Path) -> Result<Option<Vec<u32>>, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let root: Value = serde_json::from_str(&text).map_err(|source| ConfigError::Json {
            path: shown.clone(),
            source,
        })?;
        let f = Fields::new(&root, "generation_config").map_err(|msg| ConfigError::Invalid {
            path: shown.clone(),
            msg,
        })?;
        if f.present("eos_token_id").is_none() {
            return Ok(None);
        }
        f.ids("eos_token_id", &[])
            .map(Some)
            .map_err(|msg| ConfigError::Invalid { path: shown, msg })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PG1_448: &str = r#"{ "architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
      "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "ignore_index": -100,
      "image_token_index": 257152, "hidden_size": 2048, "projection_dim": 2048, "torch_dtype": "float32",
      "text_config": { "model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384,
         "num_attention_heads": 8, "num_hidden_layers": 18, "num_key_value_heads": 1,
         "num_image_tokens": 1024, "vocab_size": 257216, "torch_dtype": "float32" },
      "vision_config": { "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
         "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "image_size": 448,
         "num_image_tokens": 1024, "projection_dim": 2048, "projector_hidden_act": "gelu_fast",
         "vision_use_head": false } }"#;

    #[test]
    fn pg1_defaults_fill_omitted_fields() {
        let c = PaliGemmaConfig::from_json_str(PG1_448).unwrap();
        assert_eq!(c.text.version, GemmaVersion::Gemma1);
        assert_eq!(c.text.head_dim, 256);
        assert_eq!(c.text.rope_theta, 10000.0);
        assert_eq!(c.text.final_logit_softcapping, None);
        assert_eq!(c.vision.num_image_tokens(), 1024);
        assert_eq!(c.vision.layer_norm_eps, 1e-6);
        assert_eq!(c.text.attention_scale(), 1.0 / 16.0);
        assert_eq!(c.eos_token_ids, vec![1]);
    }

    #[test]
    fn pg2_28b_uses_query_pre_attn_scalar() {
        let json = r#"{"model_type":"paligemma","image_token_index":257152,"projection_dim":4608,
          "eos_token_id":[1,107],
          "text_config":{"model_type":"gemma2","hidden_size":4608,"num_hidden_layers":46,
            "num_attention_heads":32,"num_key_value_heads":16,"head_dim":128,
            "query_pre_attn_scalar":144,"intermediate_size":36864,"vocab_size":257216},
          "vision_config":{"hidden_size":1152,"intermediate_size":4304,"num_attention_heads":16,
            "num_hidden_layers":27,"patch_size":14,"image_size":896}}"#;
        let c = PaliGemmaConfig::from_json_str(json).unwrap();
        assert_eq!(c.text.version, GemmaVersion::Gemma2);
        assert_eq!(c.text.attention_scale(), 1.0 / 12.0);
        assert_eq!(c.text.attn_logit_softcapping, Some(50.0));
        assert_eq!(c.text.final_logit_softcapping, Some(30.0));
        assert_eq!(c.vision.num_image_tokens(), 4096);
        assert_eq!(c.eos_token_ids, vec![1, 107]);
    }

    #[test]
    fn other_model_types_are_rejected() {
        let err = PaliGemmaConfig::from_json_str(r#"{"model_type":"llama"}"#).unwrap_err();
        assert!(
            err.to_string().contains("not a PaliGemma checkpoint"),
            "{err}"
        );
        let err = PaliGemmaConfig::from_json_str(
            r#"{"model_type":"paligemma","text_config":{"model_type":"mistral"}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("mistral"), "{err}");
        let err = PaliGemmaConfig::from_json_str("[1,2]").unwrap_err();
        assert!(err.to_string().contains("JSON object"), "{err}");
    }

    #[test]
    fn inconsistent_shapes_are_rejected() {
        let json = r#"{"model_type":"paligemma","projection_dim":2048,
          "text_config":{"hidden_size":2048,"num_attention_heads":8,"num_key_value_heads":3}}"#;
        let err = PaliGemmaConfig::from_json_str(json).unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    }
}
