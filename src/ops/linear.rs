//! Fully connected layers, `y = x Wᵀ + b`, with `W` stored `[out, in]` as in the checkpoints.
//!
//! f32 weights go through candle's GEMM. bf16 weights stay bf16 in memory (borrowed from the
//! checkpoint's memory map when possible) and are widened to f32 inside our own kernels,
//! accumulating in f32: candle's CPU matmul would widen the whole matrix on every call. Few
//! rows (decoding) stream the weights once through [`gemv`]'s register-widening kernels;
//! many rows widen slabs of weights for the `gemm` crate.

use crate::ops::autodiff;
use crate::weights::{Bf16Data, WeightStore, WeightsError};
use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

#[doc(hidden)]
pub mod baseline;
mod gemm;
mod gemv;
mod qgemm;
mod qgemv;
pub mod quant;

pub use gemv::Isa;
use quant::{QuantFormat, QuantMatrix};

/// How the decoder's and encoder's matrices are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    F32,
    Bf16,
    /// Group-wise quantized ([`quant`]).
    Quant(QuantFormat),
}

impl WeightFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Quant(q) => q.name(),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Weight {
    F32(Tensor),
    Bf16(Bf16Data),
    Quant(QuantMatrix),
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    out_features: usize,
    in_features: usize,
    /// A LoRA adapter added to the output (training); `None` at inference.
    lora: Option<LoraAdapter>,
}

