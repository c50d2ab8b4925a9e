//! Continuous batching in the library: sequences that join a running [`OpenBatch`] at
//! different steps, and leave it at different steps, decode exactly the tokens they decode alone
//! with [`generate`].

mod common;

use candle_core::{Device, Tensor};
use paligemma::generate::{GenerateOptions, OpenBatch, Request, Strategy, generate, log_probs};
use paligemma::paligemma::PaliGemma;
use paligemma::prompt;
use paligemma::sampling::{LogitsSampler, argmax};

struct Sequence {
    ids: Vec<u32>,
    pixels: Tensor,
    max_new_tokens: usize,
    /// Step of the running batch at which it joins.
    joins_at: usize,
    sample: Option<(f32, Option<f32>, u64)>,
}

fn strategy(s: &Sequence) -> Strategy {
    match s.sample {
        None => Strategy::Greedy,
        Some((temperature, top_p, seed)) => Strategy::Sample {
            temperature,
            top_k: None,
            top_p,
            seed,
        },
    }
}

/// Tokens and log-probabilities of each sequence, decoded in one open batch that they join
/// and leave on their own schedule.
fn run_open_batch(model: &PaliGemma, seqs: &[Sequence]) -> Vec<(Vec<u32>, Vec<f32>)> {
    let eos = model.config.eos_token_ids.clone();
    let mut batch = OpenBatch::new(model);
    // Per live row: sequence index, sampler, next token to feed.
    let mut live: Vec<(usize, Option<LogitsSampler>, u32)> = Vec::new();
    let mut out: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); seqs.len()];
    let mut finished = vec![false; seqs.len()];
    let mut most_rows = 0;
    let mut step = 0;
    // Chooses a row's next token; returns whether the row is done.
    let choose = |out: &mut Vec<(Vec<u32>, Vec<f32>)>,
                  i: usize,
                  sampler: &mut Option<LogitsSampler>,
                  lp: &[f32]| {
        let token = match sampler {
            Some(s) => s.sample(lp),
            None => argmax(lp),
        };
        out[i].1.push(lp[token as usize]);
        let stop = eos.contains(&token);
        if !stop {
            out[i].0.push(token);
        }
        (token, stop || out[i].1.len() == seqs[i].max_new_tokens)
    };
    while finished.iter().any(|f| !f) {
        for (i, s) in seqs.iter().enumerate() {
            if s.joins_at == step {
                let features = model
                    .row_features(&[Some(s.pixels.clone())])
                    .unwrap()
                    .remove(0);
                let logits = batch
                    .join(&s.ids, features.as_ref(), s.max_new_tokens)
                    .unwrap();
                let mut sampler = s
                    .sample
                    .map(|(t, p, seed)| LogitsSampler::new(t, None, p, seed));
                let lp = log_probs(&logits).unwrap().remove(0);
                let (token, done) = choose(&mut out, i, &mut sampler, &lp);
                if done {
                    // It joined as the last row.
                    finished[i] = true;
                    let mut keep = vec![true; batch.len()];
                    keep[batch.len() - 1] = false;
                    batch.retain(&keep).unwrap();
                } else {
                    live.push((i, sampler, token));
                }
            }
        }
        most_rows = most_rows.max(batch.len());
        if live.is_empty() {
            step += 1;
            continue;
        }
        let tokens: Vec<u32> = live.iter().map(|l| l.2).collect();
        let lps = log_probs(&batch.step(&tokens).unwrap()).unwrap();
        let mut keep = Vec::with_capacity(live.len());
        for (row, lp) in live.iter_mut().zip(&lps) {
            let (token, done) = choose(&mut out, row.0, &mut row.1, lp);
            row.2 = token;
            finished[row.0] |= done;
            keep.push(!done);
        }
        batch.retain(&keep).unwrap();
        let mut flags = keep.iter();
        live.retain(|_| *flags.next().unwrap());
        if !live.is_empty() {
            // Slots are never more than the longest live row needs.
            let longest = live
                .iter()
                .map(|l| seqs[l.0].ids.len() + out[l.0].1.len() - 1)
                .max()
                .unwrap();
            assert_eq!(
                batch.slots(),
                longest,
                "step {step}: padding no row needs is dropped"
            );
        }
        step += 1;
    }
    assert!(batch.is_empty());
    assert!(
        most_rows >= 3,
        "the schedule overlaps rows ({most_rows} at most)"
    );
    out
}

