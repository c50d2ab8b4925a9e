//! `paligemma train`: fine-tunes a checkpoint on a JSONL dataset and saves a Hub-layout folder
//! that this program and transformers load, resumable with `--resume`.

use super::{DTypeArg, ModelArgs, Session};
use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use paligemma::checkpoint::ModelFiles;
use paligemma::train::checkpoint::{self, Settings, TrainerState};
use paligemma::train::data::{Cursor, Dataset, Encoder, Sampler};
use paligemma::train::init;
use paligemma::train::lora::{self, LoraConfig};
use paligemma::train::loss::Example;
use paligemma::train::optim::{AdamW, AdamWConfig, CosineSchedule};
use paligemma::train::params::{self, Param, Selection};
use paligemma::train::trainer::{self, accumulated_step, without_gradients};
use serde_json::json;
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Gradients are clipped to this global norm, as in big_vision's and HF's recipes.
const MAX_GRAD_NORM: f64 = 1.0;
/// Steps averaged in the progress bar's loss.
const BAR_WINDOW: usize = 20;

#[derive(Args)]
pub struct TrainArgs {
    /// The checkpoint to start from (folder in the Hub layout or Hub id). With --resume the
    /// model comes from --out instead, except for LoRA, whose base model is given again.
    #[arg(long, required_unless_present_any = ["resume", "init"], conflicts_with = "init")]
    pub model: Option<String>,
    /// Train from scratch: a folder with config.json and tokenizer.json (and optionally
    /// preprocessor_config.json, generation_config.json); weights start random, drawn with
    /// --seed (see `paligemma::train::init`).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Training data: JSONL lines {"image", "prefix", "suffix"}, image paths relative to the
    /// file (as `paligemma shapes` writes).
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder: the fine-tuned checkpoint, trainer state and log.jsonl.
    #[arg(long)]
    pub out: PathBuf,
    /// Evaluation data (same format): mean per-example suffix loss, logged.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// What to train: attn (decoder attention projections), llm (the whole decoder), all, or
    /// lora (adapters on the decoder's linear layers, saved alone in PEFT's layout).
    #[arg(long, default_value = "attn")]
    pub train: String,
    /// LoRA rank (with --train lora).
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha: adapters are scaled by alpha / rank (with --train lora; default: the rank).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// With --train lora: also write the base model with the adapters merged into it, a
    /// Hub-layout checkpoint in OUT/merged.
    #[arg(long)]
    pub merge: bool,
    /// Number of optimizer steps (default: one epoch).
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<usize>,
    /// Number of passes over the data, rounded up to whole steps.
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Examples per micro-batch (one forward pass).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate of the cosine schedule.
    #[arg(long, default_value_t = 2e-5)]
    pub lr: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Seed of the data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a training line to log.jsonl every this many steps.
    #[arg(long, default_value_t = 1)]
    pub log_every: usize,
    /// Evaluate every this many steps (and at the start and the end).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Save a resumable checkpoint every this many steps (and at the end).
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Stop (and save) once this step is reached; --resume continues to --steps later.
    #[arg(long)]
    pub stop_at: Option<usize>,
    /// Continue the run saved in --out, with the same flags.
    #[arg(long)]
    pub resume: bool,
    /// Leave out bad dataset lines (with a warning) instead of stopping at the first.
    #[arg(long)]
    pub skip_bad: bool,
}

/// What a run trains.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Full(Selection),
    Lora(LoraConfig),
}

