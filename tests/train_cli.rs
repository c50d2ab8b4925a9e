//! `paligemma train` end to end on the tiny pg1-56 checkpoint: the loss falls, the saved folder
//! loads and generates differently, untrained tensors are saved byte for byte, a run resumed
//! half-way equals a straight run, and bad inputs give one-line errors.

use safetensors::SafeTensors;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/pg1-56")
}

/// A fresh folder with the fixture's two images and `train.jsonl` (3 short ASCII examples: the
/// model's vocabulary is tiny).
fn workspace(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pg-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for img in ["image_a.png", "image_b.png"] {
        std::fs::copy(model().join(img), dir.join(img)).unwrap();
    }
    let lines = [
        r#"{"image": "image_a.png", "prefix": "caption en", "suffix": "a red circle"}"#,
        r#"{"image": "image_b.png", "prefix": "caption en", "suffix": "a blue square"}"#,
        r#"{"image": "image_a.png", "prefix": "answer en what color is the circle?", "suffix": "red"}"#,
    ];
    std::fs::write(dir.join("train.jsonl"), lines.join("\n") + "\n").unwrap();
    dir
}

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_paligemma"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The error of a failing run: exactly one line, starting `error:` (besides the progress
/// notes `loaded …` and `training …`).
fn one_line_error(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("loaded ") && !l.starts_with("training "))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    lines[0].to_string()
}

fn train_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let m = model().to_str().unwrap().to_string().leak() as &str;
    let mut a = vec!["train", "--model", m, "--data", "train.jsonl", "--out", out];
    a.extend_from_slice(extra);
    a
}

fn sorted_names<'a>(st: &'a SafeTensors<'a>) -> Vec<&'a str> {
    let mut names = st.names();
    names.sort();
    names
}

