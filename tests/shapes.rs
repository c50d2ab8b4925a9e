//! The synthetic shapes dataset: exact ground truth, determinism, file layout, bad input.

use paligemma::parse::parse_detections;
use paligemma::shapes::{
    BACKGROUND_MIN_CHANNEL, Colour, DatasetSpec, MAX_SHAPES, Scene, ShapeKind, TaskType, examples,
    gap, iou, render, scene, write_dataset,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A fresh, empty folder under the target directory, unique per test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("shapes-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn spec(n: usize, seed: u64, size: u32) -> DatasetSpec {
    DatasetSpec {
        n,
        seed,
        size,
        max_shapes: MAX_SHAPES,
        present_only: false,
    }
}

fn write(out: &Path, spec: &DatasetSpec) -> paligemma::shapes::Summary {
    write_dataset(out, spec, false, &mut |_| {}).unwrap()
}

/// Every file under `dir` (relative path → bytes).
fn read_tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

/// FNV-1a over the file names and contents: a fingerprint of a whole dataset.
fn fingerprint(files: &BTreeMap<PathBuf, Vec<u8>>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in files {
        for &b in name.to_string_lossy().as_bytes().iter().chain(bytes) {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

#[test]
fn same_seed_gives_identical_files_and_another_seed_does_not() {
    let (a, b, c) = (temp_dir("det-a"), temp_dir("det-b"), temp_dir("det-c"));
    write(&a, &spec(12, 5, 64));
    write(&b, &spec(12, 5, 64));
    write(&c, &spec(12, 6, 64));
    let (ta, tb, tc) = (read_tree(&a), read_tree(&b), read_tree(&c));
    assert_eq!(ta, tb);
    assert_eq!(fingerprint(&ta), fingerprint(&tb));
    assert_ne!(fingerprint(&ta), fingerprint(&tc));
    // Scene 3 is the same scene whatever the dataset size: scenes are seeded one by one.
    let d = temp_dir("det-d");
    write(&d, &spec(4, 5, 64));
    let png = Path::new("images/00003.png");
    assert_eq!(read_tree(&d)[png], ta[png]);
}

#[test]
fn boxes_are_the_tight_boxes_of_the_drawn_pixels() {
    for index in 0..200 {
        let size = if index % 2 == 0 { 224 } else { 48 };
        let scene = scene(11, index, size);
        let img = render(&scene);
        assert_eq!(img.dimensions(), (size, size));
        // Every pixel is either a palette colour inside the box of a shape of that colour, or
        // background (pale, so never a palette colour).
        let mut seen: Vec<Option<[u32; 4]>> = vec![None; scene.shapes.len()];
        for (x, y, p) in img.enumerate_pixels() {
            let owner = scene.shapes.iter().position(|s| {
                let [x0, y0, x1, y1] = s.bbox;
                (x0..x1).contains(&x) && (y0..y1).contains(&y)
            });
            match Colour::from_rgb(p.0) {
                Some(c) => {
                    let i = owner.unwrap_or_else(|| panic!("scene {index}: stray {c:?} pixel"));
                    assert_eq!(c, scene.shapes[i].colour, "scene {index} ({x}, {y})");
                    let b = seen[i].get_or_insert([x, y, x + 1, y + 1]);
                    *b = [b[0].min(x), b[1].min(y), b[2].max(x + 1), b[3].max(y + 1)];
                }
                None => assert!(
                    p.0.iter().all(|&v| v >= BACKGROUND_MIN_CHANNEL),
                    "scene {index}: background pixel {p:?} is not pale"
                ),
            }
        }
        for (shape, drawn) in scene.shapes.iter().zip(&seen) {
            assert_eq!(Some(shape.bbox), *drawn, "scene {index}: {shape:?}");
        }
    }
}

#[test]
fn scenes_respect_count_size_and_overlap_limits() {
    let mut counts = [0usize; MAX_SHAPES + 1];
    let mut kinds = BTreeMap::new();
    for index in 0..500 {
        let size = 224;
        let s = scene(3, index, size);
        counts[s.shapes.len()] += 1;
        for (i, a) in s.shapes.iter().enumerate() {
            *kinds.entry(a.kind).or_insert(0) += 1;
            let [x0, y0, x1, y1] = a.bbox;
            assert!(x0 < x1 && y0 < y1 && x1 <= size && y1 <= size);
            let [fx0, fy0, fx1, fy1] = a.frame;
            let side = fx1 - fx0;
            assert_eq!(side, fy1 - fy0, "frames are square");
            assert!(
                (34..=89).contains(&side),
                "frame side {side} outside 15-40 %"
            );
            assert!(fx0 <= x0 && fy0 <= y0 && x1 <= fx1 && y1 <= fy1);
            for b in &s.shapes[i + 1..] {
                let f = |v: [u32; 4]| v.map(|c| c as f32);
                assert_eq!(iou(f(a.bbox), f(b.bbox)), 0.0);
                let g = gap(size);
                let apart = a.bbox[2] + g <= b.bbox[0]
                    || b.bbox[2] + g <= a.bbox[0]
                    || a.bbox[3] + g <= b.bbox[1]
                    || b.bbox[3] + g <= a.bbox[1];
                assert!(
                    apart,
                    "scene {index}: {a:?} and {b:?} are closer than {g} px"
                );
            }
        }
    }
    // Placement never gives up: every count from 1 to 3 is drawn about equally often.
    assert_eq!(counts[0], 0);
    assert!(counts[1..].iter().all(|&c| c > 120), "{counts:?}");
    assert_eq!(kinds.len(), ShapeKind::ALL.len());
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The answers a scene implies, recomputed here independently of `examples`.
fn check_answer(scene: &Scene, prefix: &str, suffix: &str) {
    let count = |k: ShapeKind| scene.shapes.iter().filter(|s| s.kind == k).count();
    if prefix == "answer en how many shapes are there?" {
        assert_eq!(suffix, scene.shapes.len().to_string());
        return;
    }
    for kind in ShapeKind::ALL {
        if prefix == format!("answer en how many {}s are there?", kind.name()) {
            assert_eq!(suffix, count(kind).to_string());
            return;
        }
        if prefix == format!("answer en what colour is the {}?", kind.name()) {
            let of_kind: Vec<_> = scene.shapes.iter().filter(|s| s.kind == kind).collect();
            assert_eq!(
                of_kind.len(),
                1,
                "colour asked of a kind seen {} times",
                of_kind.len()
            );
            assert_eq!(suffix, of_kind[0].colour.name());
            return;
        }
    }
    panic!("unexpected question {prefix:?}");
}

/// Detection suffixes parse back, cleanly, to one box per shape of the asked kinds, each
/// within one bin of the true box.
fn check_detection(scene: &Scene, prefix: &str, suffix: &str) {
    let asked: Vec<&str> = prefix
        .strip_prefix("detect ")
        .unwrap()
        .split(" ; ")
        .collect();
    let parsed = parse_detections(suffix, scene.width, scene.height);
    assert!(
        parsed.warnings.is_empty(),
        "{prefix}: {:?}",
        parsed.warnings
    );
    let truth: Vec<_> = scene
        .shapes
        .iter()
        .filter(|s| asked.contains(&s.kind.name()))
        .collect();
    assert_eq!(parsed.objects.len(), truth.len(), "{prefix} → {suffix:?}");
    let bin = scene.width as f32 / 1023.0;
    for t in &truth {
        let found = parsed.objects.iter().any(|o| {
            o.label == t.kind.name()
                && o.bbox
                    .iter()
                    .zip(t.bbox)
                    .all(|(&p, v)| (p - v as f32).abs() <= bin)
        });
        assert!(found, "{prefix}: no box for {t:?} in {suffix:?}");
    }
    // Grouped by the prompt's label order.
    let order: Vec<usize> = parsed
        .objects
        .iter()
        .map(|o| asked.iter().position(|a| *a == o.label).unwrap())
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] <= w[1]),
        "{prefix} → {suffix:?}"
    );
}

/// What a caption must say: each (colour, kind) with its multiplicity.
fn check_caption(scene: &Scene, caption: &str) {
    let mut expected = BTreeMap::new();
    for s in &scene.shapes {
        *expected.entry((s.colour, s.kind)).or_insert(0) += 1;
    }
    let mut said = BTreeMap::new();
    let normalised = caption.replace(", ", " and ");
    for phrase in normalised.split(" and ") {
        let words: Vec<&str> = phrase.split(' ').collect();
        assert_eq!(words.len(), 3, "{caption:?}");
        let n = match words[0] {
            "a" | "an" => 1,
            "two" => 2,
            "three" => 3,
            w => panic!("{w:?} in {caption:?}"),
        };
        let colour = Colour::ALL
            .into_iter()
            .find(|c| c.name() == words[1])
            .unwrap();
        let kind = ShapeKind::ALL
            .into_iter()
            .find(|k| {
                words[2]
                    == if n == 1 {
                        k.name().to_string()
                    } else {
                        k.plural()
                    }
            })
            .unwrap_or_else(|| panic!("{caption:?}"));
        assert_eq!(words[0] == "an", colour == Colour::Orange, "{caption:?}");
        assert!(said.insert((colour, kind), n).is_none(), "{caption:?}");
    }
    assert_eq!(said, expected, "{caption:?}");
}

#[test]
fn jsonl_files_are_consistent_with_the_scenes() {
    let out = temp_dir("consistency");
    let spec = spec(30, 9, 64);
    let summary = write(&out, &spec);
    assert_eq!(summary.images, 30);

    let all = read_jsonl(&out.join("train.jsonl"));
    assert_eq!(all.len(), summary.examples.iter().sum::<usize>());
    let mut from_task_files = 0;
    for (task, &n) in TaskType::ALL.iter().zip(&summary.examples) {
        let lines = read_jsonl(&out.join(format!("{}.jsonl", task.name())));
        assert_eq!(lines.len(), n);
        assert!(n > 0);
        from_task_files += n;
        // Each task file is the combined file's lines of that task, in the same order.
        let prefix_ok = |p: &str| match task {
            TaskType::Caption => p == "caption en",
            TaskType::Vqa => p.starts_with("answer en "),
            TaskType::Detect => p.starts_with("detect "),
        };
        let subset: Vec<&Value> = all
            .iter()
            .filter(|l| prefix_ok(l["prefix"].as_str().unwrap()))
            .collect();
        assert_eq!(subset, lines.iter().collect::<Vec<_>>());
    }
    assert_eq!(from_task_files, all.len());

    let mut captions = 0;
    for line in &all {
        let obj = line.as_object().unwrap();
        assert_eq!(obj.len(), 3, "{line}");
        let image = obj["image"].as_str().unwrap();
        let (prefix, suffix) = (
            obj["prefix"].as_str().unwrap(),
            obj["suffix"].as_str().unwrap(),
        );
        assert!(out.join(image).is_file(), "{image}");
        let index: u64 = image
            .strip_prefix("images/")
            .and_then(|s| s.strip_suffix(".png"))
            .unwrap()
            .parse()
            .unwrap();
        let scene = scene(spec.seed, index, spec.size);
        // The PNG on disk is the rendered scene.
        let img = image::open(out.join(image)).unwrap().to_rgb8();
        assert_eq!(img, render(&scene));
        if prefix == "caption en" {
            check_caption(&scene, suffix);
            captions += 1;
        } else if prefix.starts_with("answer en ") {
            check_answer(&scene, prefix, suffix);
        } else {
            check_detection(&scene, prefix, suffix);
        }
    }
    assert_eq!(captions, 30);

    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["seed"], 9);
    assert_eq!(meta["n"], 30);
    assert_eq!(meta["size"], 64);
}

#[test]
fn every_scene_asks_about_every_kind() {
    for index in 0..50 {
        let scene = scene(1, index, 224);
        let ex = examples(&scene).unwrap();
        for kind in ShapeKind::ALL {
            let detect = format!("detect {}", kind.name());
            let e = ex.iter().find(|e| e.prefix == detect).unwrap();
            // Absent kinds answer the empty string, as big_vision's detection targets do.
            let present = scene.shapes.iter().any(|s| s.kind == kind);
            assert_eq!(e.suffix.is_empty(), !present, "{detect} → {:?}", e.suffix);
        }
        assert_eq!(ex.iter().filter(|e| e.task == TaskType::Caption).count(), 1);
    }
}

#[test]
fn bad_input_is_refused_with_clear_errors() {
    let err = |out: &Path, spec: DatasetSpec, force: bool| {
        write_dataset(out, &spec, force, &mut |_| {})
            .unwrap_err()
            .to_string()
    };
    let out = temp_dir("bad");
    assert!(err(&out, spec(0, 0, 64), false).contains("--n must be at least 1"));
    assert!(err(&out, spec(1, 0, 31), false).contains("--size 31"));
    assert!(err(&out, spec(1, 0, 5000), false).contains("--size 5000"));
    assert!(!out.exists(), "nothing is created for a bad request");

    // A non-empty folder needs --force.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "keep me").unwrap();
    assert!(err(&out, spec(2, 0, 32), false).contains("not empty"));
    write_dataset(&out, &spec(2, 0, 32), true, &mut |_| {}).unwrap();
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "keep me"
    );
    assert!(out.join("images/00001.png").is_file());

    // --out names a file, or a folder that cannot be created.
    let file = out.join("notes.txt");
    assert!(err(&file, spec(1, 0, 32), false).contains("not a folder"));
    let below_file = file.join("sub");
    let msg = format!(
        "{:#}",
        write_dataset(&below_file, &spec(1, 0, 32), false, &mut |_| {}).unwrap_err()
    );
    assert!(msg.contains("cannot create the output folder"), "{msg}");
}

