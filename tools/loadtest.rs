//! A bounded load test of `paligemma serve`, on loopback only.
//!
//! It starts the server on a free port of 127.0.0.1, records each good request's answer alone,
//! then runs `--clients` threads of `--requests` requests each, a seeded mix of good requests
//! and bad ones: corrupt base64, bytes that are no image, an image over the pixel limit, invalid
//! JSON, an oversize prompt, an oversize body, unknown endpoints, and clients that vanish
//! (mid-headers, mid-stream, before the answer). It checks that the server never dies, that
//! every good request gets the answer it gets alone and every bad one its 4xx, and that memory
//! stays bounded; then stops the server with SIGTERM. Prints a Markdown report (p50/p99
//! latency, throughput, memory) and, with `--benchmarks FILE`, puts it between
//! `<!-- serve:load:begin -->` and `<!-- serve:load:end -->` there, inside the
//! `<!-- serve:begin -->` … `<!-- serve:end -->` section (created if absent). Exits non-zero
//! on any failure.
//!
//! ```sh
//! cargo build --release
//! target/release/paligemma-loadtest --model tests/fixtures/models/pg1-56 --clients 16 --requests 60
//! ```

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

struct Args {
    server: PathBuf,
    model: String,
    clients: usize,
    requests: usize,
    seed: u64,
    max_seconds: u64,
    /// The server's RSS may grow at most this much over its size after warm-up.
    max_growth_mb: u64,
    benchmarks: Option<PathBuf>,
    serve_args: Vec<String>,
}

fn usage() -> ! {
    eprintln!(
        "usage: paligemma-loadtest --model M [--server PATH] [--clients N] [--requests R] \
         [--seed S] [--max-seconds T] [--max-growth-mb MB] [--benchmarks FILE] [--serve-arg ARG]..."
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let exe = std::env::current_exe().expect("own path");
    let mut args = Args {
        server: exe.with_file_name("paligemma"),
        model: String::new(),
        clients: 8,
        requests: 40,
        seed: 0,
        max_seconds: 600,
        max_growth_mb: 512,
        benchmarks: None,
        serve_args: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        let number = |v: String| v.parse().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--server" => args.server = value().into(),
            "--model" => args.model = value(),
            "--clients" => args.clients = number(value()) as usize,
            "--requests" => args.requests = number(value()) as usize,
            "--seed" => args.seed = number(value()),
            "--max-seconds" => args.max_seconds = number(value()),
            "--max-growth-mb" => args.max_growth_mb = number(value()),
            "--benchmarks" => args.benchmarks = Some(value().into()),
            "--serve-arg" => args.serve_args.push(value()),
            _ => usage(),
        }
    }
    if args.model.is_empty() || args.clients == 0 {
        usage();
    }
    args
}

/// The server's limits this test runs under (and relies on for its bad requests).
const MAX_BODY_MB: usize = 4;
const MAX_IMAGE_PIXELS: u64 = 4_000_000;
const MAX_PROMPT_TOKENS: usize = 256;

// ---------------------------------------------------------------------------------------------
// HTTP over a plain socket: the test needs to misbehave in ways a client library will not.

struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    s.set_write_timeout(Some(Duration::from_secs(60)))?;
    Ok(s)
}

fn request_bytes(method: &str, path: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// Sends a request and reads the whole reply (the connection closes after it). A server that
/// answers before reading an oversize body may close while we still write: the reply it sent
/// is read all the same.
fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<Reply> {
    let mut s = connect(addr)?;
    let write_result = s.write_all(&request_bytes(method, path, content_type, body));
    let mut raw = Vec::new();
    let read_result = s.read_to_end(&mut raw);
    if raw.is_empty() {
        write_result?;
        read_result?;
    }
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> std::io::Result<Reply> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        body = dechunk(&body).ok_or_else(|| bad("bad chunked body"))?;
    }
    Ok(Reply {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// The text of a streamed chat completion: its content deltas, joined.
fn streamed_text(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let mut out = String::new();
    let mut done = false;
    for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(data).ok()?;
        if chunk.get("error").is_some() {
            return None;
        }
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            out.push_str(piece);
        }
    }
    done.then_some(out)
}

// ---------------------------------------------------------------------------------------------
// The requests.

/// Deterministic test pictures: colour gradients with a few blocks, PNG-encoded.
fn picture(width: u32, height: u32, variant: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        let block = ((x / 16 + y / 16 + variant) % 3) as u8;
        image::Rgb([
            (x * 255 / width.max(1)) as u8 ^ (block * 60),
            (y * 255 / height.max(1)) as u8,
            (variant * 70) as u8 ^ (block * 40),
        ])
    });
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("PNG encoding");
    out
}

