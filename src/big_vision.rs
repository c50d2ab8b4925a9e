//! big_vision PaliGemma 1 / 2 checkpoints (`.npz`), loaded as a [`WeightStore`] under the
//! Hub's tensor names, with the configuration inferred from the tensor shapes.
//!
//! The archive holds the Flax parameter tree, paths joined by `/` (optionally under `params/`):
//! `img/…` (SigLIP; its `head` is the projector) and `llm/…` (Gemma). Per-layer tensors are
//! stacked on a leading depth axis (`nn.scan`), kernels are `[in, out]`, attention kernels are
//! einsum-shaped, and the conv kernel is HWIO. Loading slices each layer out and rearranges it
//! into the Hub layout the rest of the crate reads (`[out, in]` Linear weights, OIHW conv),
//! exactly as transformers' `convert_paligemma{,2}_weights_to_hf.py` do: values are only moved,
//! never rounded, so bf16 stays bf16 and f32 stays f32.
//!
//! Embedding rows: big_vision's table has the 257152 trained tokens (Gemma's 256000 + 1024
//! `<loc>` + 128 `<seg>`); the Hub's has 257216, the `<image>` token (id 257152) and padding
//! to a multiple of 64 added by the converter with random samples. Those rows are never looked
//! up for a real input (image slots are replaced by image features) and only add output columns,
//! so we append them filled with **zeros**: logits on every real token are identical to the
//! converted Hub checkpoint's, and the extra columns score 0.

