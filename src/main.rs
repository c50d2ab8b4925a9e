//! The `paligemma` command line: a thin layer over the library.

mod cli;

use clap::{Parser, Subcommand};

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
    Generate(cli::run::GenerateArgs),
    /// Teacher-forced log-probability of a suffix after a prompt (with <eos> appended).
    Score(cli::run::ScoreArgs),
    /// Serve the model over HTTP: task endpoints, OpenAI-compatible chat completions,
    /// continuous batching.
    Serve(cli::serve::ServeArgs),
    /// Caption an image (`caption LANG`, or `describe LANG` with --long).
    Caption(cli::tasks::CaptionArgs),
    /// Answer questions about an image (`answer LANG QUESTION`).
    Ask(cli::tasks::AskArgs),
    /// Read the text in an image (`ocr`).
    Ocr(cli::tasks::OcrArgs),
    /// Find objects: boxes in pixels (`detect a ; b`).
    Detect(cli::locate::DetectArgs),
    /// Segment objects: boxes plus masks decoded from `<seg>` codes (`segment a ; b`).
    Segment(cli::locate::SegmentArgs),
    /// Turn detection or segmentation output text (from any PaliGemma runtime) into boxes
    /// and masks.
    Parse(cli::locate::ParseArgs),
    /// Write a synthetic dataset of coloured shapes (captions, VQA, detection) as JSONL.
    Shapes(cli::shapes::ShapesArgs),
    /// Score a model on held-out shapes scenes: detection recall, caption exact match, VQA.
    EvalShapes(cli::shapes::EvalShapesArgs),
    /// Fine-tune on a JSONL dataset; writes a Hub-layout checkpoint folder (resumable).
    Train(cli::train::TrainArgs),
    /// Fold a LoRA adapter into its base model: writes a Hub-layout checkpoint folder.
    MergeLora(cli::train::MergeLoraArgs),
    /// Save a checkpoint with its linear layers quantized (q8 or q4), to load without
    /// quantizing again.
    Quantize(cli::quantize::QuantizeArgs),
}

/// How long candle's worker threads spin after each of its operations before they sleep,
/// unless the environment says otherwise. Its default (25 000 pauses, about half a
/// millisecond) keeps a core busy after every small operation, which on a machine with few
/// cores takes it from the threads of our own kernels that run next.
const CANDLE_SPIN_LIMIT: &str = "200";

fn main() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // Safety: nothing else runs yet; candle reads the variable when its pool starts.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT) };
    }
    let result = match Cli::parse().command {
        Command::Generate(args) => cli::run::generate(args),
        Command::Score(args) => cli::run::score(args),
        Command::Serve(args) => cli::serve::run(args),
        Command::Caption(args) => cli::tasks::caption(args),
        Command::Ask(args) => cli::tasks::ask(args),
        Command::Ocr(args) => cli::tasks::ocr(args),
        Command::Detect(args) => cli::locate::detect(args),
        Command::Segment(args) => cli::locate::segment(args),
        Command::Parse(args) => cli::locate::parse(args),
        Command::Shapes(args) => cli::shapes::run(args),
        Command::EvalShapes(args) => cli::shapes::eval(args),
        Command::Train(args) => cli::train::run(args),
        Command::MergeLora(args) => cli::train::merge_lora(args),
        Command::Quantize(args) => cli::quantize::run(args),
    };
    if let Err(e) = result {
        // One line: the chain of causes, outermost first.
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}
