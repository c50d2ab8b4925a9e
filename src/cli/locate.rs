//! Where things are: `detect` and `segment` run the model, `parse` reads output text from any
//! runtime; all three turn `<loc>`/`<seg>` tokens into pixel boxes, masks and pictures.

use super::{DecodeArgs, ModelArgs, Session};
use anyhow::{Context, Result, bail};
use clap::Args;
use paligemma::annotate::Annotation;
use paligemma::mask::{BinaryMask, paste_mask, rle_encode};
use paligemma::parse::{Parsed, parse_detections, parse_segmentations};
use paligemma::task::Task;
use paligemma::vqvae::VqVaeDecoder;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// What `detect` and `segment` share.
#[derive(Args)]
pub struct TargetArgs {
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

#[derive(Args)]
pub struct DetectArgs {
    #[command(flatten)]
    pub target: TargetArgs,
}

#[derive(Args)]
pub struct SegmentArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// The mask decoder weights (`vae-oid.npz`); fetched from the Hub by default.
    #[arg(long)]
    pub vae: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum Kind {
    Detect,
    Segment,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Detect => "detect",
            Kind::Segment => "segment",
        }
    }

    fn parse(self, text: &str, width: u32, height: u32) -> Parsed {
        match self {
            Kind::Detect => parse_detections(text, width, height),
            Kind::Segment => parse_segmentations(text, width, height),
        }
    }
}

pub fn detect(args: DetectArgs) -> Result<()> {
    locate(Kind::Detect, args.target, None)
}

pub fn segment(args: SegmentArgs) -> Result<()> {
    locate(Kind::Segment, args.target, args.vae.as_deref())
}

fn locate(kind: Kind, args: TargetArgs, vae: Option<&Path>) -> Result<()> {
    let labels = args.labels.clone();
    let task = match kind {
        Kind::Detect => Task::Detect { labels },
        Kind::Segment => Task::Segment { labels },
    };
    let prompt = task.prompt()?;
    let image = paligemma::image::load_image(&args.image)?;
    let size = image.dimensions();
    let session = Session::load(&args.model)?;
    let pixels = session.pixels(std::slice::from_ref(&image))?;
    let (out, text) = session
        .run_prompts(std::slice::from_ref(&prompt), &pixels, &args.decode, false)?
        .remove(0);
    let found = Found::new(kind, &text, size, vae)?;
    found.report(Some((&prompt, &out.tokens)), args.json)?;
    if let Some(path) = &args.annotate {
        found.write_annotated(&image, path)?;
    }
    Ok(())
}

#[derive(Args)]
pub struct ParseArgs {
    /// Which output syntax the text is in.
    #[arg(long, value_enum)]
    pub task: Kind,
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
    let side = |given: Option<u32>, from_image: Option<u32>, flag: &str| -> Result<u32> {
        match (given, from_image) {
            (Some(v), Some(i)) if v != i => bail!("--{flag} {v} differs from the image's {i}"),
            (Some(0), _) => bail!("--{flag} must be positive"),
            (Some(v), _) | (None, Some(v)) => Ok(v),
            (None, None) => bail!("give --{flag} (or --image)"),
        }
    };
    let width = side(args.width, image.as_ref().map(|i| i.width()), "width")?;
    let height = side(args.height, image.as_ref().map(|i| i.height()), "height")?;
    let found = Found::new(args.task, &args.text, (width, height), args.vae.as_deref())?;
    found.report(None, args.json)?;
    if let (Some(path), Some(image)) = (&args.annotate, &image) {
        found.write_annotated(image, path)?;
    }
    Ok(())
}

/// Objects read from one output, with their masks for segmentation.
struct Found<'a> {
    kind: Kind,
    text: &'a str,
    size: (u32, u32),
    parsed: Parsed,
    masks: Vec<Option<BinaryMask>>,
}

impl<'a> Found<'a> {
    fn new(
        kind: Kind,
        text: &'a str,
        (width, height): (u32, u32),
        vae: Option<&Path>,
    ) -> Result<Self> {
        let parsed = kind.parse(text, width, height);
        let masks = match kind {
            Kind::Detect => vec![None; parsed.objects.len()],
            Kind::Segment => object_masks(&parsed, width, height, vae)?,
        };
        Ok(Self {
            kind,
            text,
            size: (width, height),
            parsed,
            masks,
        })
    }

    /// Prints the objects: JSON (one object), or one line per object; warnings to stderr.
    /// `generated` is the prompt and tokens when the model ran.
    fn report(&self, generated: Option<(&str, &[u32])>, json_out: bool) -> Result<()> {
        for w in &self.parsed.warnings {
            eprintln!("warning: {w}");
        }
        if !json_out {
            if self.parsed.objects.is_empty() {
                println!("nothing found (model output: {:?})", self.text);
            }
            for o in &self.parsed.objects {
                let [x0, y0, x1, y1] = o.bbox;
                println!(
                    "{:<20} x0={x0:.1} y0={y0:.1} x1={x1:.1} y1={y1:.1}",
                    o.label
                );
            }
            return Ok(());
        }
        let mut objects = Vec::with_capacity(self.parsed.objects.len());
        for (o, mask) in self.parsed.objects.iter().zip(&self.masks) {
            let mut obj = json!({ "label": o.label, "box": o.bbox, "loc": o.loc });
            if let Some(mask) = mask {
                obj["mask"] = serde_json::to_value(rle_encode(mask))?;
            }
            objects.push(obj);
        }
        let (width, height) = self.size;
        let mut out: Value = json!({
            "task": self.kind.name(), "text": self.text, "width": width, "height": height,
            "objects": objects, "warnings": self.parsed.warnings,
        });
        if let Some((prompt, tokens)) = generated {
            out["prompt"] = json!(prompt);
            out["tokens"] = json!(tokens);
        }
        println!("{out}");
        Ok(())
    }

    /// Draws boxes, labels and masks on the image and saves it as PNG.
    fn write_annotated(&self, image: &image::RgbImage, path: &Path) -> Result<()> {
        let annotations: Vec<Annotation> = self
            .parsed
            .objects
            .iter()
            .zip(&self.masks)
            .map(|(o, mask)| {
                let a = Annotation::new(o.label.clone(), o.bbox);
                match mask {
                    Some(m) => a.with_mask(m.to_gray_image()),
                    None => a,
                }
            })
            .collect();
        paligemma::annotate::annotate(image, &annotations)
            .save_with_format(path, image::ImageFormat::Png)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
        Ok(())
    }
}

/// Decodes each object's 16 `<seg>` codes with the VQ-VAE and pastes the 64×64 mask into its
/// box as big_vision's evaluator does; `None` for objects without codes or with a box the
/// evaluator rejects.
fn object_masks(
    parsed: &Parsed,
    width: u32,
    height: u32,
    vae: Option<&Path>,
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
                "warning: object {i} ({:?}): its box is empty in pixels or inverted, so it gets no mask",
                object.label
            ),
        }
    }
    Ok(masks)
}
