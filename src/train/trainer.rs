//! The pieces of a training loop above a single step: gradient accumulation over micro-batches
//! and evaluation without a gradient graph.

use crate::paligemma::PaliGemma;
use crate::train::loss::{self, Example, Reduction};
use crate::train::optim::{self, AdamW, CosineSchedule, GradAccumulator};
use crate::train::params::Param;
use crate::train::{StepReport, train_step};
use anyhow::{Result, bail};
use candle_core::Tensor;
use std::collections::HashMap;

/// One optimizer step over several micro-batches: the gradient of the per-example mean loss
/// over all their examples, then clipping and AdamW as in [`train_step`] (which a single
/// micro-batch goes through unchanged). The reported loss is the per-example mean too.
pub fn accumulated_step(
    model: &PaliGemma,
    opt: &mut AdamW,
    schedule: &CosineSchedule,
    micro_batches: &[Vec<Example>],
    max_grad_norm: Option<f64>,
) -> Result<StepReport> {
    match micro_batches {
        [] => bail!("a step needs at least one micro-batch"),
        [one] => train_step(
            model,
            opt,
            schedule,
            one,
            max_grad_norm,
            Reduction::PerExample,
        ),
        many => {
            let mut acc = GradAccumulator::new(opt.params().len());
            let mut example_losses = Vec::new();
            for batch in many {
                let out = loss::loss(model, batch, Reduction::PerExample)?;
                let store = out.loss.backward()?;
                acc.add(&optim::gradients(opt.params(), &store), batch.len())?;
                example_losses.extend(out.example_losses);
            }
            let mut grads = acc.finish()?;
            let grad_norm = optim::global_norm(&grads)?;
            if let Some(max) = max_grad_norm {
                optim::clip(&mut grads, grad_norm, max)?;
            }
            let lr = schedule.lr(opt.steps());
            opt.step(&grads, lr)?;
            Ok(StepReport {
                loss: mean(&example_losses),
                example_losses,
                grad_norm,
                lr,
            })
        }
    }
}

/// Mean of `values`, accumulated in f64.
pub fn mean(values: &[f32]) -> f32 {
    let sum: f64 = values.iter().map(|&v| v as f64).sum();
    (sum / values.len().max(1) as f64) as f32
}

/// Runs `f` on the model with its trained parameters swapped for detached tensors holding the
/// same values, so that no forward pass inside builds a gradient graph (candle has no global
/// no-grad switch); the variables are put back afterwards, also when `f` fails.
pub fn without_gradients<R>(
    model: &mut PaliGemma,
    params: &[Param],
    f: impl FnOnce(&PaliGemma) -> Result<R>,
) -> Result<R> {
    let trained: HashMap<&str, &Tensor> = params
        .iter()
        .map(|p| (p.name.as_str(), p.var.as_tensor()))
        .collect();
    model.visit_params_mut(&mut |name: &str, t: &mut Tensor| {
        if trained.contains_key(name) {
            *t = t.detach();
        }
        Ok(())
    })?;
    let result = f(model);
    model.visit_params_mut(&mut |name: &str, t: &mut Tensor| {
        if let Some(var) = trained.get(name) {
            *t = (*var).clone();
        }
        Ok(())
    })?;
    result
}

/// Each example's mean suffix loss (`−log p` per scored token), in batches of `batch_size`.
/// Call it inside [`without_gradients`] on a model being trained.
pub fn example_losses(
    model: &PaliGemma,
    examples: &[Example],
    batch_size: usize,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(examples.len());
    for batch in examples.chunks(batch_size.max(1)) {
        let l = loss::loss(model, batch, Reduction::PerExample)?;
        if l.loss.track_op() {
            bail!("evaluation built a gradient graph: call it inside without_gradients");
        }
        out.extend(l.example_losses);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::ModelFiles;
    use crate::ops::linear::WeightFormat;
    use crate::prompt;
    use crate::tokenizer::Tokenizer;
    use crate::train::params::{Selection, make_trainable};
    use candle_core::Device;
    use std::path::PathBuf;

    fn tiny() -> (PaliGemma, Vec<Example>) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/pg1-56");
        let files = ModelFiles::from_dir(&dir).unwrap();
        let model = PaliGemma::load(&files, WeightFormat::F32, &Device::Cpu).unwrap();
        let tok = Tokenizer::from_file(&files.tokenizer).unwrap();
        let r = model.config.vision.image_size;
        let pixels = Tensor::zeros((1, 3, r, r), candle_core::DType::F32, &Device::Cpu).unwrap();
        let examples = ["a red circle", "red"]
            .iter()
            .map(|s| Example {
                seq: prompt::with_suffix(&tok, &model.config, "caption en", 1, s).unwrap(),
                pixels: Some(pixels.clone()),
            })
            .collect();
        (model, examples)
    }

    #[test]
    fn evaluation_builds_no_graph_and_training_resumes_after_it() {
        let (mut model, examples) = tiny();
        let params = make_trainable(&mut model, Selection::Attn).unwrap();
        let before = loss::loss(&model, &examples, Reduction::PerExample).unwrap();
        assert!(before.loss.track_op());
        let eval =
            without_gradients(&mut model, &params, |m| example_losses(m, &examples, 1)).unwrap();
        assert_eq!(eval, before.example_losses);
        // Outside, the loss is a graph again: the variables are back in the model.
        assert!(example_losses(&model, &examples, 2).is_err());
        let mut opt = AdamW::new(params, Default::default()).unwrap();
        let schedule = CosineSchedule {
            peak_lr: 1e-2,
            warmup_steps: 0,
            total_steps: 2,
        };
        let r = accumulated_step(
            &model,
            &mut opt,
            &schedule,
            std::slice::from_ref(&examples),
            Some(1.0),
        )
        .unwrap();
        assert!(r.grad_norm > 0.0);
        let after = loss::loss(&model, &examples, Reduction::PerExample).unwrap();
        assert_ne!(after.example_losses, before.example_losses);
    }

    #[test]
    fn accumulation_matches_one_batch_up_to_rounding() {
        let (mut a, examples) = tiny();
        let (mut b, _) = tiny();
        let schedule = CosineSchedule {
            peak_lr: 1e-3,
            warmup_steps: 0,
            total_steps: 1,
        };
        let mut oa = AdamW::new(
            make_trainable(&mut a, Selection::Attn).unwrap(),
            Default::default(),
        )
        .unwrap();
        let mut ob = AdamW::new(
            make_trainable(&mut b, Selection::Attn).unwrap(),
            Default::default(),
        )
        .unwrap();
        let ra = accumulated_step(
            &a,
            &mut oa,
            &schedule,
            std::slice::from_ref(&examples),
            None,
        )
        .unwrap();
        let split = [examples[..1].to_vec(), examples[1..].to_vec()];
        let rb = accumulated_step(&b, &mut ob, &schedule, &split, None).unwrap();
        assert!(
            (ra.loss - rb.loss).abs() < 1e-5,
            "{} vs {}",
            ra.loss,
            rb.loss
        );
        assert!((ra.grad_norm - rb.grad_norm).abs() < 1e-4 * ra.grad_norm);
    }
}