/// A low-rank update `scale · B (A x)` added to a layer's output: `a` `[r, in]`, `b` `[out, r]`
/// (f32), `scale = alpha / r`, as PEFT's `LoraLayer` with dropout 0.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl Linear {
    /// Loads `{prefix}.weight` `[out, in]` and, if `bias`, `{prefix}.bias` `[out]`.
    pub fn load(
        store: &WeightStore,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
        format: WeightFormat,
        device: &Device,
    ) -> std::result::Result<Self, WeightsError> {
        let name = format!("{prefix}.weight");
        let shape = [out_features, in_features];
        // A checkpoint written by `paligemma quantize` fixes the format of its matrices.
        let weight = match (store.quantized(&name, out_features, in_features)?, format) {
            (Some(q), WeightFormat::Quant(asked)) if q.format != asked => {
                return Err(WeightsError::Unusable {
                    name,
                    msg: format!(
                        "the checkpoint stores it quantized to {}, and {} was asked for; leave out --quant or quantize the original checkpoint",
                        q.format.name(),
                        asked.name()
                    ),
                });
            }
            (Some(q), _) => Weight::Quant(q),
            (None, WeightFormat::F32) => Weight::F32(store.f32(&name, &shape, device)?),
            (None, WeightFormat::Bf16) => Weight::Bf16(store.bf16(&name, &shape)?),
            (None, WeightFormat::Quant(q)) => {
                Weight::Quant(store.quantize(&name, out_features, in_features, q)?)
            }
        };
        let bias = if bias {
            Some(store.f32(&format!("{prefix}.bias"), &[out_features], device)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            out_features,
            in_features,
            lora: None,
        })
    }

    pub fn from_f32(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(Self {
            weight: Weight::F32(weight),
            bias,
            out_features,
            in_features,
            lora: None,
        })
    }

    /// The quantized weight, when the layer holds one.
    pub fn quantized(&self) -> Option<&QuantMatrix> {
        match &self.weight {
            Weight::Quant(q) => Some(q),
            _ => None,
        }
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Attaches (or with `None` removes) a LoRA adapter; shapes are checked.
    pub fn set_lora(&mut self, lora: Option<LoraAdapter>) -> Result<()> {
        if let Some(l) = &lora {
            let (r, i) = l.a.dims2()?;
            let (o, r2) = l.b.dims2()?;
            if i != self.in_features || o != self.out_features || r != r2 {
                candle_core::bail!(
                    "LoRA shapes A [{r}, {i}], B [{o}, {r2}] do not fit a [{}, {}] layer",
                    self.out_features,
                    self.in_features
                )
            }
        }
        self.lora = lora;
        Ok(())
    }

    pub fn lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref()
    }

    /// Folds the adapter into the weight, `W + scale · B A` (f32 weights only), and removes it.
    pub fn merge_lora(&mut self) -> Result<()> {
        let Some(l) = self.lora.take() else {
            return Ok(());
        };
        let Weight::F32(w) = &self.weight else {
            candle_core::bail!("merging LoRA needs the model loaded in f32")
        };
        let delta = (l.b.detach().matmul(&l.a.detach())? * l.scale)?;
        self.weight = Weight::F32((w.detach() + delta)?);
        Ok(())
    }

    /// Rows of the weight matrix as f32 `[ids.len(), in]`: a tied embedding's lookup.
    pub fn rows(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.out_features) {
            candle_core::bail!(
                "token id {bad} is outside the vocabulary of {}",
                self.out_features
            )
        }
        match &self.weight {
            Weight::F32(w) => {
                let idx = Tensor::from_slice(ids, ids.len(), device)?;
                w.index_select(&idx, 0)
            }
            Weight::Bf16(w) => {
                let k = self.in_features;
                let src = w.as_slice();
                let mut out = vec![0f32; ids.len() * k];
                for (dst, &id) in out.chunks_exact_mut(k).zip(ids) {
                    let id = id as usize;
                    widen_bf16(&src[id * k..(id + 1) * k], dst);
                }
                Tensor::from_vec(out, (ids.len(), k), device)
            }
            Weight::Quant(q) => {
                let k = self.in_features;
                let mut out = vec![0f32; ids.len() * k];
                for (dst, &id) in out.chunks_exact_mut(k).zip(ids) {
                    q.dequantize_rows(id as usize, dst);
                }
                Tensor::from_vec(out, (ids.len(), k), device)
            }
        }
    }

    /// The dtype values of this weight are rounded to: scale factors that transformers casts
    /// to the weight dtype must be rounded the same way.
    pub fn format(&self) -> WeightFormat {
        match &self.weight {
            Weight::F32(_) => WeightFormat::F32,
            Weight::Bf16(_) => WeightFormat::Bf16,
            Weight::Quant(q) => WeightFormat::Quant(q.format),
        }
    }

    /// `x`: `[..., in]` f32 → `[..., out]` f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, self.in_features))?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("at least one dim") = self.out_features;
        let y = self.forward_base(&x2, rows)?;
        let y = match &self.lora {
            None => y,
            Some(l) => (y + (x2.matmul(&l.a.t()?)?.matmul(&l.b.t()?)? * l.scale)?)?,
        };
        y.reshape(out_dims)
    }

    /// `x2` `[rows, in]` → `W x + b` `[rows, out]`, without the adapter.
    fn forward_base(&self, x2: &Tensor, rows: usize) -> Result<Tensor> {
        let x = x2;
        if x2.track_op() && !self.params_tracked() {
            // Training through a frozen layer: the input's gradient only.
            let Weight::F32(w) = &self.weight else {
                candle_core::bail!(
                    "gradients cannot flow through {} weights; load f32 to train",
                    self.format().name()
                )
            };
            return autodiff::frozen_linear(x2, w, self.bias.as_ref());
        }
        let y = match &self.weight {
            Weight::F32(w) => autodiff::linear_f32(x2, w)?,
            Weight::Bf16(w) => {
                let xs = x2.to_dtype(DType::F32)?.contiguous()?;
                let xv = xs.flatten_all()?.to_vec1::<f32>()?;
                let yv = matmul_bf16(&xv, rows, self.in_features, w.as_slice(), self.out_features);
                Tensor::from_vec(yv, (rows, self.out_features), x.device())?
            }
            Weight::Quant(q) => {
                let xs = x2.to_dtype(DType::F32)?.contiguous()?;
                let xv = xs.flatten_all()?.to_vec1::<f32>()?;
                let yv = matmul_quant(&xv, rows, q);
                Tensor::from_vec(yv, (rows, self.out_features), x.device())?
            }
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// Whether the weight or the bias is being trained (part of an autograd graph).
    fn params_tracked(&self) -> bool {
        let w = match &self.weight {
            Weight::F32(w) => w.track_op(),
            Weight::Bf16(_) | Weight::Quant(_) => false,
        };
        w || self.bias.as_ref().is_some_and(|b| b.track_op())
    }

    /// Calls `f` on `{prefix}.weight` and `{prefix}.bias` (when present), which may replace
    /// them (with trainable variables of the same shape).
    pub fn visit_params_mut(&mut self, prefix: &str, f: VisitParams<'_>) -> Result<()> {
        let name = format!("{prefix}.weight");
        match &mut self.weight {
            Weight::F32(w) => f(&name, w)?,
            Weight::Bf16(_) | Weight::Quant(_) => {
                candle_core::bail!(
                    "{name} is held in {}; training needs the model loaded in f32",
                    self.format().name()
                )
            }
        }
        if let Some(b) = &mut self.bias {
            f(&format!("{prefix}.bias"), b)?;
        }
        if let Some(l) = &mut self.lora {
            f(&format!("{prefix}.lora_A.weight"), &mut l.a)?;
            f(&format!("{prefix}.lora_B.weight"), &mut l.b)?;
        }
        Ok(())
    }
}

/// A visitor over a model's parameters by checkpoint (Hub) name; it may replace a tensor with
/// another of the same shape, such as a trainable [`candle_core::Var`]'s.
pub type VisitParams<'a> = &'a mut dyn FnMut(&str, &mut Tensor) -> Result<()>;

/// Multiplies `x` `[m, k]` by the transpose of bf16 `w` `[n, k]`, giving `[m, n]`.
pub fn matmul_bf16(x: &[f32], m: usize, k: usize, w: &[u16], n: usize) -> Vec<f32> {
    matmul_bf16_on(Isa::detect(), x, m, k, w, n)
}

/// [`matmul_bf16`] with the kernels for a chosen instruction set, for tests and benchmarks.
///
/// # Panics
/// If a length does not match the shapes, or if this CPU lacks `isa`'s instructions.
pub fn matmul_bf16_on(isa: Isa, x: &[f32], m: usize, k: usize, w: &[u16], n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x has the wrong length");
    assert_eq!(w.len(), n * k, "w has the wrong length");
    // Few rows (decoding): memory-bound, so stream the weights once, widening in registers.
    // Many rows (prefill, vision): compute-bound, so a register-tiled GEMM that widens each
    // weight once; the `gemm` crate on widened slabs where we have no kernel.
    let mut y = vec![0f32; m * n];
    if m < GEMM_MIN_ROWS {
        gemv::gemv_bf16(isa, x, m, k, w, n, &mut y);
    } else if gemm::supports(isa) {
        gemm::gemm(isa, x, m, k, gemm::Weights::Bf16(w), n, &mut y);
    } else {
        return gemm_bf16(x, m, k, w, n);
    }
    y
}

/// `x` `[rows, in]` times the transpose of f32 `w` `[out, in]`: on our GEMM (the one bf16
/// weights use, reading the f32 weights directly) when there are enough rows and this CPU has
/// a kernel, else candle's matmul. Inference and training's forward both come here, so they
/// compute the same values.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let isa = Isa::detect();
    let (n, k) = w.dims2()?;
    let rows = x.elem_count() / k.max(1);
    let ours = rows >= GEMM_MIN_ROWS
        && gemm::supports(isa)
        && matches!(x.device(), Device::Cpu)
        && (x.dtype(), w.dtype()) == (DType::F32, DType::F32);
    if !ours {
        return x.matmul(&w.t()?);
    }
    let xv = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let w = w.contiguous()?;
    let (storage, layout) = w.storage_and_layout();
    let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(wv)), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    else {
        candle_core::bail!("an f32 CPU weight without its f32 storage")
    };
    let mut y = vec![0f32; rows * n];
    gemm::gemm(
        isa,
        &xv,
        rows,
        k,
        gemm::Weights::F32(&wv[start..end]),
        n,
        &mut y,
    );
    Tensor::from_vec(y, (rows, n), x.device())
}