#[test]
fn progress_reaches_n() {
    let out = temp_dir("progress");
    let mut seen = Vec::new();
    write_dataset(&out, &spec(70, 2, 32), false, &mut |done| seen.push(done)).unwrap();
    assert_eq!(seen.last(), Some(&70));
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
}

/// `paligemma eval-shapes` counts against the regenerated ground truth: every shape of the
/// scenes, every VQA question the dataset asks about them, one caption per scene, and rates
/// that are the ratios of the counts. (A random tiny model answers nothing right; what a
/// trained model scores is what the command is for.)
#[test]
fn eval_shapes_counts_the_ground_truth_of_the_held_out_scenes() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/pg1-56");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_paligemma"))
        .args(["eval-shapes", "--model", model.to_str().unwrap()])
        .args(["--n", "3", "--seed", "3", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The fixture's vision tower takes 56 px: scenes are drawn at that size.
    assert_eq!(
        (r["scenes"].as_u64(), r["size"].as_u64()),
        (Some(3), Some(56))
    );
    let scenes: Vec<Scene> = (0..3).map(|i| scene(3, i, 56)).collect();
    let shapes: usize = scenes.iter().map(|s| s.shapes.len()).sum();
    let questions: usize = scenes
        .iter()
        .map(|s| {
            examples(s)
                .unwrap()
                .iter()
                .filter(|e| e.task == TaskType::Vqa)
                .count()
        })
        .sum();
    assert_eq!(r["objects"].as_u64(), Some(shapes as u64));
    assert_eq!(r["questions"].as_u64(), Some(questions as u64));
    let n = |k: &str| r[k].as_f64().unwrap();
    assert_eq!(n("recall"), n("objects_found") / n("objects"));
    assert_eq!(n("vqa_accuracy"), n("answers_exact") / n("questions"));
    assert_eq!(n("caption_exact_match"), n("captions_exact") / 3.0);
    assert!(n("boxes_correct") <= n("boxes"));

    // One shape per scene with --max-shapes 1: the scenes `shapes --max-shapes 1` writes.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_paligemma"))
        .args(["eval-shapes", "--model", model.to_str().unwrap()])
        .args(["--n", "3", "--seed", "3", "--max-shapes", "1", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (r["objects"].as_u64(), r["max_shapes"].as_u64()),
        (Some(3), Some(1))
    );

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_paligemma"))
        .args([
            "eval-shapes",
            "--model",
            model.to_str().unwrap(),
            "--n",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--n"));
}
