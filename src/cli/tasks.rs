//! Task commands: the prompt syntax built for the user, structured output.

use super::{DecodeArgs, ModelArgs, Session, read_images};
use anyhow::{Result, bail};
use clap::Args;
use paligemma::task::Task;
use serde_json::json;
use std::path::PathBuf;

/// Where the pixels come from: an image, more images, or video frames.
#[derive(Args)]
pub struct InputArgs {
    /// The image (JPEG, PNG, WebP, GIF, BMP, TIFF).
    pub image: Option<PathBuf>,
    /// More images, placed after the first one (multi-image prompts).
    #[arg(long = "image")]
    pub more_images: Vec<PathBuf>,
    /// A video: an animated GIF or WebP, or a folder of frame images (sorted by name); its
    /// frames are encoded one after another as big_vision does.
    #[arg(long, conflicts_with_all = ["image", "more_images"])]
    pub video: Option<PathBuf>,
    /// Frames sampled evenly from --video (16 as in big_vision's video transfers).
    #[arg(long, default_value_t = 16, requires = "video")]
    pub frames: usize,
}

impl InputArgs {
    fn images(&self) -> Result<Vec<image::RgbImage>> {
        if let Some(video) = &self.video {
            return Ok(paligemma::video::load_frames(video, self.frames)?);
        }
        let paths: Vec<PathBuf> = self
            .image
            .iter()
            .chain(&self.more_images)
            .cloned()
            .collect();
        if paths.is_empty() {
            bail!("no image given: name an image file (or --video)");
        }
        read_images(&paths)
    }
}

#[derive(Args)]
pub struct CaptionArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub input: InputArgs,
    /// Language of the caption (one of PaliGemma's 35 codes).
    #[arg(long, default_value = "en")]
    pub lang: String,
    /// A longer description (`describe`) instead of a short caption.
    #[arg(long)]
    pub long: bool,
    #[command(flatten)]
    pub decode: DecodeArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct AskArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The image.
    pub image: PathBuf,
    /// One or more questions; several are answered in one batch, the image encoded once.
    #[arg(required = true)]
    pub questions: Vec<String>,
    #[arg(long, default_value = "en")]
    pub lang: String,
    #[command(flatten)]
    pub decode: DecodeArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct OcrArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub input: InputArgs,
    #[command(flatten)]
    pub decode: DecodeArgs,
    #[arg(long)]
    pub json: bool,
}

/// Runs text tasks (one prompt each) and prints text or JSON lines.
fn run_text_tasks(
    task_name: &str,
    tasks: &[Task],
    model: &ModelArgs,
    images: Vec<image::RgbImage>,
    decode: &DecodeArgs,
    json_out: bool,
) -> Result<()> {
    let prompts = tasks.iter().map(Task::prompt).collect::<Result<Vec<_>>>()?;
    decode.strategy()?;
    let session = Session::load(model)?;
    let pixels = session.pixels(&images)?;
    let outputs = session.run_prompts(&prompts, &pixels, decode, !json_out)?;
    for (prompt, (out, text)) in prompts.iter().zip(&outputs) {
        if json_out {
            println!(
                "{}",
                json!({ "task": task_name, "prompt": prompt, "text": text, "tokens": out.tokens })
            );
        } else if outputs.len() > 1 {
            println!("{prompt}: {text}");
        }
    }
    Ok(())
}

pub fn caption(args: CaptionArgs) -> Result<()> {
    let task = Task::Caption {
        lang: args.lang.clone(),
        long: args.long,
    };
    let name = if args.long { "describe" } else { "caption" };
    run_text_tasks(
        name,
        &[task],
        &args.model,
        args.input.images()?,
        &args.decode,
        args.json,
    )
}

pub fn ask(args: AskArgs) -> Result<()> {
    let tasks: Vec<Task> = args
        .questions
        .iter()
        .map(|q| Task::Answer {
            lang: args.lang.clone(),
            question: q.clone(),
        })
        .collect();
    let images = read_images(std::slice::from_ref(&args.image))?;
    run_text_tasks(
        "answer",
        &tasks,
        &args.model,
        images,
        &args.decode,
        args.json,
    )
}

pub fn ocr(args: OcrArgs) -> Result<()> {
    run_text_tasks(
        "ocr",
        &[Task::Ocr],
        &args.model,
        args.input.images()?,
        &args.decode,
        args.json,
    )
}