/// Rows of `x` from which a GEMM on widened weights beats streaming them once per product.
pub const GEMM_MIN_ROWS: usize = 8;

/// `x` `[m, k]` times the transpose of a quantized `[n, k]` matrix, giving `[m, n]`.
pub fn matmul_quant(x: &[f32], m: usize, q: &QuantMatrix) -> Vec<f32> {
    matmul_quant_on(Isa::detect(), x, m, q)
}

/// [`matmul_quant`] with the few-row kernel for a chosen instruction set.
pub fn matmul_quant_on(isa: Isa, x: &[f32], m: usize, q: &QuantMatrix) -> Vec<f32> {
    if m < GEMM_MIN_ROWS {
        q.gemv(isa, x, m)
    } else if isa == Isa::Avx512 && qgemm::available() {
        // Integer dot products, as decoding: four times the multiply-adds of f32 FMAs.
        let mut y = vec![0f32; m * q.n];
        qgemm::gemm_quant(x, m, q, &mut y);
        y
    } else {
        gemm_slabs(x, m, q.k, q.n, &|r0, dst| {
            dst.par_chunks_mut(q.k.max(1) * 16)
                .enumerate()
                .for_each(|(c, d)| q.dequantize_rows(r0 + c * 16, d))
        })
    }
}

fn gemm_bf16(x: &[f32], m: usize, k: usize, w: &[u16], n: usize) -> Vec<f32> {
    gemm_slabs(x, m, k, n, &|r0, dst| {
        let rows = dst.len() / k.max(1);
        dst.par_chunks_mut(k * 16)
            .zip(w[r0 * k..(r0 + rows) * k].par_chunks(k * 16))
            .for_each(|(dst, src)| widen_bf16(src, dst))
    })
}

