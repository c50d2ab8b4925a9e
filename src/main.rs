//! The `paligemma` command line: a thin layer over the library.

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use clap::{Args, Parser, Subcommand, ValueEnum};
use paligemma::checkpoint::ModelFiles;
use paligemma::generate::{GenerateOptions, Request, Strategy, generate};
use paligemma::ops::linear::WeightFormat;
use paligemma::paligemma::PaliGemma;
use paligemma::preprocess::PreprocessorConfig;
use paligemma::prompt;
use paligemma::tokenizer::Tokenizer;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "paligemma",
    version,
    about = "PaliGemma 1 and 2 vision-language models, exact and offline"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a raw prompt about one or more images (e.g. "caption en", "detect cat").
    Generate(GenerateArgs),
    /// Teacher-forced log-probability of a suffix after a prompt (with <eos> appended).
    Score(ScoreArgs),
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum DTypeArg {
    F32,
    Bf16,
}

#[derive(Args)]
struct ModelArgs {
    /// A checkpoint folder in the Hub layout, or a Hub id such as google/paligemma2-3b-mix-224.
    #[arg(long)]
    model: String,
    /// Weight precision: f32, or bf16 (weights kept in bf16, f32 accumulation).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    /// Image files (JPEG, PNG, WebP, GIF, BMP, TIFF); several are placed one after another.
    #[arg(long = "image")]
    images: Vec<PathBuf>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt; repeat it to run several prompts about the same images as one batch.
    #[arg(long = "prompt")]
    prompts: Vec<String>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sample with this temperature instead of decoding greedily.
    #[arg(long)]
    temperature: Option<f32>,
    /// Sample only among the k most likely tokens (implies sampling).
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample only from the smallest set of tokens whose probability reaches p (implies sampling).
    #[arg(long)]
    top_p: Option<f32>,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Beam search with this many beams (sum of log-probabilities, as big_vision).
    #[arg(long)]
    num_beams: Option<usize>,
    /// Print one JSON object (one per line for several prompts) instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    /// The continuation to score; <eos> is appended as in training.
    #[arg(long)]
    suffix: String,
    #[arg(long)]
    json: bool,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => run_generate(args),
        Command::Score(args) => run_score(args),
    };
    if let Err(e) = result {
        // One line: the chain of causes, outermost first.
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

/// A loaded model with what it needs to read inputs.
struct Loaded {
    model: PaliGemma,
    tokenizer: Tokenizer,
    pixels: Tensor,
    n_images: usize,
}

fn load(args: &ModelArgs) -> Result<Loaded> {
    if args.images.is_empty() {
        bail!("no --image given: PaliGemma needs at least one image");
    }
    let t0 = Instant::now();
    let files = ModelFiles::resolve(&args.model)?;
    let format = match args.dtype {
        DTypeArg::F32 => WeightFormat::F32,
        DTypeArg::Bf16 => WeightFormat::Bf16,
    };
    let device = Device::Cpu;
    let model = PaliGemma::load(&files, format, &device)
        .with_context(|| format!("cannot load the model in {}", files.dir.display()))?;
    let tokenizer = Tokenizer::from_file(&files.tokenizer)?;
    let size = model.config.vision.image_size;
    let pre = match &files.preprocessor {
        Some(p) => PreprocessorConfig::load(p)?,
        None => PreprocessorConfig::default_for_size(size as u32),
    };
    let square = paligemma::preprocess::ImageSize::Exact {
        height: size as u32,
        width: size as u32,
    };
    if !pre.do_resize || pre.size != square {
        bail!(
            "preprocessor_config.json does not resize to {size}×{size}, the size this model's vision tower takes ({:?})",
            pre.size
        );
    }
    let images = args
        .images
        .iter()
        .map(|p| paligemma::image::load_image(p).map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
    let pixels = pre.to_tensor(&images, &device)?;
    eprintln!(
        "loaded {} in {:.2}s",
        args.model,
        t0.elapsed().as_secs_f64()
    );
    Ok(Loaded {
        model,
        tokenizer,
        pixels,
        n_images: images.len(),
    })
}

fn strategy(args: &GenerateArgs) -> Result<Strategy> {
    let sampling = args.temperature.is_some() || args.top_k.is_some() || args.top_p.is_some();
    if let Some(n) = args.num_beams {
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
    let temperature = args.temperature.unwrap_or(1.0);
    if !(temperature >= 0.0 && temperature.is_finite()) {
        bail!("--temperature must be a finite number ≥ 0");
    }
    if let Some(p) = args.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        bail!("--top-p must be in (0, 1]");
    }
    Ok(Strategy::Sample {
        temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    })
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    if args.prompts.is_empty() {
        bail!("no --prompt given (e.g. --prompt \"caption en\")");
    }
    let strategy = strategy(&args)?;
    let loaded = load(&args.model)?;
    let cfg = &loaded.model.config;
    let mut requests = Vec::new();
    for p in &args.prompts {
        let seq = prompt::prefix(&loaded.tokenizer, cfg, p, loaded.n_images)?;
        prompt::check_length(cfg, seq.ids.len(), args.max_new_tokens)?;
        requests.push(Request {
            ids: seq.ids,
            pixels: Some(loaded.pixels.clone()),
        });
    }
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        strategy,
        eos_token_ids: cfg.eos_token_ids.clone(),
    };
    let t0 = Instant::now();
    let mut first_token: Option<f64> = None;
    let stream_text = !args.json && requests.len() == 1;
    let mut stream = loaded.tokenizer.stream(true);
    let mut stdout = std::io::stdout();
    let mut stream_err: Option<anyhow::Error> = None;
    let outputs = generate(&loaded.model, &requests, &opts, &mut |_, id| {
        first_token.get_or_insert(t0.elapsed().as_secs_f64());
        if stream_text && stream_err.is_none() {
            match stream.push(id) {
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
    if stream_text {
        if let Some(rest) = stream.finish()? {
            print!("{rest}");
        }
        println!();
    }
    let mut total_tokens = 0;
    for (prompt_text, (req, out)) in args.prompts.iter().zip(requests.iter().zip(&outputs)) {
        total_tokens += out.tokens.len();
        let text = loaded.tokenizer.decode(&out.tokens, true)?;
        if args.json {
            let obj = json!({
                "prompt": prompt_text,
                "text": text,
                "tokens": out.tokens,
                "logprobs": out.logprobs,
                "stopped_at_eos": out.stopped_at_eos,
                "input_length": req.ids.len(),
            });
            println!("{obj}");
        } else if !stream_text {
            println!("{text}");
        }
    }
    eprintln!(
        "{total_tokens} tokens in {elapsed:.2}s (first token after {:.2}s)",
        first_token.unwrap_or(elapsed)
    );
    Ok(())
}

fn run_score(args: ScoreArgs) -> Result<()> {
    let loaded = load(&args.model)?;
    let cfg = &loaded.model.config;
    let seq = prompt::with_suffix(
        &loaded.tokenizer,
        cfg,
        &args.prompt,
        loaded.n_images,
        &args.suffix,
    )?;
    prompt::check_length(cfg, seq.ids.len(), 0)?;
    let logprobs = paligemma::score::suffix_logprobs(&loaded.model, &seq, Some(&loaded.pixels))?;
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
            let piece = loaded.tokenizer.id_to_token(t).unwrap_or_default();
            println!("{t:>8} {piece:<20} {lp:>12.6}");
        }
        println!("total log-probability: {total:.6}");
    }
    Ok(())
}
