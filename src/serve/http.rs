//! Routes and handlers: the task endpoints, health, models and metrics; authentication, the
//! bound on requests in flight, and request metrics wrap them all.

use super::engine::{Engine, Event, Generation, Work};
use super::error::{ApiError, describe};
use super::input::{self, ImageInput, Pixels, TaskBody, TaskRequest};
use super::metrics::Metrics;
use super::tasks::{Locate, located};
use super::{Limits, Options, Served};
use crate::generate::Generated;
use crate::task::Task;
use crate::vqvae::VqVaeDecoder;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tokio::sync::{OnceCell, Semaphore, mpsc::UnboundedReceiver};
use tokio::time::Instant as Deadline;

/// Everything the handlers share.
pub struct App {
    pub served: Arc<Served>,
    pub engine: Engine,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    api_key: Option<String>,
    vae_path: Option<PathBuf>,
    vae: OnceCell<Arc<VqVaeDecoder>>,
    /// Image decoding is memory-hungry: only this many at once.
    decoding: Semaphore,
    /// Requests past authentication and not yet answered; beyond it, 503 before reading the
    /// body, so memory stays bounded whatever the number of clients.
    admitted: Arc<Semaphore>,
    /// Unix time of start-up (`created` of the model listing).
    pub created: u64,
}

impl App {
    pub fn new(served: Served, options: &Options) -> Arc<Self> {
        let served = Arc::new(served);
        let metrics = Arc::new(Metrics::default());
        let engine = Engine::start(served.clone(), options.engine(), metrics.clone());
        let limits = options.limits.clone();
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Arc::new(Self {
            served,
            engine,
            metrics,
            admitted: Arc::new(Semaphore::new(limits.queue_size + limits.max_batch + cores)),
            decoding: Semaphore::new(cores),
            limits,
            api_key: options.api_key.clone(),
            vae_path: options.vae.clone(),
            vae: OnceCell::new(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        })
    }

    /// Decodes images and builds the prompt's ids off the async threads.
    pub async fn prepare(
        self: &Arc<Self>,
        images: Vec<ImageInput>,
        prompt: String,
        max_new_tokens: usize,
    ) -> Result<(Pixels, Vec<u32>), ApiError> {
        let _slot = self
            .decoding
            .acquire()
            .await
            .map_err(|_| ApiError::internal("shutting down"))?;
        let app = self.clone();
        tokio::task::spawn_blocking(move || {
            let pixels = input::pixels(&app.served, &images, &app.limits)?;
            let ids = input::prefix_ids(
                &app.served,
                &prompt,
                pixels.sizes.len(),
                max_new_tokens,
                &app.limits,
            )?;
            Ok((pixels, ids))
        })
        .await
        .map_err(|e| ApiError::internal(format!("input preparation failed: {e}")))?
    }

    pub fn deadline(&self) -> Deadline {
        Deadline::now() + self.limits.timeout
    }

    async fn mask_decoder(&self) -> anyhow::Result<Arc<VqVaeDecoder>> {
        let path = self.vae_path.clone();
        self.vae
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || {
                    let path = match path {
                        Some(p) => p,
                        None => crate::hub::download_vae()?,
                    };
                    Ok(Arc::new(VqVaeDecoder::load(&path)?))
                })
                .await?
            })
            .await
            .cloned()
    }
}

/// Waits for a request's final event, within its deadline.
pub async fn outcome(
    app: &App,
    mut events: UnboundedReceiver<Event>,
    deadline: Deadline,
) -> Result<Event, ApiError> {
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => return Err(ApiError::timeout(app.limits.timeout.as_secs_f64())),
            Ok(None) => return Err(ApiError::internal("the scheduler stopped")),
            Ok(Some(Event::Text(_))) => continue,
            Ok(Some(Event::Failed(e))) => return Err(e),
            Ok(Some(event)) => return Ok(event),
        }
    }
}

