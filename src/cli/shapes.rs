//! `paligemma shapes`: writes the synthetic shapes dataset (see `paligemma::shapes`).

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use paligemma::shapes::{COMBINED_FILE, DatasetSpec, TaskType, write_dataset};
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
    /// Write into a non-empty folder, overwriting files of the same name.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: ShapesArgs) -> Result<()> {
    let spec = DatasetSpec {
        n: args.n,
        seed: args.seed,
        size: args.size,
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
