//! Decoding: prefill the prefix once, then extend one token per step from the KV cache.
//!
//! Several requests run as one left-padded batch; padding slots are masked out as keys and do
//! not count towards positions, so a row's result does not depend on its neighbours.
//! Strategies: greedy, sampling (temperature, top-k, top-p, seeded), and big_vision's beam
//! search (plain sum of log-probabilities, no length normalisation).

use crate::attention_mask::{RowLayout, additive_mask};
use crate::kv_cache::KvCache;
use crate::paligemma::PaliGemma;
use crate::sampling::{LogitsSampler, argmax};
use anyhow::{Result, bail};
use candle_core::{D, Tensor};

/// One sequence to continue: its prefix ids (with `<image>` placeholders) and the pixel values
/// `[n_images, 3, R, R]` for those placeholders.
#[derive(Debug, Clone)]
pub struct Request {
    pub ids: Vec<u32>,
    pub pixels: Option<Tensor>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Strategy {
    Greedy,
    Sample {
        temperature: f32,
        top_k: Option<usize>,
        top_p: Option<f32>,
        seed: u64,
    },
    Beam {
        num_beams: usize,
    },
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub strategy: Strategy,
    /// Generation stops at any of these; the first is the one beam search appends.
    pub eos_token_ids: Vec<u32>,
}

/// A finished sequence: generated ids without the stop token.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub tokens: Vec<u32>,
    /// Log-probability of each generated token (the stop token's included last, if any).
    pub logprobs: Vec<f32>,
    pub stopped_at_eos: bool,
}

/// A batch being decoded: its rows' slot layouts and their KV cache.
pub struct Batch<'m> {
    model: &'m PaliGemma,
    rows: Vec<RowLayout>,
    cache: KvCache,
}

impl<'m> Batch<'m> {
    /// Runs the prefix of every request (left-padded to the longest) and returns the batch
    /// with room for `max_new_tokens` more, and the last position's logits `[B, V]`.
    pub fn prefill(
        model: &'m PaliGemma,
        requests: &[Request],
        max_new_tokens: usize,
    ) -> Result<(Self, Tensor)> {
        let features = image_features(model, requests)?;
        Self::prefill_features(model, requests, &features, max_new_tokens)
    }

    /// [`Batch::prefill`] with the requests' image features already computed
    /// ([`image_features`]).
    pub fn prefill_features(
        model: &'m PaliGemma,
        requests: &[Request],
        features: &[Option<Tensor>],
        max_new_tokens: usize,
    ) -> Result<(Self, Tensor)> {
        if requests.is_empty() {
            bail!("nothing to generate: no requests");
        }
        let dev = model.device();
        let width = requests.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        if width == 0 {
            bail!("empty prompt");
        }
        let hidden = model.config.text.hidden_size;
        let mut rows = Vec::with_capacity(requests.len());
        let mut embeds = Vec::with_capacity(requests.len());
        for (req, feats) in requests.iter().zip(features) {
            let pad = width - req.ids.len();
            let mut row = RowLayout::default();
            (0..pad).for_each(|_| row.push(false, false));
            req.ids.iter().for_each(|_| row.push(true, true));
            let e = model.embed(&req.ids, feats.as_ref())?;
            let e = if pad > 0 {
                Tensor::cat(&[&Tensor::zeros((pad, hidden), e.dtype(), dev)?, &e], 0)?
            } else {
                e
            };
            embeds.push(e);
            rows.push(row);
        }
        let x = Tensor::stack(&embeds, 0)?;
        let capacity = width + max_new_tokens;
        let mut cache = model.decoder().new_cache(requests.len(), capacity, dev)?;
        let positions: Vec<Vec<u32>> = rows.iter().map(|r| r.positions()).collect();
        let mask = additive_mask(&rows, 0, width, dev)?;
        let h = model
            .decoder()
            .forward(&x, &positions, &mask, Some(&mut cache))?;
        let logits = model
            .decoder()
            .logits(&h.narrow(1, width - 1, 1)?.squeeze(1)?)?;
        Ok((Self { model, rows, cache }, logits))
    }

    /// Appends one token per row (generated tokens attend causally) and returns the next
    /// logits `[B, V]`.
    pub fn step(&mut self, tokens: &[u32]) -> Result<Tensor> {
        if tokens.len() != self.rows.len() {
            bail!("{} tokens for a batch of {}", tokens.len(), self.rows.len());
        }
        decode_step(self.model, &mut self.rows, &mut self.cache, tokens)
    }

    /// Room left in the cache.
    pub fn remaining(&self) -> usize {
        self.cache.capacity() - self.cache.len()
    }

