//! Many-row products with quantized weights (prefill), on AVX-512 VNNI integer dot products.
//!
//! The same arithmetic as the few-row kernels of [`super::qgemv`]: rows of `x` quantized per
//! group of [`GROUP`] to int8 with their own scale, exact integer sums per group, each scaled
//! once by `dw · dx`, so prefill and decoding agree up to the order of f32 additions. One
//! `vpdpbusd` does 64 byte products (16 lanes × 4), four times the multiply-adds of an f32
//! FMA, which is what takes prefill past the f32 peak.
//!
//! The loop nest is the one of the bf16 GEMM (`super::gemm`): blocks of columns per thread,
//! panels of weights rebuilt for each chunk of `k` in the order the tile reads them, tiles of
//! [`MR`] rows of `x` × 32 columns with the accumulators in registers. In a panel, each group
//! holds eight steps of four values for 32 columns (a step's four bytes of a column side by
//! side, as `vpdpbusd` wants them) and the group's 32 column scales. Weights enter the
//! instruction as its unsigned operand: q8 values with the sign bit flipped (`w + 128`), q4
//! nibbles as stored (`w + 8`); each group's integer accumulator starts at `−offset · Σ qx`,
//! which takes the excess back out. `x` is the signed operand, four values broadcast per step.

use super::qgemv::quantize_x_group;
use super::quant::{GROUP, QuantFormat, QuantMatrix, f16_to_f32, padded};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows of `x` per tile: 6 × 2 float and 6 × 2 integer accumulators, two weight vectors, two
/// scale vectors and a broadcast fill 29 of the 32 registers.
const MR: usize = 6;
/// Columns per panel: two vectors of 16 lanes.
const NR: usize = 32;
/// Steps of four values in a group.
const STEPS: usize = GROUP / 4;
/// Groups per chunk of `k`: 8 × (1 KiB of values + 128 B of scales) per panel.
const KG: usize = 8;
/// Panels built together (about 72 KiB, in the L2 cache); see `super::gemm`.
const PANELS: usize = 8;
/// `u32`s of one panel's group: values (`STEPS × NR`), then `NR` f32 scales as bits.
const GROUP_WORDS: usize = STEPS * NR + NR;

/// Whether this CPU runs [`gemm_quant`].
pub fn available() -> bool {
    super::qgemv::has_vnni()
}

/// `x` `[m, k]` times the transpose of `q`, into `y` `[m, n]`.
///
/// # Panics
/// If a length does not match the shapes or the CPU lacks AVX-512 VNNI ([`available`]).
pub fn gemm_quant(x: &[f32], m: usize, q: &QuantMatrix, y: &mut [f32]) {
    assert!(available(), "this CPU has no AVX-512 VNNI instructions");
    let (k, n) = (q.k, q.n);
    assert_eq!(x.len(), m * k, "x has the wrong length");
    assert_eq!(y.len(), m * n, "y has the wrong length");
    y.fill(0.0);
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let groups = padded(k) / GROUP;
    let xq = QuantizedTiles::new(x, m, k, groups, q.format);
    let out = SharedOut(y.as_mut_ptr());
    let panels = n.div_ceil(NR);
    let threads = rayon::current_num_threads().max(1);
    let per_block = panels.div_ceil(4 * threads).clamp(1, PANELS);
    (0..panels.div_ceil(per_block))
        .into_par_iter()
        .for_each_init(
            || vec![0u32; PANELS * KG * GROUP_WORDS],
            |buf, b| {
                let j0 = b * per_block * NR;
                let cols = (per_block * NR).min(n - j0);
                column_block(&xq, q, j0, cols, buf, &out);
            },
        );
}

/// The output `[m, n]`, written by several threads at once in disjoint column blocks.
struct SharedOut(*mut f32);

// Safety: tasks write through the pointer only inside their own column block.
unsafe impl Sync for SharedOut {}

/// The rows of `x`, quantized per group and regrouped into tiles of [`MR`] rows: for each
/// group, the eight steps' four values of each row (as one `u32`), then per row the scale
/// `dx` and the accumulator's start `−offset · Σ qx` (rows past `m` are zero).
struct QuantizedTiles {
    m: usize,
    groups: usize,
    /// `[tiles][groups][STEPS][MR]`.
    q: Vec<u32>,
    /// `[tiles][groups][MR]`.
    d: Vec<f32>,
    /// `[tiles][groups][MR]`.
    start: Vec<i32>,
}

