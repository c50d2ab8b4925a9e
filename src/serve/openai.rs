//! `POST /v1/chat/completions` in OpenAI's format: one user message whose content holds the
//! prompt text and `image_url` parts with base64 data URIs; `stream: true` answers with
//! Server-Sent Events of `chat.completion.chunk` objects and a final `[DONE]`.

use super::engine::{Event, Generation, Work};
use super::error::ApiError;
use super::http::{App, outcome};
use super::input::{self, DecodeRequest, ImageInput, JsonBody};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant as Deadline;

/// Fields a chat request may carry; others (`frequency_penalty`, `user`, ...) are ignored as
/// OpenAI-compatible servers do.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<Value>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Not in OpenAI's API; as `--top-k`.
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    pub n: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_request", message)
}

/// The prompt text and images of the conversation, which must be a single user turn:
/// PaliGemma answers one prompt about images and has no chat template.
fn user_turn(messages: &[Value]) -> Result<(String, Vec<ImageInput>), ApiError> {
    let [message] = messages else {
        return Err(invalid(format!(
            "PaliGemma answers a single prompt: send exactly one message with role \"user\" ({} given)",
            messages.len()
        )));
    };
    if message.get("role").and_then(Value::as_str) != Some("user") {
        return Err(invalid("the message's role must be \"user\""));
    }
    let parts = match message.get("content") {
        Some(Value::Array(parts)) => parts,
        Some(Value::String(_)) => {
            return Err(invalid(
                "the message has text only: PaliGemma needs an image; give content as parts, e.g. [{\"type\": \"text\", \"text\": \"caption en\"}, {\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/png;base64,...\"}}]",
            ));
        }
        _ => {
            return Err(invalid(
                "the message needs \"content\": a list of text and image_url parts",
            ));
        }
    };
    let mut texts = Vec::new();
    let mut images = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        match part.get("type").and_then(Value::as_str) {
            Some("text") => match part.get("text").and_then(Value::as_str) {
                Some(t) => texts.push(t.to_string()),
                None => {
                    return Err(invalid(format!(
                        "content part {i}: \"text\" must be a string"
                    )));
                }
            },
            Some("image_url") => {
                let url = part
                    .get("image_url")
                    .and_then(|u| u.as_str().or_else(|| u.get("url").and_then(Value::as_str)))
                    .ok_or_else(|| {
                        invalid(format!("content part {i}: image_url needs a \"url\""))
                    })?;
                images.push(ImageInput::Base64(url.to_string()));
            }
            other => {
                return Err(invalid(format!(
                    "content part {i}: type {other:?} is not supported (use \"text\" or \"image_url\")"
                )));
            }
        }
    }
    Ok((texts.join(" "), images))
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub async fn chat(
    State(app): State<Arc<App>>,
    JsonBody(req): JsonBody<ChatRequest>,
) -> Result<Response, ApiError> {
    let deadline = app.deadline();
    if let Some(model) = &req.model
        && model != &app.served.name
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!(
                "model {model:?} is not served here; this server serves {:?}",
                app.served.name
            ),
        ));
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(invalid("n must be 1: one completion per request"));
    }
    let (prompt, images) = user_turn(&req.messages)?;
    let decode = DecodeRequest {
        max_new_tokens: req.max_completion_tokens.or(req.max_tokens),
        temperature: req.temperature,
        top_k: req.top_k,
        top_p: req.top_p,
        seed: req.seed,
        num_beams: None,
    };
    let (max_new_tokens, strategy) = input::decoding(&decode, &app.limits)?;
    let submitted = async {
        let (pixels, ids) = app.prepare(images, prompt, max_new_tokens).await?;
        let events = app.engine.submit(Work::Generate(Generation {
            ids,
            pixels: pixels.tensor,
            key: pixels.key,
            max_new_tokens,
            strategy,
            stream: req.stream,
        }))?;
        Ok::<_, ApiError>(events)
    };
    let events = tokio::time::timeout_at(deadline, submitted)
        .await
        .map_err(|_| ApiError::timeout(app.limits.timeout.as_secs_f64()))??;
    let id = format!("chatcmpl-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let head = Head {
        id,
        created,
        model: app.served.name.clone(),
    };
    if req.stream {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        return Ok(stream(app, head, events, deadline, include_usage));
    }
    let Event::Generated {
        result,
        text,
        prompt_tokens,
    } = outcome(&app, events, deadline).await?
    else {
        return Err(ApiError::internal("unexpected answer from the scheduler"));
    };
    let completion_tokens = result.logprobs.len();
    Ok(axum::Json(json!({
        "id": head.id,
        "object": "chat.completion",
        "created": head.created,
        "model": head.model,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": text },
            "logprobs": null,
            "finish_reason": finish_reason(result.stopped_at_eos),
        }],
        "usage": usage(prompt_tokens, completion_tokens),
    }))
    .into_response())
}

