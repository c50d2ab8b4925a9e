//! Many-row products `y = x Wᵀ` for `x` `[m, k]` (prefill and the vision tower: hundreds of
//! rows) and `W` `[n, k]` stored as bf16 bits or f32, in f32 with FMAs.
//!
//! Prefill is compute-bound: each weight meets every row of `x`. The loop nest is the usual
//! one for a register-tiled GEMM. `x` is first regrouped into tiles of `MR` rows stored column
//! by column. Columns of `y` are cut into panels of 16 and blocks of up to [`PANELS`] panels,
//! shared among rayon's threads. For each block, `k` is walked in chunks of [`KC`]: the
//! block's weights for the chunk are read into f32 panels laid out as the tile reads them
//! (for each `k`, the panel's 16 columns side by side; 16 × 16 or 8 × 8 register transposes),
//! which stay in the L2 cache while every tile of `x` passes over them. A tile keeps
//! `MR × 16` sums in registers; each step loads 16 weights and multiplies them by one
//! broadcast value of each row. Each weight is read from memory once per call.
//!
//! - AVX-512: 24 rows × one vector. Each broadcast is used once, so it folds into its FMA as a
//!   memory operand instead of taking a shuffle on the FMA pipes (the 12 × 2 tile that reuses
//!   each broadcast ran about a fifth slower on Zen 4).
//! - AVX2 with FMA: 6 rows × two vectors of 8.
//! - Elsewhere the caller uses the `gemm` crate on widened slabs.
//!
//! Products and sums are f32 (bf16 values are exact in f32), as in the few-row kernels of
//! `gemv`: a row's result does not depend on the path beyond the order of the sums.

use super::Isa;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Values of `k` per panel: a 256 × 16-column panel is 16 KiB.
const KC: usize = 256;
/// Panels built together: a tile of rows of `x` is read from memory once per block of
/// `PANELS` panels (128 KiB, in the L2 cache) instead of once per panel.
const PANELS: usize = 8;

/// Register tile of an instruction set: rows of `x` and columns of `y`.
const fn tile_shape(isa: Isa) -> (usize, usize) {
    match isa {
        // 24 accumulators of one vector and a weight vector: 25 of 32 registers.
        Isa::Avx512 => (24, 16),
        // 6 × 2 accumulators, two weight vectors and a broadcast: 15 of 16 registers.
        Isa::Avx2 => (6, 16),
        Isa::Portable => (4, 16),
    }
}

/// Whether [`gemm`] has a kernel for `isa` (the portable setting has none: the caller
/// uses the `gemm` crate instead).
pub fn supports(isa: Isa) -> bool {
    isa != Isa::Portable && isa.available()
}

/// The weight matrix `[n, k]` of a product, as stored.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    Bf16(&'a [u16]),
    F32(&'a [f32]),
}

impl Weights<'_> {
    fn len(&self) -> usize {
        match self {
            Weights::Bf16(w) => w.len(),
            Weights::F32(w) => w.len(),
        }
    }

    fn value(&self, i: usize) -> f32 {
        match self {
            Weights::Bf16(w) => f32::from_bits((w[i] as u32) << 16),
            Weights::F32(w) => w[i],
        }
    }
}

/// Writes `x Wᵀ` into `y` `[m, n]` with the kernel for `isa`.
///
/// # Panics
/// If a length does not match the shapes, or if [`supports`]`(isa)` is false.
pub fn gemm(isa: Isa, x: &[f32], m: usize, k: usize, w: Weights<'_>, n: usize, y: &mut [f32]) {
    assert!(supports(isa), "no GEMM kernel for {isa:?} on this CPU");
    assert_eq!(x.len(), m * k, "x has the wrong length");
    assert_eq!(w.len(), n * k, "w has the wrong length");
    assert_eq!(y.len(), m * n, "y has the wrong length");
    y.fill(0.0);
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let (mr, nr) = tile_shape(isa);
    let xp = pack_rows(x, m, k, mr);
    let out = SharedOut(y.as_mut_ptr());
    // Blocks of up to PANELS panels, but enough blocks for every thread to have several.
    let panels = n.div_ceil(nr);
    let threads = rayon::current_num_threads().max(1);
    let per_block = panels.div_ceil(4 * threads).clamp(1, PANELS);
    (0..panels.div_ceil(per_block))
        .into_par_iter()
        .for_each_init(
            || vec![0f32; PANELS * KC * nr],
            |buf, b| {
                let j0 = b * per_block * nr;
                let cols = (per_block * nr).min(n - j0);
                column_block(isa, &xp, m, k, w, n, j0, cols, buf, &out);
            },
        );
}