use crate::checkpoint::ModelFiles;
use crate::config::{
    Activation, ConfigError, GemmaVersion, PaliGemmaConfig, TextConfig, VisionConfig,
};
use crate::npz::{NpyArray, NpyDtype, NpzArchive, NpzError};
use crate::weights::{WeightStore, WeightsError};
use rayon::prelude::*;
use safetensors::Dtype;
use std::borrow::Cow;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum BigVisionError {
    #[error(transparent)]
    Npz(#[from] NpzError),
    #[error("{path} is not a big_vision PaliGemma checkpoint: {reason}")]
    NotPaliGemma { path: String, reason: String },
    #[error("{path}: tensor `{name}` is missing from the checkpoint")]
    Missing { path: String, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected}")]
    Shape {
        path: String,
        name: String,
        found: Vec<usize>,
        expected: String,
    },
    #[error("{path}: tensor `{name}` has dtype {dtype:?}; weights must be f32, bf16, f16 or f64")]
    Dtype {
        path: String,
        name: String,
        dtype: NpyDtype,
    },
    #[error("{path}: {msg}")]
    Config { path: String, msg: String },
    #[error(transparent)]
    ConfigFile(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

/// What the tensor shapes cannot tell.
#[derive(Debug, Clone, Default)]
pub struct BigVisionOptions {
    /// Gemma 2's attention scale is `query_pre_attn_scalar^-1/2`. `None` applies the released
    /// rule: `hidden / heads` (144) for the 28B model (big_vision's `rsqrt_emb_per_head`),
    /// `head_dim` for every other size.
    pub query_pre_attn_scalar: Option<f64>,
}

/// PaliGemma's trained vocabulary: Gemma's 256000 tokens, 1024 `<loc>`, 128 `<seg>`. The
/// Hub adds `<image>` at this id.
pub const TRAINED_VOCAB: usize = 257_152;

/// Loads a checkpoint with its configuration inferred from the shapes.
pub fn load(
    path: &Path,
    opts: &BigVisionOptions,
) -> Result<(PaliGemmaConfig, WeightStore), BigVisionError> {
    let archive = NpzArchive::open(path)?;
    let config = infer_config(&archive, opts)?;
    let store = load_weights(&archive, &config)?;
    Ok((config, store))
}

/// Loads the checkpoint [`ModelFiles`] name for a `.npz`. When `files.config` is a JSON file
/// (a `<stem>.config.json` sidecar), its values are used, after checking every size in it
/// against the tensors; it is how fields the shapes cannot tell (`query_pre_attn_scalar`,
/// `image_token_index`, stop tokens…) reach the CLI.
pub fn load_files(files: &ModelFiles) -> Result<(PaliGemmaConfig, WeightStore), BigVisionError> {
    let [npz] = files.weights.as_slice() else {
        return Err(BigVisionError::Config {
            path: files.dir.display().to_string(),
            msg: format!(
                "a big_vision checkpoint is one .npz file, got {:?}",
                files.weights
            ),
        });
    };
    let archive = NpzArchive::open(npz)?;
    let (inferred, rows) = infer(&archive, &BigVisionOptions::default())?;
    let config = if files.config.extension().is_some_and(|e| e == "json") {
        let given = PaliGemmaConfig::load(&files.config)?;
        reconcile(&inferred, rows, given).map_err(|msg| BigVisionError::Config {
            path: files.config.display().to_string(),
            msg: format!("disagrees with {}: {msg}", npz.display()),
        })?
    } else {
        inferred
    };
    let store = load_weights(&archive, &config)?;
    Ok((config, store))
}

// ---------------------------------------------------------------------------------------------
// Parameter tree
// ---------------------------------------------------------------------------------------------

/// Tree paths, relative to the `params/` root when there is one.
mod names {
    pub const EMBEDDING: &str = "llm/embedder/input_embedding";
    pub const FINAL_NORM: &str = "llm/final_norm/scale";
    pub const Q: &str = "llm/layers/attn/q_einsum/w";
    pub const KV: &str = "llm/layers/attn/kv_einsum/w";
    /// Full multi-head attention (kv heads == heads) stores q, k and v together.
    pub const QKV: &str = "llm/layers/attn/qkv_einsum/w";
    pub const ATTN_OUT: &str = "llm/layers/attn/attn_vec_einsum/w";
    pub const GATING: &str = "llm/layers/mlp/gating_einsum";
    pub const LINEAR: &str = "llm/layers/mlp/linear";
    pub const PRE_ATTN: &str = "llm/layers/pre_attention_norm/scale";
    pub const PRE_FFW: &str = "llm/layers/pre_ffw_norm/scale";
    pub const POST_ATTN: &str = "llm/layers/post_attention_norm/scale";
    pub const POST_FFW: &str = "llm/layers/post_ffw_norm/scale";

    pub const PATCH_KERNEL: &str = "img/embedding/kernel";
    pub const PATCH_BIAS: &str = "img/embedding/bias";
    pub const POS: &str = "img/pos_embedding";
    pub const BLOCK: &str = "img/Transformer/encoderblock";
    pub const ENC_NORM: &str = "img/Transformer/encoder_norm";
    pub const HEAD: &str = "img/head";
}

/// The archive seen from the root of its parameter tree.
struct Tree<'a> {
    archive: &'a NpzArchive,
    root: &'static str,
    path: String,
}

/// One leaf: shape, dtype as the store will hold it, and its little-endian C-order bytes.
struct Leaf {
    shape: Vec<usize>,
    dtype: Dtype,
    data: LeafData,
}

enum LeafData {
    /// Borrowed from the archive (f32 / bf16 / f16 as stored).
    Array(NpyArray),
    /// Converted (f64 → f32).
    Converted(Vec<u8>),
}

impl Leaf {
    fn bytes(&self) -> Cow<'_, [u8]> {
        match &self.data {
            LeafData::Array(a) => a.le_bytes(),
            LeafData::Converted(v) => Cow::Borrowed(v),
        }
    }

    fn width(&self) -> usize {
        self.dtype.bitsize() / 8
    }
}

impl<'a> Tree<'a> {
    /// Finds the tree root (`params/` or none) from the embedding table every PaliGemma has.
    fn new(archive: &'a NpzArchive) -> Result<Self, BigVisionError> {
        let path = archive.path().display().to_string();
        for root in ["params/", ""] {
            if archive.contains(&format!("{root}{}", names::EMBEDDING)) {
                return Ok(Self {
                    archive,
                    root,
                    path,
                });
            }
        }
        let names = archive.names();
        let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
        Err(BigVisionError::NotPaliGemma {
            path,
            reason: format!(
                "no `{}` (nor `params/{}`); its {} arrays start with {shown:?}",
                names::EMBEDDING,
                names::EMBEDDING,
                names.len()
            ),
        })
    }

    fn full(&self, name: &str) -> String {
        format!("{}{name}", self.root)
    }

    fn has(&self, name: &str) -> bool {
        self.archive.contains(&self.full(name))
    }

    fn missing(&self, name: &str) -> BigVisionError {
        BigVisionError::Missing {
            path: self.path.clone(),
            name: self.full(name),
        }
    }

    /// Shape of a leaf, from its header only.
    fn shape(&self, name: &str) -> Result<Vec<usize>, BigVisionError> {
        if !self.has(name) {
            return Err(self.missing(name));
        }
        Ok(self.archive.header(&self.full(name))?.0)
    }

    /// Shape of a leaf that must have `rank` axes.
    fn shape_rank(&self, name: &str, rank: usize) -> Result<Vec<usize>, BigVisionError> {
        let shape = self.shape(name)?;
        if shape.len() != rank {
            return Err(self.bad_shape(name, &shape, format!("{rank} axes")));
        }
        Ok(shape)
    }

    fn bad_shape(&self, name: &str, found: &[usize], expected: String) -> BigVisionError {
        BigVisionError::Shape {
            path: self.path.clone(),
            name: self.full(name),
            found: found.to_vec(),
            expected,
        }
    }

    /// Reads a leaf, checking its shape.
    fn leaf(&self, name: &str, shape: &[usize]) -> Result<Leaf, BigVisionError> {
        if !self.has(name) {
            return Err(self.missing(name));
        }
        let full = self.full(name);
        let array = self.archive.array(&full)?;
        if array.shape() != shape {
            return Err(self.bad_shape(name, array.shape(), format!("{shape:?}")));
        }
        let (dtype, data) = match array.dtype() {
            NpyDtype::F32 => (Dtype::F32, LeafData::Array(array)),
            NpyDtype::BF16 => (Dtype::BF16, LeafData::Array(array)),
            NpyDtype::F16 => (Dtype::F16, LeafData::Array(array)),
            // The store holds no f64; f32 is what inference runs in anyway.
            NpyDtype::F64 => {
                let v = array.to_f32_vec();
                (
                    Dtype::F32,
                    LeafData::Converted(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                )
            }
            dtype => {
                return Err(BigVisionError::Dtype {
                    path: self.path.clone(),
                    name: full,
                    dtype,
                });
            }
        };
        Ok(Leaf {
            shape: shape.to_vec(),
            dtype,
            data,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration from shapes
// ---------------------------------------------------------------------------------------------

/// Text decoder sizes read off the tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
struct TextDims {
    rows: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    mlp: usize,
    /// `gating_einsum` is `[L, 2, F, D]` instead of `[L, 2, D, F]` (some Gemma exports).
    gating_fd: bool,
    /// q, k, v in one `qkv_einsum` (multi-head attention).
    fused_qkv: bool,
    version: GemmaVersion,
}

/// Vision tower sizes read off the tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
struct VisionDims {
    hidden: usize,
    layers: usize,
    heads: usize,
    head_dim: usize,
    mlp: usize,
    patch: usize,
    channels: usize,
    grid: usize,
}

fn text_dims(t: &Tree) -> Result<TextDims, BigVisionError> {
    let emb = t.shape_rank(names::EMBEDDING, 2)?;
    let (rows, hidden) = (emb[0], emb[1]);
    let fused_qkv = !t.has(names::Q) && t.has(names::QKV);
    let (layers, heads, kv_heads, head_dim) = if fused_qkv {
        let s = t.shape_rank(names::QKV, 5)?;
        if s[1] != 3 || s[3] != hidden {
            return Err(t.bad_shape(names::QKV, &s, format!("[L, 3, N, {hidden}, H]")));
        }
        (s[0], s[2], s[2], s[4])
    } else {
        let q = t.shape_rank(names::Q, 4)?;
        if q[2] != hidden {
            return Err(t.bad_shape(names::Q, &q, format!("[L, N, {hidden}, H]")));
        }
        let kv = t.shape_rank(names::KV, 5)?;
        if kv[0] != q[0] || kv[1] != 2 || kv[3] != hidden || kv[4] != q[3] {
            let want = format!("[{}, 2, K, {hidden}, {}]", q[0], q[3]);
            return Err(t.bad_shape(names::KV, &kv, want));
        }
        (q[0], q[1], kv[2], q[3])
    };
    let g = t.shape_rank(names::GATING, 4)?;
    if g[0] != layers || g[1] != 2 || (g[2] != hidden && g[3] != hidden) {
        let want = format!("[{layers}, 2, {hidden}, F]");
        return Err(t.bad_shape(names::GATING, &g, want));
    }
    // big_vision's Gemma loader transposes when the first matrix axis is the larger one.
    let gating_fd = g[2] != hidden;
    let mlp = if gating_fd { g[2] } else { g[3] };
    let version = if t.has(names::POST_ATTN) {
        GemmaVersion::Gemma2
    } else {
        GemmaVersion::Gemma1
    };
    Ok(TextDims {
        rows,
        hidden,
        layers,
        heads,
        kv_heads,
        head_dim,
        mlp,
        gating_fd,
        fused_qkv,
        version,
    })
}

fn vision_dims(t: &Tree) -> Result<VisionDims, BigVisionError> {
    let k = t.shape_rank(names::PATCH_KERNEL, 4)?;
    if k[0] != k[1] {
        return Err(t.bad_shape(
            names::PATCH_KERNEL,
            &k,
            "a square patch [P, P, C, W]".into(),
        ));
    }
    let (patch, channels, hidden) = (k[0], k[2], k[3]);
    let pos = t.shape_rank(names::POS, 3)?;
    let grid = (pos[1] as f64).sqrt().round() as usize;
    if pos[0] != 1 || pos[2] != hidden || grid * grid != pos[1] {
        let want = format!("[1, G², {hidden}] for a square grid of G×G patches");
        return Err(t.bad_shape(names::POS, &pos, want));
    }
    let ln = t.shape_rank(&format!("{}/LayerNorm_0/scale", names::BLOCK), 2)?;
    let layers = ln[0];
    let q_name = format!(
        "{}/MultiHeadDotProductAttention_0/query/kernel",
        names::BLOCK
    );
    let q = t.shape_rank(&q_name, 4)?;
    if q[0] != layers || q[1] != hidden || q[2] * q[3] != hidden {
        let want = format!("[{layers}, {hidden}, N, H] with N·H = {hidden}");
        return Err(t.bad_shape(&q_name, &q, want));
    }
    let d0 = format!("{}/MlpBlock_0/Dense_0/kernel", names::BLOCK);
    let mlp = t.shape_rank(&d0, 3)?[2];
    Ok(VisionDims {
        hidden,
        layers,
        heads: q[2],
        head_dim: q[3],
        mlp,
        patch,
        channels,
        grid,
    })
}

/// The released `query_pre_attn_scalar`: `hidden / heads` for PaliGemma 2 28B (gemma2_27b,
/// whose `query_pre_attn_norm` is `rsqrt_emb_per_head`), `head_dim` for the others.
fn released_query_pre_attn_scalar(d: &TextDims) -> f64 {
    let is_27b = d.hidden == 4608 && d.heads == 32 && d.head_dim == 128;
    if is_27b {
        (d.hidden / d.heads) as f64
    } else {
        d.head_dim as f64
    }
}

/// `<image>` id and vocabulary size for a table of `rows` rows, as the Hub conversion has them.
///
/// A table of at most [`TRAINED_VOCAB`] rows is big_vision's: `<image>` is the next id and
/// the converter grew the table with `resize_token_embeddings(rows + 2, pad_to_multiple_of=64)`
/// (257152 → 257216). A larger table was exported from the Hub and already holds `<image>`.
fn vocab_layout(rows: usize) -> (usize, usize) {
    if rows > TRAINED_VOCAB {
        (TRAINED_VOCAB, rows)
    } else {
        (rows, (rows + 2).div_ceil(64) * 64)
    }
}

/// The configuration the Hub's converted checkpoint would have, from the shapes alone.
pub fn infer_config(
    archive: &NpzArchive,
    opts: &BigVisionOptions,
) -> Result<PaliGemmaConfig, BigVisionError> {
    Ok(infer(archive, opts)?.0)
}

/// [`infer_config`], and the number of rows of the checkpoint's embedding table.
fn infer(
    archive: &NpzArchive,
    opts: &BigVisionOptions,
) -> Result<(PaliGemmaConfig, usize), BigVisionError> {
    let t = Tree::new(archive)?;
    let td = text_dims(&t)?;
    let vd = vision_dims(&t)?;
    let head = t.shape_rank(&format!("{}/kernel", names::HEAD), 2)?;
    if head != [vd.hidden, td.hidden] {
        let want = format!("[{}, {}]", vd.hidden, td.hidden);
        return Err(t.bad_shape(&format!("{}/kernel", names::HEAD), &head, want));
    }
    let invalid = |msg: String| BigVisionError::Config {
        path: t.path.clone(),
        msg,
    };
    if td.heads == 0 || td.kv_heads == 0 || !td.heads.is_multiple_of(td.kv_heads) {
        return Err(invalid(format!(
            "{} query heads cannot share {} key/value heads",
            td.heads, td.kv_heads
        )));
    }
    let sizes = [
        ("embedding rows", td.rows),
        ("text width", td.hidden),
        ("text layers", td.layers),
        ("head_dim", td.head_dim),
        ("text MLP width", td.mlp),
        ("vision width", vd.hidden),
        ("vision layers", vd.layers),
        ("vision heads", vd.heads),
        ("vision MLP width", vd.mlp),
        ("patch size", vd.patch),
        ("patch grid", vd.grid),
    ];
    if let Some((what, _)) = sizes.iter().find(|(_, n)| *n == 0) {
        return Err(invalid(format!("the tensors give a {what} of 0")));
    }
    if !td.head_dim.is_multiple_of(2) {
        return Err(invalid(format!(
            "head_dim {} must be even for RoPE",
            td.head_dim
        )));
    }
    let (image_token_index, vocab_size) = vocab_layout(td.rows);
    let gemma2 = td.version == GemmaVersion::Gemma2;
    let text = TextConfig {
        version: td.version,
        vocab_size,
        hidden_size: td.hidden,
        intermediate_size: td.mlp,
        num_hidden_layers: td.layers,
        num_attention_heads: td.heads,
        num_key_value_heads: td.kv_heads,
        head_dim: td.head_dim,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        max_position_embeddings: 8192,
        hidden_act: Activation::GeluTanh,
        query_pre_attn_scalar: gemma2.then(|| {
            opts.query_pre_attn_scalar
                .unwrap_or_else(|| released_query_pre_attn_scalar(&td))
        }),
        attn_logit_softcapping: gemma2.then_some(50.0),
        final_logit_softcapping: gemma2.then_some(30.0),
        sliding_window: gemma2.then_some(4096),
    };
    let vision = VisionConfig {
        hidden_size: vd.hidden,
        intermediate_size: vd.mlp,
        num_hidden_layers: vd.layers,
        num_attention_heads: vd.heads,
        num_channels: vd.channels,
        image_size: vd.grid * vd.patch,
        patch_size: vd.patch,
        layer_norm_eps: 1e-6,
        hidden_act: Activation::GeluTanh,
    };
    let config = PaliGemmaConfig {
        vision,
        text,
        image_token_index: image_token_index as u32,
        projection_dim: td.hidden,
        bos_token_id: 2,
        eos_token_ids: vec![1],
        pad_token_id: 0,
    };
    Ok((config, td.rows))
}

/// `given` (a sidecar config) if every size in it matches the tensors (`inferred`).
fn reconcile(
    inferred: &PaliGemmaConfig,
    rows: usize,
    given: PaliGemmaConfig,
) -> Result<PaliGemmaConfig, String> {
    let (a, b) = (&inferred.vision, &given.vision);
    let (x, y) = (&inferred.text, &given.text);
    let sizes = [
        ("vision_config.hidden_size", a.hidden_size, b.hidden_size),
        (
            "vision_config.intermediate_size",
            a.intermediate_size,
            b.intermediate_size,
        ),
        (
            "vision_config.num_hidden_layers",
            a.num_hidden_layers,
            b.num_hidden_layers,
        ),
        (
            "vision_config.num_attention_heads",
            a.num_attention_heads,
            b.num_attention_heads,
        ),
        ("vision_config.num_channels", a.num_channels, b.num_channels),
        ("vision_config.image_size", a.image_size, b.image_size),
        ("vision_config.patch_size", a.patch_size, b.patch_size),
        ("text_config.hidden_size", x.hidden_size, y.hidden_size),
        (
            "text_config.intermediate_size",
            x.intermediate_size,
            y.intermediate_size,
        ),
        (
            "text_config.num_hidden_layers",
            x.num_hidden_layers,
            y.num_hidden_layers,
        ),
        (
            "text_config.num_attention_heads",
            x.num_attention_heads,
            y.num_attention_heads,
        ),
        (
            "text_config.num_key_value_heads",
            x.num_key_value_heads,
            y.num_key_value_heads,
        ),
        ("text_config.head_dim", x.head_dim, y.head_dim),
        (
            "projection_dim",
            inferred.projection_dim,
            given.projection_dim,
        ),
    ];
    if let Some((name, want, got)) = sizes.iter().find(|(_, want, got)| want != got) {
        return Err(format!("`{name}` is {got}, the tensors say {want}"));
    }
    if x.version != y.version {
        return Err(format!(
            "text_config is {:?}, the tensors are {:?} (post-attention norms present: {})",
            y.version,
            x.version,
            x.version == GemmaVersion::Gemma2
        ));
    }
    // The table must fit; extra rows are padding (see the module docs).
    if y.vocab_size < rows {
        return Err(format!(
            "`text_config.vocab_size` is {}, below the checkpoint's {rows} embedding rows",
            y.vocab_size
        ));
    }
    if given.image_token_index as usize >= y.vocab_size {
        return Err(format!(
            "`image_token_index` {} is outside the vocabulary of {}",
            given.image_token_index, y.vocab_size
        ));
    }
    Ok(given)
}

// ---------------------------------------------------------------------------------------------
// Weights
// ---------------------------------------------------------------------------------------------

/// One tensor for [`WeightStore::from_owned`].
type Owned = (String, Dtype, Vec<usize>, Vec<u8>);

/// Reads every tensor of the checkpoint into the Hub layout for `config` (normally
/// [`infer_config`]'s, or a sidecar's that agrees with it).
pub fn load_weights(
    archive: &NpzArchive,
    config: &PaliGemmaConfig,
) -> Result<WeightStore, BigVisionError> {
    let t = Tree::new(archive)?;
    let td = text_dims(&t)?;
    let vd = vision_dims(&t)?;
    let mut out: Vec<Owned> = Vec::new();
    vision_weights(&t, &vd, td.hidden, &mut out)?;
    text_weights(&t, &td, config.text.vocab_size, &mut out)?;
    Ok(WeightStore::from_owned(out)?)
}

const VT: &str = "vision_tower.vision_model";
const LM: &str = "language_model.model";

fn vision_weights(
    t: &Tree,
    d: &VisionDims,
    text_hidden: usize,
    out: &mut Vec<Owned>,
) -> Result<(), BigVisionError> {
    let (w, l, p, c) = (d.hidden, d.layers, d.patch, d.channels);
    // HWIO → OIHW: [(P·P·C), O] → [O, P·P, C] → [O, C, P·P].
    let k = t.leaf(names::PATCH_KERNEL, &[p, p, c, w])?;
    let oihw = {
        let b = k.bytes();
        let o_hwc = transpose(&b, 1, p * p * c, w, k.width());
        transpose(&o_hwc, w, p * p, c, k.width())
    };
    push(
        out,
        format!("{VT}.embeddings.patch_embedding.weight"),
        &k,
        vec![w, c, p, p],
        oihw,
    );
    copy(
        out,
        t,
        names::PATCH_BIAS,
        &[w],
        format!("{VT}.embeddings.patch_embedding.bias"),
    )?;
    let n = d.grid * d.grid;
    let pos = t.leaf(names::POS, &[1, n, w])?;
    let bytes = pos.bytes().into_owned();
    push(
        out,
        format!("{VT}.embeddings.position_embedding.weight"),
        &pos,
        vec![n, w],
        bytes,
    );

    let blk = names::BLOCK;
    let layer_name = |i: usize, s: &str| format!("{VT}.encoder.layers.{i}.{s}");
    for (src, dst) in [
        ("LayerNorm_0/scale", "layer_norm1.weight"),
        ("LayerNorm_0/bias", "layer_norm1.bias"),
        ("LayerNorm_1/scale", "layer_norm2.weight"),
        ("LayerNorm_1/bias", "layer_norm2.bias"),
        (
            "MultiHeadDotProductAttention_0/out/bias",
            "self_attn.out_proj.bias",
        ),
        ("MlpBlock_0/Dense_1/bias", "mlp.fc2.bias"),
    ] {
        let leaf = t.leaf(&format!("{blk}/{src}"), &[l, w])?;
        per_layer(out, &leaf, |i| layer_name(i, dst), vec![w], |s| s.to_vec());
    }
    let (nh, hd) = (d.heads, d.head_dim);
    for (src, dst) in [("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")] {
        // kernel [W, N, Hd] is [in, out]; bias [N, Hd] flattens to [out].
        let attn = format!("{blk}/MultiHeadDotProductAttention_0/{src}");
        let k = t.leaf(&format!("{attn}/kernel"), &[l, w, nh, hd])?;
        let kw = k.width();
        per_layer(
            out,
            &k,
            |i| layer_name(i, &format!("self_attn.{dst}.weight")),
            vec![w, w],
            |s| transpose(s, 1, w, w, kw),
        );
        let b = t.leaf(&format!("{attn}/bias"), &[l, nh, hd])?;
        per_layer(
            out,
            &b,
            |i| layer_name(i, &format!("self_attn.{dst}.bias")),
            vec![w],
            |s| s.to_vec(),
        );
    }
    let o = t.leaf(
        &format!("{blk}/MultiHeadDotProductAttention_0/out/kernel"),
        &[l, nh, hd, w],
    )?;
    let ow = o.width();
    per_layer(
        out,
        &o,
        |i| layer_name(i, "self_attn.out_proj.weight"),
        vec![w, w],
        |s| transpose(s, 1, w, w, ow),
    );
    let m = d.mlp;
    for (dense, dst, rows, cols) in [("Dense_0", "mlp.fc1", w, m), ("Dense_1", "mlp.fc2", m, w)] {
        let k = t.leaf(
            &format!("{blk}/MlpBlock_0/{dense}/kernel"),
            &[l, rows, cols],
        )?;
        let kw = k.width();
        per_layer(
            out,
            &k,
            |i| layer_name(i, &format!("{dst}.weight")),
            vec![cols, rows],
            |s| transpose(s, 1, rows, cols, kw),
        );
    }
    let b0 = t.leaf(&format!("{blk}/MlpBlock_0/Dense_0/bias"), &[l, m])?;
    per_layer(
        out,
        &b0,
        |i| layer_name(i, "mlp.fc1.bias"),
        vec![m],
        |s| s.to_vec(),
    );

    let norm = names::ENC_NORM;
    copy(
        out,
        t,
        &format!("{norm}/scale"),
        &[w],
        format!("{VT}.post_layernorm.weight"),
    )?;
    copy(
        out,
        t,
        &format!("{norm}/bias"),
        &[w],
        format!("{VT}.post_layernorm.bias"),
    )?;
    let head = t.leaf(&format!("{}/kernel", names::HEAD), &[w, text_hidden])?;
    let hb = transpose(&head.bytes(), 1, w, text_hidden, head.width());
    push(
        out,
        "multi_modal_projector.linear.weight".into(),
        &head,
        vec![text_hidden, w],
        hb,
    );
    let bias = format!("{}/bias", names::HEAD);
    copy(
        out,
        t,
        &bias,
        &[text_hidden],
        "multi_modal_projector.linear.bias".into(),
    )?;
    Ok(())
}

fn text_weights(
    t: &Tree,
    d: &TextDims,
    vocab_size: usize,
    out: &mut Vec<Owned>,
) -> Result<(), BigVisionError> {
    let (h, l, n, k, hd, f) = (d.hidden, d.layers, d.heads, d.kv_heads, d.head_dim, d.mlp);
    if vocab_size < d.rows {
        return Err(BigVisionError::Config {
            path: t.path.clone(),
            msg: format!(
                "vocab_size {vocab_size} is below the {} embedding rows",
                d.rows
            ),
        });
    }
    // Appended rows (the `<image>` token and padding) are zeros: see the module docs.
    let emb = t.leaf(names::EMBEDDING, &[d.rows, h])?;
    let mut table = emb.bytes().into_owned();
    table.resize(vocab_size * h * emb.width(), 0);
    push(
        out,
        format!("{LM}.embed_tokens.weight"),
        &emb,
        vec![vocab_size, h],
        table,
    );
    copy(out, t, names::FINAL_NORM, &[h], format!("{LM}.norm.weight"))?;

    let layer_name = |i: usize, s: &str| format!("{LM}.layers.{i}.self_attn.{s}.weight");
    // [N, D, H] per head → [N, H, D] = [N·H, D] (`[out, in]`).
    let heads_to_hub = |s: &[u8], heads: usize, w: usize| transpose(s, heads, h, hd, w);
    if d.fused_qkv {
        let qkv = t.leaf(names::QKV, &[l, 3, n, h, hd])?;
        let w = qkv.width();
        for (j, proj) in ["q_proj", "k_proj", "v_proj"].into_iter().enumerate() {
            per_layer(
                out,
                &qkv,
                |i| layer_name(i, proj),
                vec![n * hd, h],
                |s| heads_to_hub(part(s, 3, j), n, w),
            );
        }
    } else {
        let q = t.leaf(names::Q, &[l, n, h, hd])?;
        let w = q.width();
        per_layer(
            out,
            &q,
            |i| layer_name(i, "q_proj"),
            vec![n * hd, h],
            |s| heads_to_hub(s, n, w),
        );
        let kv = t.leaf(names::KV, &[l, 2, k, h, hd])?;
        let w = kv.width();
        for (j, proj) in ["k_proj", "v_proj"].into_iter().enumerate() {
            per_layer(
                out,
                &kv,
                |i| layer_name(i, proj),
                vec![k * hd, h],
                |s| heads_to_hub(part(s, 2, j), k, w),
            );
        }
    }
    // [N, H, D] = [(N·H), D] → [D, N·H].
    let o = t.leaf(names::ATTN_OUT, &[l, n, hd, h])?;
    let w = o.width();
    per_layer(
        out,
        &o,
        |i| layer_name(i, "o_proj"),
        vec![h, n * hd],
        |s| transpose(s, 1, n * hd, h, w),
    );

    let mlp_name = |i: usize, s: &str| format!("{LM}.layers.{i}.mlp.{s}.weight");
    let g_shape = if d.gating_fd {
        [l, 2, f, h]
    } else {
        [l, 2, h, f]
    };
    let g = t.leaf(names::GATING, &g_shape)?;
    let w = g.width();
    for (j, proj) in ["gate_proj", "up_proj"].into_iter().enumerate() {
        per_layer(
            out,
            &g,
            |i| mlp_name(i, proj),
            vec![f, h],
            |s| {
                let m = part(s, 2, j);
                // Already `[F, D]` in the transposed export.
                if d.gating_fd {
                    m.to_vec()
                } else {
                    transpose(m, 1, h, f, w)
                }
            },
        );
    }
    let lin = t.leaf(names::LINEAR, &[l, f, h])?;
    let w = lin.width();
    per_layer(
        out,
        &lin,
        |i| mlp_name(i, "down_proj"),
        vec![h, f],
        |s| transpose(s, 1, f, h, w),
    );

    // Gemma 1 has two norms per layer, Gemma 2 four; the Hub names them differently.
    let norms: &[(&str, &str)] = match d.version {
        GemmaVersion::Gemma1 => &[
            (names::PRE_ATTN, "input_layernorm"),
            (names::PRE_FFW, "post_attention_layernorm"),
        ],
        GemmaVersion::Gemma2 => &[
            (names::PRE_ATTN, "input_layernorm"),
            (names::POST_ATTN, "post_attention_layernorm"),
            (names::PRE_FFW, "pre_feedforward_layernorm"),
            (names::POST_FFW, "post_feedforward_layernorm"),
        ],
    };
    for (src, dst) in norms {
        let leaf = t.leaf(src, &[l, h])?;
        per_layer(
            out,
            &leaf,
            |i| format!("{LM}.layers.{i}.{dst}.weight"),
            vec![h],
            |s| s.to_vec(),
        );
    }
    Ok(())
}

fn push(out: &mut Vec<Owned>, name: String, leaf: &Leaf, shape: Vec<usize>, bytes: Vec<u8>) {
    out.push((name, leaf.dtype, shape, bytes));
}

/// A leaf copied as it is (the shape it has is the Hub's).
fn copy(
    out: &mut Vec<Owned>,
    t: &Tree,
    name: &str,
    shape: &[usize],
    hub: String,
) -> Result<(), BigVisionError> {
    let leaf = t.leaf(name, shape)?;
    let bytes = leaf.bytes().into_owned();
    push(out, hub, &leaf, shape.to_vec(), bytes);
    Ok(())
}

/// Emits one tensor per layer of a depth-stacked leaf: `convert` gets layer `i`'s bytes.
fn per_layer(
    out: &mut Vec<Owned>,
    leaf: &Leaf,
    name: impl Fn(usize) -> String,
    shape: Vec<usize>,
    convert: impl Fn(&[u8]) -> Vec<u8>,
) {
    let bytes = leaf.bytes();
    let layers = leaf.shape[0];
    let per = bytes.len() / layers.max(1);
    for i in 0..layers {
        let converted = convert(&bytes[i * per..(i + 1) * per]);
        out.push((name(i), leaf.dtype, shape.clone(), converted));
    }
}

/// Part `j` of `parts` equal parts (index `j` on the leading axis).
fn part(s: &[u8], parts: usize, j: usize) -> &[u8] {
    let len = s.len() / parts;
    &s[j * len..(j + 1) * len]
}

/// Transposes `batch` row-major `[rows, cols]` matrices of `width`-byte elements into
/// `[cols, rows]` ones.
pub fn transpose(src: &[u8], batch: usize, rows: usize, cols: usize, width: usize) -> Vec<u8> {
    match width {
        2 => transpose_n::<2>(src, batch, rows, cols),
        4 => transpose_n::<4>(src, batch, rows, cols),
        8 => transpose_n::<8>(src, batch, rows, cols),
        _ => transpose_n::<1>(src, batch, rows, cols * width),
    }
}

fn transpose_n<const N: usize>(src: &[u8], batch: usize, rows: usize, cols: usize) -> Vec<u8> {
    // Blocks of B×B elements keep both the reads and the writes within cache lines.
    const B: usize = 32;
    let (src, _) = src.as_chunks::<N>();
    let size = rows * cols;
    let mut out = vec![[0u8; N]; batch * size];
    if size == 0 {
        return out.into_flattened();
    }
    out.par_chunks_mut(size)
        .zip(src.par_chunks(size))
        .for_each(|(dst, s)| {
            // Each task owns B output rows (= B input columns).
            dst.par_chunks_mut(B * rows)
                .enumerate()
                .for_each(|(blk, dst)| {
                    let c0 = blk * B;
                    let c_end = (c0 + B).min(cols);
                    for r0 in (0..rows).step_by(B) {
                        let r_end = (r0 + B).min(rows);
                        for c in c0..c_end {
                            let row = &mut dst[(c - c0) * rows..(c - c0 + 1) * rows];
                            for r in r0..r_end {
                                row[r] = s[r * cols + c];
                            }
                        }
                    }
                });
        });
    out.into_flattened()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_moves_elements() {
        // Two 2×3 matrices of 2-byte elements 0..12.
        let src: Vec<u8> = (0u16..12).flat_map(|v| v.to_le_bytes()).collect();
        let t = transpose(&src, 2, 2, 3, 2);
        let got: Vec<u16> = t
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(got, vec![0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]);
        // Larger than one block, 4-byte elements.
        let (r, c) = (70, 45);
        let src: Vec<u8> = (0u32..(r * c) as u32)
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let t = transpose(&src, 1, r, c, 4);
        let back = transpose(&t, 1, c, r, 4);
        assert_eq!(back, src);
        let at = |i: usize| u32::from_le_bytes(t[4 * i..4 * i + 4].try_into().unwrap());
        assert_eq!(at(3 * r + 5), (5 * c + 3) as u32);
    }

    #[test]
    fn vocabulary_layout_follows_the_hub_converter() {
        assert_eq!(vocab_layout(257_152), (257_152, 257_216));
        assert_eq!(vocab_layout(257_216), (257_152, 257_216));
        // The tiny test checkpoints: 300 trained rows, `<image>` = 300, 320 rows on the Hub.
        assert_eq!(vocab_layout(300), (300, 320));
    }

    #[test]
    fn released_attention_scalars() {
        let mut d = TextDims {
            rows: 257_152,
            hidden: 2304,
            layers: 26,
            heads: 8,
            kv_heads: 4,
            head_dim: 256,
            mlp: 9216,
            gating_fd: false,
            fused_qkv: false,
            version: GemmaVersion::Gemma2,
        };
        assert_eq!(released_query_pre_attn_scalar(&d), 256.0);
        (d.hidden, d.heads, d.kv_heads, d.head_dim) = (4608, 32, 16, 128);
        assert_eq!(released_query_pre_attn_scalar(&d), 144.0);
    }
}
