//! The Gemma decoder: Gemma 1 (PaliGemma 1) and Gemma 2 (PaliGemma 2).
//!
//! Gemma 2 differs by sandwich norms around attention and MLP, `query_pre_attn_scalar`
//! scaling, and tanh soft-capping of attention scores and final logits. The embedding matrix is
//! tied to the output head.

use crate::config::{Activation, GemmaVersion, TextConfig};
use crate::kv_cache::KvCache;
use crate::ops::activation;
use crate::ops::autodiff;
use crate::ops::linear::{Linear, VisitParams, WeightFormat};
use crate::siglip;
use crate::weights::{WeightStore, WeightsError};
use candle_core::{D, DType, Device, Result, Tensor};

/// Gemma's RMSNorm: `x / sqrt(mean(x²) + eps) · (1 + w)`; the stored weight is zero-centred.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// `w`, as stored.
    weight: Tensor,
    /// `1 + w`, formed at load; a trained `w` forms it in the forward instead, so that the
    /// updates take effect and the gradient reaches `w`.
    scale: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(
        store: &WeightStore,
        name: &str,
        dim: usize,
        eps: f64,
        dev: &Device,
    ) -> std::result::Result<Self, WeightsError> {
        let weight = store.f32(name, &[dim], dev)?;
        let scale = (&weight + 1.0).map_err(|source| WeightsError::Candle {
            name: name.into(),
            source,
        })?;
        Ok(Self {
            weight,
            scale,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.weight.track_op() {
            autodiff::rms_norm(x, &(&self.weight + 1.0)?, self.eps)
        } else {
            autodiff::rms_norm(x, &self.scale, self.eps)
        }
    }

    fn visit_params_mut(&mut self, prefix: &str, f: VisitParams<'_>) -> Result<()> {
        f(&format!("{prefix}.weight"), &mut self.weight)?;
        self.scale = (&self.weight + 1.0)?.detach();
        Ok(())
    }
}

/// `cap · tanh(x / cap)`.
pub fn soft_cap(x: &Tensor, cap: f64) -> Result<Tensor> {
    (x / cap)?.tanh()? * cap
}

/// Rotary position embedding tables for given positions: `cos`, `sin` of shape
/// `[B, 1, L, head_dim/2]`, computed in f32 as transformers does.
pub fn rope_tables(
    positions: &[Vec<u32>],
    head_dim: usize,
    theta: f64,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let b = positions.len();
    let l = positions.first().map_or(0, |p| p.len());
    let mut cos = Vec::with_capacity(b * l * half);
    let mut sin = Vec::with_capacity(b * l * half);
    for row in positions {
        for &p in row {
            for &f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    Ok((
        Tensor::from_vec(cos, (b, 1, l, half), dev)?,
        Tensor::from_vec(sin, (b, 1, l, half), dev)?,
    ))
}

/// Rotates halves (not interleaved pairs): `[x1, x2] → [x1·cos − x2·sin, x2·cos + x1·sin]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[r1, r2], D::Minus1)
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    softcap: Option<f64>,
}

impl Attention {
    /// `x` `[B, L, H]`; `mask` `[B, 1, L, S]` where `S` counts cached plus new slots.
    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        mask: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let split = |t: Tensor, heads: usize| -> Result<Tensor> {
            t.reshape((b, l, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q_proj.forward(x)?, self.heads)?;
        let k = split(self.k_proj.forward(x)?, self.kv_heads)?;
        let v = split(self.v_proj.forward(x)?, self.kv_heads)?;
        let q = apply_rope(&q, &rope.0, &rope.1)?;
        let k = apply_rope(&k, &rope.0, &rope.1)?;
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, &k, &v)?,
            None => (k, v),
        };
        let s = k.dim(2)?;
        // Grouped queries: the `group` query heads sharing a KV head are stacked along the
        // sequence axis, so K and V are used as they are, never repeated per head.
        let group = self.heads / self.kv_heads;
        let q = q.reshape((b, self.kv_heads, group * l, self.head_dim))?;
        let mut scores = (q.matmul(&k.t()?)? * self.scale)?;
        if let Some(cap) = self.softcap {
            scores = soft_cap(&scores, cap)?;
        }
        let scores = scores.reshape((b, self.kv_heads, group, l, s))?;
        let probs = autodiff::masked_softmax_last_dim(&scores, &mask.unsqueeze(2)?)?;
        let probs = probs.reshape((b, self.kv_heads, group * l, s))?;
        let ctx = probs
            .matmul(&v)?
            .reshape((b, self.heads, l, self.head_dim))?
            .transpose(1, 2)?
            .reshape((b, l, self.heads * self.head_dim))?;
        self.o_proj.forward(&ctx)
    }

    fn visit_params_mut(&mut self, prefix: &str, f: VisitParams<'_>) -> Result<()> {
        self.q_proj
            .visit_params_mut(&format!("{prefix}.q_proj"), f)?;
        self.k_proj
            .visit_params_mut(&format!("{prefix}.k_proj"), f)?;
        self.v_proj
            .visit_params_mut(&format!("{prefix}.v_proj"), f)?;
        self.o_proj.visit_params_mut(&format!("{prefix}.o_proj"), f)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: Activation,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        let h = match self.act {
            // One pass instead of three at inference; the same values as below.
            Activation::GeluTanh if !gate.track_op() && !up.track_op() => {
                activation::gelu_tanh_mul(&gate, &up)?
            }
            act => (siglip::activation(&gate, act)? * up)?,
        };
        self.down_proj.forward(&h)
    }

    fn visit_params_mut(&mut self, prefix: &str, f: VisitParams<'_>) -> Result<()> {
        self.gate_proj
            .visit_params_mut(&format!("{prefix}.gate_proj"), f)?;
        self.up_proj
            .visit_params_mut(&format!("{prefix}.up_proj"), f)?;
        self.down_proj
            .visit_params_mut(&format!("{prefix}.down_proj"), f)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    /// Gemma 2 only.
    pre_feedforward_layernorm: Option<RmsNorm>,
    post_feedforward_layernorm: Option<RmsNorm>,
    mlp: Mlp,
}

impl DecoderLayer {
    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        mask: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let attn = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, rope, mask, cache)?;
        match (
            &self.pre_feedforward_layernorm,
            &self.post_feedforward_layernorm,
        ) {
            (Some(pre), Some(post)) => {
                let h = (x + self.post_attention_layernorm.forward(&attn)?)?;
                let m = self.mlp.forward(&pre.forward(&h)?)?;
                h + post.forward(&m)?
            }
            _ => {
                let h = (x + attn)?;
                let m = self
                    .mlp
                    .forward(&self.post_attention_layernorm.forward(&h)?)?;
                h + m
            }
        }
    }

    /// In the order of transformers' `named_parameters`.
    fn visit_params_mut(&mut self, prefix: &str, f: VisitParams<'_>) -> Result<()> {
        self.self_attn
            .visit_params_mut(&format!("{prefix}.self_attn"), f)?;
        self.mlp.visit_params_mut(&format!("{prefix}.mlp"), f)?;
        self.input_layernorm
            .visit_params_mut(&format!("{prefix}.input_layernorm"), f)?;
        self.post_attention_layernorm
            .visit_params_mut(&format!("{prefix}.post_attention_layernorm"), f)?;
        if let Some(n) = &mut self.pre_feedforward_layernorm {
            n.visit_params_mut(&format!("{prefix}.pre_feedforward_layernorm"), f)?;
        }
        if let Some(n) = &mut self.post_feedforward_layernorm {
            n.visit_params_mut(&format!("{prefix}.post_feedforward_layernorm"), f)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Decoder {
    /// `[vocab, hidden]`: the token embedding and, tied, the output head.
    embed_tokens: Linear,
    embed_scale: f64,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    cfg: TextConfig,
}

impl Decoder {
    pub fn load(
        store: &WeightStore,
        cfg: &TextConfig,
        format: WeightFormat,
        dev: &Device,
    ) -> std::result::Result<Self, WeightsError> {
        let p = "language_model.model";
        let h = cfg.hidden_size;
        let eps = cfg.rms_norm_eps;
        let embed_tokens = Linear::load(
            store,
            &format!("{p}.embed_tokens"),
            h,
            cfg.vocab_size,
            false,
            format,
            dev,
        )?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = format!("{p}.layers.{i}");
            let lin = |name: &str, i: usize, o: usize| {
                Linear::load(store, &format!("{l}.{name}"), i, o, false, format, dev)
            };
            let norm =
                |name: &str| RmsNorm::load(store, &format!("{l}.{name}.weight"), h, eps, dev);
            let (pre_ff, post_ff) = match cfg.version {
                GemmaVersion::Gemma1 => (None, None),
                GemmaVersion::Gemma2 => (
                    Some(norm("pre_feedforward_layernorm")?),
                    Some(norm("post_feedforward_layernorm")?),
                ),
            };
            let (nh, nkv, hd) = (
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.head_dim,
            );
            layers.push(DecoderLayer {
                input_layernorm: norm("input_layernorm")?,
                self_attn: Attention {
                    q_proj: lin("self_attn.q_proj", h, nh * hd)?,
                    k_proj: lin("self_attn.k_proj", h, nkv * hd)?,
                    v_proj: lin("self_attn.v_proj", h, nkv * hd)?,
                    o_proj: lin("self_attn.o_proj", nh * hd, h)?,
                    heads: nh,
                    kv_heads: nkv,
                    head_dim: hd,
                    scale: cfg.attention_scale(),
                    softcap: cfg.attn_logit_softcapping,
                },
                post_attention_layernorm: norm("post_attention_layernorm")?,
                pre_feedforward_layernorm: pre_ff,
                post_feedforward_layernorm: post_ff,
                mlp: Mlp {
                    gate_proj: lin("mlp.gate_proj", h, cfg.intermediate_size)?,
                    up_proj: lin("mlp.up_proj", h, cfg.intermediate_size)?,
                    down_proj: lin("mlp.down_proj", cfg.intermediate_size, h)?,
                    act: cfg.hidden_act,
                },
            });
        }
        // transformers keeps sqrt(hidden) as an f32 buffer cast to the weight dtype.
        let scale = (h as f64).sqrt() as f32;
        let embed_scale = match format {
            WeightFormat::F32 => scale as f64,
            WeightFormat::Bf16 => half::bf16::from_f32(scale).to_f64(),
            WeightFormat::Quant(_) => scale as f64,
        };
        Ok(Self {
            embed_tokens,
            embed_scale,
            layers,
            norm: RmsNorm::load(store, &format!("{p}.norm.weight"), h, eps, dev)?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// The linear layers of every decoder layer (`q/k/v/o_proj`, `gate/up/down_proj`) under
    /// their Hub module names (`language_model.model.layers.{i}.self_attn.q_proj`, ...).
    pub fn visit_layer_linears_mut(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Linear) -> Result<()>,
    ) -> Result<()> {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("language_model.model.layers.{i}");
            let a = &mut layer.self_attn;
            f(&format!("{p}.self_attn.q_proj"), &mut a.q_proj)?;
            f(&format!("{p}.self_attn.k_proj"), &mut a.k_proj)?;
            f(&format!("{p}.self_attn.v_proj"), &mut a.v_proj)?;
            f(&format!("{p}.self_attn.o_proj"), &mut a.o_proj)?;
            let m = &mut layer.mlp;
            f(&format!("{p}.mlp.gate_proj"), &mut m.gate_proj)?;
            f(&format!("{p}.mlp.up_proj"), &mut m.up_proj)?;
            f(&format!("{p}.mlp.down_proj"), &mut m.down_proj)?;
        }
        Ok(())
    }

    /// The token embedding (tied output head) as a linear layer `[vocab, hidden]`.
    pub fn embed_tokens_mut(&mut self) -> &mut Linear {
        &mut self.embed_tokens
    }

    /// Every parameter under its Hub name (`language_model.model.*`); the embedding is tied to
    /// the output head, so it appears once.
    pub fn visit_params_mut(&mut self, f: VisitParams<'_>) -> Result<()> {
        let p = "language_model.model";
        self.embed_tokens
            .visit_params_mut(&format!("{p}.embed_tokens"), f)?;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.visit_params_mut(&format!("{p}.layers.{i}"), f)?;
        }
        self.norm.visit_params_mut(&format!("{p}.norm"), f)
    }

    /// Token embeddings `[n, hidden]`, scaled by `sqrt(hidden)`.
    pub fn embed(&self, ids: &[u32], dev: &Device) -> Result<Tensor> {
        self.embed_tokens.rows(ids, dev)? * self.embed_scale
    }

    /// Runs the layers over `x` `[B, L, H]` (queries in slots `past..past+L`), returning the
    /// final-normed hidden states. With a cache, the new keys and values are stored in it.
    pub fn forward(
        &self,
        x: &Tensor,
        positions: &[Vec<u32>],
        mask: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let rope = rope_tables(
            positions,
            self.cfg.head_dim,
            self.cfg.rope_theta,
            x.device(),
        )?;
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let c = cache.as_deref_mut().map(|c| (c, i));
            h = layer.forward(&h, &rope, mask, c)?;
        }
        if let Some(c) = cache {
            c.advance(x.dim(1)?);
        }
        self.norm.forward(&h)
    }

    /// Output logits `[..., vocab]` for final hidden states `[..., H]`, soft-capped for
    /// Gemma 2.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = self.embed_tokens.forward(hidden)?;
        match self.cfg.final_logit_softcapping {
            Some(cap) => soft_cap(&logits, cap),
            None => Ok(logits),
        }
    }

    pub fn new_cache(&self, batch: usize, capacity: usize, dev: &Device) -> Result<KvCache> {
        KvCache::new(
            self.cfg.num_hidden_layers,
            batch,
            self.cfg.num_key_value_heads,
            capacity,
            self.cfg.head_dim,
            dev,
        )
    }
}

/// Log-softmax over the last dimension in f32.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)
}