fn sequences(model: &PaliGemma, case: &str) -> Vec<Sequence> {
    let (_, tok, pre) = common::load_model(case);
    let dir = common::fixtures().join("models").join(case);
    let image = |f: &str| paligemma::image::load_image(&dir.join(f)).unwrap();
    // pg2-42 ships one picture: its "second" image is the first one flipped.
    let first = image(if case == "pg2-42" {
        "image_c.png"
    } else {
        "image_a.png"
    });
    let second = match case {
        "pg2-42" => ::image::imageops::flip_horizontal(&first),
        _ => image("image_b.png"),
    };
    let a = pre
        .to_tensor(std::slice::from_ref(&first), &Device::Cpu)
        .unwrap();
    let b = pre
        .to_tensor(std::slice::from_ref(&second), &Device::Cpu)
        .unwrap();
    let ab = pre.to_tensor(&[first, second], &Device::Cpu).unwrap();
    let ids = |p: &str, n: usize| prompt::prefix(&tok, &model.config, p, n).unwrap().ids;
    vec![
        Sequence {
            ids: ids("caption en", 1),
            pixels: a.clone(),
            max_new_tokens: 12,
            joins_at: 0,
            sample: None,
        },
        Sequence {
            ids: ids("answer en what colour is the large shape on the left?", 1),
            pixels: b.clone(),
            max_new_tokens: 9,
            joins_at: 2,
            sample: None,
        },
        Sequence {
            ids: ids("ocr", 2),
            pixels: ab,
            max_new_tokens: 14,
            joins_at: 3,
            sample: Some((0.8, Some(0.9), 7)),
        },
        Sequence {
            ids: ids("caption en", 1),
            pixels: a,
            max_new_tokens: 1,
            joins_at: 4,
            sample: None,
        },
        Sequence {
            ids: ids("detect cat ; dog", 1),
            pixels: b,
            max_new_tokens: 6,
            joins_at: 13,
            sample: Some((1.0, None, 3)),
        },
    ]
}

#[test]
fn rows_joining_and_leaving_decode_as_they_do_alone() {
    for case in ["pg1-56", "pg2-42"] {
        let (model, _, _) = common::load_model(case);
        let seqs = sequences(&model, case);
        let batched = run_open_batch(&model, &seqs);
        for (i, (s, (tokens, logprobs))) in seqs.iter().zip(&batched).enumerate() {
            let opts = GenerateOptions {
                max_new_tokens: s.max_new_tokens,
                strategy: strategy(s),
                eos_token_ids: model.config.eos_token_ids.clone(),
            };
            let request = Request {
                ids: s.ids.clone(),
                pixels: Some(s.pixels.clone()),
            };
            let alone = generate(&model, &[request], &opts, &mut |_| {})
                .unwrap()
                .remove(0);
            assert_eq!(tokens, &alone.tokens, "{case} sequence {i}: tokens");
            assert_eq!(logprobs.len(), alone.logprobs.len(), "{case} sequence {i}");
            for (a, b) in logprobs.iter().zip(&alone.logprobs) {
                assert!(
                    (a - b).abs() < 1e-5,
                    "{case} sequence {i}: log-prob {a} in the open batch vs {b} alone"
                );
            }
        }
    }
}

#[test]
fn a_row_alone_is_bit_identical_to_generate() {
    let (model, _, _) = common::load_model("pg1-56");
    let mut seqs = sequences(&model, "pg1-56");
    seqs.truncate(1);
    let mut solo = run_open_batch_single(&model, &seqs[0]);
    let opts = GenerateOptions {
        max_new_tokens: seqs[0].max_new_tokens,
        strategy: Strategy::Greedy,
        eos_token_ids: model.config.eos_token_ids.clone(),
    };
    let request = Request {
        ids: seqs[0].ids.clone(),
        pixels: Some(seqs[0].pixels.clone()),
    };
    let alone = generate(&model, &[request], &opts, &mut |_| {})
        .unwrap()
        .remove(0);
    assert_eq!(solo.0, alone.tokens);
    assert_eq!(std::mem::take(&mut solo.1), alone.logprobs);
}

fn run_open_batch_single(model: &PaliGemma, s: &Sequence) -> (Vec<u32>, Vec<f32>) {
    let mut batch = OpenBatch::new(model);
    let features = model
        .row_features(&[Some(s.pixels.clone())])
        .unwrap()
        .remove(0);
    let mut logits = batch
        .join(&s.ids, features.as_ref(), s.max_new_tokens)
        .unwrap();
    let (mut tokens, mut logprobs) = (Vec::new(), Vec::new());
    loop {
        let lp = log_probs(&logits).unwrap().remove(0);
        let t = argmax(&lp);
        logprobs.push(lp[t as usize]);
        if model.config.eos_token_ids.contains(&t) || logprobs.len() == s.max_new_tokens {
            if !model.config.eos_token_ids.contains(&t) {
                tokens.push(t);
            }
            return (tokens, logprobs);
        }
        tokens.push(t);
        logits = batch.step(&[t]).unwrap();
    }
}
