//! Gradients for the fused kernels the model uses, for training.
//!
//! candle-nn 0.11's `rms_norm`, `layer_norm` and `softmax_last_dim` are custom ops built with
//! `apply_op*_no_bwd`: a graph through them silently stops there and every parameter before them
//! gets no gradient. And candle's backward computes a gradient for *both* operands of a product,
//! so a frozen weight multiplied by a tracked activation still costs a weight-sized gradient
//! (for the tied output head of a 3B model, 2.4 GB) that nobody reads.
//!
//! Each function here therefore takes one of two paths:
//! - no input is tracked (inference, or a frozen part of the model): exactly the fused candle
//!   op the model has always used, so inference is unchanged bit for bit;
//! - some input is tracked: the same fused op computes the value on detached inputs, and a
//!   *graft* (a custom op that returns that value) carries an analytic backward that returns
//!   gradients only for the tracked inputs. The forward of training is thus bit-identical to
//!   inference too, and the graph keeps only the inputs and the output.
//!
//! Grafts run on the CPU backend only, as does the rest of the crate.

use crate::ops::{activation, linear};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, Layout, Result, Shape, Storage, Tensor,
};
use std::sync::Mutex;

/// Gradients for a graft's inputs from `(inputs, output, grad of output)`, `None` for inputs
/// that need none.
type Backward = dyn Fn(&[&Tensor], &Tensor, &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync;

/// A custom op whose forward returns a value computed beforehand and whose backward is given.
struct Graft {
    name: &'static str,
    /// Taken (and dropped) by the forward, so the graph does not hold the value twice.
    value: Mutex<Option<Tensor>>,
    backward: Box<Backward>,
}

impl Graft {
    fn new(
        name: &'static str,
        value: Tensor,
        backward: impl Fn(&[&Tensor], &Tensor, &Tensor) -> Result<Vec<Option<Tensor>>>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        Self {
            name,
            value: Mutex::new(Some(value)),
            backward: Box::new(backward),
        }
    }

    fn take_value(&self) -> Result<(CpuStorage, Shape)> {
        let value = self
            .value
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: poisoned lock", self.name)))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice", self.name)))?;
        let (storage, layout) = value.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("{}: gradients are implemented on the CPU only", self.name)
        };
        Ok((copy_contiguous(cpu, layout)?, layout.shape().clone()))
    }

    fn grads<const N: usize>(
        &self,
        args: [&Tensor; N],
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; N]> {
        let grads = (self.backward)(&args, res, grad)?;
        grads.try_into().map_err(|g: Vec<_>| {
            candle_core::Error::Msg(format!(
                "{}: backward gave {} gradients for {N} inputs",
                self.name,
                g.len()
            ))
        })
    }
}

fn copy_contiguous(cpu: &CpuStorage, layout: &Layout) -> Result<CpuStorage> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("graft value is not contiguous")
    };
    Ok(match cpu {
        CpuStorage::F32(v) => CpuStorage::F32(v[start..end].to_vec()),
        CpuStorage::F64(v) => CpuStorage::F64(v[start..end].to_vec()),
        CpuStorage::BF16(v) => CpuStorage::BF16(v[start..end].to_vec()),
        CpuStorage::F16(v) => CpuStorage::F16(v[start..end].to_vec()),
        other => candle_core::bail!(
            "graft value has dtype {:?}",
            candle_core::backend::BackendStorage::dtype(other)
        ),
    })
}

impl CustomOp1 for Graft {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.take_value()
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let [g] = self.grads([arg], res, grad)?;
        Ok(g)
    }
}

impl CustomOp2 for Graft {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.take_value()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [ga, gb] = self.grads([a, b], res, grad)?;
        Ok((ga, gb))
    }
}

impl CustomOp3 for Graft {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.take_value()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [ga, gb, gc] = self.grads([a, b, c], res, grad)?;
        Ok((ga, gb, gc))
    }
}

/// `Some(f())` when `wanted`: gradients are computed only for tracked inputs.
fn when(wanted: bool, f: impl FnOnce() -> Result<Tensor>) -> Result<Option<Tensor>> {
    if wanted { f().map(Some) } else { Ok(None) }
}

/// Sums `t` `[..., d]` over every dimension but the last: a broadcast vector's gradient.
fn sum_rows(t: &Tensor) -> Result<Tensor> {
    let d = t.dim(D::Minus1)?;
    t.reshape(((), d))?.sum(0)
}

