//! Reading requests: JSON or multipart bodies, base64 images, decoding options, prompts, all
//! checked against the server's limits with a clear message for each refusal.

use super::engine::{FeatureKey, feature_key};
use super::error::{ApiError, describe};
use super::{Limits, Served};
use crate::generate::Strategy;
use crate::image::{DecodeOptions, ImageError};
use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header::CONTENT_TYPE;
use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use candle_core::{Device, Tensor};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// An image as the client sent it.
#[derive(Debug, Clone)]
pub enum ImageInput {
    /// Base64, bare or as a `data:` URI.
    Base64(String),
    /// A multipart file upload.
    Bytes(Bytes),
}

/// A JSON body parsed into `T`, with JSON errors for bad bodies instead of axum's plain text.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if let Some(ct) = req.headers().get(CONTENT_TYPE)
            && !ct.to_str().unwrap_or("").starts_with("application/json")
        {
            return Err(unsupported_type(ct.to_str().unwrap_or("?"), false));
        }
        let bytes = read_body(req, state).await?;
        Ok(Self(parse_json(&bytes)?))
    }
}

async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(
                "body_too_large",
                "the request body is larger than the server accepts (see --max-body-mb)",
            )
        } else {
            ApiError::bad_request("invalid_body", rejection.body_text())
        }
    })
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let what = if e.is_data() {
            "the JSON does not fit this endpoint"
        } else {
            "the body is not valid JSON"
        };
        ApiError::bad_request("invalid_json", format!("{what}: {e}"))
    })
}

fn unsupported_type(ct: &str, multipart_too: bool) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!(
            "Content-Type {ct:?} is not accepted: send application/json{}",
            if multipart_too {
                " or multipart/form-data"
            } else {
                ""
            }
        ),
    )
}

/// The body of a task endpoint (`/v1/caption`, `/v1/detect`, ...): one set of fields for all,
/// each endpoint refusing the ones it does not use.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    /// One image, base64 (bare or a `data:` URI).
    pub image: Option<String>,
    /// Several images, placed one after another.
    pub images: Option<Vec<String>>,
    pub prompt: Option<String>,
    pub suffix: Option<String>,
    pub question: Option<String>,
    pub lang: Option<String>,
    pub long: Option<bool>,
    pub labels: Option<Vec<String>>,
    #[serde(alias = "max_tokens")]
    pub max_new_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub num_beams: Option<usize>,
    /// Files of a multipart body.
    #[serde(skip)]
    pub uploads: Vec<Bytes>,
}

/// Decoding settings, named as the command line's flags.
#[derive(Debug, Default, Clone)]
pub struct DecodeRequest {
    pub max_new_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub num_beams: Option<usize>,
}

impl TaskRequest {
    pub fn decode(&self) -> DecodeRequest {
        DecodeRequest {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            num_beams: self.num_beams,
        }
    }

    /// The fields present, by name.
    fn given(&self) -> Vec<&'static str> {
        let d = self.decode();
        [
            ("image", self.image.is_some() || !self.uploads.is_empty()),
            ("images", self.images.is_some()),
            ("prompt", self.prompt.is_some()),
            ("suffix", self.suffix.is_some()),
            ("question", self.question.is_some()),
            ("lang", self.lang.is_some()),
            ("long", self.long.is_some()),
            ("labels", self.labels.is_some()),
            ("max_new_tokens", d.max_new_tokens.is_some()),
            ("temperature", d.temperature.is_some()),
            ("top_k", d.top_k.is_some()),
            ("top_p", d.top_p.is_some()),
            ("seed", d.seed.is_some()),
            ("num_beams", d.num_beams.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect()
    }

    /// Refuses fields `endpoint` does not use (`decoding` adds the decoding settings).
    pub fn only(&self, endpoint: &str, fields: &[&str], decoding: bool) -> Result<(), ApiError> {
        const DECODING: [&str; 6] = [
            "max_new_tokens",
            "temperature",
            "top_k",
            "top_p",
            "seed",
            "num_beams",
        ];
        let allowed: Vec<&str> = ["image", "images"]
            .iter()
            .chain(fields)
            .chain(if decoding { &DECODING[..] } else { &[] })
            .copied()
            .collect();
        match self.given().into_iter().find(|f| !allowed.contains(f)) {
            Some(f) => Err(ApiError::bad_request(
                "unknown_field",
                format!(
                    "{endpoint} does not take {f:?}; it takes: {}",
                    allowed.join(", ")
                ),
            )),
            None => Ok(()),
        }
    }

    /// The images in order: `image` (or uploads), then `images`.
    pub fn images(&self) -> Vec<ImageInput> {
        let mut out: Vec<ImageInput> = self
            .uploads
            .iter()
            .cloned()
            .map(ImageInput::Bytes)
            .collect();
        out.extend(self.image.iter().cloned().map(ImageInput::Base64));
        out.extend(
            self.images
                .iter()
                .flatten()
                .cloned()
                .map(ImageInput::Base64),
        );
        out
    }
}

/// A task body: JSON, or multipart with files named `image` (or `images`) and the other
/// fields as text parts (`labels` repeated for several).
pub struct TaskBody(pub TaskRequest);

impl<S: Send + Sync> FromRequest<S> for TaskBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let ct = req
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("?").to_string());
        match ct.as_deref() {
            None => Ok(Self(parse_json(&read_body(req, state).await?)?)),
            Some(ct) if ct.starts_with("application/json") => {
                Ok(Self(parse_json(&read_body(req, state).await?)?))
            }
            Some(ct) if ct.starts_with("multipart/form-data") => {
                let multipart = Multipart::from_request(req, state)
                    .await
                    .map_err(|e| ApiError::bad_request("invalid_multipart", e.body_text()))?;
                Ok(Self(read_multipart(multipart).await?))
            }
            Some(ct) => Err(unsupported_type(ct, true)),
        }
    }
}

