//! Counters, gauges and histograms in Prometheus' text format, kept by hand: a handful of
//! series do not need a metrics framework.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Upper bounds of the latency buckets, in seconds.
const SECONDS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Upper bounds of the rows-per-decode-step buckets.
const ROWS: [f64; 7] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
/// The decode rate gauge averages over this window.
const RATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum);
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count);
    }
}

#[derive(Debug)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    first_token: Mutex<Histogram>,
    batch_rows: Mutex<Histogram>,
    recent_tokens: Mutex<VecDeque<(Instant, u64)>>,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub queue_depth: AtomicUsize,
    pub active_rows: AtomicUsize,
    pub in_flight: AtomicUsize,
    pub feature_hits: AtomicU64,
    pub feature_misses: AtomicU64,
    pub cancelled: AtomicU64,
    pub rejected: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::default(),
            latency: Mutex::default(),
            first_token: Mutex::new(Histogram::new(&SECONDS)),
            batch_rows: Mutex::new(Histogram::new(&ROWS)),
            recent_tokens: Mutex::default(),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            queue_depth: AtomicUsize::new(0),
            active_rows: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            feature_hits: AtomicU64::new(0),
            feature_misses: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a metrics lock leaves plain numbers behind: keep using them.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// One answered request: `endpoint` is a route's path (or `other`), never the raw URL, so
    /// the number of series stays bounded.
    pub fn request(&self, endpoint: &'static str, status: u16, seconds: f64) {
        *lock(&self.requests).entry((endpoint, status)).or_default() += 1;
        lock(&self.latency)
            .entry(endpoint)
            .or_insert_with(|| Histogram::new(&SECONDS))
            .observe(seconds);
    }

    pub fn first_token(&self, seconds: f64) {
        lock(&self.first_token).observe(seconds);
    }

    /// One decode step over `rows` sequences.
    pub fn decode_step(&self, rows: usize) {
        lock(&self.batch_rows).observe(rows as f64);
        self.tokens(rows as u64);
    }

    /// Tokens chosen (by a prefill's first token or a decode step).
    pub fn tokens(&self, n: u64) {
        self.generated_tokens.fetch_add(n, Ordering::Relaxed);
        let now = Instant::now();
        let mut recent = lock(&self.recent_tokens);
        recent.push_back((now, n));
        while recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            recent.pop_front();
        }
    }

    fn tokens_per_second(&self) -> f64 {
        let now = Instant::now();
        let recent = lock(&self.recent_tokens);
        let n: u64 = recent
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= RATE_WINDOW)
            .map(|(_, n)| n)
            .sum();
        n as f64 / RATE_WINDOW.as_secs_f64()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            &mut out,
            "paligemma_requests_total",
            "counter",
            "HTTP requests answered, by endpoint and status.",
        );
        for ((endpoint, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "paligemma_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        head(
            &mut out,
            "paligemma_request_duration_seconds",
            "histogram",
            "Time from request to response head (streams: to the start of the stream).",
        );
        for (endpoint, h) in lock(&self.latency).iter() {
            h.render(
                &mut out,
                "paligemma_request_duration_seconds",
                &format!("endpoint=\"{endpoint}\""),
            );
        }
        head(
            &mut out,
            "paligemma_time_to_first_token_seconds",
            "histogram",
            "Time from a generation request's arrival at the scheduler to its first token.",
        );
        lock(&self.first_token).render(&mut out, "paligemma_time_to_first_token_seconds", "");
        head(
            &mut out,
            "paligemma_batch_rows",
            "histogram",
            "Sequences decoded together per decode step.",
        );
        lock(&self.batch_rows).render(&mut out, "paligemma_batch_rows", "");
        let counters: [(&str, &str, u64); 6] = [
            (
                "paligemma_prompt_tokens_total",
                "Prompt tokens (image tokens included) of generation requests.",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "paligemma_generated_tokens_total",
                "Tokens generated (stop tokens included).",
                self.generated_tokens.load(Ordering::Relaxed),
            ),
            (
                "paligemma_image_feature_cache_hits_total",
                "Generation requests whose image features were reused.",
                self.feature_hits.load(Ordering::Relaxed),
            ),
            (
                "paligemma_image_feature_cache_misses_total",
                "Generation requests whose images went through the vision tower.",
                self.feature_misses.load(Ordering::Relaxed),
            ),
            (
                "paligemma_requests_cancelled_total",
                "Requests dropped by the scheduler because the client went away or timed out.",
                self.cancelled.load(Ordering::Relaxed),
            ),
            (
                "paligemma_requests_rejected_total",
                "Requests answered 503 because the server was full.",
                self.rejected.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            head(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {v}");
        }
        let gauges: [(&str, &str, f64); 4] = [
            (
                "paligemma_queue_depth",
                "Requests waiting for a place in the batch.",
                self.queue_depth.load(Ordering::Relaxed) as f64,
            ),
            (
                "paligemma_batch_active_rows",
                "Sequences being decoded now.",
                self.active_rows.load(Ordering::Relaxed) as f64,
            ),
            (
                "paligemma_requests_in_flight",
                "Requests being handled now.",
                self.in_flight.load(Ordering::Relaxed) as f64,
            ),
            (
                "paligemma_tokens_per_second",
                "Generated tokens per second over the last 10 s.",
                self.tokens_per_second(),
            ),
        ];
        for (name, help, v) in gauges {
            head(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {v}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::new(&ROWS);
        for v in [1.0, 3.0, 3.0, 100.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "");
        assert!(out.contains("x_bucket{le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"4\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"64\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_sum 107\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
    }

    #[test]
    fn requests_render_with_labels() {
        let m = Metrics::default();
        m.request("/v1/caption", 200, 0.02);
        m.request("/v1/caption", 400, 0.001);
        let text = m.render();
        assert!(
            text.contains("paligemma_requests_total{endpoint=\"/v1/caption\",status=\"200\"} 1")
        );
        assert!(text.contains(
            "paligemma_request_duration_seconds_bucket{endpoint=\"/v1/caption\",le=\"0.025\"} 2"
        ));
    }
}