impl TrainArgs {
    /// Checks the flags before anything is loaded.
    fn check(&self) -> Result<Mode> {
        let mode = if self.train == "lora" {
            let alpha = self.lora_alpha.unwrap_or(self.rank as f64);
            if self.rank == 0 {
                bail!("--rank must be at least 1");
            }
            if !(alpha.is_finite() && alpha > 0.0) {
                bail!("--lora-alpha must be a finite number > 0");
            }
            if self.init.is_some() {
                bail!("--train lora adapts a trained model: give it with --model, not --init");
            }
            if self.resume && self.model.is_none() {
                bail!("--resume with --train lora needs the base model again: pass --model");
            }
            Mode::Lora(LoraConfig {
                rank: self.rank,
                alpha,
                seed: self.seed,
            })
        } else {
            if self.merge {
                bail!("--merge is for --train lora");
            }
            let selection: Selection = self
                .train
                .parse()
                .context("--train (attn, llm, all or lora)")?;
            Mode::Full(selection)
        };
        for (name, v) in [
            ("--batch-size", self.batch_size),
            ("--grad-accum", self.grad_accum),
            ("--log-every", self.log_every),
            ("--eval-every", self.eval_every.unwrap_or(1)),
            ("--save-every", self.save_every.unwrap_or(1)),
            ("--steps", self.steps.unwrap_or(1)),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if let Some(e) = self.epochs
            && !(e.is_finite() && e > 0.0)
        {
            bail!("--epochs must be a finite number > 0");
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            bail!("--lr must be a finite number ≥ 0");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("--weight-decay must be a finite number ≥ 0");
        }
        let weights = match mode {
            Mode::Full(_) => checkpoint::MODEL_FILE,
            Mode::Lora(_) => lora::ADAPTER_FILE,
        };
        if self.resume && !checkpoint::has_state(&self.out) {
            bail!(
                "--resume: {} holds no {}",
                self.out.display(),
                checkpoint::STATE_JSON
            );
        }
        if self.resume && !self.out.join(weights).is_file() {
            bail!(
                "--resume: {} has no {weights} (was it trained with another --train?)",
                self.out.display()
            );
        }
        if !self.resume && (self.out.join(weights).exists() || checkpoint::has_state(&self.out)) {
            bail!(
                "{} already holds a checkpoint: pass --resume to continue it, or choose another --out",
                self.out.display()
            );
        }
        Ok(mode)
    }

    fn examples_per_step(&self) -> usize {
        self.batch_size * self.grad_accum
    }

    fn total_steps(&self, dataset_size: usize) -> usize {
        self.steps.unwrap_or_else(|| {
            let examples = self.epochs.unwrap_or(1.0) * dataset_size as f64;
            ((examples / self.examples_per_step() as f64).ceil() as usize).max(1)
        })
    }
}

/// The model being trained and what it is trained with.
struct Run {
    session: Session,
    mode: Mode,
    /// Folder the configuration files are copied from.
    source: PathBuf,
    /// How the base model was named (LoRA's `base_model_name_or_path`).
    base: String,
    params: Vec<Param>,
    train: Dataset,
    eval: Option<Dataset>,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let mode = args.check()?;
    let mut run = load(&args, mode)?;
    let settings = Settings {
        train: args.train.clone(),
        seed: args.seed,
        dataset_size: run.train.len(),
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        total_steps: args.total_steps(run.train.len()),
        lr: args.lr,
        warmup: args.warmup,
        weight_decay: args.weight_decay,
    };
    let cfg = AdamWConfig {
        weight_decay: args.weight_decay,
        ..Default::default()
    };
    let mut opt = AdamW::new(run.params.clone(), cfg)?;
    let (cursor, resumed_at) = if args.resume {
        let (state, moments) = checkpoint::load_state(&args.out, run.weights_file())?;
        settings.check_same(&state.settings)?;
        checkpoint::restore_optimizer(&mut opt, &state, &moments)?;
        (state.data, Some(state.step))
    } else {
        (Cursor::default(), None)
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let log = Log::open(&args.out.join("log.jsonl"), resumed_at)?;
    train_loop(&args, &mut run, &mut opt, settings, cursor, log)
}

fn load(args: &TrainArgs, mode: Mode) -> Result<Run> {
    // LoRA keeps its base model; only full training resumes from the saved model.
    let resume_from_out = args.resume && matches!(mode, Mode::Full(_));
    let (files, mut session) = match (&args.init, &args.model, resume_from_out) {
        (Some(dir), _, false) => {
            let files = ModelFiles::without_weights(dir)?;
            let model = init::random_model(&files, args.seed, &candle_core::Device::Cpu)
                .with_context(|| format!("--init {}", dir.display()))?;
            let session = Session::with_model(model, &files)?;
            (files, session)
        }
        (_, model, resume) => {
            let spec = match (model, resume) {
                (_, true) => args.out.to_string_lossy().into_owned(),
                (Some(m), false) => m.clone(),
                (None, false) => bail!("--model or --init is required"),
            };
            let files = ModelFiles::resolve(&spec)?;
            if files.is_big_vision() {
                bail!(
                    "training starts from a checkpoint folder in the Hub layout (config.json, \
                     model.safetensors); {spec} is a big_vision .npz"
                );
            }
            let session = Session::load(&ModelArgs {
                model: spec,
                dtype: DTypeArg::F32,
                quant: None,
                adapter: None,
            })?;
            (files, session)
        }
    };
    let enc = Encoder {
        tokenizer: &session.tokenizer,
        config: &session.model.config,
        preprocessor: &session.preprocessor,
    };
    let train = load_dataset(&args.data, &enc, args.skip_bad)?;
    let eval = match &args.eval {
        Some(p) => Some(load_dataset(p, &enc, args.skip_bad)?),
        None => None,
    };
    let params = match mode {
        Mode::Full(selection) => params::make_trainable(&mut session.model, selection)?,
        Mode::Lora(cfg) => {
            if args.resume {
                let (tensors, scale) = lora::load_adapter(&args.out)?;
                if (scale - cfg.scale()).abs() > 1e-12 {
                    bail!(
                        "cannot resume: the saved adapter has alpha/rank {scale}, this run {}",
                        cfg.scale()
                    );
                }
                lora::attach_values(&mut session.model, &tensors, scale)?;
            } else {
                lora::attach(&mut session.model, cfg)?;
            }
            lora::make_trainable(&mut session.model)?
        }
    };
    eprintln!(
        "training {} parameters ({} values) on {} examples",
        params.len(),
        params::count(&params),
        train.len()
    );
    let base = match (&args.model, &args.init) {
        (Some(m), _) => m.clone(),
        (None, Some(dir)) => dir.display().to_string(),
        (None, None) => args.out.display().to_string(),
    };
    Ok(Run {
        mode,
        session,
        base,
        source: files.dir,
        params,
        train,
        eval,
    })
}

fn load_dataset(path: &Path, enc: &Encoder<'_>, skip_bad: bool) -> Result<Dataset> {
    let d = Dataset::load(path, enc, skip_bad)?;
    for (line, why) in &d.skipped {
        eprintln!("warning: {}, line {line} skipped: {why}", path.display());
    }
    Ok(d)
}

fn train_loop(
    args: &TrainArgs,
    run: &mut Run,
    opt: &mut AdamW,
    settings: Settings,
    cursor: Cursor,
    mut log: Log,
) -> Result<()> {
    let total = settings.total_steps;
    let stop = args.stop_at.unwrap_or(total).min(total);
    let schedule = CosineSchedule {
        peak_lr: args.lr,
        warmup_steps: args.warmup,
        total_steps: total,
    };
    let mut sampler = Sampler::new(run.train.len(), args.seed, cursor)?;
    let bar = progress_bar(total, opt.steps())?;
    if opt.steps() == 0 {
        evaluate(args, run, 0, &mut log, &bar)?;
    }
    let t0 = Instant::now();
    let mut seen = 0usize;
    let mut window: VecDeque<f32> = VecDeque::new();
    let mut since_log: Vec<f32> = Vec::new();
    while opt.steps() < stop {
        let micro = next_step_examples(args, run, &mut sampler)?;
        let report = accumulated_step(
            &run.session.model,
            opt,
            &schedule,
            &micro,
            Some(MAX_GRAD_NORM),
        )?;
        let step = opt.steps();
        seen += args.examples_per_step();
        let rate = seen as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        window.push_back(report.loss);
        if window.len() > BAR_WINDOW {
            window.pop_front();
        }
        since_log.push(report.loss);
        let running = trainer::mean(window.make_contiguous());
        bar.set_position(step as u64);
        bar.set_message(format!(
            "loss {running:.4}  lr {:.2e}  {rate:.1} ex/s",
            report.lr
        ));
        if step.is_multiple_of(args.log_every) || step == stop {
            let c = sampler.cursor();
            log.write(json!({
                "type": "train",
                "step": step,
                "epoch": c.epoch as f64 + c.position as f64 / run.train.len() as f64,
                "loss": trainer::mean(&since_log),
                "lr": report.lr,
                "grad_norm": report.grad_norm,
                "examples_per_s": rate,
            }))?;
            since_log.clear();
        }
        if args.eval_every.is_some_and(|k| step.is_multiple_of(k)) || step == total {
            evaluate(args, run, step, &mut log, &bar)?;
        }
        if args.save_every.is_some_and(|k| step.is_multiple_of(k)) && step != stop {
            save(run, opt, &settings, sampler.cursor(), &args.out)?;
        }
    }
    save(run, opt, &settings, sampler.cursor(), &args.out)?;
    bar.finish_and_clear();
    if args.merge {
        let merged = args.out.join("merged");
        lora::merge(&mut run.session.model)?;
        checkpoint::save_model(&mut run.session.model, &run.source, &merged, opt.steps())?;
        println!("merged model saved to {}", merged.display());
    }
    let status = if opt.steps() < total {
        format!(
            "stopped at step {} of {total}; continue with --resume",
            opt.steps()
        )
    } else {
        format!("trained {total} steps")
    };
    println!("{status}; saved to {}", args.out.display());
    Ok(())
}

fn progress_bar(total: usize, at: usize) -> Result<ProgressBar> {
    let bar = ProgressBar::new(total as u64).with_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} steps  {msg}  {elapsed} (eta {eta})",
    )?);
    bar.set_position(at as u64);
    Ok(bar)
}

