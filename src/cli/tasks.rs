//! Task commands: the prompt syntax built for the user, structured output.

use super::{DecodeArgs, ModelArgs, Session, read_images};
use anyhow::{Context, Result, bail};
use clap::Args;
use paligemma::annotate::Annotation;
use paligemma::mask::{BinaryMask, paste_mask, rle_encode};
use paligemma::task::Task;
use paligemma::vqvae::VqVaeDecoder;
use serde_json::{Value, json};
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

#[derive(Args)]
pub struct DetectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The image.
    pub image: PathBuf,
    /// What to look for, e.g. `cat` `red car` (one argument per kind of object).
    #[arg(required = true)]
    pub labels: Vec<String>,
    /// Write the image with boxes, labels (and masks) drawn on it to this PNG.
    #[arg(long)]
    pub annotate: Option<PathBuf>,
    #[command(flatten)]
    pub decode: DecodeArgs,
    #[arg(long)]
    pub json: bool,
}

pub fn detect(args: DetectArgs) -> Result<()> {
    let prompt = Task::Detect {
        labels: args.labels.clone(),
    }
    .prompt()?;
    let image = paligemma::image::load_image(&args.image)?;
    let (width, height) = image.dimensions();
    let session = Session::load(&args.model)?;
    let pixels = session.pixels(std::slice::from_ref(&image))?;
    let (out, text) = session
        .run_prompts(std::slice::from_ref(&prompt), &pixels, &args.decode, false)?
        .remove(0);
    let parsed = paligemma::parse::parse_detections(&text, width, height);
    report_objects(
        "detect",
        &prompt,
        &text,
        &out.tokens,
        &parsed,
        &[],
        (width, height),
        args.json,
    );
    if let Some(path) = &args.annotate {
        write_annotated(&image, &parsed.objects, &[], path)?;
    }
    Ok(())
}

/// Prints what was found: JSON (one object) or one line per object.
#[allow(clippy::too_many_arguments)]
pub fn report_objects(
    task: &str,
    prompt: &str,
    text: &str,
    tokens: &[u32],
    parsed: &paligemma::parse::Parsed,
    masks: &[Option<Value>],
    (width, height): (u32, u32),
    json_out: bool,
) {
    for w in &parsed.warnings {
        eprintln!("warning: {w}");
    }
    if json_out {
        let objects: Vec<Value> = parsed
            .objects
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let mut obj = json!({ "label": o.label, "box": o.bbox, "loc": o.loc });
                if let Some(Some(mask)) = masks.get(i) {
                    obj["mask"] = mask.clone();
                }
                obj
            })
            .collect();
        let mut out = json!({
            "task": task, "text": text, "width": width, "height": height,
            "objects": objects, "warnings": parsed.warnings,
        });
        if !prompt.is_empty() {
            out["prompt"] = json!(prompt);
            out["tokens"] = json!(tokens);
        }
        println!("{out}");
    } else if parsed.objects.is_empty() {
        println!("nothing found (model output: {text:?})");
    } else {
        for o in &parsed.objects {
            let [x0, y0, x1, y1] = o.bbox;
            println!(
                "{:<20} x0={x0:.1} y0={y0:.1} x1={x1:.1} y1={y1:.1}",
                o.label
            );
        }
    }
}

/// Draws boxes, labels and masks on the image and saves it as PNG.
pub fn write_annotated(
    image: &image::RgbImage,
    objects: &[paligemma::parse::Object],
    masks: &[Option<BinaryMask>],
    path: &std::path::Path,
) -> Result<()> {
    let annotations: Vec<Annotation> = objects
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let a = Annotation::new(o.label.clone(), o.bbox);
            match masks.get(i) {
                Some(Some(m)) => a.with_mask(m.to_gray_image()),
                _ => a,
            }
        })
        .collect();
    let picture = paligemma::annotate::annotate(image, &annotations);
    picture
        .save_with_format(path, image::ImageFormat::Png)
        .with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum ParseTask {
    Detect,
    Segment,
}

