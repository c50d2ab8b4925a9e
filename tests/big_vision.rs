//! big_vision `.npz` checkpoints: the NumPy reader, and PaliGemma loaded from `.npz` files that
//! `tools/convert_hub_to_npz.py` wrote from the tiny Hub-layout fixtures in
//! `tests/fixtures/models`. Loaded from either layout, the model must be the same: same
//! configuration, same weights, logits identical on every real token, same generated tokens.
//!
//! Fixtures (`tests/fixtures/big_vision`): `pg1-56.npz` (f32, under `params/`), `pg2-42.npz`
//! (f32, no prefix, with `pg2-42.*.json` sidecars), `pg1-56.bf16.npz` (bf16 as `V2`), and
//! `format.npz` (assorted dtypes and layouts, full ZIP64 records, one deflated member).

use candle_core::{Device, Tensor};
use paligemma::big_vision::{self, BigVisionOptions};
use paligemma::checkpoint::ModelFiles;
use paligemma::config::PaliGemmaConfig;
use paligemma::npz::{NpyDtype, NpzArchive};
use paligemma::ops::linear::WeightFormat;
use paligemma::paligemma::PaliGemma;
use paligemma::preprocess::PreprocessorConfig;
use paligemma::prompt;
use paligemma::score::forward_logits;
use paligemma::tokenizer::Tokenizer;
use paligemma::weights::WeightStore;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn bv(name: &str) -> PathBuf {
    root().join("big_vision").join(name)
}

fn hub(name: &str) -> PathBuf {
    root().join("models").join(name)
}

/// A fresh scratch folder for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pg-bv-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// The .npz reader
// ---------------------------------------------------------------------------------------------

/// `format.npz` stores `arange(24).reshape(2, 3, 4) - 5` in many encodings.
fn base() -> Vec<f32> {
    (0..24).map(|i| i as f32 - 5.0).collect()
}

#[test]
fn every_dtype_and_layout_reads_in_c_order() {
    let a = NpzArchive::open(bv("format.npz")).unwrap();
    let names = a.names();
    for n in [
        "f32",
        "bf16",
        "deflated",
        "nested/path/name",
        "scalar",
        "empty",
    ] {
        assert!(names.iter().any(|m| m == n), "{n} not in {names:?}");
    }
    let cases = [
        ("f32", NpyDtype::F32),
        ("f64", NpyDtype::F64),
        ("f16", NpyDtype::F16),
        ("bf16", NpyDtype::BF16),
        ("i32", NpyDtype::I32),
        ("i64", NpyDtype::I64),
        ("f32_fortran", NpyDtype::F32),
        ("f32_big_endian", NpyDtype::F32),
        ("nested/path/name", NpyDtype::F32),
        ("deflated", NpyDtype::F32),
    ];
    for (name, dtype) in cases {
        let arr = a.array(name).unwrap();
        assert_eq!(arr.shape(), &[2, 3, 4], "{name}");
        assert_eq!(arr.dtype(), dtype, "{name}");
        assert_eq!(arr.to_f32_vec(), base(), "{name}");
        assert_eq!(a.header(name).unwrap(), (vec![2, 3, 4], dtype), "{name}");
    }
    let bits = a.array("bf16").unwrap().to_bf16_bits().unwrap();
    let want: Vec<u16> = base()
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect();
    assert_eq!(bits, want);
    let u8s = a.array("u8").unwrap().to_f32_vec();
    assert_eq!(u8s, base().iter().map(|v| v + 5.0).collect::<Vec<_>>());
    let bools = a.array("bool").unwrap();
    assert_eq!(bools.dtype(), NpyDtype::Bool);
    let want: Vec<f32> = base().iter().map(|&v| (v > 0.0) as u8 as f32).collect();
    assert_eq!(bools.to_f32_vec(), want);
    let scalar = a.array("scalar").unwrap();
    assert_eq!((scalar.shape(), scalar.to_f32_vec()), (&[][..], vec![7.5]));
    let empty = a.array("empty").unwrap();
    assert_eq!(empty.shape(), &[0, 3]);
    assert!(empty.to_f32_vec().is_empty());
}

