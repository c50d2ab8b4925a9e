//! The scheduler: one thread owns the model and decodes every generation request in one
//! [`OpenBatch`]. Between two decode steps it admits waiting requests (each prefilled alone,
//! then merged in) and lets finished or abandoned ones leave, so a new request never waits for
//! the others to finish. Image features are kept in a small LRU keyed by the pixel values, so
//! a repeated image skips the vision tower.
//!
//! Scoring and beam search do not fit a shared decode step; they run whole, between steps.

use super::Served;
use super::error::{ApiError, describe};
use super::metrics::Metrics;
use crate::generate::{
    GenerateOptions, Generated, OpenBatch, Request, Strategy, generate, log_probs,
};
use crate::prompt::Sequence;
use crate::sampling::{LogitsSampler, argmax};
use crate::tokenizer::TextStream;
use anyhow::Result;
use candle_core::Tensor;
use std::collections::VecDeque;
use std::hash::{DefaultHasher, Hasher};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// A generation request, ready for the model.
pub struct Generation {
    /// Prefix ids, `<image>` placeholders included.
    pub ids: Vec<u32>,
    /// `[n_images, 3, R, R]`.
    pub pixels: Tensor,
    /// Identifies `pixels` for the feature cache ([`feature_key`]).
    pub key: FeatureKey,
    pub max_new_tokens: usize,
    pub strategy: Strategy,
    /// Send the text as it is produced ([`Event::Text`]).
    pub stream: bool,
}

pub enum Work {
    Generate(Generation),
    /// Teacher-forced log-probabilities of a sequence's suffix.
    Score {
        seq: Sequence,
        pixels: Tensor,
    },
}

/// What the scheduler tells a request's handler.
#[derive(Debug)]
pub enum Event {
    /// More generated text (streaming requests only); the pieces add up to the final text.
    Text(String),
    Generated {
        result: Generated,
        text: String,
        prompt_tokens: usize,
    },
    Scored(Vec<f32>),
    Failed(ApiError),
}

struct Job {
    work: Work,
    events: UnboundedSender<Event>,
    queued_at: Instant,
}

/// Where the handlers hand work to the scheduler thread.
pub struct Engine {
    queue: Mutex<Option<SyncSender<Job>>>,
    queue_size: usize,
    thread: Mutex<Option<JoinHandle<()>>>,
    metrics: Arc<Metrics>,
}

pub struct EngineOptions {
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Requests that may wait for a place in the batch; more are refused.
    pub queue_size: usize,
    pub feature_cache_bytes: usize,
}

impl Engine {
    pub fn start(served: Arc<Served>, options: EngineOptions, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = sync_channel(options.queue_size);
        let queue_size = options.queue_size;
        let thread_metrics = metrics.clone();
        let thread = std::thread::Builder::new()
            .name("paligemma-scheduler".into())
            .spawn(move || {
                let mut scheduler = Scheduler::new(&served, &options, &thread_metrics);
                scheduler.run(&rx);
            })
            .expect("cannot start the scheduler thread");
        Self {
            queue: Mutex::new(Some(tx)),
            queue_size,
            thread: Mutex::new(Some(thread)),
            metrics,
        }
    }

