//! Held-out evaluation on synthetic shapes: how well a model trained on `paligemma shapes`
//! data does on scenes it never saw (`paligemma eval-shapes`).
//!
//! Scenes are regenerated in memory from a seed ([`crate::shapes::scene`]), so the ground truth
//! is exact and nothing is read from disk. For each scene, greedy decoding of:
//!
//! - `caption en`: **caption exact match**, the generated text equal to [`caption`];
//! - every VQA question the dataset asks about the scene: **VQA accuracy**, exact match;
//! - `detect KIND` for each of the five kinds: predicted boxes (parsed with
//!   [`crate::parse::parse_detections`], labels must name the kind) are matched one-to-one to
//!   the scene's shapes of that kind, highest IoU first; a match needs **IoU ≥ 0.5**.
//!   **Recall** = matched shapes / shapes; **precision** = matched boxes / predicted boxes
//!   (a box for an absent kind is a false positive).

use crate::generate::{GenerateOptions, Request, Strategy, generate};
use crate::paligemma::PaliGemma;
use crate::parse::parse_detections;
use crate::preprocess::PreprocessorConfig;
use crate::prompt;
use crate::shapes::{Scene, ShapeKind, TaskType, caption, examples, iou, render, scene_with};
use crate::tokenizer::Tokenizer;
use anyhow::Result;
use serde::Serialize;

/// A detection counts when its IoU with a ground-truth box reaches this.
pub const IOU_THRESHOLD: f32 = 0.5;
/// Longest answer generated: three objects of 4 loc tokens, a label and a separator fit.
const MAX_NEW_TOKENS: usize = 48;

/// Counts over the evaluated scenes, and the rates they give.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ShapesReport {
    pub scenes: usize,
    pub seed: u64,
    pub size: u32,
    /// Shapes per scene: 1 to this many.
    pub max_shapes: usize,
    /// Ground-truth shapes, and those matched by a predicted box of the right kind.
    pub objects: usize,
    pub objects_found: usize,
    /// Predicted boxes, and those matched to a shape.
    pub boxes: usize,
    pub boxes_correct: usize,
    pub captions_exact: usize,
    pub questions: usize,
    pub answers_exact: usize,
    pub recall: f64,
    pub precision: f64,
    pub caption_exact_match: f64,
    pub vqa_accuracy: f64,
}

impl ShapesReport {
    fn finish(&mut self) {
        let rate = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        self.recall = rate(self.objects_found, self.objects);
        self.precision = rate(self.boxes_correct, self.boxes);
        self.caption_exact_match = rate(self.captions_exact, self.scenes);
        self.vqa_accuracy = rate(self.answers_exact, self.questions);
    }
}

/// What a model needs to answer: the same parts as a CLI session.
pub struct Evaluator<'a> {
    pub model: &'a PaliGemma,
    pub tokenizer: &'a Tokenizer,
    pub preprocessor: &'a PreprocessorConfig,
}

/// One prompt about a scene and what it is scored against.
enum Check {
    Caption(String),
    Answer(String),
    Detect(ShapeKind),
}