struct Head {
    id: String,
    created: u64,
    model: String,
}

impl Head {
    fn chunk(&self, choices: Value) -> Value {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "choices": choices,
        })
    }
}

fn finish_reason(stopped_at_eos: bool) -> &'static str {
    if stopped_at_eos { "stop" } else { "length" }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion })
}

enum Phase {
    Role,
    Text,
    Usage(Value),
    Done,
    End,
}

struct StreamState {
    app: Arc<App>,
    head: Head,
    events: UnboundedReceiver<Event>,
    deadline: Deadline,
    include_usage: bool,
    phase: Phase,
}

fn data(v: &Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}

/// The Server-Sent Events of a streamed completion: the role, the text as it comes, the
/// finish reason, optionally the usage, then `[DONE]`. An error midway is sent as an
/// `{"error": ...}` event before `[DONE]`. Dropping the stream (the client left) drops the
/// receiver, which cancels the generation.
fn stream(
    app: Arc<App>,
    head: Head,
    events: UnboundedReceiver<Event>,
    deadline: Deadline,
    include_usage: bool,
) -> Response {
    let state = StreamState {
        app,
        head,
        events,
        deadline,
        include_usage,
        phase: Phase::Role,
    };
    let body = futures_util::stream::unfold(state, |mut st| async move {
        let item = match std::mem::replace(&mut st.phase, Phase::End) {
            Phase::Role => {
                st.phase = Phase::Text;
                st.head.chunk(json!([{ "index": 0, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null }]))
            }
            Phase::Text => match tokio::time::timeout_at(st.deadline, st.events.recv()).await {
                Ok(Some(Event::Text(piece))) => {
                    st.phase = Phase::Text;
                    st.head.chunk(json!([{ "index": 0, "delta": { "content": piece }, "logprobs": null, "finish_reason": null }]))
                }
                Ok(Some(Event::Generated {
                    result,
                    prompt_tokens,
                    ..
                })) => {
                    st.phase = if st.include_usage {
                        let mut last = st.head.chunk(json!([]));
                        last["usage"] = usage(prompt_tokens, result.logprobs.len());
                        Phase::Usage(last)
                    } else {
                        Phase::Done
                    };
                    st.head.chunk(json!([{ "index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason(result.stopped_at_eos) }]))
                }
                Ok(Some(Event::Failed(e))) => {
                    st.phase = Phase::Done;
                    e.body()
                }
                Ok(Some(Event::Scored(_))) | Ok(None) => {
                    st.phase = Phase::Done;
                    ApiError::internal("the scheduler stopped").body()
                }
                Err(_) => {
                    st.phase = Phase::Done;
                    ApiError::timeout(st.app.limits.timeout.as_secs_f64()).body()
                }
            },
            Phase::Usage(v) => {
                st.phase = Phase::Done;
                v
            }
            Phase::Done => return Some((Ok(SseEvent::default().data("[DONE]")), st)),
            Phase::End => return None,
        };
        Some((data(&item), st))
    });
    Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response()
}