async fn read_multipart(mut multipart: Multipart) -> Result<TaskRequest, ApiError> {
    let field_error = |e: axum::extract::multipart::MultipartError| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(
                "body_too_large",
                "the request body is larger than the server accepts (see --max-body-mb)",
            )
        } else {
            ApiError::bad_request("invalid_multipart", e.body_text())
        }
    };
    let mut fields = Map::new();
    let mut uploads = Vec::new();
    let mut labels = Vec::new();
    while let Some(field) = multipart.next_field().await.map_err(field_error)? {
        let name = field.name().unwrap_or("").to_string();
        match name.as_str() {
            "image" | "images" => uploads.push(field.bytes().await.map_err(field_error)?),
            _ => {
                let text = field.text().await.map_err(field_error)?;
                let value = match name.as_str() {
                    "labels" => {
                        labels.push(Value::String(text));
                        continue;
                    }
                    "prompt" | "suffix" | "question" | "lang" => Value::String(text),
                    // Numbers and booleans arrive as text.
                    _ => serde_json::from_str(&text).unwrap_or(Value::String(text)),
                };
                fields.insert(name, value);
            }
        }
    }
    if !labels.is_empty() {
        fields.insert("labels".into(), Value::Array(labels));
    }
    let mut request: TaskRequest = serde_json::from_value(Value::Object(fields)).map_err(|e| {
        ApiError::bad_request(
            "invalid_field",
            format!("the form does not fit this endpoint: {e}"),
        )
    })?;
    request.uploads = uploads;
    Ok(request)
}

const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The bytes of a base64 image, bare or in a `data:[type];base64,` URI (line breaks allowed).
pub fn base64_image(text: &str) -> Result<Vec<u8>, String> {
    let data = match text.strip_prefix("data:") {
        Some(uri) => {
            let (meta, data) = uri
                .split_once(',')
                .ok_or("a data: URI needs a comma before its data")?;
            if !meta.ends_with(";base64") {
                return Err(format!(
                    "data: URI with {meta:?}: only base64 data URIs (data:image/png;base64,...) are accepted"
                ));
            }
            data
        }
        None if text.starts_with("http://") || text.starts_with("https://") => {
            return Err(
                "image URLs are not fetched: send the image itself, as base64 or a data: URI"
                    .into(),
            );
        }
        None => text,
    };
    let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    BASE64
        .decode(compact.as_bytes())
        .map_err(|e| format!("invalid base64: {e}"))
}

/// Images decoded and preprocessed for the model.
pub struct Pixels {
    /// `[n, 3, R, R]`.
    pub tensor: Tensor,
    pub key: FeatureKey,
    /// `(width, height)` of each image as sent.
    pub sizes: Vec<(u32, u32)>,
}

/// Decodes and preprocesses images (CPU work: run it off the async threads).
pub fn pixels(served: &Served, images: &[ImageInput], limits: &Limits) -> Result<Pixels, ApiError> {
    if images.is_empty() {
        return Err(ApiError::bad_request(
            "missing_image",
            "no image given: PaliGemma needs at least one (\"image\": base64 or a data: URI)",
        ));
    }
    if images.len() > limits.max_images {
        return Err(ApiError::bad_request(
            "too_many_images",
            format!(
                "{} images given; the server takes at most {} per request",
                images.len(),
                limits.max_images
            ),
        ));
    }
    let options = DecodeOptions {
        max_pixels: limits.max_image_pixels,
    };
    let mut decoded = Vec::with_capacity(images.len());
    for (i, input) in images.iter().enumerate() {
        let owned;
        let bytes: &[u8] = match input {
            ImageInput::Bytes(b) => b,
            ImageInput::Base64(text) => {
                owned = base64_image(text).map_err(|e| {
                    ApiError::bad_request("invalid_image", format!("image {i}: {e}"))
                })?;
                &owned
            }
        };
        let image = crate::image::decode_image_with(bytes, &options).map_err(|e| match e {
            ImageError::TooLarge { .. } => ApiError::too_large(
                "image_too_large",
                format!("image {i}: {e} (see --max-image-pixels)"),
            ),
            e => ApiError::bad_request("invalid_image", format!("image {i}: {e}")),
        })?;
        decoded.push(image);
    }
    let sizes = decoded.iter().map(|i| i.dimensions()).collect();
    let internal = |e: candle_core::Error| ApiError::internal(format!("preprocessing failed: {e}"));
    let tensor = served
        .preprocessor
        .to_tensor(&decoded, &Device::Cpu)
        .map_err(internal)?;
    let key = feature_key(&tensor).map_err(|e| ApiError::internal(describe(&e)))?;
    Ok(Pixels { tensor, key, sizes })
}

