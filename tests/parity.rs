//! Parity with transformers 5.24 (fp32, eager attention, `token_type_ids`) on the random tiny
//! checkpoints of `tests/fixtures/models`, written by `tools/make_model_fixtures.py`:
//! preprocessing, prompt layout, image features, logits, suffix log-probs, greedy decoding with
//! the KV cache, big_vision beam search, and batching.

use candle_core::{DType, Device, Tensor};
use paligemma::checkpoint::ModelFiles;
use paligemma::generate::{Batch, GenerateOptions, Progress, Request, Strategy, generate};
use paligemma::ops::linear::WeightFormat;
use paligemma::paligemma::PaliGemma;
use paligemma::preprocess::PreprocessorConfig;
use paligemma::prompt::{self, Sequence};
use paligemma::score::{forward_logits, suffix_logprobs};
use paligemma::tokenizer::Tokenizer;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

const TOL: f32 = 1e-4;
const CASES: [&str; 3] = ["pg1-56", "pg2-42", "pg2-56-2img"];

struct Case {
    dir: PathBuf,
    json: Value,
    tensors: HashMap<String, Tensor>,
    model: PaliGemma,
    tokenizer: Tokenizer,
}

impl Case {
    fn load(name: &str, format: WeightFormat) -> Case {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models")
            .join(name);
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        let tensors =
            candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
                .unwrap();
        let files = ModelFiles::from_dir(&dir).unwrap();
        let model = PaliGemma::load(&files, format, &Device::Cpu).unwrap();
        let tokenizer = Tokenizer::from_file(&files.tokenizer).unwrap();
        Case {
            dir,
            json,
            tensors,
            model,
            tokenizer,
        }
    }

    fn t(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("reference has no {name}"))
    }

    fn ids(&self, name: &str) -> Vec<u32> {
        self.t(name)
            .flatten_all()
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn json_ids(&self, v: &Value) -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    }

    fn image_files(&self) -> Vec<PathBuf> {
        self.json["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| self.dir.join(i["file"].as_str().unwrap()))
            .collect()
    }

    /// Our preprocessing of the case's images.
    fn pixels(&self, files: &[PathBuf]) -> Tensor {
        let pre = PreprocessorConfig::load(&self.dir.join("preprocessor_config.json")).unwrap();
        let images: Vec<_> = files
            .iter()
            .map(|f| paligemma::image::load_image(f).unwrap())
            .collect();
        pre.to_tensor(&images, &Device::Cpu).unwrap()
    }

    fn sequence(&self) -> Sequence {
        let prompt = self.json["prompt"].as_str().unwrap();
        let suffix = self.json["suffix"].as_str().unwrap();
        let n = self.image_files().len();
        prompt::with_suffix(&self.tokenizer, &self.model.config, prompt, n, suffix).unwrap()
    }

    fn prefix_request(&self) -> Request {
        let seq = self.sequence();
        Request {
            ids: seq.ids[..seq.prefix_len].to_vec(),
            pixels: Some(self.pixels(&self.image_files())),
        }
    }

    fn greedy_reference(&self) -> Vec<u32> {
        self.json_ids(&self.json["greedy_tokens"])
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn greedy(max_new_tokens: usize, eos: u32) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        strategy: Strategy::Greedy,
        eos_token_ids: vec![eos],
    }
}

/// Generated tokens as transformers reports them: with the final `<eos>` when it was reached.
fn with_eos(out: &paligemma::generate::Generated, eos: u32) -> Vec<u32> {
    let mut t = out.tokens.clone();
    if out.stopped_at_eos {
        t.push(eos);
    }
    t
}

#[test]
fn preprocessing_and_prompt_layout_match_the_processor() {
    for name in CASES {
        let c = Case::load(name, WeightFormat::F32);
        let pixels = c.pixels(&c.image_files());
        assert_eq!(
            max_diff(&pixels, c.t("pixel_values")),
            0.0,
            "{name}: pixel values"
        );
        let seq = c.sequence();
        assert_eq!(seq.ids, c.ids("input_ids"), "{name}: input ids");
        assert_eq!(
            seq.prefix_len as u64,
            c.json["prefix_len"].as_u64().unwrap(),
            "{name}"
        );
        let tti: Vec<u32> = c.ids("token_type_ids");
        let ours: Vec<u32> = (0..seq.ids.len())
            .map(|i| (i >= seq.prefix_len) as u32)
            .collect();
        assert_eq!(ours, tti, "{name}: token type ids");
    }
}