impl Evaluator<'_> {
    /// Evaluates scenes `0..n` of `seed` at `size` pixels with 1 to `max_shapes` shapes
    /// each (the scenes `paligemma shapes --max-shapes` writes), calling `progress` after
    /// each.
    pub fn shapes(
        &self,
        seed: u64,
        n: usize,
        size: u32,
        max_shapes: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<ShapesReport> {
        let mut report = ShapesReport {
            seed,
            size,
            max_shapes,
            ..Default::default()
        };
        for i in 0..n {
            self.scene(&scene_with(seed, i as u64, size, max_shapes), &mut report)?;
            progress(i + 1);
        }
        report.finish();
        Ok(report)
    }

    /// Adds one scene's counts to `report`.
    fn scene(&self, scene: &Scene, report: &mut ShapesReport) -> Result<()> {
        let mut checks = vec![("caption en".to_string(), Check::Caption(caption(scene)))];
        for ex in examples(scene)? {
            if ex.task == TaskType::Vqa {
                checks.push((ex.prefix, Check::Answer(ex.suffix)));
            }
        }
        for kind in ShapeKind::ALL {
            checks.push((format!("detect {}", kind.name()), Check::Detect(kind)));
        }
        let texts = self.answer(scene, checks.iter().map(|(p, _)| p.as_str()))?;
        report.scenes += 1;
        for ((_, check), text) in checks.iter().zip(texts) {
            match check {
                Check::Caption(want) => report.captions_exact += usize::from(text == *want),
                Check::Answer(want) => {
                    report.questions += 1;
                    report.answers_exact += usize::from(text == *want);
                }
                Check::Detect(kind) => {
                    let truth: Vec<[f32; 4]> = scene
                        .shapes
                        .iter()
                        .filter(|s| s.kind == *kind)
                        .map(|s| s.bbox.map(|v| v as f32))
                        .collect();
                    let predicted: Vec<[f32; 4]> =
                        parse_detections(&text, scene.width, scene.height)
                            .objects
                            .into_iter()
                            .filter(|o| o.label == kind.name())
                            .map(|o| o.bbox)
                            .collect();
                    let matched = match_boxes(&truth, &predicted);
                    report.objects += truth.len();
                    report.boxes += predicted.len();
                    report.objects_found += matched;
                    report.boxes_correct += matched;
                }
            }
        }
        Ok(())
    }

    /// Greedy answers to `prompts` about the scene's image, as one batch.
    fn answer<'p>(
        &self,
        scene: &Scene,
        prompts: impl Iterator<Item = &'p str>,
    ) -> Result<Vec<String>> {
        let cfg = &self.model.config;
        let pixels = self
            .preprocessor
            .to_tensor(&[render(scene)], self.model.device())?;
        let requests = prompts
            .map(|p| {
                Ok(Request {
                    ids: prompt::prefix(self.tokenizer, cfg, p, 1)?.ids,
                    pixels: Some(pixels.clone()),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let opts = GenerateOptions {
            max_new_tokens: MAX_NEW_TOKENS,
            strategy: Strategy::Greedy,
            eos_token_ids: cfg.eos_token_ids.clone(),
        };
        generate(self.model, &requests, &opts, &mut |_| {})?
            .iter()
            .map(|g| Ok(self.tokenizer.decode(&g.tokens, true)?))
            .collect()
    }
}

/// The number of one-to-one matches with IoU ≥ [`IOU_THRESHOLD`], taking pairs in decreasing
/// IoU (the usual greedy matching of detection benchmarks).
pub fn match_boxes(truth: &[[f32; 4]], predicted: &[[f32; 4]]) -> usize {
    let mut pairs: Vec<(f32, usize, usize)> = Vec::new();
    for (t, tb) in truth.iter().enumerate() {
        for (p, pb) in predicted.iter().enumerate() {
            let v = iou(*tb, *pb);
            if v >= IOU_THRESHOLD {
                pairs.push((v, t, p));
            }
        }
    }
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut t_used, mut p_used) = (vec![false; truth.len()], vec![false; predicted.len()]);
    let mut matched = 0;
    for (_, t, p) in pairs {
        if !t_used[t] && !p_used[p] {
            t_used[t] = true;
            p_used[p] = true;
            matched += 1;
        }
    }
    matched
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_is_one_to_one_and_needs_half_overlap() {
        let a = [0.0, 0.0, 10.0, 10.0];
        let b = [20.0, 20.0, 30.0, 30.0];
        // IoU of a with a box shifted by 3 px: 70 / 130 ≈ 0.54; by 4 px: 60 / 140 ≈ 0.43.
        let near = [3.0, 0.0, 13.0, 10.0];
        let far = [4.0, 0.0, 14.0, 10.0];
        assert_eq!(match_boxes(&[a], &[near]), 1);
        assert_eq!(match_boxes(&[a], &[far]), 0);
        // Two predictions of one shape: one match.
        assert_eq!(match_boxes(&[a], &[a, near]), 1);
        // The best pair wins: `near` could take a, but a's exact box does.
        assert_eq!(match_boxes(&[a, b], &[near, a, b]), 2);
        assert_eq!(match_boxes(&[], &[a]), 0);
        assert_eq!(match_boxes(&[a], &[]), 0);
    }
}