/// `x` `[m, k]` times the transpose of an `[n, k]` matrix that `fill(r0, dst)` writes in f32,
/// `dst.len() / k` rows from row `r0` at a time.
fn gemm_slabs(
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    fill: &(dyn Fn(usize, &mut [f32]) + Sync),
) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x has the wrong length");
    // Slabs of about 8 MiB of widened weights: big enough for the GEMM to run at speed, small
    // enough to stay in cache and not to double the memory of large matrices.
    let slab_rows = ((8 << 20) / (4 * k.max(1))).max(64).min(n.max(1));
    let mut wide = vec![0f32; slab_rows * k];
    let mut y = vec![0f32; m * n];
    if k == 0 {
        return y;
    }
    let threads = rayon::current_num_threads();
    for r0 in (0..n).step_by(slab_rows) {
        let rows = slab_rows.min(n - r0);
        let wide = &mut wide[..rows * k];
        fill(r0, wide);
        // Safety: every pointer/stride pair stays inside its buffer: y is [m, n] row-major
        // and we write its columns r0..r0+rows; x is [m, k]; wide is [rows, k], read as its
        // transpose [k, rows].
        unsafe {
            ::gemm::gemm(
                m,
                rows,
                k,
                y.as_mut_ptr().add(r0),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                wide.as_ptr(),
                k as isize,
                1,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                ::gemm::Parallelism::Rayon(threads),
            );
        }
    }
    y
}

