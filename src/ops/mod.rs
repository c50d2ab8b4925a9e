//! Kernels the model needs beyond candle's: weight formats candle cannot multiply fast on a CPU.

pub mod linear;