#[derive(Args)]
pub struct ParseArgs {
    /// Which output syntax the text is in.
    #[arg(long, value_enum)]
    pub task: ParseTask,
    /// A PaliGemma output, from this or any other runtime, e.g. "<loc0100><loc0200><loc0300><loc0400> cat".
    #[arg(long)]
    pub text: String,
    /// Width of the original image in pixels (taken from --image when given).
    #[arg(long)]
    pub width: Option<u32>,
    /// Height of the original image in pixels (taken from --image when given).
    #[arg(long)]
    pub height: Option<u32>,
    /// The image the output is about: sets the size, and is drawn on with --annotate.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Write the image with the objects drawn on it (needs --image).
    #[arg(long, requires = "image")]
    pub annotate: Option<PathBuf>,
    /// The mask decoder weights (`vae-oid.npz`) for --task segment; fetched from the Hub by
    /// default.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn parse(args: ParseArgs) -> Result<()> {
    let image = args
        .image
        .as_deref()
        .map(paligemma::image::load_image)
        .transpose()?;
    let size = |given: Option<u32>, from_image: Option<u32>, flag: &str| -> Result<u32> {
        match (given, from_image) {
            (Some(v), Some(i)) if v != i => bail!("--{flag} {v} differs from the image's {i}"),
            (Some(0), _) => bail!("--{flag} must be positive"),
            (Some(v), _) | (None, Some(v)) => Ok(v),
            (None, None) => bail!("give --{flag} (or --image)"),
        }
    };
    let width = size(args.width, image.as_ref().map(|i| i.width()), "width")?;
    let height = size(args.height, image.as_ref().map(|i| i.height()), "height")?;
    let (task, parsed) = match args.task {
        ParseTask::Detect => (
            "detect",
            paligemma::parse::parse_detections(&args.text, width, height),
        ),
        ParseTask::Segment => (
            "segment",
            paligemma::parse::parse_segmentations(&args.text, width, height),
        ),
    };
    let masks = match args.task {
        ParseTask::Detect => Vec::new(),
        ParseTask::Segment => object_masks(&parsed, width, height, args.vae.as_deref())?,
    };
    report_objects(
        task,
        "",
        &args.text,
        &[],
        &parsed,
        &rle_json(&masks)?,
        (width, height),
        args.json,
    );
    if let (Some(path), Some(image)) = (&args.annotate, &image) {
        write_annotated(image, &parsed.objects, &masks, path)?;
    }
    Ok(())
}

#[derive(Args)]
pub struct SegmentArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The image.
    pub image: PathBuf,
    /// What to segment, e.g. `cat` `red car` (one argument per kind of object).
    #[arg(required = true)]
    pub labels: Vec<String>,
    /// Write the image with masks, boxes and labels drawn on it to this PNG.
    #[arg(long)]
    pub annotate: Option<PathBuf>,
    /// The mask decoder weights (`vae-oid.npz`); fetched from the Hub by default.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    #[command(flatten)]
    pub decode: DecodeArgs,
    #[arg(long)]
    pub json: bool,
}

pub fn segment(args: SegmentArgs) -> Result<()> {
    let prompt = Task::Segment {
        labels: args.labels.clone(),
    }
    .prompt()?;
    let image = paligemma::image::load_image(&args.image)?;
    let (width, height) = image.dimensions();
    let session = Session::load(&args.model)?;
    let pixels = session.pixels(std::slice::from_ref(&image))?;
    let (out, text) = session
        .run_prompts(std::slice::from_ref(&prompt), &pixels, &args.decode, false)?
        .remove(0);
    let parsed = paligemma::parse::parse_segmentations(&text, width, height);
    let masks = object_masks(&parsed, width, height, args.vae.as_deref())?;
    report_objects(
        "segment",
        &prompt,
        &text,
        &out.tokens,
        &parsed,
        &rle_json(&masks)?,
        (width, height),
        args.json,
    );
    if let Some(path) = &args.annotate {
        write_annotated(&image, &parsed.objects, &masks, path)?;
    }
    Ok(())
}

/// Decodes each object's 16 `<seg>` codes with the VQ-VAE and pastes the 64×64 mask into its
/// box as big_vision's evaluator does; `None` for objects without codes or with a box the
/// evaluator rejects.
fn object_masks(
    parsed: &paligemma::parse::Parsed,
    width: u32,
    height: u32,
    vae: Option<&std::path::Path>,
) -> Result<Vec<Option<BinaryMask>>> {
    let mut masks = vec![None; parsed.objects.len()];
    let coded: Vec<(usize, [u8; 16])> = parsed
        .objects
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.seg.map(|codes| (i, codes)))
        .collect();
    if coded.is_empty() {
        return Ok(masks);
    }
    let path = match vae {
        Some(p) => p.to_path_buf(),
        None => paligemma::hub::download_vae()?,
    };
    let decoder = VqVaeDecoder::load(&path)?;
    let codes: Vec<[u8; 16]> = coded.iter().map(|(_, c)| *c).collect();
    for ((i, _), m64) in coded.iter().zip(decoder.decode(&codes)?) {
        let object = &parsed.objects[*i];
        match paste_mask(&m64, object.loc, width, height) {
            Some(pasted) => masks[*i] = Some(pasted.mask),
            None => eprintln!(
                "warning: object {} ({:?}): its box is empty in pixels or inverted, so it gets no mask",
                i, object.label
            ),
        }
    }
    Ok(masks)
}

/// COCO RLE JSON for each mask.
fn rle_json(masks: &[Option<BinaryMask>]) -> Result<Vec<Option<Value>>> {
    masks
        .iter()
        .map(|m| {
            m.as_ref()
                .map(|m| serde_json::to_value(rle_encode(m)))
                .transpose()
                .map_err(Into::into)
        })
        .collect()
}