/// `x` `[m, k]` regrouped into tiles of `mr` rows, each stored column by column
/// (`[k][mr]`, rows past `m` zero), so that a tile reads its broadcasts from one stream.
fn pack_rows(x: &[f32], m: usize, k: usize, mr: usize) -> Vec<f32> {
    let mut xp = vec![0f32; m.div_ceil(mr) * mr * k];
    xp.par_chunks_mut(mr * k)
        .zip(x.par_chunks(mr * k))
        .for_each(|(dst, rows)| {
            for (r, row) in rows.chunks_exact(k).enumerate() {
                for (p, &v) in row.iter().enumerate() {
                    dst[p * mr + r] = v;
                }
            }
        });
    xp
}

/// The output `[m, n]`, written by several threads at once in disjoint column blocks.
struct SharedOut(*mut f32);

// Safety: tasks write through the pointer only inside their own column block.
unsafe impl Sync for SharedOut {}

/// Columns `j0..j0 + cols` of `y`, over all of `k` and all rows of `x`: for each chunk of
/// `k`, the block's panels are widened once, then each tile of rows of `x` passes over all of
/// them while its chunk of `x` stays in the L1 cache.
#[allow(clippy::too_many_arguments)]
fn column_block(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    j0: usize,
    cols: usize,
    buf: &mut [f32],
    out: &SharedOut,
) {
    let (mr, nr) = tile_shape(isa);
    let panels = cols.div_ceil(nr);
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        let buf = &mut buf[..panels * kc * nr];
        for (q, panel) in buf.chunks_exact_mut(kc * nr).enumerate() {
            let c0 = q * nr;
            pack_panel(isa, w, k, j0 + c0, nr.min(cols - c0), k0, nr, panel);
        }
        let mut i0 = 0;
        while i0 < m {
            let rows = mr.min(m - i0);
            for (q, panel) in buf.chunks_exact(kc * nr).enumerate() {
                let c0 = q * nr;
                // Safety: the kernel for `isa` runs on this CPU (asserted by `gemm`);
                // the tile reads columns `k0..k0 + kc` of its packed rows (`mr` values per
                // column), the `kc × nr` panel, and reads and writes rows `i0..i0 + rows`,
                // columns `j0 + c0..` (at most `nr`, inside `cols`) of the `[m, n]` output,
                // which no other task touches.
                unsafe {
                    let x0 = x.as_ptr().add(i0 * k + k0 * mr);
                    let y0 = out.0.add(i0 * n + j0 + c0);
                    tile(isa, x0, rows, panel.as_ptr(), kc, y0, n, nr.min(cols - c0));
                }
            }
            i0 += rows;
        }
    }
}