/// Prefix ids for a prompt about `n_images` images, within the server's prompt limits and the
/// model's positions (with `max_new_tokens` more to come).
pub fn prefix_ids(
    served: &Served,
    prompt: &str,
    n_images: usize,
    max_new_tokens: usize,
    limits: &Limits,
) -> Result<Vec<u32>, ApiError> {
    let too_long = |size: String| {
        ApiError::bad_request(
            "prompt_too_long",
            format!(
                "the prompt is {size}; the server takes at most {} tokens (see --max-prompt-tokens)",
                limits.max_prompt_tokens
            ),
        )
    };
    // No token is longer than this many bytes in practice: refuse megabytes before tokenizing.
    if prompt.len() > 64 * limits.max_prompt_tokens {
        return Err(too_long(format!("{} bytes long", prompt.len())));
    }
    let cfg = &served.model.config;
    let seq = crate::prompt::prefix(&served.tokenizer, cfg, prompt, n_images)
        .map_err(|e| ApiError::bad_request("invalid_prompt", describe(&e)))?;
    let text_tokens = seq.ids.len() - n_images * cfg.image_seq_length() - 1;
    if text_tokens > limits.max_prompt_tokens {
        return Err(too_long(format!("{text_tokens} tokens")));
    }
    crate::prompt::check_length(cfg, seq.ids.len(), max_new_tokens)
        .map_err(|e| ApiError::bad_request("prompt_too_long", describe(&e)))?;
    Ok(seq.ids)
}

/// Tokens to generate and how to choose them, as the command line's decoding flags.
pub fn decoding(d: &DecodeRequest, limits: &Limits) -> Result<(usize, Strategy), ApiError> {
    let bad = |m: &str| ApiError::bad_request("invalid_parameter", m);
    let max_new_tokens = d.max_new_tokens.unwrap_or(limits.default_new_tokens);
    if max_new_tokens == 0 {
        return Err(bad("max_new_tokens (max_tokens) must be at least 1"));
    }
    if max_new_tokens > limits.max_new_tokens {
        return Err(ApiError::bad_request(
            "too_many_tokens",
            format!(
                "max_new_tokens (max_tokens) is {max_new_tokens}; the server allows at most {} (see --max-new-tokens)",
                limits.max_new_tokens
            ),
        ));
    }
    let sampling = d.temperature.is_some() || d.top_k.is_some() || d.top_p.is_some();
    if let Some(n) = d.num_beams {
        if sampling {
            return Err(bad(
                "num_beams cannot be combined with temperature, top_k or top_p",
            ));
        }
        return match n {
            0 => Err(bad("num_beams must be at least 1")),
            1 => Ok((max_new_tokens, Strategy::Greedy)),
            n => Ok((max_new_tokens, Strategy::Beam { num_beams: n })),
        };
    }
    if !sampling {
        return Ok((max_new_tokens, Strategy::Greedy));
    }
    let temperature = d.temperature.unwrap_or(1.0);
    if !(temperature >= 0.0 && temperature.is_finite()) {
        return Err(bad("temperature must be a finite number ≥ 0"));
    }
    if let Some(p) = d.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(bad("top_p must be in (0, 1]"));
    }
    Ok((
        max_new_tokens,
        Strategy::Sample {
            temperature,
            top_k: d.top_k,
            top_p: d.top_p,
            seed: d.seed.unwrap_or(0),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_images_come_bare_or_as_data_uris() {
        assert_eq!(base64_image("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_image("aGVsbG8").unwrap(), b"hello");
        assert_eq!(
            base64_image("data:image/png;base64,aGVs\nbG8=").unwrap(),
            b"hello"
        );
        assert!(
            base64_image("data:image/png,hello")
                .unwrap_err()
                .contains("only base64")
        );
        assert!(
            base64_image("https://x/y.png")
                .unwrap_err()
                .contains("not fetched")
        );
        assert!(base64_image("!!!").unwrap_err().contains("invalid base64"));
    }
}