#[test]
fn image_features_logits_and_suffix_logprobs_match() {
    for name in CASES {
        let c = Case::load(name, WeightFormat::F32);
        let pixels = c.t("pixel_values");
        let feats = c.model.image_features(pixels).unwrap();
        let d = max_diff(&feats, c.t("image_features"));
        assert!(d < TOL, "{name}: image features differ by {d}");
        eprintln!("{name}: image features max |Δ| = {d:.2e}");

        let seq = c.sequence();
        let logits = forward_logits(&c.model, &seq, Some(pixels)).unwrap();
        let d = max_diff(&logits, &c.t("logits").squeeze(0).unwrap());
        assert!(d < TOL, "{name}: logits differ by {d}");
        eprintln!("{name}: logits max |Δ| = {d:.2e}");

        let lps = suffix_logprobs(&c.model, &seq, Some(pixels)).unwrap();
        let want: Vec<f32> = c.t("suffix_logprobs").to_vec1().unwrap();
        assert_eq!(lps.len(), want.len(), "{name}");
        let worst = lps
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < TOL, "{name}: suffix log-probs {lps:?} vs {want:?}");
        eprintln!("{name}: suffix log-probs max |Δ| = {worst:.2e}");
        let total: f64 = lps.iter().map(|&v| v as f64).sum();
        let want_total = c.json["total_logprob"].as_f64().unwrap();
        assert!(
            (total - want_total).abs() < 1e-3,
            "{name}: total {total} vs {want_total}"
        );
    }
}

#[test]
fn greedy_decoding_matches_and_cached_steps_equal_a_full_forward() {
    for name in CASES {
        let c = Case::load(name, WeightFormat::F32);
        let eos = c.model.config.eos_token_ids[0];
        let want = c.greedy_reference();
        assert!(
            want.len() >= 16,
            "{name}: the fixture should decode at least 16 tokens"
        );
        let req = c.prefix_request();
        let mut events = Vec::new();
        let out = generate(
            &c.model,
            std::slice::from_ref(&req),
            &greedy(20, eos),
            &mut |p| events.push(p),
        )
        .unwrap();
        assert_eq!(with_eos(&out[0], eos), want, "{name}: greedy tokens");
        // The images are reported encoded first, then each token but the stop token.
        let reported: Vec<Progress> = std::iter::once(Progress::ImagesEncoded)
            .chain(
                out[0]
                    .tokens
                    .iter()
                    .map(|&id| Progress::Token { row: 0, id }),
            )
            .collect();
        assert_eq!(events, reported, "{name}: progress");

        // Teacher-force the reference tokens through the cache: every step's logits match
        // transformers' cached decode, and a single full forward over the same sequence.
        let (mut batch, first) =
            Batch::prefill(&c.model, std::slice::from_ref(&req), want.len()).unwrap();
        let steps = c.t("greedy_step_logits");
        let mut cached = vec![first.squeeze(0).unwrap()];
        for &tok in &want[..want.len() - 1] {
            cached.push(batch.step(&[tok]).unwrap().squeeze(0).unwrap());
        }
        let cached = Tensor::stack(&cached, 0).unwrap();
        let d = max_diff(&cached, steps);
        assert!(
            d < TOL,
            "{name}: cached decode logits differ from transformers by {d}"
        );
        eprintln!(
            "{name}: {} cached decode steps, logits max |Δ| = {d:.2e}",
            want.len()
        );

        let mut ids = req.ids.clone();
        ids.extend(&want[..want.len() - 1]);
        let full_seq = Sequence {
            ids,
            prefix_len: req.ids.len(),
        };
        let full = forward_logits(&c.model, &full_seq, req.pixels.as_ref()).unwrap();
        let full = full.narrow(0, req.ids.len() - 1, want.len()).unwrap();
        let d = max_diff(&cached, &full);
        assert!(
            d < TOL,
            "{name}: cached decode differs from a full forward by {d}"
        );
        eprintln!("{name}: cached decode vs full forward max |Δ| = {d:.2e}");
    }
}

#[test]
fn beam_search_matches_big_vision() {
    for name in CASES {
        let c = Case::load(name, WeightFormat::F32);
        let eos = c.model.config.eos_token_ids[0];
        let beam = &c.json["beam"];
        let opts = GenerateOptions {
            max_new_tokens: beam["max_decode_len"].as_u64().unwrap() as usize,
            strategy: Strategy::Beam {
                num_beams: beam["beam_size"].as_u64().unwrap() as usize,
            },
            eos_token_ids: vec![eos],
        };
        let out = generate(&c.model, &[c.prefix_request()], &opts, &mut |_| {}).unwrap();
        assert_eq!(
            with_eos(&out[0], eos),
            c.json_ids(&beam["tokens"]),
            "{name}: beam tokens"
        );
        let score: f64 = out[0].logprobs.iter().map(|&v| v as f64).sum();
        let want = beam["score"].as_f64().unwrap();
        assert!(
            (score - want).abs() < 1e-3,
            "{name}: beam score {score} vs {want}"
        );
    }
}