#[test]
fn reader_errors_name_the_file_and_the_array() {
    let a = NpzArchive::open(bv("format.npz")).unwrap();
    let err = a.array("nope").unwrap_err().to_string();
    assert!(
        err.contains("format.npz") && err.contains("`nope`"),
        "{err}"
    );

    let dir = scratch("reader-errors");
    let text = dir.join("text.npz");
    std::fs::write(&text, "not a zip at all").unwrap();
    let err = NpzArchive::open(&text).err().unwrap().to_string();
    assert!(
        err.contains("text.npz") && err.contains("not a readable .npz"),
        "{err}"
    );
    let err = NpzArchive::open(dir.join("absent.npz"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("absent.npz"), "{err}");

    // A truncated download: the central directory at the end is gone.
    let full = std::fs::read(bv("pg1-56.npz")).unwrap();
    let cut = dir.join("cut.npz");
    std::fs::write(&cut, &full[..full.len() / 2]).unwrap();
    let err = NpzArchive::open(&cut).err().unwrap().to_string();
    assert!(
        err.contains("cut.npz") && err.contains("truncated"),
        "{err}"
    );

    // A damaged .npy header inside an intact archive.
    let mut bytes = full.clone();
    let at = bytes.windows(6).position(|w| w == b"\x93NUMPY").unwrap();
    bytes[at..at + 6].copy_from_slice(b"XXXXXX");
    let bad = dir.join("bad-header.npz");
    std::fs::write(&bad, &bytes).unwrap();
    let a = NpzArchive::open(&bad).unwrap();
    let first = a.names().remove(0);
    let err = a.array(&first).unwrap_err().to_string();
    assert!(
        err.contains("bad-header.npz") && err.contains(&first) && err.contains("header"),
        "{err}"
    );
    // An unsupported dtype (complex) is named.
    let mut bytes = full;
    let descr = bytes.windows(5).position(|w| w == b"'<f4'").unwrap();
    bytes[descr..descr + 5].copy_from_slice(b"'<c8'");
    let cplx = dir.join("complex.npz");
    std::fs::write(&cplx, &bytes).unwrap();
    let a = NpzArchive::open(&cplx).unwrap();
    let err = a.array(&a.names().remove(0)).unwrap_err().to_string();
    assert!(
        err.contains("<c8") && err.contains("unsupported dtype"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Configuration and weights
// ---------------------------------------------------------------------------------------------

fn hub_config(name: &str) -> PaliGemmaConfig {
    PaliGemmaConfig::load(&hub(name).join("config.json")).unwrap()
}

#[test]
fn inferred_config_equals_the_hub_config() {
    // PaliGemma 1: every field follows from the shapes and the released defaults.
    let a = NpzArchive::open(bv("pg1-56.npz")).unwrap();
    let got = big_vision::infer_config(&a, &BigVisionOptions::default()).unwrap();
    assert_eq!(got, hub_config("pg1-56"));
    let a = NpzArchive::open(bv("pg1-56.bf16.npz")).unwrap();
    let got = big_vision::infer_config(&a, &BigVisionOptions::default()).unwrap();
    assert_eq!(got, hub_config("pg1-56"));

    // PaliGemma 2: all but query_pre_attn_scalar, which this tiny model sets to 24 and the
    // released rule (head_dim for all but 28B) cannot know.
    let a = NpzArchive::open(bv("pg2-42.npz")).unwrap();
    let want = hub_config("pg2-42");
    let got = big_vision::infer_config(&a, &BigVisionOptions::default()).unwrap();
    assert_eq!(got.text.query_pre_attn_scalar, Some(16.0));
    let mut fixed = got.clone();
    fixed.text.query_pre_attn_scalar = want.text.query_pre_attn_scalar;
    assert_eq!(fixed, want);
    let opts = BigVisionOptions {
        query_pre_attn_scalar: Some(24.0),
    };
    assert_eq!(big_vision::infer_config(&a, &opts).unwrap(), want);

    // The preprocessing a .npz gets by default is the folder's.
    for (name, size) in [("pg1-56", 56), ("pg2-42", 42)] {
        let folder = PreprocessorConfig::load(&hub(name)).unwrap();
        assert_eq!(folder, PreprocessorConfig::default_for_size(size), "{name}");
    }
}

/// Canonical name → shape of every tensor in a Hub folder, from the safetensors headers.
fn folder_shapes(name: &str) -> HashMap<String, Vec<usize>> {
    let files = ModelFiles::from_dir(&hub(name)).unwrap();
    let mut shapes = HashMap::new();
    for file in &files.weights {
        let bytes = std::fs::read(file).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        for (stored, info) in meta.tensors() {
            if let Some(canonical) = paligemma::weights::canonical_name(&stored) {
                shapes.insert(canonical, info.shape.clone());
            }
        }
    }
    shapes
}

fn folder_store(name: &str) -> WeightStore {
    let files = ModelFiles::from_dir(&hub(name)).unwrap();
    WeightStore::open(&files.weights).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
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

#[test]
fn npz_weights_are_the_hub_weights_rearranged() {
    let dev = Device::Cpu;
    for (npz, folder) in [
        ("pg1-56.npz", "pg1-56"),
        ("pg1-56.bf16.npz", "pg1-56"),
        ("pg2-42.npz", "pg2-42"),
    ] {
        let (cfg, store) = big_vision::load(&bv(npz), &BigVisionOptions::default()).unwrap();
        let theirs = folder_store(folder);
        let shapes = folder_shapes(folder);
        let mut names: Vec<&str> = store.names().collect();
        names.sort();
        let mut want: Vec<&str> = shapes.keys().map(String::as_str).collect();
        want.sort();
        assert_eq!(names, want, "{npz}");
        let real = cfg.image_token_index as usize;
        for (name, shape) in &shapes {
            // The embedding's rows past the trained vocabulary (`<image>`, padding) are zeros.
            let rows = |t: Tensor| {
                if name.ends_with("embed_tokens.weight") {
                    let pad = t.narrow(0, real, shape[0] - real).unwrap();
                    assert_eq!(
                        pad.abs()
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap(),
                        0.0
                    );
                    t.narrow(0, 0, real).unwrap()
                } else {
                    t
                }
            };
            if npz.contains("bf16") {
                // The converter rounded the f32 folder to bf16 as the store does at load.
                let ours = store.bf16(name, shape).unwrap();
                let theirs = theirs.bf16(name, shape).unwrap();
                let widen = |b: &[u16]| -> Tensor {
                    let v: Vec<f32> = b
                        .iter()
                        .map(|&x| half::bf16::from_bits(x).to_f32())
                        .collect();
                    Tensor::from_vec(v, shape.as_slice(), &dev).unwrap()
                };
                let (a, b) = (rows(widen(ours.as_slice())), widen(theirs.as_slice()));
                let b = if name.ends_with("embed_tokens.weight") {
                    b.narrow(0, 0, real).unwrap()
                } else {
                    b
                };
                assert_eq!(max_diff(&a, &b), 0.0, "{npz}: {name}");
            } else {
                let a = rows(store.f32(name, shape, &dev).unwrap());
                let b = theirs.f32(name, shape, &dev).unwrap();
                let b = if name.ends_with("embed_tokens.weight") {
                    b.narrow(0, 0, real).unwrap()
                } else {
                    b
                };
                assert_eq!(max_diff(&a, &b), 0.0, "{npz}: {name}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The whole model
// ---------------------------------------------------------------------------------------------

/// Logits `[len, V]` for `prompt` + `suffix` about `image`, with the Hub folder's tokenizer.
fn logits(model: &PaliGemma, image: &Path, prompt_text: &str, suffix: &str) -> Tensor {
    let tok = Tokenizer::from_file(bv("tokenizer.json")).unwrap();
    let seq = prompt::with_suffix(&tok, &model.config, prompt_text, 1, suffix).unwrap();
    let pre = PreprocessorConfig::default_for_size(model.config.vision.image_size as u32);
    let img = paligemma::image::load_image(image).unwrap();
    let pixels = pre.to_tensor(&[img], &Device::Cpu).unwrap();
    forward_logits(model, &seq, Some(&pixels)).unwrap()
}

#[test]
fn deflated_archives_load_like_stored_ones() {
    // `np.savez_compressed` deflates every member.
    use std::io::{Read, Write};
    let dir = scratch("deflated");
    let mut zin = zip::ZipArchive::new(std::fs::File::open(bv("pg2-42.npz")).unwrap()).unwrap();
    let out = dir.join("deflated.npz");
    let mut zout = zip::ZipWriter::new(std::fs::File::create(&out).unwrap());
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for i in 0..zin.len() {
        let mut f = zin.by_index(i).unwrap();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        zout.start_file(f.name().unwrap(), opts).unwrap();
        zout.write_all(&bytes).unwrap();
    }
    zout.finish().unwrap();
    let opts = BigVisionOptions::default();
    let (cfg_a, a) = big_vision::load(&out, &opts).unwrap();
    let (cfg_b, b) = big_vision::load(&bv("pg2-42.npz"), &opts).unwrap();
    assert_eq!(cfg_a, cfg_b);
    let dev = Device::Cpu;
    for (name, mut shape) in folder_shapes("pg2-42") {
        if name.ends_with("embed_tokens.weight") {
            shape[0] = cfg_a.text.vocab_size;
        }
        let (x, y) = (
            a.f32(&name, &shape, &dev).unwrap(),
            b.f32(&name, &shape, &dev).unwrap(),
        );
        assert_eq!(max_diff(&x, &y), 0.0, "{name}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The Hub folder `name` with every weight rounded to bf16 (as the converter's `--bf16` does),
/// written to `dir`: the Hub counterpart of a bf16 `.npz`.
fn bf16_folder(name: &str, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{name}-bf16"));
    std::fs::create_dir_all(&out).unwrap();
    for f in ["config.json", "tokenizer.json", "generation_config.json"] {
        std::fs::copy(hub(name).join(f), out.join(f)).unwrap();
    }
    let store = folder_store(name);
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = folder_shapes(name)
        .into_iter()
        .map(|(n, shape)| {
            let bits = store.bf16(&n, &shape).unwrap();
            let bytes = bits
                .as_slice()
                .iter()
                .flat_map(|b| b.to_le_bytes())
                .collect();
            (n, shape, bytes)
        })
        .collect();
    let views: Vec<(&str, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::BF16,
                shape.clone(),
                bytes,
            )
            .unwrap();
            (n.as_str(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
    out
}

#[test]
fn npz_logits_equal_hub_logits_on_every_real_token() {
    let dev = Device::Cpu;
    let dir = scratch("logits");
    let pg1_bf16 = bf16_folder("pg1-56", &dir);
    let cases = [
        (
            "pg1-56.npz",
            hub("pg1-56"),
            "image_a.png",
            WeightFormat::F32,
        ),
        (
            "pg2-42.npz",
            hub("pg2-42"),
            "image_c.png",
            WeightFormat::F32,
        ),
        (
            "pg1-56.npz",
            hub("pg1-56"),
            "image_b.png",
            WeightFormat::Bf16,
        ),
        // A bf16 file against its bf16 Hub counterpart, computed in f32 and in bf16.
        (
            "pg1-56.bf16.npz",
            pg1_bf16.clone(),
            "image_a.png",
            WeightFormat::F32,
        ),
        (
            "pg1-56.bf16.npz",
            pg1_bf16,
            "image_b.png",
            WeightFormat::Bf16,
        ),
    ];
    for (npz, folder, image, format) in cases {
        let files = ModelFiles::resolve(bv(npz).to_str().unwrap()).unwrap();
        let ours = PaliGemma::load(&files, format, &dev).unwrap();
        let theirs =
            PaliGemma::load(&ModelFiles::from_dir(&folder).unwrap(), format, &dev).unwrap();
        assert_eq!(ours.config, theirs.config, "{npz}");
        let image = hub(if npz.starts_with("pg1") {
            "pg1-56"
        } else {
            "pg2-42"
        })
        .join(image);
        let a = logits(&ours, &image, "caption en", "a red circle");
        let b = logits(&theirs, &image, "caption en", "a red circle");
        let real = ours.config.image_token_index as usize;
        let d = max_diff(
            &a.narrow(1, 0, real).unwrap(),
            &b.narrow(1, 0, real).unwrap(),
        );
        assert!(d <= 1e-6, "{npz} ({format:?}): logits differ by {d}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Checkpoint resolution, sidecars, and errors
// ---------------------------------------------------------------------------------------------

#[test]
fn npz_files_resolve_with_the_tokenizer_beside_them() {
    let files = ModelFiles::resolve(bv("pg1-56.npz").to_str().unwrap()).unwrap();
    assert!(files.is_big_vision());
    assert_eq!(files.tokenizer, bv("tokenizer.json"));
    assert_eq!(files.config, bv("pg1-56.npz"));
    assert!(files.preprocessor.is_none() && files.generation_config.is_none());
    let files = ModelFiles::resolve(bv("pg2-42.npz").to_str().unwrap()).unwrap();
    assert_eq!(files.config, bv("pg2-42.config.json"));
    assert_eq!(
        files.preprocessor,
        Some(bv("pg2-42.preprocessor_config.json"))
    );

    let dir = scratch("no-tokenizer");
    let npz = dir.join("model.npz");
    std::fs::copy(bv("pg1-56.npz"), &npz).unwrap();
    let err = ModelFiles::resolve(npz.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains(dir.to_str().unwrap()),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A copy of `pg1-56.npz` in `dir` without the array `drop`, with the tokenizer beside it.
fn npz_without(dir: &Path, drop: &str) -> PathBuf {
    let src = std::fs::File::open(bv("pg1-56.npz")).unwrap();
    let mut zin = zip::ZipArchive::new(src).unwrap();
    let out = dir.join("partial.npz");
    let mut zout = zip::ZipWriter::new(std::fs::File::create(&out).unwrap());
    for i in 0..zin.len() {
        let f = zin.by_index_raw(i).unwrap();
        if f.name().unwrap() != format!("{drop}.npy") {
            zout.raw_copy_file(f).unwrap();
        }
    }
    zout.finish().unwrap();
    std::fs::copy(bv("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    out
}

#[test]
fn missing_tensors_and_foreign_archives_are_named() {
    let dir = scratch("missing");
    let dev = Device::Cpu;
    for drop in [
        "params/llm/layers/mlp/linear",
        "params/img/Transformer/encoderblock/MlpBlock_0/Dense_1/kernel",
        "params/llm/layers/attn/kv_einsum/w",
    ] {
        let npz = npz_without(&dir, drop);
        let files = ModelFiles::resolve(npz.to_str().unwrap()).unwrap();
        let err = PaliGemma::load(&files, WeightFormat::F32, &dev)
            .err()
            .unwrap();
        let err = format!("{err:#}");
        assert!(
            err.contains(&format!("`{drop}` is missing")) && err.contains("partial.npz"),
            "{err}"
        );
    }
    // An .npz of something else.
    let err = big_vision::load(&bv("format.npz"), &BigVisionOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("format.npz") && err.contains("not a big_vision PaliGemma checkpoint"),
        "{err}"
    );
    // A truncated checkpoint.
    let full = std::fs::read(bv("pg2-42.npz")).unwrap();
    let cut = dir.join("cut.npz");
    std::fs::write(&cut, &full[..full.len() - 100]).unwrap();
    let err = big_vision::load(&cut, &BigVisionOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("cut.npz") && err.contains("truncated"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_sidecar_config_must_agree_with_the_tensors() {
    let dir = scratch("sidecar");
    std::fs::copy(bv("pg2-42.npz"), dir.join("m.npz")).unwrap();
    std::fs::copy(bv("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(bv("pg2-42.config.json")).unwrap()).unwrap();
    cfg["text_config"]["num_hidden_layers"] = 3.into();
    std::fs::write(dir.join("m.config.json"), cfg.to_string()).unwrap();
    let files = ModelFiles::resolve(dir.join("m.npz").to_str().unwrap()).unwrap();
    let err = PaliGemma::load(&files, WeightFormat::F32, &Device::Cpu)
        .err()
        .unwrap();
    let err = format!("{err:#}");
    assert!(
        err.contains("m.config.json") && err.contains("text_config.num_hidden_layers"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The CLI
// ---------------------------------------------------------------------------------------------

fn generate_json(model: &Path, image: &Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_paligemma"))
        .args(["generate", "--model"])
        .arg(model)
        .arg("--image")
        .arg(image)
        .args(["--prompt", "caption en", "--max-new-tokens", "20", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        model.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

#[test]
fn cli_generates_the_same_tokens_from_npz_and_folder() {
    for (npz, folder, image) in [
        ("pg1-56.npz", "pg1-56", "image_a.png"),
        // pg2-42 needs its sidecar config.json for query_pre_attn_scalar (24).
        ("pg2-42.npz", "pg2-42", "image_c.png"),
    ] {
        let image = hub(folder).join(image);
        let a = generate_json(&bv(npz), &image);
        let b = generate_json(&hub(folder), &image);
        assert_eq!(a["tokens"], b["tokens"], "{npz}");
        assert_eq!(a["text"], b["text"], "{npz}");
        assert!(!a["tokens"].as_array().unwrap().is_empty(), "{npz}");
    }
}