/// The micro-batches of the next step, images decoded.
fn next_step_examples(
    args: &TrainArgs,
    run: &Run,
    sampler: &mut Sampler,
) -> Result<Vec<Vec<Example>>> {
    let s = &run.session;
    (0..args.grad_accum)
        .map(|_| {
            run.train
                .examples(&sampler.take(args.batch_size), &s.preprocessor, &s.device)
        })
        .collect()
}

/// Mean per-example suffix loss over the evaluation set (if any), printed and logged.
fn evaluate(
    args: &TrainArgs,
    run: &mut Run,
    step: usize,
    log: &mut Log,
    bar: &ProgressBar,
) -> Result<()> {
    let Some(data) = &run.eval else {
        return Ok(());
    };
    let s = &mut run.session;
    let indices: Vec<usize> = (0..data.len()).collect();
    let losses = without_gradients(&mut s.model, &run.params, |model| {
        let mut all = Vec::with_capacity(data.len());
        for chunk in indices.chunks(args.batch_size) {
            let batch = data.examples(chunk, &s.preprocessor, &s.device)?;
            all.extend(trainer::example_losses(model, &batch, args.batch_size)?);
        }
        Ok(all)
    })?;
    let loss = trainer::mean(&losses);
    bar.suspend(|| {
        println!(
            "step {step}: eval loss {loss:.4} ({} examples)",
            losses.len()
        )
    });
    log.write(json!({"type": "eval", "step": step, "loss": loss, "examples": losses.len()}))
}