    /// Queues work; its events arrive on the returned channel. Dropping the receiver cancels
    /// the work (the scheduler checks before every step).
    pub fn submit(&self, work: Work) -> Result<UnboundedReceiver<Event>, ApiError> {
        let (events, rx) = unbounded_channel();
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let Some(queue) = queue.as_ref() else {
            return Err(ApiError::overloaded("the server is shutting down"));
        };
        // Counted before sending, so that the scheduler's decrement never comes first.
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            work,
            events,
            queued_at: Instant::now(),
        };
        match queue.try_send(job) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => {
                        self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
                        ApiError::overloaded(format!(
                            "the server is busy: {} requests are already waiting; retry later",
                            self.queue_size
                        ))
                    }
                    TrySendError::Disconnected(_) => {
                        ApiError::internal("the scheduler has stopped")
                    }
                })
            }
        }
    }

    /// Takes no more work and waits until the work already queued is done.
    pub fn stop(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

/// A hash of pixel values (and their shape), 128 bits so that two different inputs never meet
/// in practice.
pub type FeatureKey = [u64; 2];

pub fn feature_key(pixels: &Tensor) -> Result<FeatureKey> {
    let values = pixels.flatten_all()?.to_vec1::<f32>()?;
    let mut a = DefaultHasher::new();
    let mut b = DefaultHasher::new();
    b.write(b"second half of the feature key");
    for h in [&mut a, &mut b] {
        for &d in pixels.dims() {
            h.write_usize(d);
        }
        for v in &values {
            h.write_u32(v.to_bits());
        }
    }
    Ok([a.finish(), b.finish()])
}

/// Recently used image features, bounded in bytes.
struct FeatureCache {
    entries: VecDeque<(FeatureKey, Tensor, usize)>,
    bytes: usize,
    limit: usize,
}

impl FeatureCache {
    fn get(&mut self, key: &FeatureKey) -> Option<Tensor> {
        let i = self.entries.iter().position(|e| &e.0 == key)?;
        let entry = self.entries.remove(i)?;
        let features = entry.1.clone();
        self.entries.push_back(entry);
        Some(features)
    }

    fn insert(&mut self, key: FeatureKey, features: Tensor) {
        let size = features.elem_count() * features.dtype().size_in_bytes();
        if size > self.limit {
            return;
        }
        self.entries.push_back((key, features, size));
        self.bytes += size;
        while self.bytes > self.limit {
            let Some((_, _, s)) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= s;
        }
    }
}

/// One sequence being decoded.
struct Row<'m> {
    events: UnboundedSender<Event>,
    sampler: Option<LogitsSampler>,
    max_new_tokens: usize,
    prompt_tokens: usize,
    result: Generated,
    /// Present when the client streams.
    text: Option<TextStream<'m>>,
    /// The token to feed at the next step.
    next: u32,
    /// Its handler was already told of an error.
    failed: bool,
}

impl Row<'_> {
    fn fail(&mut self, error: ApiError) {
        let _ = self.events.send(Event::Failed(error));
        self.failed = true;
    }

    /// Chooses the next token as [`generate`] does; returns whether the row is done.
    fn choose(&mut self, logprobs: &[f32], eos: &[u32]) -> Result<bool> {
        let token = match &mut self.sampler {
            Some(s) => s.sample(logprobs),
            None => argmax(logprobs),
        };
        self.result.logprobs.push(logprobs[token as usize]);
        if eos.contains(&token) {
            self.result.stopped_at_eos = true;
            return Ok(true);
        }
        self.result.tokens.push(token);
        if let Some(stream) = &mut self.text
            && let Some(piece) = stream.push(token)?
        {
            let _ = self.events.send(Event::Text(piece));
        }
        self.next = token;
        Ok(self.result.logprobs.len() >= self.max_new_tokens)
    }
}

struct Scheduler<'m> {
    served: &'m Served,
    batch: OpenBatch<'m>,
    rows: Vec<Row<'m>>,
    features: FeatureCache,
    metrics: &'m Metrics,
    max_batch: usize,
}

impl<'m> Scheduler<'m> {
    fn new(served: &'m Served, options: &EngineOptions, metrics: &'m Metrics) -> Self {
        Self {
            served,
            batch: OpenBatch::new(&served.model),
            rows: Vec::new(),
            features: FeatureCache {
                entries: VecDeque::new(),
                bytes: 0,
                limit: options.feature_cache_bytes,
            },
            metrics,
            max_batch: options.max_batch.max(1),
        }
    }

    fn run(&mut self, queue: &Receiver<Job>) {
        loop {
            let closed = self.admit(queue);
            if self.rows.is_empty() {
                if closed {
                    return;
                }
                continue;
            }
            self.decode_step();
        }
    }

