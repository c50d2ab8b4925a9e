//! How far quantized weights move a full-size model's output: relative L2 error of the logits
//! of a teacher-forced sequence (image, prompt, suffix) under `--quant q8|q4` and bf16, against
//! f32 weights, and how many greedy (arg-max) tokens stay the same. Run with
//! `cargo bench --bench quant_accuracy [-- MODEL_DIR]`; the default is a random
//! PaliGemma-3B-224 checkpoint stored in f32, so that bf16 rounding is measured too:
//! `python tools/make_random_checkpoint.py --variant pg1-3b-224 --dtype f32 --out
//! bench-cache/pg1-3b-224-f32` (12 GB). It rewrites the section of BENCHMARKS.md between
//! `<!-- quant-accuracy:begin -->` and `<!-- quant-accuracy:end -->`.

use candle_core::{Device, Tensor};
use paligemma::checkpoint::ModelFiles;
use paligemma::ops::linear::WeightFormat;
use paligemma::ops::linear::quant::QuantFormat;
use paligemma::paligemma::PaliGemma;
use paligemma::preprocess::PreprocessorConfig;
use paligemma::prompt;
use paligemma::score::forward_logits;
use paligemma::tokenizer::Tokenizer;

const IMAGE: &str = "tests/fixtures/images/src/photo_640x480.png";
const PROMPT: &str = "caption en";
const SUFFIX: &str = "a photo of a small house next to a tree on a sunny day";

fn main() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| format!("{root}/bench-cache/pg1-3b-224-f32"));
    let files = ModelFiles::from_dir(std::path::Path::new(&dir)).expect("model folder");
    let tokenizer = Tokenizer::from_file(&files.tokenizer).expect("tokenizer");
    let logits = |format: WeightFormat| -> Tensor {
        let model = PaliGemma::load(&files, format, &Device::Cpu).expect("load");
        let size = model.config.vision.image_size as u32;
        let image = image::open(format!("{root}/{IMAGE}"))
            .expect("image")
            .to_rgb8();
        let pixels = PreprocessorConfig::default_for_size(size)
            .to_tensor(&[image], &Device::Cpu)
            .expect("pixels");
        let seq = prompt::with_suffix(&tokenizer, &model.config, PROMPT, 1, SUFFIX).expect("seq");
        let t = std::time::Instant::now();
        let out = forward_logits(&model, &seq, Some(&pixels)).expect("forward");
        println!(
            "{}: forward in {:.1}s",
            format.name(),
            t.elapsed().as_secs_f64()
        );
        out
    };
    let reference = logits(WeightFormat::F32);
    let mut rows = String::new();
    for format in [
        WeightFormat::Bf16,
        WeightFormat::Quant(QuantFormat::Q8),
        WeightFormat::Quant(QuantFormat::Q4),
    ] {
        let got = logits(format);
        let (rel, same, total) = compare(&got, &reference);
        let row = format!(
            "| {} | {:.3}% | {same}/{total} |\n",
            format.name(),
            100.0 * rel
        );
        print!("{row}");
        rows += &row;
    }
    let section = format!(
        "### Accuracy of bf16 and quantized weights\n\n\
         Logits of one teacher-forced sequence (the image `{IMAGE}`, prompt `{PROMPT}`, a \
         {n}-token suffix, so every image, prompt and suffix position) with the weights held in \
         each format, against f32 weights, on `{dir}`. Measured by `cargo bench --bench \
         quant_accuracy`. A random checkpoint's logits are noise, so this measures how much the \
         weights' rounding moves the output, not task quality; in a random network every \
         layer's branch is as large as the residual stream, and rounding errors add up over \
         its ~150 matrices in series.\n\n\
         | weights | relative L2 error of logits | positions with the same arg-max |\n|---|---|---|\n{rows}",
        n = tokenizer.encode(SUFFIX).map_or(0, |t| t.len()),
        dir = dir.strip_prefix(&format!("{root}/")).unwrap_or(&dir),
    );
    write_section(&section);
}

/// Relative L2 error over all logits, and the positions whose arg-max agrees.
fn compare(got: &Tensor, want: &Tensor) -> (f64, usize, usize) {
    let g = got.to_vec2::<f32>().expect("logits [L, V]");
    let w = want.to_vec2::<f32>().expect("logits [L, V]");
    let (mut diff, mut norm, mut same) = (0f64, 0f64, 0);
    for (gr, wr) in g.iter().zip(&w) {
        for (a, b) in gr.iter().zip(wr) {
            diff += (*a as f64 - *b as f64).powi(2);
            norm += (*b as f64).powi(2);
        }
        same += usize::from(argmax(gr) == argmax(wr));
    }
    ((diff / norm).sqrt(), same, w.len())
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Replaces this benchmark's section of BENCHMARKS.md, or appends one.
fn write_section(section: &str) {
    const BEGIN: &str = "<!-- quant-accuracy:begin -->";
    const END: &str = "<!-- quant-accuracy:end -->";
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md");
    let doc = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{BEGIN}\n{section}{END}");
    let doc = match (doc.find(BEGIN), doc.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{block}{}", &doc[..b], &doc[e + END.len()..]),
        _ => format!("{}\n\n{block}\n", doc.trim_end_matches('\n')),
    };
    std::fs::write(path, doc).expect("write BENCHMARKS.md");
    println!("wrote {path}");
}