fn save(run: &mut Run, opt: &AdamW, settings: &Settings, data: Cursor, out: &Path) -> Result<()> {
    let state = TrainerState {
        step: opt.steps(),
        data,
        settings: settings.clone(),
        param_steps: opt.moments().iter().map(|m| m.steps).collect(),
    };
    let model = &mut run.session.model;
    match run.mode {
        Mode::Full(_) => checkpoint::save_model(model, &run.source, out, state.step)?,
        Mode::Lora(cfg) => lora::save_adapter(model, cfg, &run.base, out, state.step)?,
    }
    checkpoint::save_state(opt, &state, out)
}

impl Run {
    /// The weights file a saved step is checked against on resume.
    fn weights_file(&self) -> &'static str {
        match self.mode {
            Mode::Full(_) => checkpoint::MODEL_FILE,
            Mode::Lora(_) => lora::ADAPTER_FILE,
        }
    }
}

#[derive(Args)]
pub struct MergeLoraArgs {
    /// The base checkpoint the adapter was trained on (folder in the Hub layout or Hub id).
    #[arg(long)]
    pub model: String,
    /// The adapter folder (PEFT layout: adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output folder for the merged checkpoint (f32, Hub layout).
    #[arg(long)]
    pub out: PathBuf,
}

/// `paligemma merge-lora`: base + adapter → one Hub-layout checkpoint.
pub fn merge_lora(args: MergeLoraArgs) -> Result<()> {
    if args.out.join(checkpoint::MODEL_FILE).exists() {
        bail!(
            "{} already holds a model; choose another --out",
            args.out.display()
        );
    }
    let files = ModelFiles::resolve(&args.model)?;
    let mut session = Session::load(&ModelArgs {
        model: args.model.clone(),
        dtype: DTypeArg::F32,
        quant: None,
        adapter: Some(args.adapter.clone()),
    })?;
    lora::merge(&mut session.model)?;
    checkpoint::save_model(&mut session.model, &files.dir, &args.out, 0)?;
    println!("merged model saved to {}", args.out.display());
    Ok(())
}