/// `softmax(x)` over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return candle_nn::ops::softmax_last_dim(x);
    }
    let value = candle_nn::ops::softmax_last_dim(&x.detach())?;
    x.apply_op1(Graft::new("softmax-grad", value, softmax_backward))
}

/// `softmax(x + mask)` over the last dimension, `mask` broadcast to `x` and never
/// differentiated (additive attention masks).
pub fn masked_softmax_last_dim(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return candle_nn::ops::softmax_last_dim(&x.broadcast_add(mask)?);
    }
    let value = candle_nn::ops::softmax_last_dim(&x.detach().broadcast_add(&mask.detach())?)?;
    if value.dims() != x.dims() {
        candle_core::bail!(
            "mask {:?} does not broadcast to scores {:?}",
            mask.dims(),
            x.dims()
        )
    }
    x.apply_op1(Graft::new("masked-softmax-grad", value, softmax_backward))
}

/// `dx = y · (g − Σ g·y)` for `y = softmax(x)`.
fn softmax_backward(_: &[&Tensor], y: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
    let y = y.detach();
    let dot = (g * &y)?.sum_keepdim(D::Minus1)?;
    Ok(vec![Some((g.broadcast_sub(&dot)? * y)?)])
}

/// `log_softmax(x)` over the last dimension, in the dtype of `x`.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return candle_nn::ops::log_softmax(x, D::Minus1);
    }
    let value = candle_nn::ops::log_softmax(&x.detach(), D::Minus1)?;
    // dx = g − softmax(x) · Σ g, with softmax(x) = exp(y).
    x.apply_op1(Graft::new(
        "log-softmax-grad",
        value,
        |_: &[&Tensor], y: &Tensor, g: &Tensor| {
            let total = g.sum_keepdim(D::Minus1)?;
            Ok(vec![Some((g - y.detach().exp()?.broadcast_mul(&total)?)?)])
        },
    ))
}

/// GELU with the tanh approximation, on the vectorised kernel of [`activation`].
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return activation::gelu_tanh(x);
    }
    let value = activation::gelu_tanh(&x.detach())?;
    x.apply_op1(Graft::new(
        "gelu-tanh-grad",
        value,
        |args: &[&Tensor], _: &Tensor, g: &Tensor| {
            Ok(vec![Some(activation::gelu_tanh_backward(
                &args[0].detach(),
                g,
            )?)])
        },
    ))
}

/// RMSNorm `x / sqrt(mean(x²) + eps) · alpha` over the last dimension (candle's kernel).
pub fn rms_norm(x: &Tensor, alpha: &Tensor, eps: f32) -> Result<Tensor> {
    if !x.track_op() && !alpha.track_op() {
        return candle_nn::ops::rms_norm(x, alpha, eps);
    }
    let value = candle_nn::ops::rms_norm(&x.detach(), &alpha.detach(), eps)?;
    let (want_x, want_alpha) = (x.track_op(), alpha.track_op());
    let backward = move |args: &[&Tensor], _: &Tensor, g: &Tensor| {
        let (x, alpha) = (args[0].detach(), args[1].detach());
        // r = 1/rms, x̂ = x·r, y = x̂·α:
        // dx = r·(g·α − x̂·mean(g·α·x̂)),  dα = Σ_rows g·x̂.
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?
            .sqrt()?
            .recip()?;
        let xhat = x.broadcast_mul(&r)?;
        let dx = when(want_x, || {
            let ga = g.broadcast_mul(&alpha)?;
            let dot = (&ga * &xhat)?.mean_keepdim(D::Minus1)?;
            (ga - xhat.broadcast_mul(&dot)?)?.broadcast_mul(&r)
        })?;
        let dalpha = when(want_alpha, || sum_rows(&(g * &xhat)?))?;
        Ok(vec![dx, dalpha])
    };
    x.apply_op2(alpha, Graft::new("rms-norm-grad", value, backward))
}