pub fn router(app: Arc<App>) -> Router {
    let body_limit = app.limits.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(super::openai::chat))
        .route("/v1/generate", post(generate))
        .route("/v1/caption", post(caption))
        .route("/v1/answer", post(answer))
        .route("/v1/ocr", post(ocr))
        .route("/v1/detect", post(detect))
        .route("/v1/segment", post(segment))
        .route("/v1/score", post(score))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(app.clone(), gatekeeper))
        .with_state(app)
}

const ENDPOINTS: [&str; 11] = [
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/generate",
    "/v1/caption",
    "/v1/answer",
    "/v1/ocr",
    "/v1/detect",
    "/v1/segment",
    "/v1/score",
];

/// Counts a request while it is handled, even if the client leaves and the handler is dropped.
struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Authentication, the bound on requests in flight, and request metrics.
async fn gatekeeper(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let path = req.uri().path();
    let endpoint = ENDPOINTS
        .iter()
        .copied()
        .find(|e| *e == path)
        .unwrap_or("other");
    let response = match admit(&app, &req, endpoint) {
        Err(e) => {
            discard_body(req, app.limits.max_body_bytes).await;
            e.into_response()
        }
        Ok(permit) => {
            app.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
            let _counted = InFlight(&app.metrics);
            let response = next.run(req).await;
            drop(permit);
            response
        }
    };
    app.metrics.request(
        endpoint,
        response.status().as_u16(),
        t0.elapsed().as_secs_f64(),
    );
    response
}

/// Reads and drops what the client is still sending of a refused request (up to `limit` bytes,
/// for at most a second). Answering from the headers alone would close the connection under a
/// client still writing its body, which then reports a broken pipe instead of the refusal.
async fn discard_body(req: Request, limit: usize) {
    let mut data = req.into_body().into_data_stream();
    let mut read = 0;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        while let Some(Ok(chunk)) = data.next().await {
            read += chunk.len();
            if read > limit {
                break;
            }
        }
    })
    .await;
}

fn admit(
    app: &App,
    req: &Request,
    endpoint: &str,
) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, ApiError> {
    if endpoint == "/health" {
        return Ok(None);
    }
    if let Some(key) = &app.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same_secret(given.as_bytes(), key.as_bytes()) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong API key: send the header \"Authorization: Bearer <key>\"",
            ));
        }
    }
    if req.method() != Method::POST {
        return Ok(None);
    }
    match app.admitted.clone().try_acquire_owned() {
        Ok(permit) => Ok(Some(permit)),
        Err(_) => {
            app.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            Err(ApiError::overloaded(
                "the server is handling as many requests as it accepts; retry later",
            ))
        }
    }
}

/// Compares without stopping at the first difference, so timing does not reveal the key.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no endpoint {method} {}; the endpoints are {}",
            uri.path(),
            ENDPOINTS.join(", ")
        ),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    let allowed = if ["/health", "/metrics", "/v1/models"].contains(&uri.path()) {
        "GET"
    } else {
        "POST"
    };
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} takes {allowed}, not {method}", uri.path()),
    )
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let m = &app.metrics;
    axum::Json(json!({
        "status": "ok",
        "model": app.served.name,
        "queue_depth": m.queue_depth.load(Ordering::Relaxed),
        "active_sequences": m.active_rows.load(Ordering::Relaxed),
    }))
    .into_response()
}

async fn models(State(app): State<Arc<App>>) -> Response {
    let cfg = &app.served.model.config;
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": app.served.name,
            "object": "model",
            "created": app.created,
            "owned_by": "paligemma",
            "image_size": cfg.vision.image_size,
            "max_model_len": cfg.text.max_position_embeddings,
        }],
    }))
    .into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

