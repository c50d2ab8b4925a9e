//! Fine-tuning parity with PyTorch (transformers 5.24, fp32, eager attention) on the tiny random
//! checkpoints of `tests/fixtures/models`, against `tests/fixtures/train` written by
//! `tools/make_train_fixtures.py`: the batch layout, the loss (per example then per batch, and
//! transformers' per-token mean), every trained parameter's gradient for the `attn`, `llm` and
//! `all` selections, and three AdamW steps with clipping and the warm-up cosine schedule.

mod common;

use candle_core::{DType, Device, Tensor};
use paligemma::paligemma::PaliGemma;
use paligemma::train::loss::{self, Example, Reduction};
use paligemma::train::optim::{self, AdamW, AdamWConfig, CosineSchedule, GradAccumulator};
use paligemma::train::params::{self, Param, Selection};
use paligemma::train::train_step;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use common::fixtures;

const LOSS_TOL: f64 = 1e-5;
const GRAD_REL_TOL: f64 = 1e-4;
const WEIGHT_TOL: f32 = 1e-6;

struct Case {
    name: &'static str,
    json: Value,
    reference: HashMap<String, Tensor>,
    model: PaliGemma,
    examples: Vec<Example>,
}

impl Case {
    fn load(name: &'static str) -> Case {
        let train = fixtures().join("train");
        let json: Value = serde_json::from_str(
            &std::fs::read_to_string(train.join(format!("{name}.json"))).unwrap(),
        )
        .unwrap();
        let reference =
            candle_core::safetensors::load(train.join(format!("{name}.safetensors")), &Device::Cpu)
                .unwrap();
        let (model, tok, pre) = common::load_model(name);
        let examples = common::train_examples(&json, &model, &tok, &pre);
        Case {
            name,
            json,
            reference,
            model,
            examples,
        }
    }

    fn t(&self, name: &str) -> &Tensor {
        self.reference
            .get(name)
            .unwrap_or_else(|| panic!("{}: reference has no {name}", self.name))
    }

    fn f(&self, key: &str) -> f64 {
        self.json[key].as_f64().unwrap()
    }

    fn rows(&self, name: &str) -> Vec<Vec<i64>> {
        self.t(name)
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec2()
            .unwrap()
    }

    /// Names of the parameters the reference stores under `prefix.`.
    fn names_under(&self, prefix: &str) -> BTreeSet<String> {
        self.reference
            .keys()
            .filter_map(|k| k.strip_prefix(&format!("{prefix}.")).map(String::from))
            .collect()
    }
}

fn names(params: &[Param]) -> BTreeSet<String> {
    params.iter().map(|p| p.name.clone()).collect()
}

fn vec_f32(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// `(‖a − b‖ / ‖b‖, max |a − b|)` over all elements (same number of them).
fn differences(a: &Tensor, b: &Tensor) -> (f64, f64) {
    let (a, b) = (vec_f32(a), vec_f32(b));
    assert_eq!(a.len(), b.len(), "element counts differ");
    let mut diff2 = 0f64;
    let mut ref2 = 0f64;
    let mut max = 0f64;
    for (&x, &y) in a.iter().zip(&b) {
        let d = (x as f64 - y as f64).abs();
        diff2 += d * d;
        ref2 += (y as f64) * (y as f64);
        max = max.max(d);
    }
    (diff2.sqrt() / ref2.sqrt().max(f64::MIN_POSITIVE), max)
}

fn norm(t: &Tensor) -> f64 {
    vec_f32(t)
        .iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
}

/// Compares gradients `got` with `want`, tensor by tensor: `‖got − want‖ / ‖want‖ < 1e-4`.
/// A tensor whose reference gradient is below 1e-6 of the global norm is numerically zero:
/// the SigLIP key biases, whose true gradient is exactly 0 (softmax ignores the constant
/// `q·b_k` added to a row of scores), so both sides hold f32 noise; `got` must then be as
/// small. Returns the worst relative and max-abs differences of the other tensors, and how
/// many tensors were numerically zero.
fn check_gradients(
    what: &str,
    params: &[Param],
    got: &[Option<Tensor>],
    want: impl Fn(&str) -> Tensor,
) -> (f64, f64, usize) {
    let want: Vec<Tensor> = params.iter().map(|p| want(&p.name)).collect();
    let global = want.iter().map(|w| norm(w).powi(2)).sum::<f64>().sqrt();
    let (mut rel_max, mut abs_max, mut zeros) = (0f64, 0f64, 0);
    for ((p, g), w) in params.iter().zip(got).zip(&want) {
        let g = g
            .as_ref()
            .unwrap_or_else(|| panic!("{what}: {} got no gradient", p.name));
        let (rel, abs) = differences(g, w);
        if norm(w) < 1e-6 * global {
            let n = norm(g);
            assert!(
                n < 1e-6 * global,
                "{what}: gradient of {} should be numerically zero, its norm is {n:.2e}",
                p.name
            );
            zeros += 1;
            continue;
        }
        assert!(
            rel < GRAD_REL_TOL,
            "{what}: gradient of {} differs by {rel:.2e} relative ({abs:.2e} max abs)",
            p.name
        );
        rel_max = rel_max.max(rel);
        abs_max = abs_max.max(abs);
    }
    (rel_max, abs_max, zeros)
}

fn reference_grads(case: &Case) -> impl Fn(&str) -> Tensor + '_ {
    move |name| case.t(&format!("grad.{name}")).clone()
}

