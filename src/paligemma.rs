//! The whole model: SigLIP → linear projector → Gemma, with image features placed in the
//! `<image>` slots of the token sequence.

use crate::checkpoint::ModelFiles;
use crate::config::{GenerationDefaults, PaliGemmaConfig};
use crate::gemma::Decoder;
use crate::ops::linear::quant::QuantFormat;
use crate::ops::linear::{Linear, VisitParams, WeightFormat};
use crate::siglip::VisionTower;
use crate::weights::WeightStore;
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};

pub struct PaliGemma {
    pub config: PaliGemmaConfig,
    vision: VisionTower,
    projector: Linear,
    decoder: Decoder,
    device: Device,
}

impl PaliGemma {
    pub fn load(files: &ModelFiles, format: WeightFormat, device: &Device) -> Result<Self> {
        let (mut config, store) = if files.is_big_vision() {
            crate::big_vision::load_files(files)?
        } else {
            (
                PaliGemmaConfig::load(&files.config)?,
                WeightStore::open(&files.weights)?,
            )
        };
        apply_generation_config(&mut config, files)?;
        Self::from_store(config, &store, format, device)
    }

    /// The configuration of a Hub-layout folder: `config.json`, with the end-of-sequence ids
    /// of `generation_config.json` when it names any (as transformers' `generate` uses them).
    pub fn load_config(files: &ModelFiles) -> Result<PaliGemmaConfig> {
        let mut config = PaliGemmaConfig::load(&files.config)?;
        apply_generation_config(&mut config, files)?;
        Ok(config)
    }

    pub fn from_store(
        config: PaliGemmaConfig,
        store: &WeightStore,
        format: WeightFormat,
        device: &Device,
    ) -> Result<Self> {
        let vision_format = vision_format(format);
        let vision = VisionTower::load(store, &config.vision, vision_format, device)?;
        let projector = Linear::load(
            store,
            "multi_modal_projector.linear",
            config.vision.hidden_size,
            config.projection_dim,
            true,
            vision_format,
            device,
        )?;
        let decoder = Decoder::load(store, &config.text, format, device)?;
        Ok(Self {
            config,
            vision,
            projector,
            decoder,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// Every parameter, under its Hub name: vision tower, projector, decoder. `f` may replace
    /// a tensor with one of the same shape (training makes the selected ones variables).
    pub fn visit_params_mut(&mut self, f: VisitParams<'_>) -> candle_core::Result<()> {
        self.vision.visit_params_mut(f)?;
        self.projector
            .visit_params_mut("multi_modal_projector.linear", f)?;
        self.decoder.visit_params_mut(f)
    }

    /// The decoder layers' linear layers by Hub module name: where LoRA adapters go.
    pub fn visit_decoder_linears_mut(
        &mut self,
        f: &mut dyn FnMut(&str, &mut crate::ops::linear::Linear) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        self.decoder.visit_layer_linears_mut(f)
    }

    /// Every linear layer loaded through [`Linear::load`] (the ones `--quant` quantizes) by Hub
    /// module name: encoder layers, projector, token embedding, decoder layers.
    pub fn visit_linears_mut(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Linear) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        self.vision.visit_layer_linears_mut(f)?;
        f("multi_modal_projector.linear", &mut self.projector)?;
        f(
            "language_model.model.embed_tokens",
            self.decoder.embed_tokens_mut(),
        )?;
        self.decoder.visit_layer_linears_mut(f)
    }

    /// Pixel values `[n, 3, R, R]` → projected image tokens `[n, (R/14)², text_hidden]`,
    /// unscaled: the projector's output enters the decoder as it is.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = self.vision.forward(pixels)?;
        Ok(self.projector.forward(&x)?)
    }

    /// Embeds one sequence `[len, H]`: tokens are looked up and scaled by `sqrt(H)`; the
    /// `<image>` slots take the rows of `features` `[n_image_tokens, H]` in order.
    pub fn embed(&self, ids: &[u32], features: Option<&Tensor>) -> Result<Tensor> {
        let image_id = self.config.image_token_index;
        let slots = ids.iter().filter(|&&t| t == image_id).count();
        let available = match features {
            Some(f) => f.dim(0)?,
            None => 0,
        };
        if slots != available {
            bail!(
                "the sequence has {slots} <image> tokens but {available} image feature rows were given"
            );
        }
        let text = self.decoder.embed(ids, &self.device)?;
        let Some(features) = features.filter(|_| slots > 0) else {
            return Ok(text);
        };
        // Pick each row from [text rows ; image rows]: one gather instead of a scatter.
        let mut next_image = ids.len() as u32;
        let pick: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                if t == image_id {
                    next_image += 1;
                    next_image - 1
                } else {
                    i as u32
                }
            })
            .collect();
        let all = Tensor::cat(&[&text, features], 0)?;
        let idx = Tensor::from_vec(pick, ids.len(), &self.device)?;
        Ok(all.index_select(&idx, 0)?)
    }

    /// Checks pixel values have the shape this checkpoint's vision tower takes.
    pub fn check_pixels(&self, pixels: &Tensor) -> Result<()> {
        let r = self.config.vision.image_size;
        let dims = pixels.dims();
        if dims.len() != 4 || dims[1..] != [3, r, r] {
            bail!("pixel values have shape {dims:?}, the model takes [n, 3, {r}, {r}]");
        }
        Ok(())
    }

    /// Image features for every image of every row as `[images·tokens, H]`. Rows given the
    /// same pixel tensor (clones of one tensor) share one pass through the vision tower.
    pub fn row_features(&self, pixels_per_row: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let mut unique: Vec<&Tensor> = Vec::new();
        let slot: Vec<Option<usize>> = pixels_per_row
            .iter()
            .map(|p| {
                p.as_ref()
                    .map(|p| match unique.iter().position(|u| u.id() == p.id()) {
                        Some(i) => i,
                        None => {
                            unique.push(p);
                            unique.len() - 1
                        }
                    })
            })
            .collect();
        if unique.is_empty() {
            return Ok(vec![None; pixels_per_row.len()]);
        }
        for p in &unique {
            self.check_pixels(p)?;
        }
        let all = Tensor::cat(&unique, 0).context("stacking images")?;
        let feats = self.image_features(&all)?;
        let (_, tokens, h) = feats.dims3()?;
        let mut starts = Vec::with_capacity(unique.len());
        let mut at = 0;
        for p in &unique {
            starts.push(at);
            at += p.dim(0)?;
        }
        slot.iter()
            .map(|s| match s {
                Some(i) => {
                    let n = unique[*i].dim(0)?;
                    Ok(Some(
                        feats.narrow(0, starts[*i], n)?.reshape((n * tokens, h))?,
                    ))
                }
                None => Ok(None),
            })
            .collect()
    }
}

/// The format of the vision tower and projector when the decoder is held in `format`: q4
/// becomes q8 there. The encoder's 0.4 B weights are read once per image, where the work is
/// compute-bound and fewer bits buy no speed, and its errors reach every image token; q8
/// costs 0.2 GB more than q4 and keeps them small.
pub fn vision_format(format: WeightFormat) -> WeightFormat {
    match format {
        WeightFormat::Quant(QuantFormat::Q4) => WeightFormat::Quant(QuantFormat::Q8),
        other => other,
    }
}

fn apply_generation_config(config: &mut PaliGemmaConfig, files: &ModelFiles) -> Result<()> {
    if let Some(gen_cfg) = &files.generation_config
        && let Some(eos) = GenerationDefaults::load_eos(gen_cfg)?
        && !eos.is_empty()
    {
        config.eos_token_ids = eos;
    }
    Ok(())
}