/// Runs one prompt about the request's images to the end.
async fn run_prompt(
    app: &Arc<App>,
    req: &TaskRequest,
    prompt: String,
) -> Result<(Generated, String, Pixels), ApiError> {
    let deadline = app.deadline();
    let (max_new_tokens, strategy) = input::decoding(&req.decode(), &app.limits)?;
    let work = async {
        let (pixels, ids) = app.prepare(req.images(), prompt, max_new_tokens).await?;
        let events = app.engine.submit(Work::Generate(Generation {
            ids,
            pixels: pixels.tensor.clone(),
            key: pixels.key,
            max_new_tokens,
            strategy,
            stream: false,
        }))?;
        match outcome(app, events, deadline).await? {
            Event::Generated { result, text, .. } => Ok((result, text, pixels)),
            other => Err(ApiError::internal(format!("unexpected answer {other:?}"))),
        }
    };
    tokio::time::timeout_at(deadline, work)
        .await
        .map_err(|_| ApiError::timeout(app.limits.timeout.as_secs_f64()))?
}

fn task_prompt(task: Task) -> Result<String, ApiError> {
    task.prompt()
        .map_err(|e| ApiError::bad_request("invalid_parameter", describe(&e)))
}

fn required<'a, T>(value: &'a Option<T>, name: &str, example: &str) -> Result<&'a T, ApiError> {
    value.as_ref().ok_or_else(|| {
        ApiError::bad_request(
            "missing_field",
            format!("{name:?} is required (e.g. {example})"),
        )
    })
}

async fn generate(
    State(app): State<Arc<App>>,
    TaskBody(req): TaskBody,
) -> Result<Response, ApiError> {
    req.only("/v1/generate", &["prompt"], true)?;
    let prompt = required(&req.prompt, "prompt", "\"caption en\"")?.clone();
    let (out, text, _) = run_prompt(&app, &req, prompt.clone()).await?;
    Ok(axum::Json(json!({
        "prompt": prompt,
        "text": text,
        "tokens": out.tokens,
        "logprobs": out.logprobs,
        "stopped_at_eos": out.stopped_at_eos,
    }))
    .into_response())
}

/// Caption, answer and OCR: text out, as `paligemma caption --json`.
async fn text_task(
    app: Arc<App>,
    req: TaskRequest,
    name: &str,
    task: Task,
) -> Result<Response, ApiError> {
    let prompt = task_prompt(task)?;
    let (out, text, _) = run_prompt(&app, &req, prompt.clone()).await?;
    Ok(
        axum::Json(json!({ "task": name, "prompt": prompt, "text": text, "tokens": out.tokens }))
            .into_response(),
    )
}

async fn caption(
    State(app): State<Arc<App>>,
    TaskBody(req): TaskBody,
) -> Result<Response, ApiError> {
    req.only("/v1/caption", &["lang", "long"], true)?;
    let long = req.long.unwrap_or(false);
    let task = Task::Caption {
        lang: req.lang.clone().unwrap_or_else(|| "en".into()),
        long,
    };
    let name = if long { "describe" } else { "caption" };
    text_task(app, req, name, task).await
}

async fn answer(
    State(app): State<Arc<App>>,
    TaskBody(req): TaskBody,
) -> Result<Response, ApiError> {
    req.only("/v1/answer", &["question", "lang"], true)?;
    let task = Task::Answer {
        lang: req.lang.clone().unwrap_or_else(|| "en".into()),
        question: required(&req.question, "question", "\"what is this?\"")?.clone(),
    };
    text_task(app, req, "answer", task).await
}

async fn ocr(State(app): State<Arc<App>>, TaskBody(req): TaskBody) -> Result<Response, ApiError> {
    req.only("/v1/ocr", &[], true)?;
    text_task(app, req, "ocr", Task::Ocr).await
}

async fn detect(
    State(app): State<Arc<App>>,
    TaskBody(req): TaskBody,
) -> Result<Response, ApiError> {
    locate(app, req, Locate::Detect).await
}

async fn segment(
    State(app): State<Arc<App>>,
    TaskBody(req): TaskBody,
) -> Result<Response, ApiError> {
    locate(app, req, Locate::Segment).await
}