#[test]
fn batched_generation_equals_single_and_reference() {
    let c = Case::load("pg1-56", WeightFormat::F32);
    let eos = c.model.config.eos_token_ids[0];
    let rows = c.json["batch"]["rows"].as_array().unwrap();
    assert!(rows.len() >= 2);
    let requests: Vec<Request> = rows
        .iter()
        .map(|r| {
            let seq = prompt::prefix(
                &c.tokenizer,
                &c.model.config,
                r["prompt"].as_str().unwrap(),
                1,
            )
            .unwrap();
            Request {
                ids: seq.ids,
                pixels: Some(c.pixels(&[c.dir.join(r["image"].as_str().unwrap())])),
            }
        })
        .collect();
    assert_ne!(
        requests[0].ids.len(),
        requests[1].ids.len(),
        "rows must need padding"
    );
    let n = c.json["batch"]["max_new_tokens"].as_u64().unwrap() as usize;
    let batched = generate(&c.model, &requests, &greedy(n, eos), &mut |_| {}).unwrap();
    for (i, (row, req)) in rows.iter().zip(&requests).enumerate() {
        let single = generate(
            &c.model,
            std::slice::from_ref(req),
            &greedy(n, eos),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(
            batched[i].tokens, single[0].tokens,
            "row {i}: batch vs single"
        );
        assert_eq!(
            with_eos(&batched[i], eos),
            c.json_ids(&row["tokens"]),
            "row {i}: vs transformers"
        );
        for (a, b) in batched[i].logprobs.iter().zip(&single[0].logprobs) {
            assert!(
                (a - b).abs() < 1e-5,
                "row {i}: log-prob {a} batched vs {b} alone"
            );
        }
    }
}

#[test]
fn bf16_weights_match_a_reference_with_bf16_rounded_weights() {
    for name in CASES {
        let c = Case::load(name, WeightFormat::Bf16);
        let seq = c.sequence();
        let logits = forward_logits(&c.model, &seq, Some(c.t("pixel_values"))).unwrap();
        let d = max_diff(&logits, &c.t("logits_bf16_weights").squeeze(0).unwrap());
        assert!(d < TOL, "{name}: bf16-weight logits differ by {d}");
        eprintln!("{name}: bf16-weight logits max |Δ| = {d:.2e}");
        // and the rounding is real: f32 logits are measurably different
        let d32 = max_diff(&logits, &c.t("logits").squeeze(0).unwrap());
        assert!(
            d32 > 100.0 * TOL,
            "{name}: bf16 logits equal f32 ones ({d32})"
        );
    }
}

/// ‖a − b‖ / ‖b‖ over all values.
fn relative_l2(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let diff: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

#[test]
fn quantized_logits_stay_near_f32_and_saved_folders_load_to_the_same() {
    use paligemma::ops::linear::quant::QuantFormat;
    // These tiny random checkpoints amplify rounding: bf16 weights alone move their logits by
    // 1–3% (relative L2), so errors are bounded against that; full-size figures are in
    // BENCHMARKS.md. Measured: q8 2.5, q4 22–31 times the bf16 error.
    for name in CASES {
        let bf16 = Case::load(name, WeightFormat::Bf16);
        let logits = forward_logits(&bf16.model, &bf16.sequence(), Some(bf16.t("pixel_values")));
        let bf16_error = relative_l2(&logits.unwrap(), &bf16.t("logits").squeeze(0).unwrap());
        for (format, bound) in [(QuantFormat::Q8, 4.0), (QuantFormat::Q4, 40.0)] {
            let c = Case::load(name, WeightFormat::Quant(format));
            let seq = c.sequence();
            let pixels = c.t("pixel_values");
            let logits = forward_logits(&c.model, &seq, Some(pixels)).unwrap();
            let reference = c.t("logits").squeeze(0).unwrap();
            let rel = relative_l2(&logits, &reference);
            let ratio = rel / bf16_error;
            eprintln!(
                "{name} {}: relative L2 error of logits {rel:.2e}, {ratio:.2} times bf16's",
                format.name()
            );
            assert!(
                ratio < bound,
                "{name} {format:?}: {rel} ({ratio} times bf16's)"
            );
            assert!(
                rel > 1e-5,
                "{name} {format:?}: logits equal f32 ones ({rel})"
            );

            let out = std::env::temp_dir().join(format!(
                "pg-quant-{name}-{}-{}",
                format.name(),
                std::process::id()
            ));
            let files = ModelFiles::from_dir(&c.dir).unwrap();
            paligemma::quantize::quantize_checkpoint(&files, format, &out).unwrap();
            let saved = ModelFiles::from_dir(&out).unwrap();
            let model = PaliGemma::load(&saved, WeightFormat::F32, &Device::Cpu).unwrap();
            let again = forward_logits(&model, &seq, Some(pixels)).unwrap();
            assert_eq!(
                max_diff(&logits, &again),
                0.0,
                "{name} {format:?}: saved folder differs"
            );
            // Asking a q4 folder for q8 (or the reverse) is refused, naming both.
            let other = match format {
                QuantFormat::Q8 => QuantFormat::Q4,
                QuantFormat::Q4 => QuantFormat::Q8,
            };
            let err = PaliGemma::load(&saved, WeightFormat::Quant(other), &Device::Cpu)
                .err()
                .expect("mismatched --quant loads");
            let msg = format!("{err:#}");
            assert!(
                msg.contains(&format!("quantized to {}", format.name()))
                    && msg.contains(other.name()),
                "{msg}"
            );
            std::fs::remove_dir_all(&out).unwrap();
        }
    }
}