fn log(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn generate(model: &str, dir: &Path) -> Vec<u64> {
    generate_json(dir, model, &[])["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

#[test]
fn training_lowers_the_loss_and_saves_a_loadable_checkpoint() {
    let dir = workspace("fit");
    std::fs::copy(dir.join("train.jsonl"), dir.join("eval.jsonl")).unwrap();
    let args = train_args(
        "out",
        &[
            "--eval",
            "eval.jsonl",
            "--train",
            "attn",
            "--steps",
            "8",
            "--batch-size",
            "2",
            "--lr",
            "1e-2",
            "--eval-every",
            "4",
        ],
    );
    let stdout = ok(&dir, &args);
    assert!(stdout.contains("trained 8 steps"), "{stdout}");
    let log = log(&dir.join("out"));
    let evals: Vec<f64> = log
        .iter()
        .filter(|l| l["type"] == "eval")
        .map(|l| l["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(evals.len(), 3, "evaluations at steps 0, 4 and 8: {log:?}");
    assert!(evals[2] < evals[1] && evals[1] < evals[0], "{evals:?}");
    let train: Vec<&Value> = log.iter().filter(|l| l["type"] == "train").collect();
    assert_eq!(train.len(), 8);
    assert!(train[7]["loss"].as_f64().unwrap() < train[0]["loss"].as_f64().unwrap());

    // The folder is a checkpoint: it loads and the training changed what it generates.
    let before = generate(model().to_str().unwrap(), &dir);
    let after = generate("out", &dir);
    assert_ne!(before, after);

    // Same tensors, shapes and f32; untrained ones byte-identical to the source.
    let src_bytes = std::fs::read(model().join("model.safetensors")).unwrap();
    let out_bytes = std::fs::read(dir.join("out/model.safetensors")).unwrap();
    let (src, saved) = (
        SafeTensors::deserialize(&src_bytes).unwrap(),
        SafeTensors::deserialize(&out_bytes).unwrap(),
    );
    let names = sorted_names(&src);
    assert_eq!(names, sorted_names(&saved));
    let mut trained = 0;
    for name in names {
        let (a, b) = (src.tensor(name).unwrap(), saved.tensor(name).unwrap());
        assert_eq!(a.shape(), b.shape(), "{name}");
        assert_eq!(b.dtype(), safetensors::Dtype::F32, "{name}");
        let is_attn =
            name.starts_with("language_model.model.layers.") && name.contains("self_attn.");
        if is_attn {
            trained += 1;
            assert_ne!(a.data(), b.data(), "{name} was trained");
        } else {
            assert_eq!(a.data(), b.data(), "{name} was not trained");
        }
    }
    assert_eq!(trained, 8);
    for f in [
        "config.json",
        "tokenizer.json",
        "preprocessor_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(model().join(f)).unwrap(),
            std::fs::read(dir.join("out").join(f)).unwrap(),
            "{f}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_resumed_run_equals_a_straight_run() {
    let dir = workspace("resume");
    // 3 examples, 4 per step: batches run across epochs, accumulation over 2 micro-batches.
    let common = [
        "--train",
        "llm",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--lr",
        "1e-3",
        "--warmup",
        "1",
        "--weight-decay",
        "0.1",
        "--seed",
        "5",
        "--log-every",
        "1",
    ];
    ok(&dir, &train_args("straight", &common));
    let first = ok(
        &dir,
        &train_args("split", &[&common[..], &["--stop-at", "2"]].concat()),
    );
    assert!(first.contains("stopped at step 2 of 4"), "{first}");
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("split/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"], 2);
    let resume = [
        &[
            "train",
            "--data",
            "train.jsonl",
            "--out",
            "split",
            "--resume",
        ][..],
        &common,
    ]
    .concat();
    ok(&dir, &resume);
    for f in [
        "model.safetensors",
        "trainer_state.safetensors",
        "trainer_state.json",
    ] {
        assert!(
            std::fs::read(dir.join("straight").join(f)).unwrap()
                == std::fs::read(dir.join("split").join(f)).unwrap(),
            "{f} differs"
        );
    }
    // The resumed log lists each step once, as the straight run's does.
    let steps = |run: &str| -> Vec<(String, u64)> {
        std::fs::read_to_string(dir.join(run).join("log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .map(|v| (v["type"].to_string(), v["step"].as_u64().unwrap()))
            .collect()
    };
    assert_eq!(steps("split"), steps("straight"));
    // Resuming with other settings is refused, naming the setting.
    let mut changed = resume.clone();
    let lr = changed.iter().position(|a| *a == "1e-3").unwrap();
    changed[lr] = "2e-3";
    let err = one_line_error(&dir, &changed);
    assert!(err.contains("lr"), "{err}");
    // A finished folder is not overwritten by a fresh run.
    let err = one_line_error(&dir, &train_args("straight", &common));
    assert!(err.contains("--resume"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_inputs_are_one_line_errors_naming_the_line() {
    let dir = workspace("errors");
    let good = r#"{"image": "image_a.png", "prefix": "caption en", "suffix": "red"}"#;
    let cases = [
        ("not json", "line 2", "not valid JSON"),
        (
            r#"{"image": "image_a.png", "prefix": "caption en"}"#,
            "line 2",
            "suffix",
        ),
        (
            r#"{"image": "nope.png", "prefix": "caption en", "suffix": "red"}"#,
            "line 2",
            "nope.png",
        ),
        (
            r#"{"image": "image_a.png", "prefix": 3, "suffix": "red"}"#,
            "line 2",
            "prefix",
        ),
    ];
    for (bad, line, why) in cases {
        std::fs::write(dir.join("bad.jsonl"), format!("{good}\n{bad}\n")).unwrap();
        let mut args = train_args("out", &["--steps", "1"]);
        args[4] = "bad.jsonl";
        let err = one_line_error(&dir, &args);
        assert!(err.contains(line) && err.contains(why), "{bad}: {err}");
        // --skip-bad leaves the line out with a warning and trains on the rest.
        args.push("--skip-bad");
        let out = run(&dir, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("line 2 skipped"));
        std::fs::remove_dir_all(dir.join("out")).unwrap();
    }
    let long = format!(
        r#"{{"image": "image_a.png", "prefix": "caption en", "suffix": "{}"}}"#,
        "red ".repeat(9000)
    );
    std::fs::write(dir.join("bad.jsonl"), format!("{good}\n{long}\n")).unwrap();
    let mut args = train_args("out", &["--steps", "1"]);
    args[4] = "bad.jsonl";
    let err = one_line_error(&dir, &args);
    assert!(err.contains("line 2") && err.contains("positions"), "{err}");
    let err = one_line_error(&dir, &train_args("out", &["--train", "vision"]));
    assert!(
        err.contains("vision") && err.contains("attn, llm, all or lora"),
        "{err}"
    );
    let err = one_line_error(&dir, &train_args("out", &["--batch-size", "0"]));
    assert!(err.contains("--batch-size"), "{err}");
    let err = one_line_error(
        &dir,
        &[
            "train",
            "--data",
            "train.jsonl",
            "--out",
            "missing",
            "--resume",
        ],
    );
    assert!(err.contains("trainer_state.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The JSON of `generate` with extra model flags (`--adapter`, `--dtype`): tokens and the
/// per-step log-probabilities of the chosen tokens.
fn generate_json(dir: &Path, model: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--image",
        "image_a.png",
        "--prompt",
        "caption en",
        "--max-new-tokens",
        "6",
        "--json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(ok(dir, &args).trim()).unwrap()
}

#[test]
fn lora_trains_adapters_alone_that_load_merge_and_resume() {
    let dir = workspace("lora");
    let common = [
        "--train",
        "lora",
        "--rank",
        "4",
        "--lora-alpha",
        "8",
        "--steps",
        "6",
        "--batch-size",
        "3",
        "--lr",
        "3e-2",
        "--seed",
        "3",
    ];
    let stdout = ok(
        &dir,
        &train_args("lora", &[&common[..], &["--merge"]].concat()),
    );
    assert!(stdout.contains("trained 6 steps"), "{stdout}");
    let out = dir.join("lora");
    let train: Vec<f64> = log(&out)
        .iter()
        .filter(|l| l["type"] == "train")
        .map(|l| l["loss"].as_f64().unwrap())
        .collect();
    assert!(train[5] < train[0], "{train:?}");

    // PEFT's layout: adapter tensors only (A [r, in], B [out, r]) for all 7 projections of both
    // decoder layers, and adapter_config.json; no full model.
    assert!(!out.join("model.safetensors").exists());
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()),
        (Some(4), Some(8.0))
    );
    let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let adapter = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(adapter.names().len(), 2 * 7 * 2);
    let a = adapter
        .tensor("base_model.model.model.language_model.layers.1.mlp.down_proj.lora_A.weight")
        .unwrap();
    assert_eq!(a.shape(), &[4, 128]);
    let b = adapter
        .tensor("base_model.model.model.language_model.layers.1.self_attn.k_proj.lora_B.weight")
        .unwrap();
    assert_eq!(b.shape(), &[16, 4]);
    assert!(
        b.data().iter().any(|&x| x != 0),
        "B starts at 0 and was trained"
    );

    // Base + adapter, the merged folder written by --merge, and merge-lora's folder generate
    // the same tokens, with log-probs within float rounding; the base alone differs.
    let base = model().to_str().unwrap().to_string();
    let with_adapter = generate_json(&dir, &base, &["--adapter", "lora"]);
    let merged = generate_json(&dir, "lora/merged", &[]);
    ok(
        &dir,
        &[
            "merge-lora",
            "--model",
            &base,
            "--adapter",
            "lora",
            "--out",
            "merged2",
        ],
    );
    let merged2 = generate_json(&dir, "merged2", &[]);
    let plain = generate_json(&dir, &base, &[]);
    assert_eq!(with_adapter["tokens"], merged["tokens"]);
    assert_eq!(merged["tokens"], merged2["tokens"]);
    assert_ne!(with_adapter["tokens"], plain["tokens"]);
    let lp = |v: &Value| -> Vec<f64> {
        v["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    for (x, y) in lp(&with_adapter).iter().zip(lp(&merged)) {
        assert!((x - y).abs() < 1e-4, "{x} vs {y}");
    }
    // bf16 base weights take an f32 adapter too.
    let bf16 = generate_json(&dir, &base, &["--adapter", "lora", "--dtype", "bf16"]);
    assert!(bf16["tokens"].is_array(), "{bf16}");

    // Stopping half-way and resuming (the base given again) gives the same bytes.
    ok(
        &dir,
        &train_args("split", &[&common[..], &["--stop-at", "3"]].concat()),
    );
    ok(
        &dir,
        &train_args("split", &[&common[..], &["--resume"]].concat()),
    );
    ok(&dir, &train_args("straight", &common));
    for f in [
        "adapter_model.safetensors",
        "trainer_state.safetensors",
        "trainer_state.json",
    ] {
        assert!(
            std::fs::read(dir.join("straight").join(f)).unwrap()
                == std::fs::read(dir.join("split").join(f)).unwrap(),
            "{f} differs"
        );
    }

    // Misuse is a one-line error.
    let err = one_line_error(
        &dir,
        &[
            "train",
            "--data",
            "train.jsonl",
            "--out",
            "split",
            "--resume",
            "--train",
            "lora",
        ],
    );
    assert!(err.contains("--model"), "{err}");
    let err = one_line_error(&dir, &train_args("x", &["--train", "attn", "--merge"]));
    assert!(err.contains("--merge"), "{err}");
    let err = one_line_error(&dir, &train_args("x", &["--train", "lora", "--rank", "0"]));
    assert!(err.contains("--rank"), "{err}");
    let err = one_line_error(&dir, &generate_args_with_adapter("image_a.png"));
    assert!(err.contains("adapter"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `generate` with an adapter folder that does not exist.
fn generate_args_with_adapter(image: &str) -> Vec<&str> {
    let m = model().to_str().unwrap().to_string().leak() as &str;
    vec![
        "generate",
        "--model",
        m,
        "--image",
        image,
        "--prompt",
        "caption en",
        "--adapter",
        "no-such-adapter",
    ]
}

#[test]
fn training_from_scratch_starts_from_random_weights_of_the_config() {
    let dir = workspace("init");
    // A weightless folder: pg1-56's configuration and tokenizer.
    let init = dir.join("init");
    std::fs::create_dir_all(&init).unwrap();
    for f in ["config.json", "tokenizer.json", "preprocessor_config.json"] {
        std::fs::copy(model().join(f), init.join(f)).unwrap();
    }
    let args = |out: &'static str, seed: &'static str| {
        vec![
            "train",
            "--init",
            "init",
            "--data",
            "train.jsonl",
            "--out",
            out,
            "--train",
            "all",
            "--steps",
            "4",
            "--batch-size",
            "3",
            "--lr",
            "1e-3",
            "--seed",
            seed,
        ]
    };
    ok(&dir, &args("a", "1"));
    ok(&dir, &args("b", "1"));
    ok(&dir, &args("c", "2"));
    let read = |d: &str| std::fs::read(dir.join(d).join("model.safetensors")).unwrap();
    assert!(read("a") == read("b"), "the same seed gives the same model");
    assert!(read("a") != read("c"), "another seed gives another model");
    // Every tensor of the fixture checkpoint, with its shape.
    let src_bytes = std::fs::read(model().join("model.safetensors")).unwrap();
    let a_bytes = read("a");
    let (src, a) = (
        SafeTensors::deserialize(&src_bytes).unwrap(),
        SafeTensors::deserialize(&a_bytes).unwrap(),
    );
    let names = sorted_names(&src);
    assert_eq!(names, sorted_names(&a));
    for n in names {
        assert_eq!(
            src.tensor(n).unwrap().shape(),
            a.tensor(n).unwrap().shape(),
            "{n}"
        );
    }
    // The new folder is a checkpoint (what a random model says is anyone's guess).
    assert!(generate_json(&dir, "a", &[])["tokens"].is_array());
    let err = one_line_error(
        &dir,
        &[
            "train",
            "--init",
            "nowhere",
            "--data",
            "train.jsonl",
            "--out",
            "d",
        ],
    );
    assert!(err.contains("nowhere"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