fn trainable(case: &Case, selection: Selection) -> (PaliGemma, Vec<Param>) {
    // A fresh copy of the loaded model: making it trainable replaces its tensors.
    let (mut model, _, _) = common::load_model(case.name);
    let params = params::make_trainable(&mut model, selection).unwrap();
    (model, params)
}

#[test]
fn batch_layout_matches_the_processor_with_right_padding() {
    for name in ["pg1-56", "pg2-42", "pg2-56-2img"] {
        let c = Case::load(name);
        let ids = c.rows("input_ids");
        let tti = c.rows("token_type_ids");
        let attention = c.rows("attention_mask");
        let labels = c.rows("labels");
        for (r, e) in c.examples.iter().enumerate() {
            let n = e.seq.ids.len();
            let want: Vec<u32> = ids[r][..n].iter().map(|&v| v as u32).collect();
            assert_eq!(e.seq.ids, want, "{name} row {r}");
            assert!(ids[r][n..].iter().all(|&v| v == 0), "{name}: right padding");
            assert!(attention[r][..n].iter().all(|&v| v == 1));
            assert!(attention[r][n..].iter().all(|&v| v == 0));
            for t in 0..n {
                assert_eq!(tti[r][t], (t >= e.seq.prefix_len) as i64, "{name} row {r}");
                let label = if t >= e.seq.prefix_len {
                    e.seq.ids[t] as i64
                } else {
                    -100
                };
                assert_eq!(labels[r][t], label, "{name} row {r} label {t}");
            }
        }
        let scored: Vec<u64> = c.json["scored_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let seqs: Vec<_> = c.examples.iter().map(|e| &e.seq).collect();
        let collated = loss::collate(&seqs, 0, Reduction::PerExample).unwrap();
        let ours: Vec<u64> = collated.scored.iter().map(|&s| s as u64).collect();
        assert_eq!(ours, scored, "{name}");
        assert_ne!(scored[0], scored[1], "{name}: suffix lengths should differ");
    }
}

#[test]
fn loss_and_gradients_match_pytorch() {
    for name in ["pg1-56", "pg2-42", "pg2-56-2img"] {
        let c = Case::load(name);
        let selection: Selection = c.json["grad_selection"].as_str().unwrap().parse().unwrap();
        let (model, params) = trainable(&c, selection);
        assert_eq!(names(&params), c.names_under("grad"), "{name}: trained set");

        let out = loss::loss(&model, &c.examples, Reduction::PerExample).unwrap();
        let value = out.loss.to_scalar::<f32>().unwrap() as f64;
        let dl = (value - c.f("loss")).abs();
        assert!(dl < LOSS_TOL, "{name}: loss {value} vs {}", c.f("loss"));
        for (a, b) in out
            .example_losses
            .iter()
            .zip(c.json["per_example_loss"].as_array().unwrap())
        {
            let b = b.as_f64().unwrap();
            assert!((*a as f64 - b).abs() < LOSS_TOL, "{name}: {a} vs {b}");
        }

        let grads = optim::gradients(&params, &out.loss.backward().unwrap());
        let (rel, abs, zeros) = check_gradients(name, &params, &grads, reference_grads(&c));
        eprintln!(
            "{name} ({selection:?}, {} tensors, {} values): loss diff {dl:.1e}, \
             worst gradient {rel:.1e} relative, {abs:.1e} max abs, {zeros} numerically zero",
            params.len(),
            params::count(&params)
        );
    }
}

#[test]
fn every_selection_trains_its_documented_set_with_exact_gradients() {
    let c = Case::load("pg1-56");
    for selection in [Selection::Attn, Selection::Llm, Selection::All] {
        let (model, params) = trainable(&c, selection);
        // The optimizer fixture stores each run's trained parameters under `<selection>.`.
        let key = format!("{selection:?}").to_lowercase();
        assert_eq!(names(&params), c.names_under(&key), "{key}");
        let count = c.json["runs"][&key]["trained_parameters"].as_u64().unwrap();
        assert_eq!(params::count(&params) as u64, count, "{key}");

        let out = loss::loss(&model, &c.examples, Reduction::PerExample).unwrap();
        let grads = optim::gradients(&params, &out.loss.backward().unwrap());
        let (rel, abs, zeros) = check_gradients(&key, &params, &grads, reference_grads(&c));
        eprintln!(
            "pg1-56 {key}: worst gradient {rel:.1e} relative, {abs:.1e} max abs, \
             {zeros} numerically zero"
        );
    }
}

#[test]
fn per_token_and_per_example_means_match_their_references() {
    for name in ["pg1-56", "pg2-42", "pg2-56-2img"] {
        let c = Case::load(name);
        let per_token = loss::loss(&c.model, &c.examples, Reduction::PerToken).unwrap();
        let v = per_token.loss.to_scalar::<f32>().unwrap() as f64;
        let want = c.f("hf_token_mean_loss");
        assert!((v - want).abs() < LOSS_TOL, "{name}: {v} vs HF {want}");
        assert!(
            (v - c.f("loss")).abs() > 1e-2,
            "{name}: the two means should differ for unequal suffixes"
        );
        // A batch of one: both reductions are the plain mean.
        let one = &c.examples[..1];
        let want = c.f("single_example_loss");
        for reduction in [Reduction::PerExample, Reduction::PerToken] {
            let v = loss::loss(&c.model, one, reduction).unwrap().loss;
            let v = v.to_scalar::<f32>().unwrap() as f64;
            assert!(
                (v - want).abs() < LOSS_TOL,
                "{name} {reduction:?}: {v} vs {want}"
            );
        }
    }
}

#[test]
fn padding_and_micro_batching_change_nothing() {
    let c = Case::load("pg2-42");
    let (model, params) = trainable(&c, Selection::All);
    let batch = loss::loss(&model, &c.examples, Reduction::PerExample).unwrap();
    let batch_grads = optim::gradients(&params, &batch.loss.backward().unwrap());
    let mut acc = GradAccumulator::new(params.len());
    for (i, e) in c.examples.iter().enumerate() {
        let alone = loss::loss(&model, std::slice::from_ref(e), Reduction::PerExample).unwrap();
        let v = alone.loss.to_scalar::<f32>().unwrap();
        // The shorter example is padded in the batch; its loss must not move.
        assert!(
            (v - batch.example_losses[i]).abs() < 1e-6,
            "example {i}: alone {v} vs in the batch {}",
            batch.example_losses[i]
        );
        acc.add(
            &optim::gradients(&params, &alone.loss.backward().unwrap()),
            1,
        )
        .unwrap();
    }
    let accumulated = acc.finish().unwrap();
    let batch_grad = |name: &str| {
        let i = params.iter().position(|p| p.name == name).unwrap();
        batch_grads[i].clone().unwrap()
    };
    let (rel, abs, _) = check_gradients("accumulated vs batch", &params, &accumulated, batch_grad);
    eprintln!(
        "pg2-42: accumulated single-example gradients vs the batch: {rel:.1e} relative, {abs:.1e} max abs"
    );
}

fn adamw_settings(c: &Case) -> (AdamWConfig, CosineSchedule, f64, usize) {
    let a = &c.json["adamw"];
    let f = |k: &str| a[k].as_f64().unwrap();
    let u = |k: &str| a[k].as_u64().unwrap() as usize;
    let cfg = AdamWConfig {
        beta1: f("beta1"),
        beta2: f("beta2"),
        eps: f("eps"),
        weight_decay: f("weight_decay"),
    };
    let schedule = CosineSchedule {
        peak_lr: f("lr"),
        warmup_steps: u("warmup_steps"),
        total_steps: u("total_steps"),
    };
    (cfg, schedule, f("max_grad_norm"), u("steps"))
}

#[test]
fn adamw_with_clipping_and_schedule_matches_torch_given_the_same_gradients() {
    let c = Case::load("pg1-56");
    let (cfg, schedule, max_norm, steps) = adamw_settings(&c);
    for selection in [Selection::Attn, Selection::Llm, Selection::All] {
        let key = format!("{selection:?}").to_lowercase();
        let (_model, params) = trainable(&c, selection);
        let initial: Vec<Vec<f32>> = params.iter().map(|p| vec_f32(p.var.as_tensor())).collect();
        let grads: Vec<Option<Tensor>> = params
            .iter()
            .map(|p| {
                Some(
                    c.t(&format!("grad.{}", p.name))
                        .reshape(p.var.shape())
                        .unwrap(),
                )
            })
            .collect();
        let mut opt = AdamW::new(params.clone(), cfg).unwrap();
        let log = c.json["runs"][&key]["fixed_gradients"].as_array().unwrap();
        assert_eq!(log.len(), steps);
        for (i, want) in log.iter().enumerate() {
            let mut g = grads.clone();
            let n = optim::global_norm(&g).unwrap();
            let want_norm = want["grad_norm"].as_f64().unwrap();
            assert!(
                ((n - want_norm) / want_norm).abs() < 1e-6,
                "{key}: norm {n} vs {want_norm}"
            );
            assert!(n > max_norm, "{key}: clipping should act");
            optim::clip(&mut g, n, max_norm).unwrap();
            let lr = schedule.lr(opt.steps());
            let want_lr = want["lr"].as_f64().unwrap();
            assert!(
                (lr - want_lr).abs() < 1e-15,
                "{key} step {i}: lr {lr} vs {want_lr}"
            );
            opt.step(&g, lr).unwrap();
        }
        let (mut worst, mut moved) = (0f32, 0f32);
        for (p, w0) in params.iter().zip(&initial) {
            let got = vec_f32(p.var.as_tensor());
            let want = vec_f32(c.t(&format!("{key}.{}", p.name)));
            for ((a, b), w) in got.iter().zip(&want).zip(w0) {
                worst = worst.max((a - b).abs());
                moved = moved.max((b - w).abs());
            }
        }
        eprintln!(
            "pg1-56 {key}: {steps} AdamW steps on fixed gradients, weights within {worst:.1e} \
             of torch (largest update {moved:.1e})"
        );
        assert!(worst < WEIGHT_TOL, "{key}: weights differ by {worst}");
        assert!(
            moved > 100.0 * WEIGHT_TOL,
            "{key}: the steps should move the weights"
        );
    }
}

#[test]
fn training_steps_match_torch_end_to_end() {
    let c = Case::load("pg1-56");
    let (cfg, schedule, max_norm, steps) = adamw_settings(&c);
    for selection in [Selection::Attn, Selection::Llm, Selection::All] {
        let key = format!("{selection:?}").to_lowercase();
        let (model, params) = trainable(&c, selection);
        let mut opt = AdamW::new(params, cfg).unwrap();
        let run = &c.json["runs"][&key]["training"];
        let log = run["steps"].as_array().unwrap();
        assert_eq!(log.len(), steps);
        let mut worst_loss = 0f64;
        for (i, want) in log.iter().enumerate() {
            let r = train_step(
                &model,
                &mut opt,
                &schedule,
                &c.examples,
                Some(max_norm),
                Reduction::PerExample,
            )
            .unwrap();
            let f = |k: &str| want[k].as_f64().unwrap();
            let dl = (r.loss as f64 - f("loss")).abs();
            assert!(
                dl < LOSS_TOL,
                "{key} step {i}: loss {} vs {}",
                r.loss,
                f("loss")
            );
            worst_loss = worst_loss.max(dl);
            let dn = ((r.grad_norm - f("grad_norm")) / f("grad_norm")).abs();
            assert!(
                dn < GRAD_REL_TOL,
                "{key} step {i}: grad norm {} vs {}",
                r.grad_norm,
                f("grad_norm")
            );
            assert!(
                (r.lr - f("lr")).abs() < 1e-15,
                "{key} step {i}: lr {} vs {}",
                r.lr,
                f("lr")
            );
        }
        // The loss at the weights the steps produced.
        let after = loss::loss(&model, &c.examples, Reduction::PerExample).unwrap();
        let after = after.loss.to_scalar::<f32>().unwrap() as f64;
        let want = run["final_loss"].as_f64().unwrap();
        let dl = (after - want).abs();
        eprintln!(
            "pg1-56 {key}: {steps} training steps, losses within {worst_loss:.1e}, \
             final loss {after:.6} vs torch {want:.6} ({dl:.1e})"
        );
        assert!(dl < LOSS_TOL, "{key}: final loss {after} vs {want}");
        assert!(want < log[0]["loss"].as_f64().unwrap() - 0.1);
    }
}

#[test]
fn a_few_steps_on_a_tiny_batch_lower_the_loss() {
    let c = Case::load("pg1-56");
    let (model, params) = trainable(&c, Selection::Attn);
    let mut opt = AdamW::new(params, AdamWConfig::default()).unwrap();
    let schedule = CosineSchedule {
        peak_lr: 3e-3,
        warmup_steps: 2,
        total_steps: 12,
    };
    let losses: Vec<f32> = (0..12)
        .map(|_| {
            train_step(
                &model,
                &mut opt,
                &schedule,
                &c.examples,
                Some(1.0),
                Reduction::PerExample,
            )
            .unwrap()
            .loss
        })
        .collect();
    eprintln!("attn fine-tuning losses: {losses:?}");
    let last = *losses.last().unwrap();
    assert!(last < 0.5 * losses[0], "loss {} → {last}", losses[0]);
    assert!(losses.iter().all(|l| l.is_finite()));
}

#[test]
fn bf16_models_are_refused_for_training() {
    let dir = fixtures().join("models/pg1-56");
    let files = paligemma::checkpoint::ModelFiles::from_dir(Path::new(&dir)).unwrap();
    let mut model = PaliGemma::load(
        &files,
        paligemma::ops::linear::WeightFormat::Bf16,
        &Device::Cpu,
    )
    .unwrap();
    let err = params::make_trainable(&mut model, Selection::Attn).unwrap_err();
    assert!(err.to_string().contains("f32"), "{err}");
}

#[test]
fn frozen_weights_cost_no_gradient() {
    // candle's backward computes a gradient for every operand of a product, tracked or not;
    // the model routes frozen layers through `ops::autodiff` so that no weight-sized gradient
    // is computed for them. What the backward leaves beside the trained parameters' gradients
    // must be activation-sized (≤ batch · length · hidden), smaller than any frozen decoder
    // matrix (MLP 128×64, the tied head 320×64).
    let c = Case::load("pg1-56");
    let seqs: Vec<_> = c.examples.iter().map(|e| &e.seq).collect();
    let len = loss::collate(&seqs, 0, Reduction::PerExample)
        .unwrap()
        .len();
    let activation = c.examples.len() * len * c.model.config.text.hidden_size;
    assert!(activation < 128 * 64);
    for selection in [Selection::Attn, Selection::Llm] {
        let (model, params) = trainable(&c, selection);
        let out = loss::loss(&model, &c.examples, Reduction::PerExample).unwrap();
        let store = out.loss.backward().unwrap();
        for id in store.get_ids() {
            if params.iter().any(|p| p.var.id() == *id) {
                continue;
            }
            let g = store.get_id(*id).unwrap();
            assert!(
                g.elem_count() <= activation,
                "{selection:?}: backward computed a {:?} gradient for an untrained tensor",
                g.dims()
            );
        }
    }
}

#[test]
fn training_forward_is_the_inference_forward_bit_for_bit() {
    // The gradient paths take their values from the same kernels as inference.
    for name in ["pg1-56", "pg2-42"] {
        let c = Case::load(name);
        let plain = loss::loss(&c.model, &c.examples, Reduction::PerExample).unwrap();
        assert!(
            !plain.loss.track_op(),
            "{name}: an untrained model builds no graph"
        );
        for selection in [Selection::Attn, Selection::Llm, Selection::All] {
            let (model, _params) = trainable(&c, selection);
            let out = loss::loss(&model, &c.examples, Reduction::PerExample).unwrap();
            assert!(out.loss.track_op());
            assert_eq!(
                out.loss.to_scalar::<f32>().unwrap(),
                plain.loss.to_scalar::<f32>().unwrap(),
                "{name} {selection:?}"
            );
        }
    }
}