/// Widens `w[j0 + c][k0 + p]` into `panel[p · nr + c]` for the `kc = panel.len() / nr` values
/// of the chunk; columns past `cols` are zero.
#[allow(clippy::too_many_arguments)]
fn pack_panel(
    isa: Isa,
    w: Weights<'_>,
    k: usize,
    j0: usize,
    cols: usize,
    k0: usize,
    nr: usize,
    panel: &mut [f32],
) {
    let kc = panel.len() / nr;
    assert!(
        cols <= nr && (j0 + cols) * k <= w.len() && k0 + kc <= k,
        "panel bounds"
    );
    if cols < nr {
        panel.fill(0.0);
    }
    // Square blocks of `b` rows × `b` values go through the vector transpose; the edges (fewer
    // than `b` rows or values left) one value at a time.
    let b = match isa {
        Isa::Avx512 => 16,
        Isa::Avx2 => 8,
        Isa::Portable => 1,
    };
    let (full_c, full_p) = if b > 1 {
        (cols / b * b, kc / b * b)
    } else {
        (0, 0)
    };
    for c0 in (0..full_c).step_by(b) {
        for p0 in (0..full_p).step_by(b) {
            let src = (j0 + c0) * k + k0 + p0;
            let dst = p0 * nr + c0;
            // Safety: rows j0 + c0 .. + b of w hold the b values from k0 + p0 (asserted
            // bounds, c0 + b ≤ cols, p0 + b ≤ kc); the panel holds b rows of nr from p0, at
            // columns c0 .. c0 + b ≤ nr; the kernel for `isa` runs on this CPU.
            unsafe {
                let dst = panel.as_mut_ptr().add(dst);
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => transpose16(Rows::at(w, src), k, dst, nr),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => transpose8(Rows::at(w, src), k, dst, nr),
                    _ => unreachable!(),
                }
            }
        }
    }
    for c in 0..cols {
        let row = (j0 + c) * k + k0;
        let from = if c < full_c { full_p } else { 0 };
        for p in from..kc {
            panel[p * nr + c] = w.value(row + p);
        }
    }
}

/// Where a block of weight rows starts, in either storage.
#[derive(Clone, Copy)]
enum Rows {
    Bf16(*const u16),
    F32(*const f32),
}

impl Rows {
    /// The address of value `i` of `w`.
    ///
    /// # Safety
    /// `i` must be inside `w`.
    unsafe fn at(w: Weights<'_>, i: usize) -> Self {
        // Safety: the caller keeps `i` inside `w`.
        unsafe {
            match w {
                Weights::Bf16(w) => Rows::Bf16(w.as_ptr().add(i)),
                Weights::F32(w) => Rows::F32(w.as_ptr().add(i)),
            }
        }
    }
}

/// Reads the 16 × 16 block of weights at `src` (row stride `k`) as f32 and writes its transpose
/// at `dst` (row stride `nr`): `dst[p · nr + c] = src[c · k + p]`.
///
/// # Safety
/// AVX-512F; 16 rows of 16 readable values at `src`, 16 rows of 16 writable values at `dst`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(src: Rows, k: usize, dst: *mut f32, nr: usize) {
    // Safety: every access is inside the two blocks the caller vouches for.
    unsafe {
        let r: [__m512; 16] = std::array::from_fn(|c| match src {
            Rows::Bf16(p) => {
                let raw = _mm256_loadu_si256(p.add(c * k).cast());
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
            }
            Rows::F32(p) => _mm512_loadu_ps(p.add(c * k)),
        });
        // Pairs of rows interleaved by 32 bits, then by 64 bits: b[4g + t] holds, in each
        // 128-bit lane L, rows 4g..4g + 4 of column 4L + t.
        let a: [__m512; 16] = std::array::from_fn(|i| {
            let (x, y) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_ps(x, y)
            } else {
                _mm512_unpackhi_ps(x, y)
            }
        });
        let b: [__m512; 16] = std::array::from_fn(|i| {
            let (g, t) = (i / 4, i % 4);
            let (x, y) = (
                _mm512_castps_pd(a[4 * g + t / 2]),
                _mm512_castps_pd(a[4 * g + 2 + t / 2]),
            );
            _mm512_castpd_ps(if t % 2 == 0 {
                _mm512_unpacklo_pd(x, y)
            } else {
                _mm512_unpackhi_pd(x, y)
            })
        });
        // Then the 4 × 4 lanes: column 4L + t gathers lane L of b[t], b[4 + t], b[8 + t],
        // b[12 + t].
        for t in 0..4 {
            let c0 = _mm512_shuffle_f32x4::<0x88>(b[t], b[4 + t]);
            let c1 = _mm512_shuffle_f32x4::<0xDD>(b[t], b[4 + t]);
            let c2 = _mm512_shuffle_f32x4::<0x88>(b[8 + t], b[12 + t]);
            let c3 = _mm512_shuffle_f32x4::<0xDD>(b[8 + t], b[12 + t]);
            _mm512_storeu_ps(dst.add(t * nr), _mm512_shuffle_f32x4::<0x88>(c0, c2));
            _mm512_storeu_ps(dst.add((4 + t) * nr), _mm512_shuffle_f32x4::<0x88>(c1, c3));
            _mm512_storeu_ps(dst.add((8 + t) * nr), _mm512_shuffle_f32x4::<0xDD>(c0, c2));
            _mm512_storeu_ps(dst.add((12 + t) * nr), _mm512_shuffle_f32x4::<0xDD>(c1, c3));
        }
    }
}

