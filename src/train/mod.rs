//! Fine-tuning in f32: what trains ([`params`]), the loss ([`loss`]) and the optimizer
//! ([`optim`]), checked against PyTorch (transformers 5.24) by `tests/train_parity.rs`.
//!
//! A step: [`loss::loss`] over a batch, `backward()`, [`optim::gradients`], clipping of the
//! global norm ([`optim::clip`]), and [`optim::AdamW::step`] at the [`optim::CosineSchedule`]'s
//! learning rate; [`train_step`] does exactly that.
//!
//! The model is the inference model with the selected weights turned into variables
//! ([`params::make_trainable`]): the forward pass is the same code, and the fused kernels
//! gain gradients through [`crate::ops::autodiff`].
//!
//! Around the step: [`data`] (JSONL datasets, seeded order), [`trainer`] (gradient
//! accumulation, evaluation without a graph) and [`checkpoint`] (Hub-layout saving, resumable
//! trainer state); `paligemma train` puts them together.

pub mod checkpoint;
pub mod data;
pub mod init;
pub mod lora;
pub mod loss;
pub mod optim;
pub mod params;
pub mod trainer;

use crate::paligemma::PaliGemma;
use anyhow::Result;
use loss::{Example, Reduction};
use optim::{AdamW, CosineSchedule};

/// What one step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// The batch loss before the update.
    pub loss: f32,
    pub example_losses: Vec<f32>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
}

/// One optimizer step on `batch`: loss, gradients, clipping at `max_grad_norm` (if any), and
/// an AdamW update at the schedule's learning rate for the optimizer's step count.
pub fn train_step(
    model: &PaliGemma,
    opt: &mut AdamW,
    schedule: &CosineSchedule,
    batch: &[Example],
    max_grad_norm: Option<f64>,
    reduction: Reduction,
) -> Result<StepReport> {
    let out = loss::loss(model, batch, reduction)?;
    let store = out.loss.backward()?;
    let mut grads = optim::gradients(opt.params(), &store);
    drop(store);
    let grad_norm = optim::global_norm(&grads)?;
    if let Some(max) = max_grad_norm {
        optim::clip(&mut grads, grad_norm, max)?;
    }
    let lr = schedule.lr(opt.steps());
    opt.step(&grads, lr)?;
    Ok(StepReport {
        loss: out.loss.to_scalar::<f32>()?,
        example_losses: out.example_losses,
        grad_norm,
        lr,
    })
}