    /// Rebuilds the batch from rows of itself (beam search keeps the best beams' parents).
    pub fn reorder(&mut self, parents: &[u32]) -> Result<()> {
        self.cache.reorder(parents)?;
        self.rows = parents
            .iter()
            .map(|&p| self.rows[p as usize].clone())
            .collect();
        Ok(())
    }
}

/// One decode step of a batch: each row's token is appended (attending causally to its row's
/// slots in `cache`) and the next logits `[B, V]` come back.
fn decode_step(
    model: &PaliGemma,
    rows: &mut [RowLayout],
    cache: &mut KvCache,
    tokens: &[u32],
) -> Result<Tensor> {
    let dev = model.device();
    let start = cache.len();
    for row in rows.iter_mut() {
        row.push(true, false);
    }
    let x = model.decoder().embed(tokens, dev)?.unsqueeze(1)?;
    let positions: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| vec![*r.positions().last().expect("row has slots")])
        .collect();
    let mask = additive_mask(rows, start, 1, dev)?;
    let h = model
        .decoder()
        .forward(&x, &positions, &mask, Some(cache))?;
    Ok(model.decoder().logits(&h.squeeze(1)?)?)
}

/// A batch that sequences join and leave between decode steps (continuous batching).
///
/// A sequence is prefilled alone, exactly as a batch of one in [`Batch::prefill`], and then
/// merged in. All rows end at the same slot, so a row shorter than the others gets empty slots
/// in front, which the mask hides and positions skip, as in a left-padded [`Batch`]. When rows
/// leave, the slots no remaining row uses are dropped: the cache never holds more than the
/// longest live row plus the room its rows still need.
pub struct OpenBatch<'m> {
    model: &'m PaliGemma,
    rows: Vec<RowLayout>,
    /// Decode steps each row may still take.
    room: Vec<usize>,
    cache: Option<KvCache>,
}