#[derive(Clone)]
struct Good {
    name: &'static str,
    path: &'static str,
    body: Value,
    stream: bool,
}

fn good_requests(images: &[String], model: &str) -> Vec<Good> {
    let data_uri = |i: usize| format!("data:image/png;base64,{}", images[i]);
    let chat = |prompt: &str, image: usize, extra: Value| {
        let mut body = json!({
            "model": model,
            "messages": [{ "role": "user", "content": [
                { "type": "text", "text": prompt },
                { "type": "image_url", "image_url": { "url": data_uri(image) } },
            ]}],
        });
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        body
    };
    vec![
        Good {
            name: "generate",
            path: "/v1/generate",
            body: json!({ "image": images[0], "prompt": "caption en", "max_new_tokens": 24 }),
            stream: false,
        },
        Good {
            name: "caption",
            path: "/v1/caption",
            body: json!({ "image": images[1], "max_new_tokens": 16 }),
            stream: false,
        },
        Good {
            name: "answer (sampled)",
            path: "/v1/answer",
            body: json!({ "image": images[2], "question": "what is in the picture?", "max_new_tokens": 12, "temperature": 0.7, "seed": 1 }),
            stream: false,
        },
        Good {
            name: "detect",
            path: "/v1/detect",
            body: json!({ "image": images[0], "labels": ["circle", "square"], "max_new_tokens": 20 }),
            stream: false,
        },
        Good {
            name: "ocr (2 images)",
            path: "/v1/ocr",
            body: json!({ "images": [images[1], images[2]], "max_new_tokens": 16 }),
            stream: false,
        },
        Good {
            name: "score",
            path: "/v1/score",
            body: json!({ "image": images[0], "prompt": "caption en", "suffix": "a red circle" }),
            stream: false,
        },
        Good {
            name: "chat",
            path: "/v1/chat/completions",
            body: chat(
                "answer en how many shapes?",
                2,
                json!({ "max_tokens": 40, "temperature": 1.0, "top_p": 0.9, "seed": 7 }),
            ),
            stream: false,
        },
        Good {
            name: "chat (stream)",
            path: "/v1/chat/completions",
            body: chat("ocr", 1, json!({ "max_tokens": 32, "stream": true })),
            stream: true,
        },
    ]
}