/// Detection and segmentation: boxes (and masks) in the image's pixels, as
/// `paligemma detect --json`.
async fn locate(app: Arc<App>, req: TaskRequest, kind: Locate) -> Result<Response, ApiError> {
    let endpoint = format!("/v1/{}", kind.name());
    req.only(&endpoint, &["labels"], true)?;
    if req.images().len() != 1 {
        return Err(ApiError::bad_request(
            "one_image",
            format!("{endpoint} takes exactly one image (\"image\")"),
        ));
    }
    let labels = required(&req.labels, "labels", "[\"cat\", \"red car\"]")?.clone();
    let task = match kind {
        Locate::Detect => Task::Detect { labels },
        Locate::Segment => Task::Segment { labels },
    };
    let prompt = task_prompt(task)?;
    let (out, text, pixels) = run_prompt(&app, &req, prompt.clone()).await?;
    let size = pixels.sizes[0];
    let vae = if kind == Locate::Segment && text.contains("<seg") {
        Some(app.mask_decoder().await.map_err(|e| {
            ApiError::internal(format!("cannot load the mask decoder: {}", describe(&e)))
        })?)
    } else {
        None
    };
    let mut found = tokio::task::spawn_blocking(move || {
        located(kind, &text, size, || {
            vae.ok_or_else(|| anyhow::anyhow!("mask decoder not loaded"))
        })
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::internal(format!("cannot decode the masks: {}", describe(&e))))?;
    found["prompt"] = json!(prompt);
    found["tokens"] = json!(out.tokens);
    Ok(axum::Json(found).into_response())
}

async fn score(State(app): State<Arc<App>>, TaskBody(req): TaskBody) -> Result<Response, ApiError> {
    req.only("/v1/score", &["prompt", "suffix"], false)?;
    let prompt = required(&req.prompt, "prompt", "\"caption en\"")?.clone();
    let suffix = required(&req.suffix, "suffix", "\"a red circle\"")?.clone();
    let deadline = app.deadline();
    let work = async {
        let (pixels, _) = app.prepare(req.images(), prompt.clone(), 0).await?;
        let served = &app.served;
        let n_images = pixels.sizes.len();
        let seq = crate::prompt::with_suffix(
            &served.tokenizer,
            &served.model.config,
            &prompt,
            n_images,
            &suffix,
        )
        .map_err(|e| ApiError::bad_request("invalid_prompt", describe(&e)))?;
        let prefix_text = seq.prefix_len - n_images * served.model.config.image_seq_length() - 1;
        let suffix_tokens = seq.ids.len() - seq.prefix_len;
        if prefix_text + suffix_tokens > app.limits.max_prompt_tokens {
            return Err(ApiError::bad_request(
                "prompt_too_long",
                format!(
                    "prompt and suffix are {} tokens; the server takes at most {} (see --max-prompt-tokens)",
                    prefix_text + suffix_tokens,
                    app.limits.max_prompt_tokens
                ),
            ));
        }
        crate::prompt::check_length(&served.model.config, seq.ids.len(), 0)
            .map_err(|e| ApiError::bad_request("prompt_too_long", describe(&e)))?;
        let events = app.engine.submit(Work::Score {
            seq: seq.clone(),
            pixels: pixels.tensor,
        })?;
        match outcome(&app, events, deadline).await? {
            Event::Scored(logprobs) => Ok((seq, logprobs)),
            other => Err(ApiError::internal(format!("unexpected answer {other:?}"))),
        }
    };
    let (seq, logprobs) = tokio::time::timeout_at(deadline, work)
        .await
        .map_err(|_| ApiError::timeout(app.limits.timeout.as_secs_f64()))??;
    let total: f64 = logprobs.iter().map(|&v| v as f64).sum();
    Ok(axum::Json(json!({
        "input_ids": seq.ids,
        "prefix_length": seq.prefix_len,
        "tokens": seq.suffix(),
        "logprobs": logprobs,
        "total_logprob": total,
    }))
    .into_response())
}