/// LayerNorm `(x − mean) / sqrt(var + eps) · alpha + beta` over the last dimension.
pub fn layer_norm(x: &Tensor, alpha: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    let want = [x.track_op(), alpha.track_op(), beta.track_op()];
    if want == [false; 3] {
        return candle_nn::ops::layer_norm(x, alpha, beta, eps);
    }
    let value = candle_nn::ops::layer_norm(&x.detach(), &alpha.detach(), &beta.detach(), eps)?;
    let backward = move |args: &[&Tensor], _: &Tensor, g: &Tensor| {
        let (x, alpha) = (args[0].detach(), args[1].detach());
        // x̂ = (x − μ)·r, y = x̂·α + β:
        // dx = r·(g·α − mean(g·α) − x̂·mean(g·α·x̂)),  dα = Σ_rows g·x̂,  dβ = Σ_rows g.
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let r = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?
            .sqrt()?
            .recip()?;
        let xhat = centred.broadcast_mul(&r)?;
        let dx = when(want[0], || {
            let ga = g.broadcast_mul(&alpha)?;
            let mean_ga = ga.mean_keepdim(D::Minus1)?;
            let dot = (&ga * &xhat)?.mean_keepdim(D::Minus1)?;
            ga.broadcast_sub(&mean_ga)?
                .sub(&xhat.broadcast_mul(&dot)?)?
                .broadcast_mul(&r)
        })?;
        let dalpha = when(want[1], || sum_rows(&(g * &xhat)?))?;
        let dbeta = when(want[2], || sum_rows(g))?;
        Ok(vec![dx, dalpha, dbeta])
    };
    x.apply_op3(alpha, beta, Graft::new("layer-norm-grad", value, backward))
}

/// `x Wᵀ` for `x` `[rows, in]` and f32 `w` `[out, in]`, on the kernel inference uses
/// ([`linear::matmul_t`]), with the gradients `dx = g W` and `dW = gᵀ x` of whichever is
/// tracked.
pub fn linear_f32(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.track_op() && !w.track_op() {
        return linear::matmul_t(x, w);
    }
    let value = linear::matmul_t(&x.detach(), &w.detach())?;
    let (want_x, want_w) = (x.track_op(), w.track_op());
    x.apply_op2(
        w,
        Graft::new(
            "linear-grad",
            value,
            move |args: &[&Tensor], _: &Tensor, g: &Tensor| {
                let (x, w) = (args[0].detach(), args[1].detach());
                Ok(vec![
                    when(want_x, || g.matmul(&w))?,
                    when(want_w, || g.t()?.matmul(&x))?,
                ])
            },
        ),
    )
}