/// What must not change between an answer alone and an answer under load: the text and
/// tokens (log-probabilities move by rounding when rows share a batch).
fn signature(good: &Good, reply: &Reply) -> Option<Value> {
    if reply.status != 200 {
        return None;
    }
    if good.stream {
        return streamed_text(&reply.body).map(Value::String);
    }
    let mut v = reply.json();
    if v.is_null() {
        return None;
    }
    if good.path == "/v1/chat/completions" {
        return Some(v["choices"][0]["message"]["content"].clone());
    }
    if good.path == "/v1/generate"
        && let Some(o) = v.as_object_mut()
    {
        o.remove("logprobs");
    }
    Some(v)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Bad {
    CorruptBase64,
    NotAnImage,
    HugeImage,
    InvalidJson,
    OversizePrompt,
    OversizeBody,
    UnknownEndpoint,
    HangUpMidHeaders,
    HangUpMidStream,
    HangUpBeforeAnswer,
}

impl Bad {
    const ALL: [Bad; 10] = [
        Bad::CorruptBase64,
        Bad::NotAnImage,
        Bad::HugeImage,
        Bad::InvalidJson,
        Bad::OversizePrompt,
        Bad::OversizeBody,
        Bad::UnknownEndpoint,
        Bad::HangUpMidHeaders,
        Bad::HangUpMidStream,
        Bad::HangUpBeforeAnswer,
    ];

    /// The status the server must answer (`None`: the client does not wait for one).
    fn expected(self) -> Option<u16> {
        match self {
            Bad::CorruptBase64 | Bad::NotAnImage | Bad::InvalidJson | Bad::OversizePrompt => {
                Some(400)
            }
            Bad::HugeImage | Bad::OversizeBody => Some(413),
            Bad::UnknownEndpoint => Some(404),
            Bad::HangUpMidHeaders | Bad::HangUpMidStream | Bad::HangUpBeforeAnswer => None,
        }
    }
}

struct Payloads {
    huge_image: String,
    good: Vec<Good>,
}

/// Sends one bad request; returns the status it got, if it waits for one.
fn send_bad(addr: &str, bad: Bad, p: &Payloads) -> std::io::Result<Option<u16>> {
    let json = "application/json";
    let post =
        |path: &str, body: &[u8]| exchange(addr, "POST", path, json, body).map(|r| Some(r.status));
    match bad {
        Bad::CorruptBase64 => post(
            "/v1/caption",
            json!({ "image": "iVBORw0KGgo!!!*&^%" })
                .to_string()
                .as_bytes(),
        ),
        Bad::NotAnImage => post(
            "/v1/caption",
            json!({ "image": BASE64.encode(b"#!/bin/sh\necho this is not a picture\n") })
                .to_string()
                .as_bytes(),
        ),
        Bad::HugeImage => post(
            "/v1/caption",
            json!({ "image": p.huge_image }).to_string().as_bytes(),
        ),
        Bad::InvalidJson => post(
            "/v1/chat/completions",
            b"{\"messages\": [{\"role\": \"user\", \"content\": [}",
        ),
        Bad::OversizePrompt => {
            let question = "why ".repeat(4 * MAX_PROMPT_TOKENS);
            let mut body = p.good[2].body.clone();
            body["question"] = json!(question);
            post("/v1/answer", body.to_string().as_bytes())
        }
        Bad::OversizeBody => post("/v1/caption", &vec![b'7'; (MAX_BODY_MB << 20) + 1000]),
        Bad::UnknownEndpoint => {
            exchange(addr, "GET", "/v1/completions/../../etc/passwd", json, b"")
                .map(|r| Some(r.status))
        }
        Bad::HangUpMidHeaders => {
            let mut s = connect(addr)?;
            s.write_all(b"POST /v1/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")?;
            Ok(None)
        }
        Bad::HangUpMidStream => {
            let good = &p.good[7];
            let mut s = connect(addr)?;
            s.write_all(&request_bytes(
                "POST",
                good.path,
                json,
                good.body.to_string().as_bytes(),
            ))?;
            let mut first = [0u8; 256];
            let _ = s.read(&mut first)?;
            s.shutdown(Shutdown::Both)?;
            Ok(None)
        }
        Bad::HangUpBeforeAnswer => {
            let good = &p.good[0];
            let mut s = connect(addr)?;
            s.write_all(&request_bytes(
                "POST",
                good.path,
                json,
                good.body.to_string().as_bytes(),
            ))?;
            Ok(None)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The server process.

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(args: &Args) -> Server {
        let mut child = Command::new(&args.server)
            .args([
                "serve",
                "--model",
                &args.model,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
            ])
            .args(["--max-body-mb", &MAX_BODY_MB.to_string()])
            .args(["--max-image-pixels", &MAX_IMAGE_PIXELS.to_string()])
            .args(["--max-prompt-tokens", &MAX_PROMPT_TOKENS.to_string()])
            .args(&args.serve_args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| fail(&format!("cannot start {}: {e}", args.server.display())));
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("paligemma serve: listening on http://") {
                    let _ = tx.send(addr.to_string());
                }
                eprintln!("  server: {line}");
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(600))
            .unwrap_or_else(|_| fail("the server did not start"));
        Server { child, addr }
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn rss_mb(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kb / 1024.0)
    }

    fn metric(&self, name: &str) -> f64 {
        let reply = exchange(&self.addr, "GET", "/metrics", "text/plain", b"").ok();
        let text = reply
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(f64::NAN)
    }

    /// SIGTERM, then the exit status (killed after a minute).
    fn stop(mut self) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

fn fail(message: &str) -> ! {
    eprintln!("loadtest: FAILED: {message}");
    std::process::exit(1)
}

/// xorshift64*: a seeded, dependency-free choice of requests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Default)]
struct Tally {
    good_latencies: BTreeMap<&'static str, Vec<f64>>,
    bad: BTreeMap<String, u64>,
    failures: Vec<String>,
}

fn main() {
    let args = parse_args();
    let images: Vec<String> = [(96, 72, 0), (320, 240, 1), (640, 480, 2)]
        .iter()
        .map(|&(w, h, v)| BASE64.encode(picture(w, h, v)))
        .collect();
    // 2500×2500: over the 4-megapixel limit, small once compressed.
    let huge = image::RgbImage::from_pixel(2500, 2500, image::Rgb([200, 30, 30]));
    let mut huge_png = Vec::new();
    image::DynamicImage::ImageRgb8(huge)
        .write_to(
            &mut std::io::Cursor::new(&mut huge_png),
            image::ImageFormat::Png,
        )
        .expect("PNG encoding");
    let t_start = Instant::now();
    let mut server = Server::start(&args);
    let served_name = args.model.clone();
    let payloads = Arc::new(Payloads {
        huge_image: BASE64.encode(&huge_png),
        good: good_requests(&images, &served_name),
    });

    // Every good request alone: the answers everything under load must match.
    let mut reference = Vec::new();
    for good in &payloads.good {
        let reply = exchange(
            &server.addr,
            "POST",
            good.path,
            "application/json",
            good.body.to_string().as_bytes(),
        )
        .unwrap_or_else(|e| fail(&format!("{}: {e}", good.name)));
        match signature(good, &reply) {
            Some(s) => reference.push(s),
            None => fail(&format!(
                "{} alone: status {} {}",
                good.name,
                reply.status,
                String::from_utf8_lossy(&reply.body)
            )),
        }
    }
    let rss_start = server.rss_mb().unwrap_or(f64::NAN);
    let tokens_start = server.metric("paligemma_generated_tokens_total");

    let stop = Arc::new(AtomicBool::new(false));
    let peak_rss = Arc::new(Mutex::new(rss_start));
    let pid = server.child.id();
    let sampler = {
        let (stop, peak) = (stop.clone(), peak_rss.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(kb) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("VmRSS:"))
                            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                    })
                {
                    let mut p = peak.lock().expect("peak");
                    *p = p.max(kb / 1024.0);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let tally = Arc::new(Mutex::new(Tally::default()));
    let reference = Arc::new(reference);
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    let good_done = Arc::new(AtomicU64::new(0));
    let t_load = Instant::now();
    let clients: Vec<_> = (0..args.clients)
        .map(|c| {
            let (addr, payloads, reference, tally, good_done) = (
                server.addr.clone(),
                payloads.clone(),
                reference.clone(),
                tally.clone(),
                good_done.clone(),
            );
            let mut rng = Rng(args
                .seed
                .wrapping_mul(0x9e37_79b9)
                .wrapping_add(c as u64 + 1)
                | 1);
            let requests = args.requests;
            std::thread::spawn(move || {
                for _ in 0..requests {
                    if Instant::now() > deadline {
                        tally
                            .lock()
                            .expect("tally")
                            .failures
                            .push("time limit reached".into());
                        return;
                    }
                    // Two in three requests are good.
                    if rng.below(3) < 2 {
                        let i = rng.below(payloads.good.len());
                        let good = &payloads.good[i];
                        let t0 = Instant::now();
                        let reply = exchange(
                            &addr,
                            "POST",
                            good.path,
                            "application/json",
                            good.body.to_string().as_bytes(),
                        );
                        let seconds = t0.elapsed().as_secs_f64();
                        let mut t = tally.lock().expect("tally");
                        match reply {
                            Ok(r) if r.status == 503 && r.headers.contains_key("retry-after") => {
                                *t.bad
                                    .entry("good request turned away (503)".into())
                                    .or_default() += 1;
                            }
                            Ok(r) => match signature(good, &r) {
                                Some(s) if s == reference[i] => {
                                    t.good_latencies.entry(good.name).or_default().push(seconds);
                                    good_done.fetch_add(1, Ordering::Relaxed);
                                }
                                _ => t.failures.push(format!(
                                    "{}: status {}, answer differs from alone: {:.300}",
                                    good.name,
                                    r.status,
                                    String::from_utf8_lossy(&r.body)
                                )),
                            },
                            Err(e) => t.failures.push(format!("{}: {e}", good.name)),
                        }
                    } else {
                        let bad = Bad::ALL[rng.below(Bad::ALL.len())];
                        let got = send_bad(&addr, bad, &payloads);
                        let mut t = tally.lock().expect("tally");
                        match (got, bad.expected()) {
                            (Ok(None), None) => *t.bad.entry(format!("{bad:?}")).or_default() += 1,
                            (Ok(Some(s)), Some(want)) if s == want => {
                                *t.bad.entry(format!("{bad:?} → {s}")).or_default() += 1
                            }
                            (Ok(Some(503)), Some(_)) => {
                                *t.bad.entry(format!("{bad:?} → 503 (busy)")).or_default() += 1
                            }
                            // The server may close the connection on an oversize body before we
                            // finish sending it.
                            (Err(_), Some(413)) => {
                                *t.bad
                                    .entry(format!("{bad:?} → connection closed"))
                                    .or_default() += 1
                            }
                            (got, want) => t
                                .failures
                                .push(format!("{bad:?}: got {got:?}, want {want:?}")),
                        }
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
    let load_seconds = t_load.elapsed().as_secs_f64();
    // Cancelled rows leave at the next step; give the server a moment to settle.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    let rss_end = server.rss_mb().unwrap_or(f64::NAN);
    let peak = *peak_rss.lock().expect("peak");
    let tokens = server.metric("paligemma_generated_tokens_total") - tokens_start;
    let cancelled = server.metric("paligemma_requests_cancelled_total");
    let queue = server.metric("paligemma_queue_depth");
    let batch_sum = server.metric("paligemma_batch_rows_sum");
    let batch_count = server.metric("paligemma_batch_rows_count");
    let mut tally = std::mem::take(&mut *tally.lock().expect("tally"));
    if !server.alive() {
        tally.failures.push("the server died".into());
    }
    let health = exchange(&server.addr, "GET", "/health", "text/plain", b"");
    if !health.as_ref().is_ok_and(|r| r.status == 200) {
        tally
            .failures
            .push("/health does not answer 200 after the load".into());
    }
    if queue != 0.0 {
        tally
            .failures
            .push(format!("{queue} requests still queued"));
    }
    if peak - rss_start > args.max_growth_mb as f64 {
        tally.failures.push(format!(
            "memory grew from {rss_start:.0} MB to {peak:.0} MB, more than {} MB",
            args.max_growth_mb
        ));
    }
    match server.stop() {
        Some(s) if s.success() => {}
        other => tally.failures.push(format!(
            "the server did not exit cleanly on SIGTERM: {other:?}"
        )),
    }

    let mut all: Vec<f64> = tally.good_latencies.values().flatten().copied().collect();
    all.sort_by(f64::total_cmp);
    let good_n = good_done.load(Ordering::Relaxed);
    let bad_n: u64 = tally.bad.values().sum();
    let mut report = String::new();
    let w = &mut report;
    let _ = writeln!(w, "| requests | count | p50 | p99 |\n|---|---|---|---|");
    for (name, lat) in &tally.good_latencies {
        let mut lat = lat.clone();
        lat.sort_by(f64::total_cmp);
        let _ = writeln!(
            w,
            "| {name} | {} | {:.1} ms | {:.1} ms |",
            lat.len(),
            1000.0 * percentile(&lat, 50.0),
            1000.0 * percentile(&lat, 99.0)
        );
    }
    let _ = writeln!(
        w,
        "| **all good requests** | {} | {:.1} ms | {:.1} ms |\n",
        all.len(),
        1000.0 * percentile(&all, 50.0),
        1000.0 * percentile(&all, 99.0)
    );
    let _ = writeln!(
        w,
        "- {} clients × {} requests in {load_seconds:.1} s: {good_n} good requests answered as alone ({:.1}/s), {bad_n} bad or abandoned ones ({}).",
        args.clients,
        args.requests,
        good_n as f64 / load_seconds,
        tally
            .bad
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        w,
        "- Generated {tokens:.0} tokens under load ({:.0} tokens/s); {:.2} sequences per decode step on average; {cancelled:.0} requests cancelled by vanishing clients.",
        tokens / load_seconds,
        batch_sum / batch_count
    );
    let _ = writeln!(
        w,
        "- Server memory (RSS): {rss_start:.0} MB after warm-up, {peak:.0} MB at peak, {rss_end:.0} MB at the end.",
    );
    let _ = writeln!(
        w,
        "- Failures: {}; the server exited cleanly on SIGTERM. Total run {:.1} s.",
        if tally.failures.is_empty() {
            "none".to_string()
        } else {
            tally.failures.len().to_string()
        },
        t_start.elapsed().as_secs_f64()
    );
    println!("{report}");
    for f in tally.failures.iter().take(20) {
        eprintln!("failure: {f}");
    }
    if let Some(path) = &args.benchmarks
        && tally.failures.is_empty()
    {
        write_benchmarks(path, &args, &report);
    }
    if !tally.failures.is_empty() {
        fail(&format!("{} failures", tally.failures.len()));
    }
}

use std::fmt::Write as _;

/// Puts the report between the load-test markers of the benchmarks file, inside the serve
/// section (created at the end if absent), leaving the rest of the section alone.
fn write_benchmarks(path: &PathBuf, args: &Args, report: &str) {
    let (begin, end) = ("<!-- serve:load:begin -->", "<!-- serve:load:end -->");
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let extra = if args.serve_args.is_empty() {
        String::new()
    } else {
        format!(" (server flags: `{}`)", args.serve_args.join(" "))
    };
    let section = format!(
        "{begin}\n#### Bounded load test: `{}`\n\nMeasured on {cpu}, {cores} cores, by `paligemma-loadtest --model {} --clients {} --requests {} --seed {}`{extra}: the server on loopback, the clients in the same machine; two in three requests good (the mix of `tools/loadtest.rs`: generate, caption, sampled answer, detect, two-image OCR, score, chat, streamed chat), the rest corrupt base64, non-images, a 6.25-megapixel image over the 4-megapixel limit, invalid JSON, oversize prompts and bodies, unknown endpoints and clients hanging up mid-headers, mid-stream or before the answer. Latency is the client's, request sent to answer read.\n\n{report}{end}",
        args.model, args.model, args.clients, args.requests, args.seed
    );
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let serve_end = "<!-- serve:end -->";
    let new = match (old.find(begin), old.find(end), old.find(serve_end)) {
        (Some(a), Some(b), _) if a < b => {
            format!("{}{section}{}", &old[..a], &old[b + end.len()..])
        }
        (_, _, Some(e)) => format!("{}{section}\n{}", &old[..e], &old[e..]),
        _ => format!(
            "{}\n\n<!-- serve:begin -->\n{section}\n{serve_end}\n",
            old.trim_end()
        ),
    };
    std::fs::write(path, new)
        .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", path.display())));
    eprintln!("wrote the report into {}", path.display());
}
