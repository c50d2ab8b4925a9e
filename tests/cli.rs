//! The `paligemma` binary end to end: `generate --json` and `score --json` against the
//! transformers references, batching from the command line, and bad inputs, each of which must
//! give a one-line error and a non-zero exit, never a panic.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(case)
}

fn reference(case: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(case).join("reference.json")).unwrap())
        .unwrap()
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_paligemma"))
        .args(args)
        .output()
        .unwrap()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn image_args(case: &str) -> Vec<String> {
    let r = reference(case);
    r["images"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| {
            let path = fixture(case).join(i["file"].as_str().unwrap());
            ["--image".to_string(), path.display().to_string()]
        })
        .collect()
}

/// A scratch copy of a fixture model that a test may damage.
struct Scratch(PathBuf);

impl Scratch {
    fn copy_of(case: &str, tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("pg-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(fixture(case)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        Scratch(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn generate_json_matches_transformers_greedy_on_two_images() {
    let case = "pg2-56-2img";
    let r = reference(case);
    let model = fixture(case).display().to_string();
    let mut args = vec![
        "generate",
        "--model",
        &model,
        "--max-new-tokens",
        "20",
        "--json",
    ];
    let images = image_args(case);
    args.extend(images.iter().map(|s| s.as_str()));
    args.extend(["--prompt", r["prompt"].as_str().unwrap()]);
    let out = run(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut want = ids(&r["greedy_tokens"]);
    if r["greedy_ended_with_eos"].as_bool().unwrap() {
        assert_eq!(want.pop(), Some(1));
    }
    assert_eq!(ids(&json["tokens"]), want);
    assert_eq!(json["text"], r["greedy_text"]);
}

#[test]
fn score_json_matches_transformers_suffix_logprobs() {
    for case in ["pg1-56", "pg2-42"] {
        let r = reference(case);
        let model = fixture(case).display().to_string();
        let mut args = vec!["score", "--model", &model, "--json"];
        let images = image_args(case);
        args.extend(images.iter().map(|s| s.as_str()));
        args.extend([
            "--prompt",
            r["prompt"].as_str().unwrap(),
            "--suffix",
            r["suffix"].as_str().unwrap(),
        ]);
        let out = run(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(ids(&json["tokens"]), ids(&r["suffix_ids"]), "{case}");
        assert_eq!(
            json["input_ids"].as_array().unwrap().len() as u64,
            r["seq_len"].as_u64().unwrap()
        );
        let total = json["total_logprob"].as_f64().unwrap();
        let want = r["total_logprob"].as_f64().unwrap();
        assert!((total - want).abs() < 1e-3, "{case}: {total} vs {want}");
        assert_eq!(
            json["logprobs"].as_array().unwrap().len(),
            json["tokens"].as_array().unwrap().len()
        );
    }
}

#[test]
fn several_prompts_run_as_one_batch_with_single_results() {
    let case = "pg1-56";
    let model = fixture(case).display().to_string();
    let image = fixture(case).join("image_a.png").display().to_string();
    let base = [
        "generate",
        "--model",
        &model,
        "--image",
        &image,
        "--max-new-tokens",
        "12",
        "--json",
    ];
    let prompts = ["caption en", "answer en what colour is the big shape?"];
    let mut args = base.to_vec();
    for p in &prompts {
        args.extend(["--prompt", p]);
    }
    let out = run(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (p, batched) in prompts.iter().zip(&lines) {
        let mut args = base.to_vec();
        args.extend(["--prompt", p]);
        let single: Value = serde_json::from_slice(&run(&args).stdout).unwrap();
        assert_eq!(batched["tokens"], single["tokens"], "{p}");
        assert_eq!(batched["prompt"].as_str().unwrap(), *p);
    }
}

/// Runs a command that must fail and returns its one error line (progress lines may precede it).
fn expect_error(args: &[&str]) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let shown: Vec<String> = args.iter().map(|a| a.chars().take(60).collect()).collect();
    assert!(!out.status.success(), "expected failure for {shown:?}");
    assert!(
        !stderr.contains("panicked"),
        "panic for {shown:?}: {stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(
        errors.len(),
        1,
        "expected one error line for {shown:?}, got: {stderr}"
    );
    assert!(errors[0].starts_with("error: "), "{stderr}");
    errors[0].to_string()
}

fn generate_with(model: &Path, image: &Path, prompt: &str) -> String {
    let (m, i) = (model.display().to_string(), image.display().to_string());
    expect_error(&["generate", "--model", &m, "--image", &i, "--prompt", prompt])
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let good = fixture("pg1-56");
    let image = good.join("image_a.png");

    let e = generate_with(&good, &good.join("no-such.png"), "caption en");
    assert!(e.contains("no-such.png"), "{e}");

    let scratch = Scratch::copy_of("pg1-56", "img");
    let corrupt = scratch.path().join("corrupt.jpg");
    std::fs::write(&corrupt, b"\xff\xd8\xff\xe0 this is not really a jpeg").unwrap();
    let e = generate_with(scratch.path(), &corrupt, "caption en");
    assert!(e.contains("corrupt.jpg"), "{e}");

    let e = generate_with(&good.join("missing-model"), &image, "caption en");
    assert!(e.contains("missing-model"), "{e}");

    let m = good.display().to_string();
    let e = expect_error(&["generate", "--model", &m, "--prompt", "caption en"]);
    assert!(e.contains("--image"), "{e}");

    let long = "word ".repeat(9000);
    let e = generate_with(&good, &image, &long);
    assert!(e.contains("positions"), "{e}");
}

/// Keeps (with a possibly new dtype and shape) or drops (`None`) each tensor of a checkpoint.
type Edit<'a> = dyn Fn(&str, Vec<usize>) -> Option<(safetensors::Dtype, Vec<usize>)> + 'a;

#[test]
fn damaged_checkpoints_give_one_line_errors() {
    let image = fixture("pg1-56").join("image_a.png");

    let s = Scratch::copy_of("pg1-56", "trunc");
    let weights = s.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let e = generate_with(s.path(), &image, "caption en");
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );

    let s = Scratch::copy_of("pg1-56", "garbage");
    std::fs::write(
        s.path().join("model.safetensors"),
        b"not a safetensors file at all",
    )
    .unwrap();
    let e = generate_with(s.path(), &image, "caption en");
    assert!(e.contains("model.safetensors"), "{e}");

    let s = Scratch::copy_of("pg1-56", "llama");
    let cfg = std::fs::read_to_string(s.path().join("config.json")).unwrap();
    std::fs::write(
        s.path().join("config.json"),
        cfg.replace("\"paligemma\"", "\"llama\""),
    )
    .unwrap();
    let e = generate_with(s.path(), &image, "caption en");
    assert!(e.contains("llama") && e.contains("config.json"), "{e}");

    let s = Scratch::copy_of("pg1-56", "nojson");
    std::fs::write(s.path().join("config.json"), "{ not json").unwrap();
    let e = generate_with(s.path(), &image, "caption en");
    assert!(e.contains("config.json"), "{e}");

    // A checkpoint missing one tensor, and one with a tensor of another shape and dtype.
    let rewrite = |tag: &str, edit: &Edit<'_>| {
        let s = Scratch::copy_of("pg1-56", tag);
        let path = s.path().join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, view) in st.tensors() {
            if let Some((dtype, shape)) = edit(&name, view.shape().to_vec()) {
                let n: usize = shape.iter().product::<usize>() * dtype.bitsize() / 8;
                let data = if shape == view.shape() && dtype == view.dtype() {
                    view.data().to_vec()
                } else {
                    vec![0u8; n]
                };
                tensors.push((name, dtype, shape, data));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &path).unwrap();
        s
    };
    let f32 = safetensors::Dtype::F32;
    let missing = "language_model.model.layers.1.mlp.down_proj.weight";
    let s = rewrite("missing", &|n, shape| {
        (n != missing).then_some((f32, shape))
    });
    let e = generate_with(s.path(), &image, "caption en");
    assert!(e.contains(missing) && e.contains("missing"), "{e}");

    let reshaped = "language_model.model.layers.0.self_attn.q_proj.weight";
    let s = rewrite("shape", &|n, shape| {
        Some((f32, if n == reshaped { vec![3, 5] } else { shape }))
    });
    let e = generate_with(s.path(), &image, "caption en");
    assert!(e.contains(reshaped) && e.contains("shape"), "{e}");

    let s = rewrite("dtype", &|n, shape| {
        Some((
            if n == reshaped {
                safetensors::Dtype::I32
            } else {
                f32
            },
            shape,
        ))
    });
    let e = generate_with(s.path(), &image, "caption en");
    assert!(e.contains(reshaped) && e.contains("I32"), "{e}");
}

#[test]
fn hub_ids_resolve_from_the_cache_offline() {
    // The Hugging Face cache layout: models--owner--name/{refs/main, snapshots/<rev>/files}.
    let home = std::env::temp_dir().join(format!("pg-cli-hfhome-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let repo = home.join("hub/models--tiny--pg1-56");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for entry in std::fs::read_dir(fixture("pg1-56")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
    let image = fixture("pg1-56").join("image_a.png").display().to_string();
    let args = [
        "generate",
        "--model",
        "tiny/pg1-56",
        "--image",
        &image,
        "--prompt",
        "caption en",
    ];
    let out = Command::new(env!("CARGO_BIN_EXE_paligemma"))
        .args([&args[..], &["--max-new-tokens", "20", "--json"]].concat())
        .env("HF_HOME", &home)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        ids(&json["tokens"]),
        ids(&reference("pg1-56")["greedy_tokens"])
    );

    let missing = Command::new(env!("CARGO_BIN_EXE_paligemma"))
        .args([
            "generate",
            "--model",
            "tiny/not-cached",
            "--image",
            &image,
            "--prompt",
            "x",
        ])
        .env("HF_HOME", &home)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success() && err.contains("not in the Hugging Face cache"),
        "{err}"
    );
    std::fs::remove_dir_all(&home).unwrap();
}
