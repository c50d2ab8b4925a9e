//! SigLIP image encoder (So400m/14 in every PaliGemma): patches → linear patch embedding
//! + learned positions → pre-LN transformer encoder → final LayerNorm. No pooling head.

use crate::config::{Activation, VisionConfig};
use crate::ops::autodiff;
use crate::ops::linear::{Linear, VisitParams, WeightFormat};
use crate::weights::{WeightStore, WeightsError};
use candle_core::{Device, Result, Tensor};

/// Cuts `[B, C, R, R]` pixels into `[B, (R/p)², C·p·p]` patches in row-major patch order,
/// each flattened channel-major like the conv kernel `[out, C, p, p]`, so the patch embedding
/// (a stride-p convolution) becomes one matrix product.
pub fn patchify(pixels: &Tensor, patch: usize) -> Result<Tensor> {
    let (b, c, h, w) = pixels.dims4()?;
    if h % patch != 0 || w % patch != 0 {
        candle_core::bail!("image {h}×{w} is not a multiple of the {patch}-pixel patch")
    }
    let (gh, gw) = (h / patch, w / patch);
    pixels
        .reshape((b, c, gh, patch, gw, patch))?
        .permute((0, 2, 4, 1, 3, 5))?
        .contiguous()?
        .reshape((b, gh * gw, c * patch * patch))
}

pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::GeluTanh => autodiff::gelu_tanh(x),
        Activation::GeluErf => x.gelu_erf(),
    }
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(
        store: &WeightStore,
        prefix: &str,
        dim: usize,
        eps: f64,
        dev: &Device,
    ) -> std::result::Result<Self, WeightsError> {
        Ok(Self {
            weight: store.f32(&format!("{prefix}.weight"), &[dim], dev)?,
            bias: store.f32(&format!("{prefix}.bias"), &[dim], dev)?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        autodiff::layer_norm(x, &self.weight, &self.bias, self.eps)
    }

    fn visit_params_mut(&mut self, prefix: &str, f: VisitParams<'_>) -> Result<()> {
        f(&format!("{prefix}.weight"), &mut self.weight)?;
        f(&format!("{prefix}.bias"), &mut self.bias)
    }
}

#[derive(Debug, Clone)]
struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    scale: f64,
}

impl SelfAttention {
    /// Bidirectional multi-head attention over all patches of one image.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let hd = d / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, n, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        let probs = autodiff::softmax_last_dim(&scores)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        self.out.forward(&ctx)
    }

    fn visit_params_mut(&mut self, prefix: &str, f: VisitParams<'_>) -> Result<()> {
        self.q.visit_params_mut(&format!("{prefix}.q_proj"), f)?;
        self.k.visit_params_mut(&format!("{prefix}.k_proj"), f)?;
        self.v.visit_params_mut(&format!("{prefix}.v_proj"), f)?;
        self.out.visit_params_mut(&format!("{prefix}.out_proj"), f)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    attn: SelfAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.layer_norm1.forward(x)?)?)?;
        let h = activation(&self.fc1.forward(&self.layer_norm2.forward(&x)?)?, self.act)?;
        x + self.fc2.forward(&h)?
    }

    fn visit_params_mut(&mut self, prefix: &str, f: VisitParams<'_>) -> Result<()> {
        self.layer_norm1
            .visit_params_mut(&format!("{prefix}.layer_norm1"), f)?;
        self.attn
            .visit_params_mut(&format!("{prefix}.self_attn"), f)?;
        self.layer_norm2
            .visit_params_mut(&format!("{prefix}.layer_norm2"), f)?;
        self.fc1.visit_params_mut(&format!("{prefix}.mlp.fc1"), f)?;
        self.fc2.visit_params_mut(&format!("{prefix}.mlp.fc2"), f)
    }
}

#[derive(Debug, Clone)]
pub struct VisionTower {
    patch_embedding: Linear,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    cfg: VisionConfig,
}

