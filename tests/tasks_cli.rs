//! Task commands end to end: the prompts they build, `parse` turning PaliGemma output into
//! pixel boxes and COCO RLE masks, `--annotate` pictures, and video input.

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny() -> String {
    root()
        .join("tests/fixtures/models/pg1-56")
        .display()
        .to_string()
}

fn tiny_image() -> String {
    root()
        .join("tests/fixtures/models/pg1-56/image_a.png")
        .display()
        .to_string()
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_paligemma"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The tokens `generate` gives for a raw prompt over the given images.
fn generate_tokens(prompt: &str, images: &[&str], max_new: &str) -> Value {
    let model = tiny();
    let mut args = vec![
        "generate",
        "--model",
        &model,
        "--prompt",
        prompt,
        "--max-new-tokens",
        max_new,
        "--json",
    ];
    for i in images {
        args.extend(["--image", i]);
    }
    json_lines(&run(&args)).remove(0)["tokens"].clone()
}

#[test]
fn text_tasks_build_the_documented_prompts() {
    let (model, image) = (tiny(), tiny_image());
    let cases: [(&[&str], &str); 4] = [
        (&["caption"], "caption en"),
        (&["caption", "--long", "--lang", "fr"], "describe fr"),
        (&["ocr"], "ocr"),
        (&["ask", "what is it?"], "answer en what is it?"),
    ];
    for (cmd, prompt) in cases {
        let mut args = vec![
            cmd[0],
            "--model",
            &model,
            &image,
            "--max-new-tokens",
            "6",
            "--json",
        ];
        args.extend(&cmd[1..]);
        let got = json_lines(&run(&args)).remove(0);
        assert_eq!(got["prompt"], prompt);
        assert_eq!(
            got["tokens"],
            generate_tokens(prompt, &[&image], "6"),
            "{prompt}"
        );
    }
}

#[test]
fn ask_answers_several_questions_in_one_batch() {
    let (model, image) = (tiny(), tiny_image());
    let args = [
        "ask",
        "--model",
        &model,
        &image,
        "what is it?",
        "how many?",
        "--max-new-tokens",
        "5",
        "--json",
    ];
    let lines = json_lines(&run(&args));
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["prompt"], "answer en how many?");
    assert_eq!(
        lines[1]["tokens"],
        generate_tokens("answer en how many?", &[&image], "5")
    );
}

#[test]
fn detect_reports_its_prompt_and_parse() {
    let (model, image) = (tiny(), tiny_image());
    let out = json_lines(&run(&[
        "detect",
        "--model",
        &model,
        &image,
        "cat",
        "dog",
        "--json",
        "--max-new-tokens",
        "8",
    ]))
    .remove(0);
    assert_eq!(out["prompt"], "detect cat ; dog");
    assert_eq!(
        (out["width"].as_u64(), out["height"].as_u64()),
        (Some(75), Some(90))
    );
    assert_eq!(
        out["tokens"],
        generate_tokens("detect cat ; dog", &[&image], "8")
    );
    // The tiny model's vocabulary has no <loc> tokens: nothing found, with a warning.
    assert_eq!(out["objects"].as_array().unwrap().len(), 0);
    assert!(!out["warnings"].as_array().unwrap().is_empty());
}

