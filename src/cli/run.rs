//! `generate` (raw prompts) and `score` (teacher-forced log-probabilities).

use super::{DecodeArgs, ModelArgs, Session, read_images};
use anyhow::{Result, bail};
use clap::Args;
use paligemma::prompt;
use serde_json::json;
use std::path::PathBuf;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image files (JPEG, PNG, WebP, GIF, BMP, TIFF); several are placed one after another.
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// The prompt; repeat it to run several prompts about the same images as one batch.
    #[arg(long = "prompt")]
    pub prompts: Vec<String>,
    #[command(flatten)]
    pub decode: DecodeArgs,
    /// Print one JSON object (one per line for several prompts) instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    /// The continuation to score; <eos> is appended as in training.
    #[arg(long)]
    pub suffix: String,
    #[arg(long)]
    pub json: bool,
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    if args.images.is_empty() {
        bail!("no --image given: PaliGemma needs at least one image");
    }
    if args.prompts.is_empty() {
        bail!("no --prompt given (e.g. --prompt \"caption en\")");
    }
    args.decode.strategy()?;
    let session = Session::load(&args.model)?;
    let pixels = session.pixels(&read_images(&args.images)?)?;
    let outputs = session.run_prompts(&args.prompts, &pixels, &args.decode, !args.json)?;
    for (prompt_text, (out, text)) in args.prompts.iter().zip(&outputs) {
        if args.json {
            let obj = json!({
                "prompt": prompt_text,
                "text": text,
                "tokens": out.tokens,
                "logprobs": out.logprobs,
                "stopped_at_eos": out.stopped_at_eos,
            });
            println!("{obj}");
        } else if outputs.len() > 1 {
            println!("{text}");
        }
    }
    Ok(())
}

pub fn score(args: ScoreArgs) -> Result<()> {
    if args.images.is_empty() {
        bail!("no --image given: PaliGemma needs at least one image");
    }
    let session = Session::load(&args.model)?;
    let pixels = session.pixels(&read_images(&args.images)?)?;
    let cfg = &session.model.config;
    let seq = prompt::with_suffix(
        &session.tokenizer,
        cfg,
        &args.prompt,
        pixels.dim(0)?,
        &args.suffix,
    )?;
    prompt::check_length(cfg, seq.ids.len(), 0)?;
    let logprobs = paligemma::score::suffix_logprobs(&session.model, &seq, Some(&pixels))?;
    let total: f64 = logprobs.iter().map(|&v| v as f64).sum();
    if args.json {
        let obj = json!({
            "input_ids": seq.ids,
            "prefix_length": seq.prefix_len,
            "tokens": seq.suffix(),
            "logprobs": logprobs,
            "total_logprob": total,
        });
        println!("{obj}");
    } else {
        for (&t, lp) in seq.suffix().iter().zip(&logprobs) {
            let piece = session.tokenizer.id_to_token(t).unwrap_or_default();
            println!("{t:>8} {piece:<20} {lp:>12.6}");
        }
        println!("total log-probability: {total:.6}");
    }
    Ok(())
}
