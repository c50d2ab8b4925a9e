//! LoRA parity with PEFT 0.21 + transformers 5.24 on the tiny pg1-56 checkpoint, against
//! `tests/fixtures/train/lora-pg1-56.*` written by `tools/make_lora_fixtures.py`: the adapter
//! key layout, the loss and every lora_A/lora_B gradient on the 2-example batch of
//! `make_train_fixtures.py`; and the merged model's logits against the adapted model's.

mod common;

use candle_core::{Device, Tensor};
use paligemma::attention_mask::additive_mask;
use paligemma::paligemma::PaliGemma;
use paligemma::train::lora;
use paligemma::train::loss::{self, Example, Reduction};
use paligemma::train::optim;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};

use common::fixtures;

const LOSS_TOL: f64 = 1e-5;
const GRAD_REL_TOL: f64 = 1e-4;

struct Case {
    json: Value,
    reference: HashMap<String, Tensor>,
    model: PaliGemma,
    examples: Vec<Example>,
    adapter: HashMap<String, Tensor>,
}

fn load() -> Case {
    let train = fixtures().join("train");
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(train.join("pg1-56.json")).unwrap()).unwrap();
    let lora_json: Value =
        serde_json::from_str(&std::fs::read_to_string(train.join("lora-pg1-56.json")).unwrap())
            .unwrap();
    let reference =
        candle_core::safetensors::load(train.join("lora-pg1-56.safetensors"), &Device::Cpu)
            .unwrap();
    let (model, tok, pre) = common::load_model("pg1-56");
    let examples = common::train_examples(&json, &model, &tok, &pre);
    let adapter = reference
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("adapter.")
                .map(|k| (k.to_string(), v.clone()))
        })
        .collect();
    Case {
        json: lora_json,
        reference,
        model,
        examples,
        adapter,
    }
}

/// The full logits `[batch, len, vocab]` of the collated batch (the loss's forward pass).
fn logits(model: &PaliGemma, examples: &[Example]) -> Tensor {
    let seqs: Vec<_> = examples.iter().map(|e| &e.seq).collect();
    let c = loss::collate(&seqs, model.config.pad_token_id, Reduction::PerExample).unwrap();
    let pixels: Vec<Option<Tensor>> = examples.iter().map(|e| e.pixels.clone()).collect();
    let features = model.row_features(&pixels).unwrap();
    let embedded: Vec<Tensor> = c
        .ids
        .iter()
        .zip(&features)
        .map(|(ids, f)| model.embed(ids, f.as_ref()).unwrap())
        .collect();
    let x = Tensor::stack(&embedded, 0).unwrap();
    let mask = additive_mask(&c.rows, 0, c.len(), &Device::Cpu).unwrap();
    let positions: Vec<Vec<u32>> = c.rows.iter().map(|r| r.positions()).collect();
    let hidden = model
        .decoder()
        .forward(&x, &positions, &mask, None)
        .unwrap();
    model.decoder().logits(&hidden).unwrap()
}

fn scale(c: &Case) -> f64 {
    c.json["lora_alpha"].as_f64().unwrap() / c.json["r"].as_f64().unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

#[test]
fn lora_loss_and_gradients_match_peft() {
    let mut c = load();
    let s = scale(&c);
    lora::attach_values(&mut c.model, &c.adapter, s).unwrap();
    let params = lora::make_trainable(&mut c.model).unwrap();
    // Our names map one to one onto PEFT's saved keys.
    let ours: BTreeSet<String> = params.iter().map(|p| lora::peft_name(&p.name)).collect();
    let theirs: BTreeSet<String> = c.adapter.keys().cloned().collect();
    assert_eq!(ours, theirs);
    let out = loss::loss(&c.model, &c.examples, Reduction::PerExample).unwrap();
    let l = out.loss.to_scalar::<f32>().unwrap() as f64;
    let want = c.json["loss"].as_f64().unwrap();
    println!(
        "lora loss {l:.7} vs PEFT {want:.7} (diff {:.2e})",
        (l - want).abs()
    );
    assert!((l - want).abs() < LOSS_TOL);
    let store = out.loss.backward().unwrap();
    let grads = optim::gradients(&params, &store);
    let mut worst = 0f64;
    for (p, g) in params.iter().zip(&grads) {
        let key = lora::peft_name(&p.name);
        let r = &c.reference[&format!("grad.{key}")];
        let norm = r
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!(norm > 0.0, "{key}: zero reference gradient");
        let rel = max_abs(g.as_ref().expect("a gradient"), r) / norm;
        worst = worst.max(rel);
        assert!(rel < GRAD_REL_TOL, "{key}: relative error {rel:.2e}");
    }
    println!(
        "{} lora gradients, worst relative error {worst:.2e}",
        grads.len()
    );
}

#[test]
fn merged_model_matches_adapters_and_peft() {
    let mut c = load();
    let s = scale(&c);
    lora::attach_values(&mut c.model, &c.adapter, s).unwrap();
    let with = logits(&c.model, &c.examples);
    lora::merge(&mut c.model).unwrap();
    let merged = logits(&c.model, &c.examples);
    let d = max_abs(&with, &merged);
    let top = with
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    println!(
        "merged vs adapters max |Δlogit| {d:.2e} (max |logit| {top:.2}, relative {:.2e})",
        d / top
    );
    assert!(d / top <= 1e-5, "{d} / {top}");
}