#[test]
fn parse_turns_detections_into_pixel_boxes_and_pictures() {
    let text = "<loc0100><loc0200><loc0800><loc0900> cat ; <loc0000><loc0000><loc1023><loc0511> big dog ; <loc0005>";
    let out = json_lines(&run(&[
        "parse", "--task", "detect", "--text", text, "--width", "640", "--height", "480", "--json",
    ]))
    .remove(0);
    let objects = out["objects"].as_array().unwrap();
    assert_eq!(objects.len(), 2);
    let boxes: Vec<Vec<f64>> = objects
        .iter()
        .map(|o| {
            o["box"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        })
        .collect();
    // big_vision's convention: bin / 1023 of the side.
    let want = [
        [
            200.0 / 1023.0 * 640.0,
            100.0 / 1023.0 * 480.0,
            900.0 / 1023.0 * 640.0,
            800.0 / 1023.0 * 480.0,
        ],
        [0.0, 0.0, 511.0 / 1023.0 * 640.0, 480.0],
    ];
    for (b, w) in boxes.iter().zip(want) {
        for (x, y) in b.iter().zip(w) {
            assert!((x - y).abs() < 1e-3, "{b:?} vs {w:?}");
        }
    }
    assert_eq!(objects[1]["label"], "big dog");
    assert_eq!(objects[0]["loc"], serde_json::json!([100, 200, 800, 900]));
    assert_eq!(
        out["warnings"].as_array().unwrap().len(),
        1,
        "the truncated third object is reported"
    );

    // --annotate draws on the image: same size, the box outline drawn, far pixels untouched.
    let image = root().join("tests/fixtures/images/src/photo_640x480.png");
    let picture = std::env::temp_dir().join(format!("pg-parse-{}.png", std::process::id()));
    let (img, pic) = (image.display().to_string(), picture.display().to_string());
    run(&[
        "parse",
        "--task",
        "detect",
        "--text",
        text,
        "--image",
        &img,
        "--annotate",
        &pic,
    ]);
    let before = image::open(&image).unwrap().to_rgb8();
    let after = image::open(&picture).unwrap().to_rgb8();
    assert_eq!(before.dimensions(), after.dimensions());
    let changed_on_top_edge = (130..560)
        .flat_map(|x| (44..50).map(move |y| (x, y)))
        .filter(|&(x, y)| before.get_pixel(x, y) != after.get_pixel(x, y))
        .count();
    assert!(
        changed_on_top_edge > 400,
        "top edge of the cat box is drawn ({changed_on_top_edge} pixels)"
    );
    assert_eq!(
        before.get_pixel(600, 470),
        after.get_pixel(600, 470),
        "far from every box, unchanged"
    );
    std::fs::remove_file(picture).unwrap();
}

#[test]
fn parse_decodes_segmentation_masks_into_coco_rle() {
    let codes: String = (0..16).map(|i| format!("<seg{:03}>", i * 7)).collect();
    let text = format!("<loc0100><loc0200><loc0800><loc0900>{codes} cat");
    let vae = root()
        .join("tests/fixtures/segmentation/vae-oid-random.npz")
        .display()
        .to_string();
    let args = [
        "parse", "--task", "segment", "--text", &text, "--width", "640", "--height", "480",
        "--vae", &vae, "--json",
    ];
    let out = json_lines(&run(&args)).remove(0);
    let object = &out["objects"][0];
    let rle: paligemma::mask::CocoRle = serde_json::from_value(object["mask"].clone()).unwrap();
    assert_eq!(rle.size, [480, 640]);
    let mask = paligemma::mask::rle_decode(&rle).unwrap();
    // The same decode and paste through the library.
    let decoder = paligemma::vqvae::VqVaeDecoder::load(&vae).unwrap();
    let code_values: [u8; 16] = std::array::from_fn(|i| (i * 7) as u8);
    let m64 = decoder.decode(&[code_values]).unwrap().remove(0);
    let pasted = paligemma::mask::paste_mask(&m64, [100, 200, 800, 900], 640, 480).unwrap();
    assert_eq!(mask, pasted.mask);
    assert!(mask.area() > 0);
    // Nothing outside the evaluator's pixel box.
    let b = pasted.pixel_box;
    for y in 0..480 {
        for x in 0..640 {
            if mask.get(x, y) {
                assert!(x >= b.x0 && x < b.x1 && y >= b.y0 && y < b.y1);
            }
        }
    }
}

#[test]
fn video_frames_are_consecutive_image_blocks() {
    // A folder of two frames sampled with --frames 2 is the same input as two --image flags.
    let dir = std::env::temp_dir().join(format!("pg-video-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = root().join("tests/fixtures/models/pg1-56/image_a.png");
    let b = root().join("tests/fixtures/models/pg1-56/image_b.png");
    std::fs::copy(&a, dir.join("frame1.png")).unwrap();
    std::fs::copy(&b, dir.join("frame2.png")).unwrap();
    let (model, folder) = (tiny(), dir.display().to_string());
    let out = json_lines(&run(&[
        "caption",
        "--model",
        &model,
        "--video",
        &folder,
        "--frames",
        "2",
        "--max-new-tokens",
        "6",
        "--json",
    ]))
    .remove(0);
    let (a, b) = (a.display().to_string(), b.display().to_string());
    assert_eq!(out["tokens"], generate_tokens("caption en", &[&a, &b], "6"));
    std::fs::remove_dir_all(dir).unwrap();
}