/// [`transpose16`] for 8 × 8 blocks with AVX2.
///
/// # Safety
/// AVX2; 8 rows of 8 readable values at `src`, 8 rows of 8 writable values at `dst`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose8(src: Rows, k: usize, dst: *mut f32, nr: usize) {
    // Safety: every access is inside the two blocks the caller vouches for.
    unsafe {
        let r: [__m256; 8] = std::array::from_fn(|c| match src {
            Rows::Bf16(p) => {
                let raw = _mm_loadu_si128(p.add(c * k).cast());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
            }
            Rows::F32(p) => _mm256_loadu_ps(p.add(c * k)),
        });
        let a: [__m256; 8] = std::array::from_fn(|i| {
            let (x, y) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                _mm256_unpacklo_ps(x, y)
            } else {
                _mm256_unpackhi_ps(x, y)
            }
        });
        // s[4h + t] holds, in each 128-bit lane L, rows 4h..4h + 4 of column 4L + t.
        let s: [__m256; 8] = std::array::from_fn(|i| {
            let (h, t) = (i / 4, i % 4);
            let (x, y) = (a[4 * h + t / 2], a[4 * h + 2 + t / 2]);
            if t % 2 == 0 {
                _mm256_shuffle_ps::<0x44>(x, y)
            } else {
                _mm256_shuffle_ps::<0xEE>(x, y)
            }
        });
        for t in 0..4 {
            _mm256_storeu_ps(
                dst.add(t * nr),
                _mm256_permute2f128_ps::<0x20>(s[t], s[4 + t]),
            );
            _mm256_storeu_ps(
                dst.add((4 + t) * nr),
                _mm256_permute2f128_ps::<0x31>(s[t], s[4 + t]),
            );
        }
    }
}

/// The first `rows` rows of a packed tile of `x` at `x` (`kc` columns of `mr` values) times
/// the `kc × nr` panel, added into the `rows × cols` tile of `y` at `y` (row stride `n`).
///
/// # Safety
/// The CPU runs `isa`'s kernel; `rows` ≤ the tile's rows, `cols` ≤ its columns; `x` points at
/// `kc · mr` readable values, `panel` at `kc · nr`, `y` at `rows` rows of `cols` writable
/// values.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    isa: Isa,
    x: *const f32,
    rows: usize,
    panel: *const f32,
    kc: usize,
    y: *mut f32,
    n: usize,
    cols: usize,
) {
    // Safety (every arm): forwarded from the caller, with `rows` equal to the kernel's `R`.
    macro_rules! by_rows {
        ($kernel:ident, $($r:literal)+) => {
            match rows {
                $($r => unsafe { $kernel::<$r>(x, panel, kc, y, n, cols) },)+
                _ => unreachable!("{rows} rows in a tile"),
            }
        };
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            by_rows!(tile_avx512, 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24)
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => by_rows!(tile_avx2, 1 2 3 4 5 6),
        _ => unreachable!("no GEMM kernel for {isa:?}"),
    }
}