impl QuantizedTiles {
    fn new(x: &[f32], m: usize, k: usize, groups: usize, format: QuantFormat) -> Self {
        let tiles = m.div_ceil(MR);
        let offset = match format {
            QuantFormat::Q8 => 128,
            QuantFormat::Q4 => 8,
        };
        let mut q = vec![0u32; tiles * groups * STEPS * MR];
        let mut d = vec![0f32; tiles * groups * MR];
        let mut start = vec![0i32; tiles * groups * MR];
        q.par_chunks_mut(groups * STEPS * MR)
            .zip(d.par_chunks_mut(groups * MR))
            .zip(start.par_chunks_mut(groups * MR))
            .enumerate()
            .for_each(|(t, ((q, d), start))| {
                let mut vals = [0i8; GROUP];
                for r in 0..MR.min(m - t * MR) {
                    let row = &x[(t * MR + r) * k..(t * MR + r + 1) * k];
                    for g in 0..groups {
                        let src = &row[(g * GROUP).min(k)..((g + 1) * GROUP).min(k)];
                        d[g * MR + r] = quantize_x_group(src, &mut vals);
                        start[g * MR + r] = -offset * vals.iter().map(|&v| v as i32).sum::<i32>();
                        for (s, four) in vals.chunks_exact(4).enumerate() {
                            let bytes =
                                [four[0] as u8, four[1] as u8, four[2] as u8, four[3] as u8];
                            q[(g * STEPS + s) * MR + r] = u32::from_le_bytes(bytes);
                        }
                    }
                }
            });
        Self {
            m,
            groups,
            q,
            d,
            start,
        }
    }
}

/// Columns `j0..j0 + cols` of `y`, over all groups and all rows of `x`.
fn column_block(
    xq: &QuantizedTiles,
    q: &QuantMatrix,
    j0: usize,
    cols: usize,
    buf: &mut [u32],
    out: &SharedOut,
) {
    let (m, n, groups) = (xq.m, q.n, xq.groups);
    let panels = cols.div_ceil(NR);
    for g0 in (0..groups).step_by(KG) {
        let kg = KG.min(groups - g0);
        let buf = &mut buf[..panels * kg * GROUP_WORDS];
        for (p, panel) in buf.chunks_exact_mut(kg * GROUP_WORDS).enumerate() {
            let c0 = p * NR;
            pack_panel(q, j0 + c0, NR.min(cols - c0), g0, panel);
        }
        for t in 0..m.div_ceil(MR) {
            let rows = MR.min(m - t * MR);
            let base = t * groups + g0;
            let xs = &xq.q[base * STEPS * MR..(base + kg) * STEPS * MR];
            let ds = &xq.d[base * MR..(base + kg) * MR];
            let ss = &xq.start[base * MR..(base + kg) * MR];
            for (p, panel) in buf.chunks_exact(kg * GROUP_WORDS).enumerate() {
                let c0 = p * NR;
                // Safety: `available()` was asserted; the tile reads `kg` groups of its
                // quantized rows and of the panel (sizes fixed by the slices above) and reads
                // and writes rows `t·MR..t·MR + rows`, columns `j0 + c0..` (at most NR, inside
                // `cols`) of the `[m, n]` output, which no other task touches.
                unsafe {
                    let y0 = out.0.add(t * MR * n + j0 + c0);
                    tile(rows, xs, ds, ss, panel, kg, y0, n, NR.min(cols - c0));
                }
            }
        }
    }
}

/// Groups `g0..g0 + kg` of weight rows `j0..j0 + cols` into a panel (columns past `cols` are
/// zero weights with zero scales).
fn pack_panel(q: &QuantMatrix, j0: usize, cols: usize, g0: usize, panel: &mut [u32]) {
    let kg = panel.len() / GROUP_WORDS;
    let groups = padded(q.k) / GROUP;
    let rb = q.format.row_bytes(q.k);
    if cols < NR {
        panel.fill(0);
    }
    for c in 0..cols {
        let j = j0 + c;
        let vals = &q.values()[j * rb..(j + 1) * rb];
        let scales = &q.scales()[j * groups * 2..(j + 1) * groups * 2];
        for gi in 0..kg {
            let g = g0 + gi;
            let words = &mut panel[gi * GROUP_WORDS..(gi + 1) * GROUP_WORDS];
            let mut unsigned = [0u8; GROUP];
            match q.format {
                QuantFormat::Q8 => {
                    for (u, &v) in unsigned.iter_mut().zip(&vals[g * GROUP..(g + 1) * GROUP]) {
                        *u = v ^ 0x80;
                    }
                }
                QuantFormat::Q4 => {
                    const HALF: usize = GROUP / 2;
                    for (j, &b) in vals[g * HALF..(g + 1) * HALF].iter().enumerate() {
                        unsigned[j] = b & 15;
                        unsigned[j + HALF] = b >> 4;
                    }
                }
            }
            for (s, four) in unsigned.chunks_exact(4).enumerate() {
                words[s * NR + c] = u32::from_le_bytes([four[0], four[1], four[2], four[3]]);
            }
            let d = f16_to_f32(u16::from_le_bytes([scales[2 * g], scales[2 * g + 1]]));
            words[STEPS * NR + c] = d.to_bits();
        }
    }
}

