//! `paligemma serve` end to end, on the tiny pg1-56 model and loopback ports: every endpoint
//! answers what the command line prints for the same input; concurrent requests are batched
//! and answered as they are alone; bad input, full queues, timeouts and vanishing clients get
//! clear JSON errors and leave the server working; SIGTERM lets requests in flight finish; the
//! official `openai` Python client works unchanged (skipped when Python or the package is
//! missing); the bounded load test passes.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model_dir() -> String {
    root()
        .join("tests/fixtures/models/pg1-56")
        .display()
        .to_string()
}

fn image_path(name: &str) -> String {
    root()
        .join("tests/fixtures/models/pg1-56")
        .join(name)
        .display()
        .to_string()
}

fn vae_path() -> String {
    root()
        .join("tests/fixtures/segmentation/vae-oid-random.npz")
        .display()
        .to_string()
}

fn image_b64(name: &str) -> String {
    BASE64.encode(std::fs::read(image_path(name)).unwrap())
}

/// A `paligemma serve` process on a free loopback port, stopped with SIGTERM when dropped.
struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let model = model_dir();
        let mut child = Command::new(env!("CARGO_BIN_EXE_paligemma"))
            .args(["serve", "--model", &model, "--port", "0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        // Keeps reading, so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("paligemma serve: listening on http://") {
                    let _ = tx.send(addr.to_string());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the server did not start: {}", log.lock().unwrap()));
        Server { child, addr, log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn terminate(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, up to `limit`.
    fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn metric(&self, line_start: &str) -> f64 {
        let text = get(&self.url("/metrics")).1;
        let text = text.as_str().unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {line_start} in\n{text}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate();
            if self.wait(Duration::from_secs(20)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build()
}

/// Status and body (JSON, or a string when the body is not JSON).
fn answer(result: Result<ureq::Response, ureq::Error>) -> (u16, Value, Option<String>) {
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    let status = response.status();
    let retry_after = response.header("retry-after").map(str::to_string);
    let text = response.into_string().unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body, retry_after)
}

fn get(url: &str) -> (u16, Value) {
    let (s, b, _) = answer(agent().get(url).call());
    (s, b)
}

fn post(url: &str, body: &Value) -> (u16, Value) {
    let (s, b, _) = answer(
        agent()
            .post(url)
            .set("Content-Type", "application/json")
            .send_string(&body.to_string()),
    );
    (s, b)
}

fn post_raw(url: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
    let (s, b, _) = answer(
        agent()
            .post(url)
            .set("Content-Type", content_type)
            .send_bytes(body),
    );
    (s, b)
}

/// A multipart body: `(name, Some(filename), bytes)` for files, `(name, None, text)` else.
fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "----paligemma-test-boundary";
    let mut body = Vec::new();
    for (name, file, data) in parts {
        write!(
            body,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\""
        )
        .unwrap();
        if let Some(f) = file {
            write!(body, "; filename=\"{f}\"\r\nContent-Type: image/png").unwrap();
        }
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{boundary}--\r\n").unwrap();
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// The JSON line(s) the command line prints.
fn cli(args: &[&str]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_paligemma"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn cli_one(args: &[&str]) -> Value {
    let model = model_dir();
    let mut all = vec![args[0], "--model", &model];
    all.extend(&args[1..]);
    cli(&all).remove(0)
}

fn chat_body(prompt: &str, images: &[&str], extra: Value) -> Value {
    let mut content = vec![json!({ "type": "text", "text": prompt })];
    for i in images {
        content.push(json!({
            "type": "image_url",
            "image_url": { "url": format!("data:image/png;base64,{}", image_b64(i)) },
        }));
    }
    let mut body = json!({
        "model": model_dir(),
        "messages": [{ "role": "user", "content": content }],
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The data lines of a Server-Sent Events stream, read to the end.
fn sse(url: &str, body: &Value) -> Vec<String> {
    let response = agent()
        .post(url)
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response
            .header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    BufReader::new(response.into_reader())
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

#[test]
fn endpoints_answer_what_the_command_line_prints() {
    let vae = vae_path();
    let server = Server::start(&["--vae", &vae]);
    let (a, b) = (image_path("image_a.png"), image_path("image_b.png"));
    let (a64, b64) = (image_b64("image_a.png"), image_b64("image_b.png"));

    let (status, health) = get(&server.url("/health"));
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    let (status, models) = get(&server.url("/v1/models"));
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["id"], model_dir());

    // Task endpoints: the same JSON as `paligemma <task> --json`.
    let cases: Vec<(&str, Value, Vec<&str>)> = vec![
        (
            "/v1/caption",
            json!({ "image": a64, "max_new_tokens": 6 }),
            vec!["caption", &a, "--max-new-tokens", "6", "--json"],
        ),
        (
            "/v1/caption",
            json!({ "image": a64, "long": true, "lang": "fr", "max_tokens": 5 }),
            vec![
                "caption",
                &a,
                "--long",
                "--lang",
                "fr",
                "--max-new-tokens",
                "5",
                "--json",
            ],
        ),
        (
            "/v1/answer",
            json!({ "image": b64, "question": "what is it?", "max_new_tokens": 7 }),
            vec!["ask", &b, "what is it?", "--max-new-tokens", "7", "--json"],
        ),
        (
            "/v1/ocr",
            json!({ "images": [a64, b64], "max_new_tokens": 6, "temperature": 0.9, "top_k": 20, "seed": 5 }),
            vec![
                "ocr",
                &a,
                "--image",
                &b,
                "--max-new-tokens",
                "6",
                "--temperature",
                "0.9",
                "--top-k",
                "20",
                "--seed",
                "5",
                "--json",
            ],
        ),
        (
            "/v1/detect",
            json!({ "image": a64, "labels": ["cat", "dog"], "max_new_tokens": 8 }),
            vec![
                "detect",
                &a,
                "cat",
                "dog",
                "--max-new-tokens",
                "8",
                "--json",
            ],
        ),
        (
            "/v1/segment",
            json!({ "image": b64, "labels": ["shape"], "max_new_tokens": 8 }),
            vec![
                "segment",
                &b,
                "shape",
                "--vae",
                &vae,
                "--max-new-tokens",
                "8",
                "--json",
            ],
        ),
        (
            "/v1/generate",
            json!({ "image": a64, "prompt": "caption en", "max_new_tokens": 10, "temperature": 0.7, "top_p": 0.9, "seed": 3 }),
            vec![
                "generate",
                "--image",
                &a,
                "--prompt",
                "caption en",
                "--max-new-tokens",
                "10",
                "--temperature",
                "0.7",
                "--top-p",
                "0.9",
                "--seed",
                "3",
                "--json",
            ],
        ),
        (
            "/v1/generate",
            json!({ "image": a64, "prompt": "caption en", "max_new_tokens": 8, "num_beams": 3 }),
            vec![
                "generate",
                "--image",
                &a,
                "--prompt",
                "caption en",
                "--max-new-tokens",
                "8",
                "--num-beams",
                "3",
                "--json",
            ],
        ),
        (
            "/v1/score",
            json!({ "image": a64, "prompt": "caption en", "suffix": "a red circle" }),
            vec![
                "score",
                "--image",
                &a,
                "--prompt",
                "caption en",
                "--suffix",
                "a red circle",
                "--json",
            ],
        ),
    ];
    for (endpoint, body, args) in &cases {
        let (status, got) = post(&server.url(endpoint), body);
        assert_eq!(status, 200, "{endpoint}: {got}");
        assert_eq!(got, cli_one(args), "{endpoint} {body:.200}");
    }

    // Multipart: the same request as JSON.
    let png = std::fs::read(&a).unwrap();
    let (ct, form) = multipart(&[
        ("image", Some("a.png"), &png),
        ("labels", None, b"cat"),
        ("labels", None, b"dog"),
        ("max_new_tokens", None, b"8"),
    ]);
    let (status, got) = post_raw(&server.url("/v1/detect"), &ct, &form);
    assert_eq!(status, 200, "{got}");
    assert_eq!(got, post(&server.url(cases[4].0), &cases[4].1).1);

    // Chat completions: the text `generate` gives, whole or streamed.
    let want = cli_one(&[
        "generate",
        "--image",
        &a,
        "--prompt",
        "caption en",
        "--max-new-tokens",
        "12",
        "--json",
    ]);
    let body = chat_body("caption en", &["image_a.png"], json!({ "max_tokens": 12 }));
    let (status, chat) = post(&server.url("/v1/chat/completions"), &body);
    assert_eq!(status, 200, "{chat}");
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    assert_eq!(chat["choices"][0]["message"]["content"], want["text"]);
    let finish = if want["stopped_at_eos"].as_bool().unwrap() {
        "stop"
    } else {
        "length"
    };
    assert_eq!(chat["choices"][0]["finish_reason"], finish);
    assert_eq!(
        chat["usage"]["prompt_tokens"],
        16 + 4,
        "16 image tokens, <bos>, prompt, \\n"
    );
    assert_eq!(chat["usage"]["completion_tokens"], 12);

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({ "include_usage": true });
    let events = sse(&server.url("/v1/chat/completions"), &streamed);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, want["text"].as_str().unwrap());
    assert!(chunks.len() > 4, "the text comes in pieces");
    let finish_chunk = &chunks[chunks.len() - 2];
    assert_eq!(finish_chunk["choices"][0]["finish_reason"], finish);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 12);

    // Sampling settings reach the sampler: the same draw as the command line.
    let sampled = cli_one(&[
        "generate",
        "--image",
        &b,
        "--prompt",
        "ocr",
        "--max-new-tokens",
        "9",
        "--temperature",
        "1.3",
        "--top-p",
        "0.95",
        "--seed",
        "11",
        "--json",
    ]);
    let body = chat_body(
        "ocr",
        &["image_b.png"],
        json!({ "max_completion_tokens": 9, "temperature": 1.3, "top_p": 0.95, "seed": 11 }),
    );
    let (_, chat) = post(&server.url("/v1/chat/completions"), &body);
    assert_eq!(chat["choices"][0]["message"]["content"], sampled["text"]);

    // Metrics count what was served.
    let requests =
        server.metric("paligemma_requests_total{endpoint=\"/v1/detect\",status=\"200\"}");
    assert_eq!(requests, 3.0);
    assert!(server.metric("paligemma_generated_tokens_total") > 50.0);
    assert!(server.metric("paligemma_image_feature_cache_hits_total") >= 1.0);
    let (_, metrics) = get(&server.url("/metrics"));
    let metrics = metrics.as_str().unwrap().to_string();
    for series in [
        "paligemma_request_duration_seconds_bucket{endpoint=\"/v1/caption\",le=\"0.5\"}",
        "paligemma_time_to_first_token_seconds_count",
        "paligemma_tokens_per_second",
        "paligemma_queue_depth 0",
    ] {
        assert!(metrics.contains(series), "{series} in\n{metrics}");
    }
}

#[test]
fn masks_are_the_ones_parse_prints() {
    let codes: String = (0..16).map(|i| format!("<seg{:03}>", i * 8)).collect();
    let text = format!(
        "<loc0100><loc0200><loc0800><loc0900>{codes} cat ; <loc0500><loc0000><loc1023><loc0300>{codes} dog ; <loc0001>"
    );
    let vae = vae_path();
    let want = cli(&[
        "parse", "--task", "segment", "--text", &text, "--width", "640", "--height", "480",
        "--vae", &vae, "--json",
    ])
    .remove(0);
    let decoder = Arc::new(paligemma::vqvae::VqVaeDecoder::load(&vae).unwrap());
    let got = paligemma::serve::tasks::located(
        paligemma::serve::tasks::Locate::Segment,
        &text,
        (640, 480),
        || Ok(decoder),
    )
    .unwrap();
    assert!(got["objects"][0]["mask"]["counts"].is_string());
    assert!(got["objects"][1]["mask"]["counts"].is_string());
    assert_eq!(
        got["warnings"].as_array().unwrap().len(),
        1,
        "the cut-off third object"
    );
    assert_eq!(got, want);
}

fn error_of(status_body: (u16, Value)) -> (u16, String, String) {
    let (status, body) = status_body;
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no JSON error in {body}"))
        .to_string();
    assert!(!message.is_empty());
    (
        status,
        body["error"]["code"].as_str().unwrap().to_string(),
        message,
    )
}

/// Endpoint, body, content type, and the status, error code and words the answer must have.
type BadCase<'a> = (&'a str, Vec<u8>, &'a str, u16, &'a str, &'a str);

#[test]
fn bad_requests_get_clear_json_errors() {
    let server = Server::start(&[
        "--api-key",
        "sesame",
        "--max-body-mb",
        "1",
        "--max-image-pixels",
        "10000",
        "--max-prompt-tokens",
        "12",
        "--max-new-tokens",
        "32",
    ]);
    let a64 = image_b64("image_a.png");
    let call = |path: &str, key: Option<&str>, ct: &str, body: &[u8]| {
        // An oversize body is refused from its Content-Length while the client may still be
        // writing it; the client then sees a broken pipe instead of the 413 that was sent.
        // That race is the client's, so such attempts are repeated.
        for _ in 0..10 {
            let mut req = agent().post(&server.url(path)).set("Content-Type", ct);
            if let Some(k) = key {
                req = req.set("Authorization", &format!("Bearer {k}"));
            }
            match req.send_bytes(body) {
                Err(ureq::Error::Transport(t)) if body.len() > 1 << 20 => {
                    eprintln!("retrying an oversize request after: {t}");
                }
                result => {
                    let (s, b, _) = answer(result);
                    return (s, b);
                }
            }
        }
        panic!("{path}: the oversize request never got an answer");
    };
    let json_call = |path: &str, body: &Value| {
        call(
            path,
            Some("sesame"),
            "application/json",
            body.to_string().as_bytes(),
        )
    };
    let good = json!({ "image": a64, "max_new_tokens": 4 });

    // The key guards everything but /health.
    assert_eq!(get(&server.url("/health")).0, 200);
    let (status, code, _) = error_of(get(&server.url("/v1/models")));
    assert_eq!((status, code.as_str()), (401, "unauthorized"));
    let caption = good.to_string();
    let (status, code, _) = error_of(call(
        "/v1/caption",
        Some("wrong"),
        "application/json",
        caption.as_bytes(),
    ));
    assert_eq!((status, code.as_str()), (401, "unauthorized"));
    assert_eq!(json_call("/v1/caption", &good).0, 200);

    // A 1000×1000 picture: a valid PNG of a million pixels in a few kilobytes.
    let mut huge = Vec::new();
    image::DynamicImage::ImageRgb8(image::RgbImage::new(1000, 1000))
        .write_to(
            &mut std::io::Cursor::new(&mut huge),
            image::ImageFormat::Png,
        )
        .unwrap();
    let long_prompt = "many words ".repeat(20);
    let png = std::fs::read(image_path("image_a.png")).unwrap();
    let cases: Vec<BadCase> = vec![
        ("/v1/caption", b"{\"image\": ".to_vec(), "application/json", 400, "invalid_json", "not valid JSON"),
        ("/v1/caption", json!({ "image": "%%%not base64%%%" }).to_string().into_bytes(), "application/json", 400, "invalid_image", "base64"),
        ("/v1/caption", json!({ "image": BASE64.encode(&png[..png.len() / 2]) }).to_string().into_bytes(), "application/json", 400, "invalid_image", "corrupt or truncated"),
        ("/v1/caption", json!({ "image": BASE64.encode(b"hello, world") }).to_string().into_bytes(), "application/json", 400, "invalid_image", "not a recognised image"),
        ("/v1/caption", json!({ "image": BASE64.encode(&huge) }).to_string().into_bytes(), "application/json", 413, "image_too_large", "1000000 pixels"),
        ("/v1/caption", vec![b' '; 1_100_000], "application/json", 413, "body_too_large", "--max-body-mb"),
        ("/v1/caption", json!({ "max_new_tokens": 4 }).to_string().into_bytes(), "application/json", 400, "missing_image", "at least one"),
        ("/v1/caption", json!({ "image": a64, "max_new_tokens": 33 }).to_string().into_bytes(), "application/json", 400, "too_many_tokens", "at most 32"),
        ("/v1/caption", json!({ "image": a64, "lang": "xx" }).to_string().into_bytes(), "application/json", 400, "invalid_parameter", "unknown language"),
        ("/v1/caption", json!({ "image": a64, "colour": "red" }).to_string().into_bytes(), "application/json", 400, "invalid_json", "unknown field `colour`"),
        ("/v1/caption", json!({ "image": a64, "top_p": 1.5 }).to_string().into_bytes(), "application/json", 400, "invalid_parameter", "top_p"),
        ("/v1/caption", b"image=abc".to_vec(), "text/plain", 415, "unsupported_media_type", "application/json"),
        ("/v1/answer", json!({ "image": a64, "question": long_prompt }).to_string().into_bytes(), "application/json", 400, "prompt_too_long", "at most 12"),
        ("/v1/answer", json!({ "image": a64 }).to_string().into_bytes(), "application/json", 400, "missing_field", "question"),
        ("/v1/detect", json!({ "image": a64, "labels": ["a;b"] }).to_string().into_bytes(), "application/json", 400, "invalid_parameter", "';'"),
        ("/v1/detect", json!({ "images": [a64, a64], "labels": ["cat"] }).to_string().into_bytes(), "application/json", 400, "one_image", "exactly one"),
        ("/v1/generate", json!({ "image": a64, "prompt": "<image> hi" }).to_string().into_bytes(), "application/json", 400, "invalid_prompt", "<image>"),
        ("/v1/score", json!({ "image": a64, "prompt": "caption en", "suffix": "x", "seed": 1 }).to_string().into_bytes(), "application/json", 400, "unknown_field", "does not take \"seed\""),
        ("/v1/caption", b"--x\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc".to_vec(), "multipart/form-data; boundary=x", 400, "invalid_multipart", ""),
        ("/v1/chat/completions", chat_body("caption en", &["image_a.png"], json!({ "model": "gpt-4o" })).to_string().into_bytes(), "application/json", 404, "model_not_found", "gpt-4o"),
        ("/v1/chat/completions", json!({ "messages": [{ "role": "user", "content": "hi" }] }).to_string().into_bytes(), "application/json", 400, "invalid_request", "needs an image"),
        ("/v1/chat/completions", json!({ "messages": [{ "role": "system", "content": "be nice" }, { "role": "user", "content": [] }] }).to_string().into_bytes(), "application/json", 400, "invalid_request", "exactly one message"),
        ("/v1/chat/completions", json!({ "messages": [{ "role": "user", "content": [{ "type": "image_url", "image_url": { "url": "https://example.com/cat.png" } }] }] }).to_string().into_bytes(), "application/json", 400, "invalid_image", "not fetched"),
        ("/v1/chat/completions", json!({ "messages": [] , "n": 2 }).to_string().into_bytes(), "application/json", 400, "invalid_request", "n must be 1"),
    ];
    for (path, body, ct, want_status, want_code, want_text) in cases {
        let (status, code, message) = error_of(call(path, Some("sesame"), ct, &body));
        assert_eq!(
            (status, code.as_str()),
            (want_status, want_code),
            "{path} {:.80}: {message}",
            String::from_utf8_lossy(&body)
        );
        assert!(
            message.contains(want_text),
            "{message:?} should mention {want_text:?}"
        );
    }
    let authed = |path: &str| {
        let (s, b, _) = answer(
            agent()
                .get(&server.url(path))
                .set("Authorization", "Bearer sesame")
                .call(),
        );
        (s, b)
    };
    let (status, code, _) = error_of(authed("/v1/nothing-here"));
    assert_eq!((status, code.as_str()), (404, "not_found"));
    let (status, code, message) = error_of(authed("/v1/caption"));
    assert_eq!((status, code.as_str()), (405, "method_not_allowed"));
    assert!(message.contains("POST"));

    // Nothing above hurt the server.
    assert_eq!(json_call("/v1/caption", &good).0, 200);
}

/// Distinct requests: prompts, images, lengths and sampling all differ, several long enough to
/// overlap with the others.
fn mixed_requests() -> Vec<Value> {
    let images = ["image_a.png", "image_b.png"];
    let prompts = [
        "caption en",
        "ocr",
        "answer en what colour is the square?",
        "detect circle ; star",
    ];
    (0..8)
        .map(|i| {
            let max_new_tokens = [300, 40, 200, 12][i % 4] + i;
            let mut body = json!({
                "image": image_b64(images[i % 2]),
                "prompt": prompts[i % 4],
                "max_new_tokens": max_new_tokens,
            });
            if i % 3 == 1 {
                body["temperature"] = json!(0.8);
                body["top_p"] = json!(0.9);
                body["seed"] = json!(i);
            }
            if i == 5 {
                body["images"] = json!([image_b64("image_b.png")]);
            }
            body
        })
        .collect()
}

fn same_generation(got: &Value, want: &Value, what: &str) {
    assert_eq!(got["tokens"], want["tokens"], "{what}: tokens");
    assert_eq!(got["text"], want["text"], "{what}: text");
    assert_eq!(got["stopped_at_eos"], want["stopped_at_eos"], "{what}");
    let (g, w) = (
        got["logprobs"].as_array().unwrap(),
        want["logprobs"].as_array().unwrap(),
    );
    assert_eq!(g.len(), w.len(), "{what}");
    for (x, y) in g.iter().zip(w) {
        let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
        // Padding in a shared batch moves rounding by a few ulps only.
        assert!(
            (x - y).abs() < 1e-4,
            "{what}: log-prob {x} in a batch vs {y} alone"
        );
    }
}

#[test]
fn concurrent_requests_are_batched_and_answered_as_alone() {
    let server = Server::start(&["--max-batch", "6"]);
    let url = server.url("/v1/generate");
    let requests = mixed_requests();
    // Alone, one after another: each is also what the command line prints.
    let alone: Vec<Value> = requests.iter().map(|r| post(&url, r).1).collect();
    let first = &requests[0];
    let want = cli_one(&[
        "generate",
        "--image",
        &image_path("image_a.png"),
        "--prompt",
        first["prompt"].as_str().unwrap(),
        "--max-new-tokens",
        &first["max_new_tokens"].to_string(),
        "--json",
    ]);
    assert_eq!(alone[0], want);
    let steps_before = server.metric("paligemma_batch_rows_count");
    let single_before = server.metric("paligemma_batch_rows_bucket{le=\"1\"}");

    // All at once, three rounds, from as many threads.
    let threads: Vec<_> = (0..requests.len() * 3)
        .map(|k| {
            let (url, body) = (url.clone(), requests[k % requests.len()].clone());
            std::thread::spawn(move || post(&url, &body))
        })
        .collect();
    for (k, t) in threads.into_iter().enumerate() {
        let (status, got) = t.join().unwrap();
        assert_eq!(status, 200, "{got}");
        same_generation(&got, &alone[k % requests.len()], &format!("request {k}"));
    }
    let steps = server.metric("paligemma_batch_rows_count") - steps_before;
    let single = server.metric("paligemma_batch_rows_bucket{le=\"1\"}") - single_before;
    assert!(
        single < steps,
        "some decode steps ran several requests ({single} of {steps} ran one)"
    );
    assert!(server.metric("paligemma_image_feature_cache_hits_total") > 0.0);
}

/// Reads until `needle` shows up (or the peer closes), returning what was read.
fn read_until(stream: &mut TcpStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

fn raw_post(addr: &str, path: &str, body: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "timed out waiting: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn vanishing_clients_full_queues_and_timeouts() {
    let server = Server::start(&[
        "--max-batch",
        "1",
        "--queue-size",
        "1",
        "--max-new-tokens",
        "4000",
    ]);
    let long = json!({ "image": image_b64("image_a.png"), "prompt": "caption en", "max_new_tokens": 4000 });

    // A client that leaves mid-stream, and one that leaves while waiting for a whole answer:
    // both are dropped from the batch.
    let mut stream_body = chat_body(
        "caption en",
        &["image_a.png"],
        json!({ "max_tokens": 4000, "stream": true }),
    );
    stream_body["model"] = json!(model_dir());
    let mut s = raw_post(
        &server.addr,
        "/v1/chat/completions",
        &stream_body.to_string(),
    );
    assert!(read_until(&mut s, "\"content\":\"A\"").contains("200 OK"));
    drop(s);
    wait_for("the stream's row is dropped", || {
        server.metric("paligemma_requests_cancelled_total") >= 1.0
    });
    let s = raw_post(&server.addr, "/v1/generate", &long.to_string());
    wait_for("the request is decoding", || {
        server.metric("paligemma_batch_active_rows") >= 1.0
    });
    drop(s);
    wait_for("the waiting client's row is dropped", || {
        server.metric("paligemma_requests_cancelled_total") >= 2.0
            && server.metric("paligemma_batch_active_rows") == 0.0
    });
    // Half a request, then gone.
    let mut s = TcpStream::connect(&server.addr).unwrap();
    write!(s, "POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{{\"image\": \"iVBO").unwrap();
    drop(s);

    // One decoding, one waiting: the rest are turned away with Retry-After.
    let url = server.url("/v1/generate");
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (url, body) = (url.clone(), long.to_string());
            std::thread::spawn(move || {
                answer(
                    agent()
                        .post(&url)
                        .set("Content-Type", "application/json")
                        .send_string(&body),
                )
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok: Vec<&Value> = results
        .iter()
        .filter(|r| r.0 == 200)
        .map(|r| &r.1)
        .collect();
    let busy: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    assert!(
        !ok.is_empty() && !busy.is_empty(),
        "{:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    assert_eq!(ok.len() + busy.len(), 8);
    assert!(ok.iter().all(|r| r["tokens"] == ok[0]["tokens"]));
    for (_, body, retry_after) in busy {
        assert_eq!(body["error"]["code"], "overloaded");
        assert_eq!(retry_after.as_deref(), Some("1"));
    }
    assert!(server.metric("paligemma_requests_rejected_total") >= 1.0);

    // Too slow for the limit: 504, and the work is dropped.
    drop(server);
    let server = Server::start(&["--timeout", "0.05", "--max-new-tokens", "8000"]);
    let mut slow = long.clone();
    slow["max_new_tokens"] = json!(8000);
    let (status, code, message) = error_of(post(&server.url("/v1/generate"), &slow));
    assert_eq!((status, code.as_str()), (504, "timeout"), "{message}");
    wait_for("the timed-out row is dropped", || {
        server.metric("paligemma_batch_active_rows") == 0.0
    });
    let (status, _) = post(
        &server.url("/v1/caption"),
        &json!({ "image": image_b64("image_b.png"), "max_new_tokens": 2 }),
    );
    assert_eq!(status, 200);
}

#[test]
fn sigterm_lets_requests_in_flight_finish() {
    let mut server = Server::start(&["--max-batch", "2", "--max-new-tokens", "1500"]);
    let url = server.url("/v1/generate");
    let body =
        json!({ "image": image_b64("image_b.png"), "prompt": "ocr", "max_new_tokens": 1500 });
    let alone = post(&url, &body).1;
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            std::thread::spawn(move || post(&url, &body))
        })
        .collect();
    wait_for("requests are decoding", || {
        server.metric("paligemma_batch_active_rows") >= 1.0
    });
    server.terminate();
    for t in threads {
        let (status, got) = t.join().unwrap();
        assert_eq!(status, 200, "{got}");
        same_generation(&got, &alone, "in flight at SIGTERM");
    }
    let status = server
        .wait(Duration::from_secs(30))
        .expect("the server exits after finishing");
    assert!(
        status.success(),
        "{status:?}: {}",
        server.log.lock().unwrap()
    );
    assert!(
        server
            .log
            .lock()
            .unwrap()
            .contains("paligemma serve: stopped")
    );
    assert!(
        TcpStream::connect(&server.addr).is_err(),
        "no longer listening"
    );
}

/// A Python interpreter with the `openai` package: $PALIGEMMA_PYTHON, the tools' venv, or
/// python3.
fn python_with_openai() -> Option<String> {
    let candidates = [
        std::env::var("PALIGEMMA_PYTHON").ok(),
        Some(root().join("venv/bin/python").display().to_string()),
        Some(root().join("../venv/bin/python").display().to_string()),
        Some("python3".to_string()),
    ];
    candidates.into_iter().flatten().find(|py| {
        Command::new(py)
            .args(["-c", "import openai"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

const OPENAI_CLIENT: &str = r#"
import base64, json, sys
from openai import OpenAI

base_url, model, image, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = OpenAI(base_url=base_url, api_key="sesame")
url = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
messages = [{"role": "user", "content": [
    {"type": "text", "text": "caption en"},
    {"type": "image_url", "image_url": {"url": url}},
]}]
whole = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
pieces = []
finish = None
for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True):
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        finish = choice.finish_reason or finish
try:
    client.chat.completions.create(model="not-this-one", messages=messages)
    error = None
except Exception as e:
    error = type(e).__name__ + ": " + str(e)
print(json.dumps({
    "models": [m.id for m in client.models.list()],
    "text": whole.choices[0].message.content,
    "finish_reason": whole.choices[0].finish_reason,
    "usage": whole.usage.completion_tokens,
    "streamed": "".join(pieces),
    "stream_finish_reason": finish,
    "error": error,
}))
"#;

#[test]
fn the_openai_python_client_works_unchanged() {
    let Some(python) = python_with_openai() else {
        println!(
            "note: skipped: no Python with the `openai` package (set PALIGEMMA_PYTHON, or pip install openai)"
        );
        return;
    };
    let server = Server::start(&["--api-key", "sesame"]);
    let image = image_path("image_a.png");
    let want = cli_one(&[
        "generate",
        "--image",
        &image,
        "--prompt",
        "caption en",
        "--max-new-tokens",
        "10",
        "--json",
    ]);
    let out = Command::new(&python)
        .args([
            "-c",
            OPENAI_CLIENT,
            &server.url("/v1"),
            &model_dir(),
            &image,
            "10",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["models"], json!([model_dir()]));
    assert_eq!(got["text"], want["text"]);
    assert_eq!(got["streamed"], want["text"]);
    assert_eq!(got["finish_reason"], "length");
    assert_eq!(got["stream_finish_reason"], "length");
    assert_eq!(got["usage"], 10);
    let error = got["error"].as_str().unwrap();
    assert!(
        error.starts_with("NotFoundError") && error.contains("not-this-one"),
        "{error}"
    );
}

#[test]
fn the_bounded_load_test_passes() {
    // A small run of `tools/loadtest.rs`: it fails on any wrong answer, unexpected status,
    // runaway memory, or a server that dies or does not stop cleanly.
    let out = Command::new(env!("CARGO_BIN_EXE_paligemma-loadtest"))
        .args([
            "--server",
            env!("CARGO_BIN_EXE_paligemma"),
            "--model",
            &model_dir(),
        ])
        .args([
            "--clients",
            "4",
            "--requests",
            "25",
            "--seed",
            "3",
            "--max-seconds",
            "300",
        ])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("Failures: none"), "{report}");
}
