//! `paligemma shapes`: writes the synthetic shapes dataset (see `paligemma::shapes`).

use super::{ModelArgs, Session};
use anyhow::{Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use paligemma::eval::Evaluator;
use paligemma::shapes::{
    COMBINED_FILE, DatasetSpec, MAX_SHAPES, MAX_SIZE, MIN_SIZE, TaskType, write_dataset,
};
use std::path::PathBuf;

#[derive(Args)]
pub struct ShapesArgs {
    /// Output folder: created if missing, and must be empty unless --force.
    #[arg(long)]
    pub out: PathBuf,
    /// Number of scenes (images) to generate.
    #[arg(long)]
    pub n: usize,
    /// Seed: the same seed gives the same files on any machine.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image side in pixels (32 to 4096).
    #[arg(long, default_value_t = 224)]
    pub size: u32,
    /// Shapes per scene: 1 to this many (at most 3). Scenes with one shape are the easiest
    /// start for a model trained from scratch.
    #[arg(long, default_value_t = MAX_SHAPES)]
    pub max_shapes: usize,
    /// Ask the per-kind questions (`how many circles`, `detect circle`) only about kinds
    /// present in the scene: no "0" counts and no empty detections.
    #[arg(long)]
    pub present_only: bool,
    /// Write into a non-empty folder, overwriting files of the same name.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: ShapesArgs) -> Result<()> {
    let spec = DatasetSpec {
        n: args.n,
        seed: args.seed,
        size: args.size,
        max_shapes: args.max_shapes,
        present_only: args.present_only,
    };
    // Checked before the bar appears, so a bad flag gives only its error.
    spec.check()?;
    let bar = ProgressBar::new(spec.n as u64).with_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} scenes  {elapsed} (eta {eta})",
    )?);
    let result = write_dataset(&args.out, &spec, args.force, &mut |done| {
        bar.set_position(done as u64)
    });
    bar.finish_and_clear();
    let summary = result?;
    let per_task: Vec<String> = TaskType::ALL
        .iter()
        .zip(summary.examples)
        .map(|(t, n)| format!("{} {n}", t.name()))
        .collect();
    println!(
        "wrote {} images and {} examples ({}) to {}; all examples are in {COMBINED_FILE}",
        summary.images,
        summary.examples.iter().sum::<usize>(),
        per_task.join(", "),
        args.out.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct EvalShapesArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Number of held-out scenes.
    #[arg(long, default_value_t = 200)]
    pub n: usize,
    /// Seed of the scenes: use one the model was not trained on (tools/train_demo.sh trains
    /// on seed 1 and evaluates the loss on seed 2 while training).
    #[arg(long, default_value_t = 3)]
    pub seed: u64,
    /// Image side in pixels (default: the model's input size).
    #[arg(long)]
    pub size: Option<u32>,
    /// Shapes per scene: 1 to this many (at most 3), as `paligemma shapes --max-shapes`.
    #[arg(long, default_value_t = MAX_SHAPES)]
    pub max_shapes: usize,
    /// Print the counts and rates as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `paligemma eval-shapes`: detection recall/precision at IoU ≥ 0.5, caption exact match and
/// VQA accuracy on freshly generated scenes (see `paligemma::eval`).
pub fn eval(args: EvalShapesArgs) -> Result<()> {
    if args.n == 0 {
        bail!("--n must be at least 1");
    }
    let session = Session::load(&args.model)?;
    let size = args
        .size
        .unwrap_or(session.model.config.vision.image_size as u32);
    if !(MIN_SIZE..=MAX_SIZE).contains(&size) {
        bail!("--size must be between {MIN_SIZE} and {MAX_SIZE} pixels");
    }
    let bar = ProgressBar::new(args.n as u64).with_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} scenes  {elapsed} (eta {eta})",
    )?);
    let evaluator = Evaluator {
        model: &session.model,
        tokenizer: &session.tokenizer,
        preprocessor: &session.preprocessor,
    };
    if !(1..=MAX_SHAPES).contains(&args.max_shapes) {
        bail!("--max-shapes must be between 1 and {MAX_SHAPES}");
    }
    let report = evaluator.shapes(args.seed, args.n, size, args.max_shapes, &mut |done| {
        bar.set_position(done as u64)
    });
    bar.finish_and_clear();
    let r = report?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} scenes (seed {}, {size} px, 1 to {} shapes):\n  detection recall@0.5   {:.3} ({}/{} shapes)\n  \
             detection precision    {:.3} ({}/{} boxes)\n  caption exact match    {:.3} ({}/{})\n  \
             VQA accuracy           {:.3} ({}/{})",
            r.scenes,
            r.seed,
            r.max_shapes,
            r.recall,
            r.objects_found,
            r.objects,
            r.precision,
            r.boxes_correct,
            r.boxes,
            r.caption_exact_match,
            r.captions_exact,
            r.scenes,
            r.vqa_accuracy,
            r.answers_exact,
            r.questions
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ShapesArgs,
    }

    #[test]
    fn flags_have_the_documented_defaults() {
        let args = Cli::try_parse_from(["shapes", "--out", "d", "--n", "5"])
            .unwrap()
            .args;
        assert_eq!(
            (args.n, args.seed, args.size, args.force),
            (5, 0, 224, false)
        );
        assert!(Cli::try_parse_from(["shapes", "--n", "5"]).is_err());
        assert!(Cli::try_parse_from(["shapes", "--out", "d", "--n", "-1"]).is_err());
    }

    #[test]
    fn run_writes_a_dataset_and_refuses_bad_flags() {
        let out = std::env::temp_dir().join(format!("paligemma-shapes-cli-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let args = |n, size| ShapesArgs {
            out: out.clone(),
            n,
            seed: 1,
            size,
            max_shapes: MAX_SHAPES,
            present_only: false,
            force: false,
        };
        assert!(run(args(0, 32)).unwrap_err().to_string().contains("--n"));
        assert!(run(args(1, 8)).unwrap_err().to_string().contains("--size"));
        run(args(3, 32)).unwrap();
        assert!(out.join(COMBINED_FILE).is_file());
        assert!(out.join("images/00002.png").is_file());
        std::fs::remove_dir_all(&out).unwrap();
    }
}