impl VisionTower {
    pub fn load(
        store: &WeightStore,
        cfg: &VisionConfig,
        format: WeightFormat,
        dev: &Device,
    ) -> std::result::Result<Self, WeightsError> {
        let p = "vision_tower.vision_model";
        let d = cfg.hidden_size;
        let candle = |name: &str| {
            let name = name.to_string();
            move |source| WeightsError::Candle { name, source }
        };
        let conv_name = format!("{p}.embeddings.patch_embedding.weight");
        let kernel = [d, cfg.num_channels, cfg.patch_size, cfg.patch_size];
        let conv = store
            .f32(&conv_name, &kernel, dev)?
            .reshape((d, cfg.num_channels * cfg.patch_size * cfg.patch_size))
            .map_err(candle(&conv_name))?;
        let conv_bias = store.f32(&format!("{p}.embeddings.patch_embedding.bias"), &[d], dev)?;
        let patch_embedding =
            Linear::from_f32(conv, Some(conv_bias)).map_err(candle(&conv_name))?;
        let position_embedding = store.f32(
            &format!("{p}.embeddings.position_embedding.weight"),
            &[cfg.num_image_tokens(), d],
            dev,
        )?;
        let eps = cfg.layer_norm_eps;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = format!("{p}.encoder.layers.{i}");
            let lin = |name: &str, i: usize, o: usize| {
                Linear::load(store, &format!("{l}.{name}"), i, o, true, format, dev)
            };
            layers.push(EncoderLayer {
                layer_norm1: LayerNorm::load(store, &format!("{l}.layer_norm1"), d, eps, dev)?,
                attn: SelfAttention {
                    q: lin("self_attn.q_proj", d, d)?,
                    k: lin("self_attn.k_proj", d, d)?,
                    v: lin("self_attn.v_proj", d, d)?,
                    out: lin("self_attn.out_proj", d, d)?,
                    heads: cfg.num_attention_heads,
                    scale: (cfg.head_dim() as f64).powf(-0.5),
                },
                layer_norm2: LayerNorm::load(store, &format!("{l}.layer_norm2"), d, eps, dev)?,
                fc1: lin("mlp.fc1", d, cfg.intermediate_size)?,
                fc2: lin("mlp.fc2", cfg.intermediate_size, d)?,
                act: cfg.hidden_act,
            });
        }
        Ok(Self {
            patch_embedding,
            position_embedding,
            layers,
            post_layernorm: LayerNorm::load(store, &format!("{p}.post_layernorm"), d, eps, dev)?,
            cfg: cfg.clone(),
        })
    }

    /// `[B, 3, R, R]` pixels in [-1, 1] → `[B, (R/14)², hidden]` patch features.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = pixels.dims4()?;
        let r = self.cfg.image_size;
        if (c, h, w) != (self.cfg.num_channels, r, r) {
            candle_core::bail!(
                "pixel values are {c}×{h}×{w}, the vision tower expects {}×{r}×{r}",
                self.cfg.num_channels
            )
        }
        let patches = patchify(pixels, self.cfg.patch_size)?;
        let mut x = self
            .patch_embedding
            .forward(&patches)?
            .broadcast_add(&self.position_embedding)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        self.post_layernorm.forward(&x)
    }

    /// Every parameter under its Hub name (`vision_tower.vision_model.*`). The patch
    /// embedding's convolution kernel is held flattened, `[hidden, 3·p·p]` (the checkpoint's
    /// `[hidden, 3, p, p]` in row-major order).
    /// The encoder layers' linear layers by Hub module name.
    pub fn visit_layer_linears_mut(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Linear) -> Result<()>,
    ) -> Result<()> {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("vision_tower.vision_model.encoder.layers.{i}");
            let a = &mut layer.attn;
            f(&format!("{p}.self_attn.q_proj"), &mut a.q)?;
            f(&format!("{p}.self_attn.k_proj"), &mut a.k)?;
            f(&format!("{p}.self_attn.v_proj"), &mut a.v)?;
            f(&format!("{p}.self_attn.out_proj"), &mut a.out)?;
            f(&format!("{p}.mlp.fc1"), &mut layer.fc1)?;
            f(&format!("{p}.mlp.fc2"), &mut layer.fc2)?;
        }
        Ok(())
    }

    pub fn visit_params_mut(&mut self, f: VisitParams<'_>) -> Result<()> {
        let p = "vision_tower.vision_model";
        self.patch_embedding
            .visit_params_mut(&format!("{p}.embeddings.patch_embedding"), f)?;
        f(
            &format!("{p}.embeddings.position_embedding.weight"),
            &mut self.position_embedding,
        )?;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.visit_params_mut(&format!("{p}.encoder.layers.{i}"), f)?;
        }
        self.post_layernorm
            .visit_params_mut(&format!("{p}.post_layernorm"), f)
    }
}
