//! The demo model built into the binary (`--model demo`, trained from scratch by
//! `tools/train_demo.sh`): README's first commands read `examples/shapes.png` as README shows,
//! and on 20 held-out scenes (seed 3, never trained on) it keeps the scores README reports for
//! 200.

use paligemma::shapes::scene;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `examples/shapes.png` is scene 6 of seed 3 at 224 px.
const EXAMPLE: (u64, u64, u32) = (3, 6, 224);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_paligemma"))
        .current_dir(root())
        // The demo model is unpacked here rather than into the user's cache.
        .env(
            "PALIGEMMA_CACHE",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("cache"),
        )
        .args(args)
        .output()
        .unwrap()
}

fn json(args: &[&str]) -> Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_example_scene_is_what_the_test_says() {
    let img = image::open(root().join("examples/shapes.png"))
        .unwrap()
        .to_rgb8();
    let (seed, index, size) = EXAMPLE;
    assert_eq!(img, paligemma::shapes::render(&scene(seed, index, size)));
}

#[test]
fn readme_first_commands_read_the_example_and_draw_it() {
    let (seed, index, size) = EXAMPLE;
    let truth = scene(seed, index, size);
    // The true count of this held-out scene (the model's answers on held-out scenes beat the
    // text prior overall, see README; this scene is one it gets right).
    let answer = json(&[
        "ask",
        "--model",
        "demo",
        "examples/shapes.png",
        "how many shapes are there?",
        "--json",
    ]);
    assert_eq!(answer["text"], truth.shapes.len().to_string(), "{answer}");
    // The caption starts with the leftmost shape, colour and kind right.
    let caption = json(&[
        "caption",
        "--model",
        "demo",
        "examples/shapes.png",
        "--json",
    ]);
    let first = paligemma::shapes::caption(&truth);
    let first = first
        .split([',', ' '])
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let text = caption["text"].as_str().unwrap();
    assert!(text.starts_with(&first), "{text:?} vs {first:?}");
    // detect runs end to end into boxes and a picture, whatever the model finds.
    let annotated = Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-detect.png");
    let out = json(&[
        "detect",
        "--model",
        "demo",
        "examples/shapes.png",
        "square",
        "--json",
        "--annotate",
        annotated.to_str().unwrap(),
    ]);
    assert_eq!(
        (out["width"].as_u64(), out["height"].as_u64()),
        (Some(224), Some(224))
    );
    assert!(out["objects"].is_array(), "{out}");
    let drawn = image::open(&annotated).unwrap().to_rgb8();
    assert_eq!(drawn.dimensions(), (224, 224));
}

#[test]
fn held_out_scores_stay_at_readme_levels() {
    let r = json(&[
        "eval-shapes",
        "--model",
        "demo",
        "--n",
        "20",
        "--seed",
        "3",
        "--json",
    ]);
    assert_eq!(r["scenes"], 20);
    let rate = |k: &str| r[k].as_f64().unwrap();
    // README (200 scenes): VQA 0.663, caption exact match 0.09, no detection yet (recall 0,
    // so there is nothing to bound). The bound sits below the 200-scene VQA figure by a margin
    // for 20 scenes' noise (about 150 questions), and above the 0.52 that answering from the
    // text prior alone scores, so a model or pipeline that stopped reading images fails.
    assert!(rate("vqa_accuracy") >= VQA_MIN, "{r}");
}

const VQA_MIN: f64 = 0.55;
