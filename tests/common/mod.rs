//! Fixture loading shared by the fine-tuning tests (each test file uses what it needs).
#![allow(dead_code)]

use candle_core::Device;
use paligemma::checkpoint::ModelFiles;
use paligemma::ops::linear::WeightFormat;
use paligemma::paligemma::PaliGemma;
use paligemma::preprocess::PreprocessorConfig;
use paligemma::prompt;
use paligemma::tokenizer::Tokenizer;
use paligemma::train::loss::Example;
use serde_json::Value;
use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A tiny fixture model in f32 with the tokenizer and preprocessing beside it.
pub fn load_model(name: &str) -> (PaliGemma, Tokenizer, PreprocessorConfig) {
    let dir = fixtures().join("models").join(name);
    let files = ModelFiles::from_dir(&dir).unwrap();
    let model = PaliGemma::load(&files, WeightFormat::F32, &Device::Cpu).unwrap();
    let tok = Tokenizer::from_file(&files.tokenizer).unwrap();
    let pre = PreprocessorConfig::load(&dir.join("preprocessor_config.json")).unwrap();
    (model, tok, pre)
}

/// The training batch a `tests/fixtures/train/*.json` describes (`examples`: prompt, suffix,
/// image files relative to `tests/fixtures/models`).
pub fn train_examples(
    json: &Value,
    model: &PaliGemma,
    tok: &Tokenizer,
    pre: &PreprocessorConfig,
) -> Vec<Example> {
    json["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let images: Vec<_> = e["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| {
                    paligemma::image::load_image(
                        &fixtures().join("models").join(f.as_str().unwrap()),
                    )
                    .unwrap()
                })
                .collect();
            let seq = prompt::with_suffix(
                tok,
                &model.config,
                e["prompt"].as_str().unwrap(),
                images.len(),
                e["suffix"].as_str().unwrap(),
            )
            .unwrap();
            Example {
                seq,
                pixels: Some(pre.to_tensor(&images, &Device::Cpu).unwrap()),
            }
        })
        .collect()
}
