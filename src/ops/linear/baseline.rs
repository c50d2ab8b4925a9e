//! The few-row bf16 product as it was before the kernels in `gemv`: blocks of 16 weight rows
//! widened into a fresh f32 buffer, then one dot product per output. Not used by the model;
//! kept so that `benches/kernels.rs` measures the new kernels against it on the same machine.

use rayon::prelude::*;

/// `x` `[m, k]` times the transpose of bf16 `w` `[n, k]`, giving `[m, n]`.
pub fn gemv_bf16(x: &[f32], m: usize, k: usize, w: &[u16], n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x has the wrong length");
    assert_eq!(w.len(), n * k, "w has the wrong length");
    // Each task widens a block of weight rows once and reuses it for every row of x.
    const BLOCK: usize = 16;
    let blocks: Vec<Vec<f32>> = (0..n.div_ceil(BLOCK))
        .into_par_iter()
        .map(|b| {
            let r0 = b * BLOCK;
            let r1 = (r0 + BLOCK).min(n);
            let mut wide = vec![0f32; (r1 - r0) * k];
            super::widen_bf16(&w[r0 * k..r1 * k], &mut wide);
            let mut out = vec![0f32; m * (r1 - r0)];
            for (i, xrow) in x.chunks_exact(k).enumerate() {
                for (j, wrow) in wide.chunks_exact(k).enumerate() {
                    out[i * (r1 - r0) + j] = dot(xrow, wrow);
                }
            }
            out
        })
        .collect();
    let mut y = vec![0f32; m * n];
    for (b, block) in blocks.iter().enumerate() {
        let r0 = b * BLOCK;
        let width = block.len() / m.max(1);
        for i in 0..m {
            y[i * n + r0..i * n + r0 + width].copy_from_slice(&block[i * width..(i + 1) * width]);
        }
    }
    y
}

/// A dot product with eight independent accumulators, so the compiler can vectorise it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // Safety: the features were just detected.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ar.iter().zip(br) {
        s = x.mul_add(*y, s);
    }
    s
}