    /// Takes waiting requests while the batch has room, blocking only when there is nothing
    /// to decode. Returns whether the queue is closed (shutdown).
    fn admit(&mut self, queue: &Receiver<Job>) -> bool {
        while self.rows.len() < self.max_batch {
            let job = if self.rows.is_empty() {
                match queue.recv() {
                    Ok(job) => job,
                    Err(_) => return true,
                }
            } else {
                match queue.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty) => return false,
                    Err(TryRecvError::Disconnected) => return true,
                }
            };
            self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            if job.events.is_closed() {
                self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let events = job.events.clone();
            match catch_unwind(AssertUnwindSafe(|| self.start(job))) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = events.send(Event::Failed(e));
                }
                Err(panic) => {
                    let e = ApiError::internal(format!("the model failed: {}", panic_text(&panic)));
                    let _ = events.send(Event::Failed(e.clone()));
                    self.fail_all(e);
                }
            }
        }
        false
    }

    /// Scores or beam-searches a job whole, or lets a generation join the batch.
    fn start(&mut self, job: Job) -> Result<(), ApiError> {
        let Job {
            work,
            events,
            queued_at,
        } = job;
        let g = match work {
            Work::Score { seq, pixels } => {
                let lps = crate::score::suffix_logprobs(&self.served.model, &seq, Some(&pixels))
                    .map_err(model_failed)?;
                let _ = events.send(Event::Scored(lps));
                return Ok(());
            }
            Work::Generate(g) => g,
        };
        self.metrics
            .prompt_tokens
            .fetch_add(g.ids.len() as u64, Ordering::Relaxed);
        let sampler = match g.strategy {
            Strategy::Greedy => None,
            Strategy::Sample {
                temperature,
                top_k,
                top_p,
                seed,
            } => Some(LogitsSampler::new(temperature, top_k, top_p, seed)),
            Strategy::Beam { .. } => return self.beam_search(g, events, queued_at),
        };
        let features = self.features_of(g.pixels, g.key)?;
        let logits = self
            .batch
            .join(&g.ids, Some(&features), g.max_new_tokens)
            .map_err(model_failed)?;
        self.metrics.first_token(queued_at.elapsed().as_secs_f64());
        self.metrics.tokens(1);
        let mut row = Row {
            events,
            sampler,
            max_new_tokens: g.max_new_tokens,
            prompt_tokens: g.ids.len(),
            result: Generated {
                tokens: Vec::new(),
                logprobs: Vec::new(),
                stopped_at_eos: false,
            },
            text: g.stream.then(|| self.served.tokenizer.stream(true)),
            next: 0,
            failed: false,
        };
        // The row is in the batch now: from here on a failure is the row's, not the job's.
        let eos = &self.served.model.config.eos_token_ids;
        let done = log_probs(&logits)
            .and_then(|lps| row.choose(&lps[0], eos))
            .unwrap_or_else(|e| {
                row.fail(model_failed(e));
                true
            });
        self.rows.push(row);
        self.metrics
            .active_rows
            .store(self.rows.len(), Ordering::Relaxed);
        if done {
            let mut keep = vec![true; self.rows.len()];
            *keep.last_mut().expect("just pushed") = false;
            self.leave(&keep);
        }
        Ok(())
    }

    /// Image features from the cache, or from the vision tower (then cached).
    fn features_of(&mut self, pixels: Tensor, key: FeatureKey) -> Result<Tensor, ApiError> {
        if let Some(f) = self.features.get(&key) {
            self.metrics.feature_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(f);
        }
        self.metrics.feature_misses.fetch_add(1, Ordering::Relaxed);
        // As `Batch::prefill` computes them, so that a request alone matches `generate`.
        let f = self
            .served
            .model
            .row_features(&[Some(pixels)])
            .map_err(model_failed)?
            .remove(0)
            .ok_or_else(|| ApiError::internal("no image features"))?;
        self.features.insert(key, f.clone());
        Ok(f)
    }

    /// Beam search keeps several hypotheses per request and reorders them every step, which a
    /// shared batch cannot do: it runs whole, with [`generate`].
    fn beam_search(
        &self,
        g: Generation,
        events: UnboundedSender<Event>,
        queued_at: Instant,
    ) -> Result<(), ApiError> {
        let served = self.served;
        let opts = GenerateOptions {
            max_new_tokens: g.max_new_tokens,
            strategy: g.strategy,
            eos_token_ids: served.model.config.eos_token_ids.clone(),
        };
        let request = Request {
            ids: g.ids,
            pixels: Some(g.pixels),
        };
        let prompt_tokens = request.ids.len();
        let result = generate(&served.model, &[request], &opts, &mut |_| {})
            .map_err(model_failed)?
            .remove(0);
        self.metrics.first_token(queued_at.elapsed().as_secs_f64());
        self.metrics.tokens(result.logprobs.len() as u64);
        let text = served
            .tokenizer
            .decode(&result.tokens, true)
            .map_err(|e| model_failed(e.into()))?;
        if g.stream && !text.is_empty() {
            let _ = events.send(Event::Text(text.clone()));
        }
        let _ = events.send(Event::Generated {
            result,
            text,
            prompt_tokens,
        });
        Ok(())
    }

    /// One decode step for every row, after dropping the rows nobody waits for any more.
    fn decode_step(&mut self) {
        let abandoned: Vec<bool> = self.rows.iter().map(|r| !r.events.is_closed()).collect();
        if abandoned.contains(&false) {
            let n = abandoned.iter().filter(|k| !**k).count();
            self.metrics
                .cancelled
                .fetch_add(n as u64, Ordering::Relaxed);
            self.leave(&abandoned);
            if self.rows.is_empty() {
                return;
            }
        }
        let tokens: Vec<u32> = self.rows.iter().map(|r| r.next).collect();
        let step = catch_unwind(AssertUnwindSafe(|| {
            let logits = self.batch.step(&tokens)?;
            log_probs(&logits)
        }));
        let lps = match step {
            Ok(Ok(lps)) => lps,
            Ok(Err(e)) => {
                return self.fail_all(model_failed(e));
            }
            Err(panic) => {
                return self.fail_all(ApiError::internal(format!(
                    "the model failed: {}",
                    panic_text(&panic)
                )));
            }
        };
        self.metrics.decode_step(self.rows.len());
        let eos = &self.served.model.config.eos_token_ids;
        let mut keep = Vec::with_capacity(self.rows.len());
        for (row, lp) in self.rows.iter_mut().zip(&lps) {
            match row.choose(lp, eos) {
                Ok(done) => keep.push(!done),
                Err(e) => {
                    row.fail(ApiError::internal(describe(&e)));
                    keep.push(false);
                }
            }
        }
        self.leave(&keep);
    }

    /// Removes the rows not kept, answering those that finished.
    fn leave(&mut self, keep: &[bool]) {
        if let Err(e) = self.batch.retain(keep) {
            return self.fail_all(model_failed(e));
        }
        let mut flags = keep.iter();
        let rows = std::mem::take(&mut self.rows);
        for row in rows {
            if *flags.next().expect("one flag per row") {
                self.rows.push(row);
            } else {
                self.finish(row);
            }
        }
        self.metrics
            .active_rows
            .store(self.rows.len(), Ordering::Relaxed);
    }

    /// Sends a row's result, if it has one (a cancelled or failed row has none to send).
    fn finish(&self, row: Row<'_>) {
        let done = row.result.stopped_at_eos || row.result.logprobs.len() >= row.max_new_tokens;
        if row.failed || !done || row.events.is_closed() {
            return;
        }
        if let Some(stream) = row.text
            && let Ok(Some(rest)) = stream.finish()
        {
            let _ = row.events.send(Event::Text(rest));
        }
        let event = match self.served.tokenizer.decode(&row.result.tokens, true) {
            Ok(text) => Event::Generated {
                result: row.result,
                text,
                prompt_tokens: row.prompt_tokens,
            },
            Err(e) => Event::Failed(ApiError::internal(format!("cannot decode the output: {e}"))),
        };
        let _ = row.events.send(event);
    }

    /// Answers every row with `error` and starts over with an empty batch.
    fn fail_all(&mut self, error: ApiError) {
        for row in self.rows.drain(..) {
            let _ = row.events.send(Event::Failed(error.clone()));
        }
        self.batch = OpenBatch::new(&self.served.model);
        self.metrics.active_rows.store(0, Ordering::Relaxed);
    }
}

fn model_failed(e: anyhow::Error) -> ApiError {
    ApiError::internal(format!("the model failed: {}", describe(&e)))
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}
