//! What is trained: a named selection of the model's parameters, turned into variables.
//!
//! | selection | parameters | why |
//! |---|---|---|
//! | `attn` | `q_proj`, `k_proj`, `v_proj`, `o_proj` weights of every decoder layer | Google's fine-tuning notebook trains `llm/layers/attn/*` (`q_einsum`, `kv_einsum`, `attn_vec_einsum`), no norms |
//! | `llm` | every parameter under `language_model.`: the tied embedding/output head, all layers' projections and norms, the final norm | big_vision's `freeze_vit` (schedule `img/.*` frozen, `llm/.*` trained, which includes `llm/embedder`); HF's `language_model` |
//! | `all` | everything: vision tower (patch and position embeddings, all layers, post-LayerNorm), projector, decoder | big_vision's default transfer configs |
//!
//! Frozen parameters stay plain tensors: no gradient is computed for them.

use crate::paligemma::PaliGemma;
use anyhow::{Result, bail};
use candle_core::{Tensor, Var};
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    Attn,
    Llm,
    All,
}

impl Selection {
    /// Whether the parameter with this Hub name is trained.
    pub fn includes(self, name: &str) -> bool {
        match self {
            Selection::Attn => is_decoder_attention_projection(name),
            Selection::Llm => name.starts_with("language_model."),
            Selection::All => true,
        }
    }
}

impl FromStr for Selection {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "attn" => Ok(Selection::Attn),
            "llm" => Ok(Selection::Llm),
            "all" => Ok(Selection::All),
            _ => bail!("unknown selection `{s}`: expected attn, llm or all"),
        }
    }
}

/// `language_model.model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`.
fn is_decoder_attention_projection(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("language_model.model.layers.") else {
        return false;
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return false;
    };
    !layer.is_empty()
        && layer.bytes().all(|b| b.is_ascii_digit())
        && matches!(
            rest,
            "self_attn.q_proj.weight"
                | "self_attn.k_proj.weight"
                | "self_attn.v_proj.weight"
                | "self_attn.o_proj.weight"
        )
}

/// A trained parameter: its Hub name and the variable the model now holds.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
}

/// Makes the selected parameters of an f32 model trainable, in the model's order; the model
/// then builds a gradient graph whenever it runs. Errors when the model holds bf16 weights.
pub fn make_trainable(model: &mut PaliGemma, selection: Selection) -> Result<Vec<Param>> {
    let mut params = Vec::new();
    model.visit_params_mut(&mut |name: &str, t: &mut Tensor| {
        if selection.includes(name) {
            let var = Var::from_tensor(t)?;
            *t = var.as_tensor().clone();
            params.push(Param {
                name: name.to_string(),
                var,
            });
        }
        Ok(())
    })?;
    if params.is_empty() {
        bail!("the selection {selection:?} matches no parameter of this model");
    }
    Ok(params)
}

/// Number of scalar values in `params`.
pub fn count(params: &[Param]) -> usize {
    params.iter().map(|p| p.var.elem_count()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selections_pick_the_documented_parameters() {
        let attn = Selection::Attn;
        assert!(attn.includes("language_model.model.layers.0.self_attn.q_proj.weight"));
        assert!(attn.includes("language_model.model.layers.17.self_attn.o_proj.weight"));
        for name in [
            "language_model.model.layers.0.input_layernorm.weight",
            "language_model.model.layers.0.mlp.up_proj.weight",
            "language_model.model.layers.x.self_attn.q_proj.weight",
            "language_model.model.layers..self_attn.q_proj.weight",
            "language_model.model.embed_tokens.weight",
            "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
            "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.bias",
        ] {
            assert!(!attn.includes(name), "{name}");
        }
        let llm = Selection::Llm;
        assert!(llm.includes("language_model.model.embed_tokens.weight"));
        assert!(llm.includes("language_model.model.norm.weight"));
        assert!(!llm.includes("multi_modal_projector.linear.weight"));
        assert!(!llm.includes("vision_tower.vision_model.post_layernorm.bias"));
        assert!(Selection::All.includes("multi_modal_projector.linear.bias"));
        assert_eq!("llm".parse::<Selection>().unwrap(), Selection::Llm);
        assert!("lora".parse::<Selection>().is_err());
    }
}