/// One tile: `rows` (≤ [`MR`]) quantized rows × the panel's `kg` groups, added into the
/// `rows × cols` tile of `y` at `y` (row stride `n`).
///
/// # Safety
/// AVX-512F, BW and VNNI; `xs`, `ds`, `ss` and `panel` hold `kg` groups; `y` points at `rows`
/// rows of `cols` ≤ [`NR`] writable floats.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    rows: usize,
    xs: &[u32],
    ds: &[f32],
    ss: &[i32],
    panel: &[u32],
    kg: usize,
    y: *mut f32,
    n: usize,
    cols: usize,
) {
    debug_assert!(xs.len() >= kg * STEPS * MR && ds.len() >= kg * MR && ss.len() >= kg * MR);
    debug_assert!(panel.len() >= kg * GROUP_WORDS);
    #[cfg(target_arch = "x86_64")]
    // Safety: forwarded from the caller, with `rows` equal to the kernel's `R`.
    unsafe {
        let args = (
            xs.as_ptr(),
            ds.as_ptr(),
            ss.as_ptr(),
            panel.as_ptr(),
            kg,
            y,
            n,
            cols,
        );
        match rows {
            1 => tile_vnni::<1>(args),
            2 => tile_vnni::<2>(args),
            3 => tile_vnni::<3>(args),
            4 => tile_vnni::<4>(args),
            5 => tile_vnni::<5>(args),
            _ => tile_vnni::<6>(args),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("gemm_quant asserts AVX-512 VNNI")
}

type TileArgs = (
    *const u32,
    *const f32,
    *const i32,
    *const u32,
    usize,
    *mut f32,
    usize,
    usize,
);

/// # Safety
/// As [`tile`], with `rows == R`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_vnni<const R: usize>((xs, ds, ss, panel, kg, y, n, cols): TileArgs) {
    let mask = |v: usize| -> __mmask16 {
        let live = cols.saturating_sub(16 * v).min(16);
        ((1u32 << live) - 1) as __mmask16
    };
    let (m0, m1) = (mask(0), mask(1));
    // Safety (all pointer arithmetic): group g of the rows holds STEPS × MR words from
    // xs + g·STEPS·MR and MR scales and starts from ds, ss + g·MR; group g of the panel
    // GROUP_WORDS words from panel + g·GROUP_WORDS; rows i < R of y hold the tile's columns,
    // and only lanes inside `cols` are touched (masked).
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for (i, a) in acc.iter_mut().enumerate() {
            a[0] = _mm512_maskz_loadu_ps(m0, y.add(i * n));
            a[1] = _mm512_maskz_loadu_ps(m1, y.add(i * n + 16));
        }
        for g in 0..kg {
            let x = xs.add(g * STEPS * MR);
            let w = panel.add(g * GROUP_WORDS);
            let mut sums: [[__m512i; 2]; R] = std::array::from_fn(|i| {
                let s = _mm512_set1_epi32(*ss.add(g * MR + i));
                [s, s]
            });
            for s in 0..STEPS {
                let w0 = _mm512_loadu_si512(w.add(s * NR).cast());
                let w1 = _mm512_loadu_si512(w.add(s * NR + 16).cast());
                for (i, sum) in sums.iter_mut().enumerate() {
                    let xi = _mm512_set1_epi32(*x.add(s * MR + i) as i32);
                    sum[0] = _mm512_dpbusd_epi32(sum[0], w0, xi);
                    sum[1] = _mm512_dpbusd_epi32(sum[1], w1, xi);
                }
            }
            let dw0 = _mm512_loadu_ps(w.add(STEPS * NR).cast());
            let dw1 = _mm512_loadu_ps(w.add(STEPS * NR + 16).cast());
            for (i, (a, sum)) in acc.iter_mut().zip(&sums).enumerate() {
                let dx = _mm512_set1_ps(*ds.add(g * MR + i));
                a[0] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum[0]), dw0), dx, a[0]);
                a[1] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum[1]), dw1), dx, a[1]);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(y.add(i * n), m0, a[0]);
            _mm512_mask_storeu_ps(y.add(i * n + 16), m1, a[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::linear::Isa;

    fn random(seed: &mut u64, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The same integer sums as the few-row kernels (validated against an f64 reference in
    /// `quant`), on shapes that cover every edge of the tiles: rows past a multiple of 6,
    /// columns past a multiple of 32 and of a block, k past whole groups and chunks of groups.
    #[test]
    fn matches_the_few_row_kernels_on_odd_shapes() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI (the model uses the other path)");
            return;
        }
        let mut seed = 17u64;
        for format in [QuantFormat::Q8, QuantFormat::Q4] {
            for &(m, k, n) in &[
                (8, 32, 1),
                (9, 33, 31),
                (13, 300, 33),
                (6, 64, 64),
                (25, 4304, 70),
                (40, 257, 300),
                (7, 1, 5),
            ] {
                let x = random(&mut seed, m * k);
                let w = random(&mut seed, n * k);
                let q = QuantMatrix::quantize(format, &w, n, k).unwrap();
                let mut y = vec![f32::NAN; m * n];
                gemm_quant(&x, m, &q, &mut y);
                let want = q.gemv(Isa::Portable, &x, m);
                for (idx, (a, b)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{format:?} ({m},{k},{n}) [{idx}]: {a} vs {b}"
                    );
                }
            }
        }
    }
}