/// `x Wᵀ (+ b)` for a tracked `x` `[rows, in]` and a frozen `w` `[out, in]` and bias: only
/// `dx = g W` is computed in the backward, never the weight's gradient.
pub fn frozen_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let mut value = linear::matmul_t(&x.detach(), &w.detach())?;
    if let Some(b) = bias {
        value = value.broadcast_add(b)?;
    }
    let w = w.detach();
    x.apply_op1(Graft::new(
        "frozen-linear-grad",
        value,
        move |_: &[&Tensor], _: &Tensor, g: &Tensor| Ok(vec![Some(g.matmul(&w)?)]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn lcg_tensor(shape: &[usize], seed: u64) -> Tensor {
        let mut s = seed;
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Gradients of `sum(f(vars) · weights)` through the graft and through a composition of
    /// basic candle ops (whose backward is candle's own), to `tol`.
    fn check(
        vars: &[Var],
        graft: impl Fn(&[Tensor]) -> Result<Tensor>,
        reference: impl Fn(&[Tensor]) -> Result<Tensor>,
        tol: f64,
    ) {
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = graft(&ts).unwrap();
        let y_ref = reference(&ts).unwrap();
        let d = max_abs(&y, &y_ref);
        assert!(d < tol, "values differ by {d}");
        let w = lcg_tensor(y.dims(), 99).to_dtype(y.dtype()).unwrap();
        let g = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (y_ref * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            let (a, b) = (g.get(v).unwrap(), g_ref.get(v).unwrap());
            let d = max_abs(a, b);
            assert!(d < tol, "input {i}: gradients differ by {d}");
        }
    }

    fn var(shape: &[usize], seed: u64, dtype: DType) -> Var {
        Var::from_tensor(&lcg_tensor(shape, seed).to_dtype(dtype).unwrap()).unwrap()
    }

    #[test]
    fn softmax_gradients_match_the_composition() {
        let x = var(&[2, 3, 7], 1, DType::F64);
        check(
            &[x],
            |t| softmax_last_dim(&t[0]),
            |t| candle_nn::ops::softmax(&t[0], D::Minus1),
            1e-12,
        );
        let x = var(&[2, 1, 3, 5], 2, DType::F64);
        let mask = Tensor::from_vec(
            vec![0.0, f64::MIN, 0.0, 0.0, f64::MIN],
            (1, 1, 1, 5),
            &Device::Cpu,
        )
        .unwrap()
        .broadcast_as((2, 1, 3, 5))
        .unwrap()
        .contiguous()
        .unwrap();
        check(
            &[x],
            |t| masked_softmax_last_dim(&t[0], &mask),
            |t| {
                // Masked entries contribute exactly zero: softmax over the kept columns.
                let keep = Tensor::from_vec(vec![1.0, 0.0, 1.0, 1.0, 0.0], 5, &Device::Cpu)?;
                let e = t[0].broadcast_sub(&t[0].max_keepdim(D::Minus1)?.detach())?;
                let e = e.exp()?.broadcast_mul(&keep)?;
                e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
            },
            1e-12,
        );
    }

    #[test]
    fn log_softmax_gradients_match_the_composition() {
        let x = var(&[4, 9], 3, DType::F64);
        check(
            &[x],
            |t| log_softmax_last_dim(&t[0]),
            |t| candle_nn::ops::log_softmax(&t[0], D::Minus1),
            1e-12,
        );
    }

    #[test]
    fn norm_gradients_match_the_compositions() {
        // The fused norms exist in f32 (not f64): compare to f32 rounding.
        let x = var(&[2, 3, 8], 4, DType::F32);
        let alpha = var(&[8], 5, DType::F32);
        check(
            &[x.clone(), alpha.clone()],
            |t| rms_norm(&t[0], &t[1], 1e-6),
            |t| candle_nn::ops::rms_norm_slow(&t[0], &t[1], 1e-6),
            1e-5,
        );
        let beta = var(&[8], 6, DType::F32);
        check(
            &[x, alpha, beta],
            |t| layer_norm(&t[0], &t[1], &t[2], 1e-6),
            |t| candle_nn::ops::layer_norm_slow(&t[0], &t[1], &t[2], 1e-6),
            1e-5,
        );
    }

    #[test]
    fn frozen_weights_get_no_gradient_and_inputs_the_right_one() {
        let x = var(&[5, 4], 7, DType::F64);
        let (w, b) = (lcg_tensor(&[3, 4], 8), lcg_tensor(&[3], 9));
        check(
            std::slice::from_ref(&x),
            |t| frozen_linear(&t[0], &w, Some(&b)),
            |t| t[0].matmul(&w.t()?)?.broadcast_add(&b),
            1e-12,
        );
        let y = frozen_linear(x.as_tensor(), &w, Some(&b)).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&w).is_none() && grads.get(&b).is_none());

        // A frozen norm weight gets no gradient either, a trained one does.
        let x = var(&[5, 4], 7, DType::F32);
        let alpha = lcg_tensor(&[4], 10).to_dtype(DType::F32).unwrap();
        let y = rms_norm(x.as_tensor(), &alpha, 1e-6).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&alpha).is_none() && grads.get(x.as_tensor()).is_some());
    }

    #[test]
    fn candle_fused_kernels_drop_the_graph() {
        // Why this module exists: through candle-nn 0.11's fused kernels a variable gets no
        // gradient at all (if this starts failing, candle has gained a backward for them).
        let x = var(&[2, 4], 13, DType::F32);
        let a = lcg_tensor(&[4], 14).to_dtype(DType::F32).unwrap();
        for y in [
            candle_nn::ops::rms_norm(x.as_tensor(), &a, 1e-6).unwrap(),
            candle_nn::ops::softmax_last_dim(x.as_tensor()).unwrap(),
        ] {
            assert!(!y.track_op());
        }
    }

    #[test]
    fn untracked_inputs_take_the_fused_kernels_unchanged() {
        let x = lcg_tensor(&[3, 6], 11).to_dtype(DType::F32).unwrap();
        let a = lcg_tensor(&[6], 12).to_dtype(DType::F32).unwrap();
        let fused = candle_nn::ops::rms_norm(&x, &a, 1e-6).unwrap();
        let ours = rms_norm(&x, &a, 1e-6).unwrap();
        assert!(!ours.track_op());
        let diff: f32 = (fused - ours)
            .unwrap()
            .abs()
            .unwrap()
            .max_keepdim(1)
            .unwrap()
            .max(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(diff, 0.0);
    }
}