/// The lines of a log whose `step` is at most `step` (lines without one, or unreadable, are kept).
fn lines_up_to(text: &str, step: usize) -> String {
    text.lines()
        .filter(|line| {
            let logged = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
            logged.is_none_or(|s| s as usize <= step)
        })
        .flat_map(|line| [line, "\n"])
        .collect()
}

/// `log.jsonl`: one JSON object per line, flushed as written so a crash keeps what was logged.
struct Log(File);

impl Log {
    /// A fresh log, or when resuming from `step`, the old one without the lines logged after the
    /// saved step: those steps run again and would otherwise appear twice.
    fn open(path: &Path, resumed_at: Option<usize>) -> Result<Self> {
        let kept = match resumed_at {
            Some(step) => match std::fs::read_to_string(path) {
                Ok(text) => lines_up_to(&text, step),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
            },
            None => String::new(),
        };
        let mut file =
            File::create(path).with_context(|| format!("cannot open {}", path.display()))?;
        file.write_all(kept.as_bytes())?;
        Ok(Self(file))
    }

    fn write(&mut self, value: serde_json::Value) -> Result<()> {
        writeln!(self.0, "{value}")?;
        Ok(self.0.flush()?)
    }
}

#[cfg(test)]
mod tests {
    use super::lines_up_to;

    #[test]
    fn resuming_drops_the_lines_logged_after_the_saved_step() {
        let log = "{\"step\":10,\"type\":\"train\"}\n{\"note\":\"no step\"}\n\
                   {\"step\":20,\"type\":\"eval\"}\n{\"step\":30,\"type\":\"train\"}\n";
        assert_eq!(
            lines_up_to(log, 20),
            "{\"step\":10,\"type\":\"train\"}\n{\"note\":\"no step\"}\n{\"step\":20,\"type\":\"eval\"}\n"
        );
        assert_eq!(lines_up_to(log, 5), "{\"note\":\"no step\"}\n");
        assert_eq!(lines_up_to("", 5), "");
    }
}
