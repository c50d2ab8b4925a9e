//! `paligemma serve`: an HTTP server for one model.
//!
//! - [`http`]: routes, the task endpoints (`/v1/caption`, `/v1/answer`, `/v1/ocr`,
//!   `/v1/detect`, `/v1/segment`, `/v1/score`, `/v1/generate`), health, models, metrics;
//!   authentication and the bound on requests in flight
//! - [`openai`]: `/v1/chat/completions`, streaming or not
//! - [`input`]: request bodies, base64 images, decoding settings, prompts, within [`Limits`]
//! - [`engine`]: the scheduler, continuous batching over one [`crate::generate::OpenBatch`],
//!   with an image-feature cache
//! - [`tasks`]: boxes and masks as `paligemma detect/segment --json` print them
//! - [`metrics`], [`error`]
//!
//! Handlers decode and check inputs on blocking threads, then hand ready work to the scheduler
//! thread, which owns the model; results come back on a channel per request. A request whose
//! client leaves, or whose time runs out, drops its channel, and the scheduler drops its row.

pub mod engine;
pub mod error;
pub mod http;
pub mod input;
pub mod metrics;
pub mod openai;
pub mod tasks;

use crate::paligemma::PaliGemma;
use crate::preprocess::PreprocessorConfig;
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A loaded model with what it needs to read inputs.
pub struct Served {
    pub model: PaliGemma,
    pub tokenizer: Tokenizer,
    pub preprocessor: PreprocessorConfig,
    /// The name clients give as `model`.
    pub name: String,
}

/// What one request may ask for, and how much the server takes on at once.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_image_pixels: u64,
    pub max_images: usize,
    /// Prompt text tokens (image tokens and `<bos>` not counted).
    pub max_prompt_tokens: usize,
    /// The most new tokens a request may ask for.
    pub max_new_tokens: usize,
    /// New tokens when a request does not say.
    pub default_new_tokens: usize,
    pub timeout: Duration,
    /// Requests waiting for a place in the batch; more get 503.
    pub queue_size: usize,
    /// Sequences decoded together.
    pub max_batch: usize,
    pub feature_cache_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 20 << 20,
            max_image_pixels: 25_000_000,
            max_images: 16,
            max_prompt_tokens: 1024,
            max_new_tokens: 512,
            default_new_tokens: 64,
            timeout: Duration::from_secs(300),
            queue_size: 64,
            max_batch: 8,
            feature_cache_bytes: 256 << 20,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub addr: SocketAddr,
    /// Required as `Authorization: Bearer <key>` on everything but `/health`.
    pub api_key: Option<String>,
    /// The mask decoder (`vae-oid.npz`) for `/v1/segment`; fetched from the Hub when needed.
    pub vae: Option<PathBuf>,
    pub limits: Limits,
}

impl Options {
    fn engine(&self) -> engine::EngineOptions {
        engine::EngineOptions {
            max_batch: self.limits.max_batch,
            queue_size: self.limits.queue_size,
            feature_cache_bytes: self.limits.feature_cache_bytes,
        }
    }
}

/// Serves until SIGTERM or Ctrl-C, then stops taking connections, finishes the requests in
/// flight and returns. Prints `listening on http://ADDR` to stderr once bound.
pub fn run(served: Served, options: Options) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(options.addr)
            .await
            .with_context(|| format!("cannot listen on {}", options.addr))?;
        let addr = listener.local_addr()?;
        let app = http::App::new(served, &options);
        eprintln!("paligemma serve: listening on http://{addr}");
        axum::serve(listener, http::router(app.clone()))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("the server failed")?;
        eprintln!("paligemma serve: shutting down");
        tokio::task::spawn_blocking(move || app.engine.stop()).await?;
        eprintln!("paligemma serve: stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    eprintln!("paligemma serve: signal received; finishing the requests in flight");
}
