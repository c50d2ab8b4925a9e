//! Pieces every command shares: loading a model, reading images, decoding options, and
//! running prompts with text streamed to the terminal.

pub mod locate;
pub mod quantize;
pub mod run;
pub mod serve;
pub mod shapes;
pub mod tasks;
pub mod train;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use clap::{Args, ValueEnum};
use paligemma::checkpoint::ModelFiles;
use paligemma::generate::{GenerateOptions, Generated, Progress, Request, Strategy, generate};
use paligemma::ops::linear::WeightFormat;
use paligemma::ops::linear::quant::QuantFormat;
use paligemma::paligemma::PaliGemma;
use paligemma::preprocess::{ImageSize, PreprocessorConfig};
use paligemma::prompt;
use paligemma::tokenizer::Tokenizer;
use paligemma::train::lora;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DTypeArg {
    F32,
    Bf16,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum QuantArg {
    Q8,
    Q4,
}

impl QuantArg {
    pub fn format(self) -> QuantFormat {
        match self {
            Self::Q8 => QuantFormat::Q8,
            Self::Q4 => QuantFormat::Q4,
        }
    }
}

#[derive(Args)]
pub struct ModelArgs {
    /// `demo` (the small model built into this program, trained on synthetic shapes), a
    /// checkpoint folder in the Hub layout, a Hub id such as google/paligemma2-3b-mix-224, or
    /// a big_vision `.npz` checkpoint (with `tokenizer.json` beside it).
    #[arg(long)]
    pub model: String,
    /// Weight precision: f32, or bf16 (weights kept in bf16, f32 accumulation).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// Quantize the linear layers at load, in groups of 32 with f16 scales: q8 (8.5 bits per
    /// weight) or q4 (4.5 bits; the vision tower then takes q8). A folder written by
    /// `paligemma quantize` is already quantized and needs no flag.
    #[arg(long, value_enum)]
    pub quant: Option<QuantArg>,
    /// A LoRA adapter folder (PEFT layout, as `paligemma train --train lora` writes) applied
    /// on top of --model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

#[derive(Args, Clone)]
pub struct DecodeArgs {
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sample with this temperature instead of decoding greedily.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Sample only among the k most likely tokens (implies sampling).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample from the smallest set of tokens whose probability reaches p (implies sampling).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Beam search with this many beams (sum of log-probabilities, as big_vision).
    #[arg(long)]
    pub num_beams: Option<usize>,
}

impl DecodeArgs {
    pub fn strategy(&self) -> Result<Strategy> {
        let sampling = self.temperature.is_some() || self.top_k.is_some() || self.top_p.is_some();
        if let Some(n) = self.num_beams {
            if sampling {
                bail!("--num-beams cannot be combined with --temperature/--top-k/--top-p");
            }
            if n == 0 {
                bail!("--num-beams must be at least 1");
            }
            return Ok(if n == 1 {
                Strategy::Greedy
            } else {
                Strategy::Beam { num_beams: n }
            });
        }
        if !sampling {
            return Ok(Strategy::Greedy);
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature >= 0.0 && temperature.is_finite()) {
            bail!("--temperature must be a finite number ≥ 0");
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            bail!("--top-p must be in (0, 1]");
        }
        Ok(Strategy::Sample {
            temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        })
    }
}

/// A loaded model with what it needs to read inputs.
pub struct Session {
    pub model: PaliGemma,
    pub tokenizer: Tokenizer,
    pub preprocessor: PreprocessorConfig,
    pub device: Device,
}

impl Session {
    pub fn load(args: &ModelArgs) -> Result<Self> {
        let t0 = Instant::now();
        let files = ModelFiles::resolve(&args.model)?;
        let format = match (args.quant, args.dtype) {
            (Some(q), _) => WeightFormat::Quant(q.format()),
            (None, DTypeArg::F32) => WeightFormat::F32,
            (None, DTypeArg::Bf16) => WeightFormat::Bf16,
        };
        let device = Device::Cpu;
        let mut model = PaliGemma::load(&files, format, &device)
            .with_context(|| format!("cannot load the model in {}", files.dir.display()))?;
        if let Some(dir) = &args.adapter {
            let (tensors, scale) = lora::load_adapter(dir)?;
            lora::attach_values(&mut model, &tensors, scale)
                .with_context(|| format!("--adapter {}", dir.display()))?;
        }
        let session = Self::with_model(model, &files)?;
        eprintln!(
            "loaded {} in {:.2}s",
            args.model,
            t0.elapsed().as_secs_f64()
        );
        Ok(session)
    }

    /// A session around a model already built from `files` (its tokenizer and preprocessor
    /// are read from there).
    pub fn with_model(model: PaliGemma, files: &ModelFiles) -> Result<Self> {
        let device = model.device().clone();
        let tokenizer = Tokenizer::from_file(&files.tokenizer)?;
        let size = model.config.vision.image_size as u32;
        let preprocessor = match &files.preprocessor {
            Some(p) => PreprocessorConfig::load(p)?,
            None => PreprocessorConfig::default_for_size(size),
        };
        let square = ImageSize::Exact {
            height: size,
            width: size,
        };
        if !preprocessor.do_resize || preprocessor.size != square {
            bail!(
                "preprocessor_config.json does not resize to {size}×{size}, the size this model's vision tower takes ({:?})",
                preprocessor.size
            );
        }
        Ok(Self {
            model,
            tokenizer,
            preprocessor,
            device,
        })
    }

    /// Pixel values `[n, 3, R, R]` for images already decoded.
    pub fn pixels(&self, images: &[image::RgbImage]) -> Result<Tensor> {
        if images.is_empty() {
            bail!("no image given: PaliGemma needs at least one image");
        }
        Ok(self.preprocessor.to_tensor(images, &self.device)?)
    }

    /// Generates for each prompt about the same images (one batch); streams the text to
    /// stdout when `stream` and there is a single prompt. Returns each result with its text.
    pub fn run_prompts(
        &self,
        prompts: &[String],
        pixels: &Tensor,
        decode: &DecodeArgs,
        stream: bool,
    ) -> Result<Vec<(Generated, String)>> {
        let n_images = pixels.dim(0)?;
        let cfg = &self.model.config;
        let mut requests = Vec::with_capacity(prompts.len());
        for p in prompts {
            let seq = prompt::prefix(&self.tokenizer, cfg, p, n_images)?;
            prompt::check_length(cfg, seq.ids.len(), decode.max_new_tokens)?;
            requests.push(Request {
                ids: seq.ids,
                pixels: Some(pixels.clone()),
            });
        }
        let opts = GenerateOptions {
            max_new_tokens: decode.max_new_tokens,
            strategy: decode.strategy()?,
            eos_token_ids: cfg.eos_token_ids.clone(),
        };
        let t0 = Instant::now();
        let mut encoded: Option<f64> = None;
        let mut first_token: Option<f64> = None;
        let stream = stream && requests.len() == 1;
        let mut text_stream = self.tokenizer.stream(true);
        let mut stdout = std::io::stdout();
        let mut stream_err: Option<anyhow::Error> = None;
        let outputs = generate(&self.model, &requests, &opts, &mut |progress| {
            let id = match progress {
                Progress::ImagesEncoded => {
                    encoded.get_or_insert(t0.elapsed().as_secs_f64());
                    return;
                }
                Progress::Token { id, .. } => id,
            };
            first_token.get_or_insert(t0.elapsed().as_secs_f64());
            if stream && stream_err.is_none() {
                match text_stream.push(id) {
                    Ok(Some(text)) => {
                        let _ = write!(stdout, "{text}");
                        let _ = stdout.flush();
                    }
                    Ok(None) => {}
                    Err(e) => stream_err = Some(e.into()),
                }
            }
        })?;
        if let Some(e) = stream_err {
            return Err(e);
        }
        let elapsed = t0.elapsed().as_secs_f64();
        if stream {
            if let Some(rest) = text_stream.finish()? {
                print!("{rest}");
            }
            println!();
        }
        let total: usize = outputs.iter().map(|o| o.tokens.len()).sum();
        eprintln!(
            "{total} tokens in {elapsed:.2}s (images encoded after {:.2}s, first token after {:.2}s)",
            encoded.unwrap_or(0.0),
            first_token.unwrap_or(elapsed)
        );
        outputs
            .into_iter()
            .map(|o| {
                let text = self.tokenizer.decode(&o.tokens, true)?;
                Ok((o, text))
            })
            .collect()
    }
}

/// Decodes image files, naming the file that fails.
pub fn read_images(paths: &[PathBuf]) -> Result<Vec<image::RgbImage>> {
    paths
        .iter()
        .map(|p| paligemma::image::load_image(p).map_err(anyhow::Error::from))
        .collect()
}
