//! `serve`: the model behind an HTTP API (see `paligemma::serve`).

use super::{ModelArgs, Session};
use anyhow::{Context, Result, bail};
use clap::Args;
use paligemma::serve::{Limits, Options, Served};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on; the default answers this machine only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long)]
    pub api_key: Option<String>,
    /// The name clients give as `model` (default: --model as given).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// The mask decoder weights (`vae-oid.npz`) for /v1/segment; fetched from the Hub when
    /// first needed by default.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Sequences decoded together at most (continuous batching).
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Requests that may wait for a place in the batch; beyond, 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub queue_size: usize,
    /// Largest request body in MiB (images travel base64-encoded in it).
    #[arg(long, default_value_t = 20)]
    pub max_body_mb: usize,
    /// Largest image, in pixels (width × height), checked before decoding.
    #[arg(long, default_value_t = 25_000_000)]
    pub max_image_pixels: u64,
    /// Most images in one request.
    #[arg(long, default_value_t = 16)]
    pub max_images: usize,
    /// Longest prompt in tokens (image tokens not counted).
    #[arg(long, default_value_t = 1024)]
    pub max_prompt_tokens: usize,
    /// Most new tokens a request may ask for (max_tokens / max_new_tokens).
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// New tokens for a request that does not say.
    #[arg(long, default_value_t = 64)]
    pub default_new_tokens: usize,
    /// Seconds a request may take, waiting included; then 504 (the work is dropped).
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
    /// Memory for reusing the image features of repeated images, in MiB.
    #[arg(long, default_value_t = 256)]
    pub feature_cache_mb: usize,
}

pub fn run(args: ServeArgs) -> Result<()> {
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds");
    }
    if args.max_batch == 0 || args.queue_size == 0 {
        bail!("--max-batch and --queue-size must be at least 1");
    }
    let addr: SocketAddr = (args.host.as_str(), args.port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve --host {}", args.host))?
        .next()
        .with_context(|| format!("--host {} has no address", args.host))?;
    if !addr.ip().is_loopback() && args.api_key.is_none() {
        eprintln!("warning: listening on {addr}, reachable from other machines, without --api-key");
    }
    let limits = Limits {
        max_body_bytes: args.max_body_mb << 20,
        max_image_pixels: args.max_image_pixels,
        max_images: args.max_images,
        max_prompt_tokens: args.max_prompt_tokens,
        max_new_tokens: args.max_new_tokens,
        default_new_tokens: args.default_new_tokens.min(args.max_new_tokens),
        timeout: Duration::from_secs_f64(args.timeout),
        queue_size: args.queue_size,
        max_batch: args.max_batch,
        feature_cache_bytes: args.feature_cache_mb << 20,
    };
    let session = Session::load(&args.model)?;
    let served = Served {
        model: session.model,
        tokenizer: session.tokenizer,
        preprocessor: session.preprocessor,
        name: args.served_model_name.unwrap_or(args.model.model),
    };
    paligemma::serve::run(
        served,
        Options {
            addr,
            api_key: args.api_key,
            vae: args.vae,
            limits,
        },
    )
}