impl<'m> OpenBatch<'m> {
    pub fn new(model: &'m PaliGemma) -> Self {
        Self {
            model,
            rows: Vec::new(),
            room: Vec::new(),
            cache: None,
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Key/value slots per row (the longest live row, padding included).
    pub fn slots(&self) -> usize {
        self.cache.as_ref().map_or(0, KvCache::len)
    }

    /// Prefills one prefix, whose `<image>` slots take the rows of `features`
    /// `[n_image_tokens, H]` (from [`PaliGemma::row_features`]), and adds it as the last row with
    /// room for `max_new_tokens`. Returns its next-token logits `[1, V]`.
    pub fn join(
        &mut self,
        ids: &[u32],
        features: Option<&Tensor>,
        max_new_tokens: usize,
    ) -> Result<Tensor> {
        if ids.is_empty() {
            bail!("empty prompt");
        }
        let model = self.model;
        let dev = model.device();
        let width = ids.len();
        let mut row = RowLayout::default();
        ids.iter().for_each(|_| row.push(true, true));
        let x = model.embed(ids, features)?.unsqueeze(0)?;
        let mut cache = model.decoder().new_cache(1, width + max_new_tokens, dev)?;
        let mask = additive_mask(std::slice::from_ref(&row), 0, width, dev)?;
        let h = model
            .decoder()
            .forward(&x, &[row.positions()], &mask, Some(&mut cache))?;
        let logits = model
            .decoder()
            .logits(&h.narrow(1, width - 1, 1)?.squeeze(1)?)?;
        self.merge(row, cache, max_new_tokens)?;
        Ok(logits)
    }

    /// Adds a prefilled row, padding whichever side is shorter at the front.
    fn merge(&mut self, mut row: RowLayout, cache: KvCache, room: usize) -> Result<()> {
        let Some(current) = &self.cache else {
            self.rows.push(row);
            self.room.push(room);
            self.cache = Some(cache);
            return Ok(());
        };
        let (old, new) = (current.len(), cache.len());
        let len = old.max(new);
        let most_room = self.room.iter().copied().chain([room]).max().unwrap_or(0);
        let capacity = len + most_room;
        let current = current.relayout(0, len - old, capacity)?;
        let joining = cache.relayout(0, len - new, capacity)?;
        self.cache = Some(KvCache::concat_rows(&[&current, &joining])?);
        for r in &mut self.rows {
            pad_front(r, len - old);
        }
        pad_front(&mut row, len - new);
        self.rows.push(row);
        self.room.push(room);
        Ok(())
    }

    /// Appends one token per row (as [`Batch::step`]) and returns the next logits `[B, V]`.
    pub fn step(&mut self, tokens: &[u32]) -> Result<Tensor> {
        if tokens.len() != self.rows.len() {
            bail!("{} tokens for a batch of {}", tokens.len(), self.rows.len());
        }
        if let Some(i) = self.room.iter().position(|&r| r == 0) {
            bail!("row {i} has used all the new tokens it asked for");
        }
        let Some(cache) = self.cache.as_mut() else {
            bail!("the batch is empty");
        };
        let logits = decode_step(self.model, &mut self.rows, cache, tokens)?;
        self.room.iter_mut().for_each(|r| *r -= 1);
        Ok(logits)
    }

    /// Keeps the rows where `keep` is true, in order, and drops the front slots that are
    /// padding in every row left.
    pub fn retain(&mut self, keep: &[bool]) -> Result<()> {
        if keep.len() != self.rows.len() {
            bail!("{} flags for a batch of {}", keep.len(), self.rows.len());
        }
        let kept: Vec<u32> = (0..keep.len() as u32)
            .filter(|&i| keep[i as usize])
            .collect();
        if kept.len() == self.rows.len() {
            return Ok(());
        }
        let Some(cache) = &self.cache else {
            bail!("the batch is empty");
        };
        if kept.is_empty() {
            *self = Self::new(self.model);
            return Ok(());
        }
        let mut cache = cache.clone();
        cache.reorder(&kept)?;
        let mut rows: Vec<RowLayout> = kept
            .iter()
            .map(|&i| self.rows[i as usize].clone())
            .collect();
        let room: Vec<usize> = kept.iter().map(|&i| self.room[i as usize]).collect();
        let skip = rows
            .iter()
            .map(|r| r.valid.iter().position(|&v| v).unwrap_or(r.len()))
            .min()
            .unwrap_or(0);
        let capacity = cache.len() - skip + room.iter().copied().max().unwrap_or(0);
        self.cache = Some(cache.relayout(skip, 0, capacity)?);
        for r in &mut rows {
            r.valid.drain(..skip);
            r.prefix.drain(..skip);
        }
        self.rows = rows;
        self.room = room;
        Ok(())
    }
}

fn pad_front(row: &mut RowLayout, n: usize) {
    row.valid.splice(0..0, std::iter::repeat_n(false, n));
    row.prefix.splice(0..0, std::iter::repeat_n(false, n));
}

/// Per-row log-softmax of `[B, V]` logits, as host vectors.
pub fn log_probs(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok(lp.to_vec2::<f32>()?)
}

/// The image features of each request (`None` for a request without images), each distinct
/// pixel tensor encoded once.
pub fn image_features(model: &PaliGemma, requests: &[Request]) -> Result<Vec<Option<Tensor>>> {
    let pixels: Vec<Option<Tensor>> = requests.iter().map(|r| r.pixels.clone()).collect();
    model.row_features(&pixels)
}

/// What [`generate`] reports while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The images (if any) are encoded; the prefill of the decoder starts.
    ImagesEncoded,
    /// `row` chose `id` (not reported for the stop token, nor for beam search, whose tokens are
    /// only known at the end).
    Token { row: usize, id: u32 },
}

/// Generates for every request; `on_progress` sees the images encoded and each token as it is
/// chosen.
pub fn generate(
    model: &PaliGemma,
    requests: &[Request],
    opts: &GenerateOptions,
    on_progress: &mut dyn FnMut(Progress),
) -> Result<Vec<Generated>> {
    if opts.eos_token_ids.is_empty() {
        bail!("no stop token configured");
    }
    match &opts.strategy {
        Strategy::Beam { num_beams } => requests
            .iter()
            .map(|r| beam_search(model, r, *num_beams, opts, on_progress))
            .collect(),
        strategy => sample_batch(model, requests, strategy, opts, on_progress),
    }
}

fn sample_batch(
    model: &PaliGemma,
    requests: &[Request],
    strategy: &Strategy,
    opts: &GenerateOptions,
    on_progress: &mut dyn FnMut(Progress),
) -> Result<Vec<Generated>> {
    let n = requests.len();
    let mut out: Vec<Generated> = (0..n)
        .map(|_| Generated {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            stopped_at_eos: false,
        })
        .collect();
    if opts.max_new_tokens == 0 {
        return Ok(out);
    }
    // Every row gets its own generator seeded alike, so a row samples the same tokens
    // whether it runs alone or in a batch.
    let mut samplers: Vec<Option<LogitsSampler>> = (0..n)
        .map(|_| match strategy {
            Strategy::Sample {
                temperature,
                top_k,
                top_p,
                seed,
            } => Some(LogitsSampler::new(*temperature, *top_k, *top_p, *seed)),
            _ => None,
        })
        .collect();
    let features = image_features(model, requests)?;
    on_progress(Progress::ImagesEncoded);
    let (mut batch, mut logits) =
        Batch::prefill_features(model, requests, &features, opts.max_new_tokens)?;
    let mut done = vec![false; n];
    for step in 0..opts.max_new_tokens {
        let lps = log_probs(&logits)?;
        let mut next = vec![opts.eos_token_ids[0]; n];
        for (i, lp) in lps.iter().enumerate() {
            if done[i] {
                continue;
            }
            let token = match &mut samplers[i] {
                Some(s) => s.sample(lp),
                None => argmax(lp),
            };
            next[i] = token;
            out[i].logprobs.push(lp[token as usize]);
            if opts.eos_token_ids.contains(&token) {
                out[i].stopped_at_eos = true;
                done[i] = true;
            } else {
                out[i].tokens.push(token);
                on_progress(Progress::Token { row: i, id: token });
            }
        }
        if done.iter().all(|&d| d) || step + 1 == opts.max_new_tokens {
            break;
        }
        logits = batch.step(&next)?;
    }
    Ok(out)
}

/// big_vision's beam search for one request: each step either ends a live beam with `<eos>`
/// (kept if it beats the best finished hypothesis) or extends it with one of its best
/// `beams + 1` non-eos tokens; the best `beams` extensions live on. It stops when no live beam
/// can beat the best finished one, since scores only fall.
fn beam_search(
    model: &PaliGemma,
    request: &Request,
    beams: usize,
    opts: &GenerateOptions,
    on_progress: &mut dyn FnMut(Progress),
) -> Result<Generated> {
    if beams == 0 {
        bail!("--num-beams must be at least 1");
    }
    let eos = opts.eos_token_ids[0];
    let mut best: Option<(f32, Vec<u32>, Vec<f32>)> = None;
    let request = std::slice::from_ref(request);
    let features = image_features(model, request)?;
    on_progress(Progress::ImagesEncoded);
    let (mut batch, logits) =
        Batch::prefill_features(model, request, &features, opts.max_new_tokens)?;
    batch.reorder(&vec![0; beams])?;
    let mut logits = logits.repeat((beams, 1))?;
    // Only the first beam is real at the start; the copies must not be picked twice.
    let mut scores: Vec<f32> = (0..beams)
        .map(|b| if b == 0 { 0.0 } else { f32::NEG_INFINITY })
        .collect();
    let mut seqs: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); beams];
    for step in 0..opts.max_new_tokens {
        let lps = log_probs(&logits)?;
        for (b, lp) in lps.iter().enumerate() {
            let s = scores[b] + lp[eos as usize];
            if s.is_finite() && best.as_ref().is_none_or(|(bs, _, _)| s > *bs) {
                let mut lps_b = seqs[b].1.clone();
                lps_b.push(lp[eos as usize]);
                best = Some((s, seqs[b].0.clone(), lps_b));
            }
        }
        let mut candidates: Vec<(f32, usize, u32, f32)> = Vec::with_capacity(beams * (beams + 1));
        for (b, lp) in lps.iter().enumerate() {
            for t in top_indices(lp, beams + 1) {
                let score = if opts.eos_token_ids.contains(&t) {
                    f32::NEG_INFINITY
                } else {
                    scores[b] + lp[t as usize]
                };
                candidates.push((score, b, t, lp[t as usize]));
            }
        }
        // Stable sort: ties keep beam-then-token order.
        candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
        candidates.truncate(beams);
        let best_live = candidates[0].0;
        if best.as_ref().is_some_and(|(bs, _, _)| best_live < *bs)
            || step + 1 == opts.max_new_tokens
        {
            break;
        }
        let parents: Vec<u32> = candidates.iter().map(|c| c.1 as u32).collect();
        seqs = candidates
            .iter()
            .map(|&(_, b, t, lp)| {
                let (mut toks, mut lps) = seqs[b].clone();
                toks.push(t);
                lps.push(lp);
                (toks, lps)
            })
            .collect();
        scores = candidates.iter().map(|c| c.0).collect();
        batch.reorder(&parents)?;
        let next: Vec<u32> = candidates.iter().map(|c| c.2).collect();
        logits = batch.step(&next)?;
    }
    let (_, tokens, logprobs) = best.expect("the first step always yields a finished hypothesis");
    Ok(Generated {
        tokens,
        logprobs,
        stopped_at_eos: true,
    })
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
fn top_indices(values: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    let k = k.min(idx.len());
    idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| {
        values[b as usize]
            .total_cmp(&values[a as usize])
            .then(a.cmp(&b))
    });
    idx.truncate(k);
    idx.sort_by(|&a, &b| {
        values[b as usize]
            .total_cmp(&values[a as usize])
            .then(a.cmp(&b))
    });
    idx
}

#[cfg(test)]
mod tests {
    use super::top_indices;

    #[test]
    fn top_indices_orders_and_breaks_ties_by_index() {
        assert_eq!(top_indices(&[0.1, 0.5, 0.5, -1.0, 0.3], 3), vec![1, 2, 4]);
        assert_eq!(top_indices(&[1.0], 3), vec![0]);
    }
}