/// # Safety
/// As [`tile`], with AVX-512F, `R` ≤ 24 rows and up to 16 columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const R: usize>(
    x: *const f32,
    panel: *const f32,
    kc: usize,
    y: *mut f32,
    n: usize,
    cols: usize,
) {
    let mask = ((1u32 << cols.min(16)) - 1) as __mmask16;
    // Safety (all pointer arithmetic): x holds kc columns of 24 rows; the panel holds kc
    // rows of 16; rows i < R of y hold the tile's columns, and only lanes inside `cols` are
    // touched (masked).
    unsafe {
        let mut acc = [_mm512_setzero_ps(); R];
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm512_maskz_loadu_ps(mask, y.add(i * n));
        }
        for p in 0..kc {
            let b = _mm512_loadu_ps(panel.add(p * 16));
            // Each broadcast is used once, so it folds into its FMA as a memory operand
            // (`{1to16}`) and costs a load, not a shuffle on the FMA pipes.
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_set1_ps(*x.add(p * 24 + i)), b, *a);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(y.add(i * n), mask, *a);
        }
    }
}

/// # Safety
/// As [`tile`], with AVX2 and FMA, `R` ≤ 6 rows and up to 16 columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize>(
    x: *const f32,
    panel: *const f32,
    kc: usize,
    y: *mut f32,
    n: usize,
    cols: usize,
) {
    // Safety (all pointer arithmetic): as in `tile_avx512`; the tile's columns are read and
    // written through a 16-value buffer when the block is narrower than 16.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut edge = [[0f32; 16]; R];
        for (i, a) in acc.iter_mut().enumerate() {
            let src = if cols == 16 {
                y.add(i * n).cast_const()
            } else {
                std::ptr::copy_nonoverlapping(y.add(i * n), edge[i].as_mut_ptr(), cols);
                edge[i].as_ptr()
            };
            a[0] = _mm256_loadu_ps(src);
            a[1] = _mm256_loadu_ps(src.add(8));
        }
        for p in 0..kc {
            let b0 = _mm256_loadu_ps(panel.add(p * 16));
            let b1 = _mm256_loadu_ps(panel.add(p * 16 + 8));
            for (i, a) in acc.iter_mut().enumerate() {
                let xi = _mm256_set1_ps(*x.add(p * 6 + i));
                a[0] = _mm256_fmadd_ps(xi, b0, a[0]);
                a[1] = _mm256_fmadd_ps(xi, b1, a[1]);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            if cols == 16 {
                _mm256_storeu_ps(y.add(i * n), a[0]);
                _mm256_storeu_ps(y.add(i * n + 8), a[1]);
            } else {
                _mm256_storeu_ps(edge[i].as_mut_ptr(), a[0]);
                _mm256_storeu_ps(edge[i].as_mut_ptr().add(8), a[1]);
                std::ptr::copy_nonoverlapping(edge[i].as_ptr(), y.add(i * n), cols);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f32 weights take the same loop as bf16 ones (whose tests are in `linear`): every
    /// kernel against an f64 reference, on shapes past the tiles' and the transposes' edges.
    #[test]
    fn f32_weights_match_f64_reference() {
        let mut seed = 29u64;
        let mut random = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                })
                .collect()
        };
        for isa in Isa::ALL.into_iter().filter(|&isa| supports(isa)) {
            for &(m, k, n) in &[(8, 16, 16), (25, 17, 33), (30, 300, 47), (9, 520, 16)] {
                let (x, w) = (random(m * k), random(n * k));
                let mut y = vec![f32::NAN; m * n];
                gemm(isa, &x, m, k, Weights::F32(&w), n, &mut y);
                for i in 0..m {
                    for j in 0..n {
                        let terms = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64);
                        let (want, scale) =
                            terms.fold((0f64, 0f64), |(s, a), v| (s + v, a + v.abs()));
                        let got = y[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * scale + 1e-6,
                            "{isa:?} ({m},{k},{n}) [{i},{j}] {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
