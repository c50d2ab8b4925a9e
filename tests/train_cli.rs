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

fn log(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn generate(model: &str, dir: &Path) -> Vec<u64> {
    let out = ok(
        dir,
        &[
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
        ],
    );
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    v["tokens"]
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
    let mut names = src.names();
    names.sort();
    let mut saved_names = saved.names();
    saved_names.sort();
    assert_eq!(names, saved_names);
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
    let err = one_line_error(&dir, &train_args("out", &["--train", "lora"]));
    assert!(
        err.contains("lora") && err.contains("attn, llm or all"),
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