pub(crate) fn widen_bf16(src: &[u16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s as u32) << 16);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Random `x` `[m, k]` and bf16 `w` `[n, k]`.
    fn random_problem(seed: &mut u64, m: usize, k: usize, n: usize) -> (Vec<f32>, Vec<u16>) {
        let x: Vec<f32> = (0..m * k).map(|_| lcg(seed)).collect();
        let w: Vec<u16> = (0..n * k)
            .map(|_| half::bf16::from_f32(lcg(seed)).to_bits())
            .collect();
        (x, w)
    }

    /// Checks `y` against an f64 reference, within f32 rounding of a length-`k` sum.
    fn assert_matches_reference(x: &[f32], m: usize, k: usize, w: &[u16], n: usize, y: &[f32]) {
        assert_eq!(y.len(), m * n);
        for i in 0..m {
            for j in 0..n {
                let terms = (0..k)
                    .map(|t| x[i * k + t] as f64 * half::bf16::from_bits(w[j * k + t]).to_f64());
                let (want, scale) = terms.fold((0f64, 0f64), |(s, a), v| (s + v, a + v.abs()));
                let got = y[i * n + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-6 * scale + 1e-6,
                    "({m},{k},{n}) [{i},{j}] {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn every_kernel_matches_f64_reference_on_odd_shapes() {
        let mut seed = 11u64;
        let shapes = [
            (1, 0, 3),
            (2, 15, 1),
            (1, 16, 4),
            (4, 17, 9),
            (5, 31, 6),
            (6, 7, 13),
            (7, 129, 10),
            (8, 40, 11),
            (9, 23, 7),
            (3, 33, 5003),
            (1, 2048, 67),
            (2, 1000, 130),
            (12, 77, 21),
            (64, 48, 65),
            // The GEMM's edges: rows past a multiple of the tile's, columns past a multiple
            // of 16 or 32, an odd k over several 256-value chunks.
            (37, 515, 100),
            (10, 301, 49),
            (16, 256, 48),
        ];
        for isa in Isa::ALL.into_iter().filter(|isa| isa.available()) {
            for &(m, k, n) in &shapes {
                let (x, w) = random_problem(&mut seed, m, k, n);
                let y = matmul_bf16_on(isa, &x, m, k, &w, n);
                assert_matches_reference(&x, m, k, &w, n, &y);
            }
        }
    }

    #[test]
    fn every_rows_count_below_the_gemm_matches_f64_reference() {
        // Rows of x come in groups of each kernel's tile height; every remainder must work.
        let mut seed = 3u64;
        for isa in Isa::ALL.into_iter().filter(|isa| isa.available()) {
            for m in 1..=GEMM_MIN_ROWS + 1 {
                let (x, w) = random_problem(&mut seed, m, 50, 23);
                let y = matmul_bf16_on(isa, &x, m, 50, &w, 23);
                assert_matches_reference(&x, m, 50, &w, 23, &y);
            }
        }
    }

    #[test]
    fn kernels_agree_with_the_baseline() {
        let mut seed = 5u64;
        let (m, k, n) = (3, 300, 77);
        let (x, w) = random_problem(&mut seed, m, k, n);
        let old = baseline::gemv_bf16(&x, m, k, &w, n);
        for isa in Isa::ALL.into_iter().filter(|isa| isa.available()) {
            let y = matmul_bf16_on(isa, &x, m, k, &w, n);
            for (a, b) in y.iter().zip(&old) {
                assert!((a - b).abs() < 1e-4, "{isa:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn detected_kernel_is_available_and_portable_always_is() {
        assert!(Isa::detect().available());
        assert!(Isa::Portable.available());
    }

    #[test]
    fn bf16_matmul_matches_f64_reference_on_odd_shapes() {
        let mut seed = 7u64;
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 37, 5),
            (3, 64, 17),
            (7, 100, 33),
            (2, 9, 40),
            (8, 33, 70),
            (19, 130, 200),
            (300, 5, 3),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let w: Vec<u16> = (0..n * k)
                .map(|_| half::bf16::from_f32(lcg(&mut seed)).to_bits())
                .collect();
            let y = matmul_bf16(&x, m, k, &w, n);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|t| x[i * k + t] as f64 * half::bf16::from_bits(w[j * k + t]).to_f64())
                        .sum();
                    let got = y[i * n + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-4,
                        "({m},{k},{n}) [{i},{j}] {got} vs {want}"
                    );
                }
            }
        }
    }
}
