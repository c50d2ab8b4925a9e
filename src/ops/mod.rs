//! Kernels the model needs beyond candle's: weight formats candle cannot multiply fast on a CPU,
//! and gradients for the fused kernels candle ships without a backward.

pub mod activation;
pub mod autodiff;
pub mod linear;
