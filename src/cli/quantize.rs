//! `paligemma quantize`: save a checkpoint with its linear layers quantized.

use super::QuantArg;
use anyhow::Result;
use clap::Args;
use paligemma::checkpoint::ModelFiles;
use paligemma::quantize::quantize_checkpoint;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct QuantizeArgs {
    /// The checkpoint to quantize: `demo`, a Hub-layout folder or a Hub id.
    #[arg(long)]
    pub model: String,
    /// The folder to write (config, tokenizer and one model.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// q8: 8.5 bits per weight; q4: 4.5 bits (the vision tower is stored in q8).
    #[arg(long, value_enum)]
    pub quant: QuantArg,
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    let t0 = Instant::now();
    let files = ModelFiles::resolve(&args.model)?;
    let s = quantize_checkpoint(&files, args.quant.format(), &args.out)?;
    let gb = |b: u64| b as f64 / 1e9;
    eprintln!(
        "wrote {} in {:.1}s: {} matrices quantized to {}, {} tensors copied; {:.3} GB of weights -> {:.3} GB",
        args.out.display(),
        t0.elapsed().as_secs_f64(),
        s.quantized_matrices,
        args.quant.format().name(),
        s.copied_tensors,
        gb(s.bytes_before),
        gb(s.bytes_after),
    );
    Ok(())
}
