//! Few-row products with bf16 weights, `y = x Wᵀ` for `x` `[m, k]` (decoding: m < 8) and `W`
//! `[n, k]` stored as bf16 bits.
//!
//! Decoding is memory-bound: each weight is used once per row of `x`, so all that matters is
//! reading the weights exactly once at the memory's full speed. A tile reads `NR` rows of `W`,
//! widens them to f32 in registers (bf16 is the top half of an f32, so widening is a 16-bit
//! shift) and multiplies them into accumulators for up to `max_rows` rows of `x` at once; the
//! other rows of `x` reuse the same weights while they are still in cache. Output rows are
//! shared among rayon's threads in chunks large enough that scheduling costs nothing next to
//! the reads.
//!
//! There is one kernel per instruction set ([`Isa`]): AVX-512, AVX2 with FMA, and portable
//! code for everything else, picked at run time so one binary runs at full speed everywhere.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows of `W` per tile: four independent weight streams keep several loads in flight, and
/// 4 × `max_rows` accumulators still fit the registers of every instruction set.
const NR: usize = 4;

/// The instruction set a kernel runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F: 16 f32 lanes, 32 registers.
    Avx512,
    /// AVX2 and FMA: 8 f32 lanes, 16 registers.
    Avx2,
    /// Plain Rust that the compiler vectorises for the baseline target.
    Portable,
}

impl Isa {
    /// Every kernel, fastest first.
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Portable];

    /// The fastest kernel this CPU runs.
    pub fn detect() -> Self {
        Self::ALL
            .into_iter()
            .find(|isa| isa.available())
            .unwrap_or(Isa::Portable)
    }

    /// Whether this CPU has the instructions the kernel needs.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx512 | Isa::Avx2 => false,
            Isa::Portable => true,
        }
    }

    /// Rows of `x` one tile handles: as many as keep the `NR` × rows accumulators, `NR`
    /// widened weights and one row of `x` in registers (32 on AVX-512, 16 on AVX2).
    fn max_rows(self) -> usize {
        match self {
            Isa::Avx512 => 4,
            Isa::Avx2 => 3,
            Isa::Portable => 2,
        }
    }
}

/// Writes `x Wᵀ` into `y` `[m, n]` with the kernel for `isa`.
///
/// # Panics
/// If a length does not match the shapes, or if this CPU lacks `isa`'s instructions.
pub fn gemv_bf16(isa: Isa, x: &[f32], m: usize, k: usize, w: &[u16], n: usize, y: &mut [f32]) {
    assert!(isa.available(), "this CPU cannot run the {isa:?} kernel");
    assert_eq!(x.len(), m * k, "x has the wrong length");
    assert_eq!(w.len(), n * k, "w has the wrong length");
    assert_eq!(y.len(), m * n, "y has the wrong length");
    if m == 0 || n == 0 {
        return;
    }
    let chunk = chunk_rows(n, k);
    let out = SharedOut::new(y);
    w.par_chunks(chunk * k.max(1))
        .enumerate()
        .for_each(|(c, wc)| rows_into(isa, x, m, k, wc, c * chunk, n, &out));
    // k == 0: par_chunks saw an empty `w` and wrote nothing, and y is already the empty sum.
    if k == 0 {
        y.fill(0.0);
    }
}

/// Rows of `W` per rayon task, a multiple of `NR`.
fn chunk_rows(n: usize, k: usize) -> usize {
    // About four chunks per thread let the others take over from a thread slowed by other
    // work; at least 256 KiB of weights per chunk keep rayon's cost per task (microseconds)
    // small next to the reads.
    let threads = rayon::current_num_threads().max(1);
    let min_rows = (256 << 10) / (2 * k.max(1));
    let rows = n.div_ceil(4 * threads).max(min_rows).max(NR);
    rows.div_ceil(NR) * NR
}

/// `y[.., r0..r0 + rows]` from the weight rows `w` `[rows, k]`, which start at row `r0`.
#[allow(clippy::too_many_arguments)]
fn rows_into(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u16],
    r0: usize,
    n: usize,
    out: &SharedOut,
) {
    let rows = w.len() / k;
    let full = rows / NR * NR;
    for r in (0..full).step_by(NR) {
        tiles::<NR>(isa, x, m, k, &w[r * k..(r + NR) * k], r0 + r, n, out);
    }
    for r in full..rows {
        tiles::<1>(isa, x, m, k, &w[r * k..(r + 1) * k], r0 + r, n, out);
    }
}

/// Every row of `x` against the `R` weight rows `w`, a few rows of `x` at a time.
#[allow(clippy::too_many_arguments)]
fn tiles<const R: usize>(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u16],
    col: usize,
    n: usize,
    out: &SharedOut,
) {
    let mut i0 = 0;
    while i0 < m {
        let mr = (m - i0).min(isa.max_rows());
        let xs = &x[i0 * k..(i0 + mr) * k];
        match mr {
            1 => store(tile::<1, R>(isa, xs, k, w), i0, col, n, out),
            2 => store(tile::<2, R>(isa, xs, k, w), i0, col, n, out),
            3 => store(tile::<3, R>(isa, xs, k, w), i0, col, n, out),
            _ => store(tile::<4, R>(isa, xs, k, w), i0, col, n, out),
        }
        i0 += mr;
    }
}

fn store<const MR: usize, const R: usize>(
    t: [[f32; R]; MR],
    row: usize,
    col: usize,
    n: usize,
    out: &SharedOut,
) {
    for (i, ti) in t.iter().enumerate() {
        for (j, &v) in ti.iter().enumerate() {
            out.write((row + i) * n + col + j, v);
        }
    }
}

/// Dot products of the `MR` rows of `x` `[MR, k]` with the `R` rows of `w` `[R, k]`.
fn tile<const MR: usize, const R: usize>(
    isa: Isa,
    x: &[f32],
    k: usize,
    w: &[u16],
) -> [[f32; R]; MR] {
    assert!(x.len() == MR * k && w.len() == R * k, "tile shapes");
    match isa {
        // Safety: `gemv_bf16` checked that this CPU has the instructions, and the shapes
        // were checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { tile_avx512::<MR, R>(x, k, w) },
        // Safety: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { tile_avx2::<MR, R>(x, k, w) },
        _ => tile_portable::<MR, R>(x, k, w),
    }
}

/// The output `[m, n]`, written by several threads at once at disjoint indices.
struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// Safety: `SharedOut` only writes (never reads) through `ptr`, at indices the callers keep
// disjoint between threads (each rayon task owns the columns of its chunk of weight rows).
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn new(y: &mut [f32]) -> Self {
        Self {
            ptr: y.as_mut_ptr(),
            len: y.len(),
        }
    }

    fn write(&self, i: usize, v: f32) {
        assert!(i < self.len, "output index {i} out of {}", self.len);
        // Safety: `i` is inside the buffer (asserted), which `gemv_bf16` borrows mutably for
        // longer than any task runs, and no other thread writes index `i` (see `Sync`).
        unsafe { self.ptr.add(i).write(v) }
    }
}

/// # Safety
/// The CPU must support AVX-512F, `x.len() == MR * k` and `w.len() == R * k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const MR: usize, const R: usize>(
    x: &[f32],
    k: usize,
    w: &[u16],
) -> [[f32; R]; MR] {
    const L: usize = 16;
    let mut acc = [[_mm512_setzero_ps(); R]; MR];
    let body = k / L * L;
    let mut t = 0;
    while t < body {
        let mut wv = [_mm512_setzero_ps(); R];
        for (j, wj) in wv.iter_mut().enumerate() {
            // Safety: t + L <= k, so the L values at row j, column t lie inside w [R, k].
            *wj = unsafe { widen16(w.as_ptr().add(j * k + t)) };
            prefetch_next_tile(w, j * k + t + R * k);
        }
        for (i, acc_i) in acc.iter_mut().enumerate() {
            // Safety: as above, inside x [MR, k].
            let xv = unsafe { _mm512_loadu_ps(x.as_ptr().add(i * k + t)) };
            for (a, &wj) in acc_i.iter_mut().zip(&wv) {
                *a = _mm512_fmadd_ps(xv, wj, *a);
            }
        }
        t += L;
    }
    if t < k {
        // The last k % L columns, zero-padded to a full vector.
        let (xt, wt) = padded_tail::<MR, R, L>(x, k, w, t);
        for (i, acc_i) in acc.iter_mut().enumerate() {
            // Safety: xt[i] and wt[j] are arrays of exactly L values.
            let xv = unsafe { _mm512_loadu_ps(xt[i].as_ptr()) };
            for (a, wj) in acc_i.iter_mut().zip(&wt) {
                *a = _mm512_fmadd_ps(xv, unsafe { widen16(wj.as_ptr()) }, *a);
            }
        }
    }
    let mut out = [[0f32; R]; MR];
    for (o, a) in out.iter_mut().flatten().zip(acc.iter().flatten()) {
        *o = _mm512_reduce_add_ps(*a);
    }
    out
}

/// Sixteen bf16 values at `p` as f32.
///
/// # Safety
/// `p` must point at 16 readable `u16`s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn widen16(p: *const u16) -> __m512 {
    // Safety: the caller guarantees 32 readable bytes; loadu needs no alignment.
    let raw = unsafe { _mm256_loadu_si256(p.cast()) };
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
}

/// # Safety
/// The CPU must support AVX2 and FMA, `x.len() == MR * k` and `w.len() == R * k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const MR: usize, const R: usize>(
    x: &[f32],
    k: usize,
    w: &[u16],
) -> [[f32; R]; MR] {
    const L: usize = 8;
    let mut acc = [[_mm256_setzero_ps(); R]; MR];
    let body = k / L * L;
    let mut t = 0;
    while t < body {
        let mut wv = [_mm256_setzero_ps(); R];
        for (j, wj) in wv.iter_mut().enumerate() {
            // Safety: t + L <= k, so the L values at row j, column t lie inside w [R, k].
            *wj = unsafe { widen8(w.as_ptr().add(j * k + t)) };
            prefetch_next_tile(w, j * k + t + R * k);
        }
        for (i, acc_i) in acc.iter_mut().enumerate() {
            // Safety: as above, inside x [MR, k].
            let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add(i * k + t)) };
            for (a, &wj) in acc_i.iter_mut().zip(&wv) {
                *a = _mm256_fmadd_ps(xv, wj, *a);
            }
        }
        t += L;
    }
    if t < k {
        // The last k % L columns, zero-padded to a full vector.
        let (xt, wt) = padded_tail::<MR, R, L>(x, k, w, t);
        for (i, acc_i) in acc.iter_mut().enumerate() {
            // Safety: xt[i] and wt[j] are arrays of exactly L values.
            let xv = unsafe { _mm256_loadu_ps(xt[i].as_ptr()) };
            for (a, wj) in acc_i.iter_mut().zip(&wt) {
                *a = _mm256_fmadd_ps(xv, unsafe { widen8(wj.as_ptr()) }, *a);
            }
        }
    }
    let mut out = [[0f32; R]; MR];
    for (o, a) in out.iter_mut().flatten().zip(acc.iter().flatten()) {
        *o = hsum256(*a);
    }
    out
}

/// Eight bf16 values at `p` as f32.
///
/// # Safety
/// `p` must point at 8 readable `u16`s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn widen8(p: *const u16) -> __m256 {
    // Safety: the caller guarantees 16 readable bytes; loadu needs no alignment.
    let raw = unsafe { _mm_loadu_si128(p.cast()) };
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn hsum256(a: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// Asks for the weights at `w[i]`, where `i` is the same column of the next tile's rows,
/// to be brought into cache. Each row of a tile is a separate stream that the hardware
/// prefetcher picks up again at every 4 KiB page (a whole row when k = 2048); asking one
/// tile ahead keeps the memory busy across those restarts (10-15% more GB/s on large
/// matrices on this machine).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_next_tile(w: &[u16], i: usize) {
    // A prefetch is only a hint: it reads nothing into the program and cannot fault, so the
    // address may lie past the end of `w` (the last tile); `wrapping_add` keeps computing it
    // defined.
    // Safety: SSE is part of x86_64's baseline, and prefetching any address is harmless.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().wrapping_add(i).cast::<i8>()) }
}

/// Columns `t..k` of `x` `[MR, k]` and `w` `[R, k]` (fewer than `L`), zero-padded to `L`.
#[allow(clippy::type_complexity)]
fn padded_tail<const MR: usize, const R: usize, const L: usize>(
    x: &[f32],
    k: usize,
    w: &[u16],
    t: usize,
) -> ([[f32; L]; MR], [[u16; L]; R]) {
    let mut xt = [[0f32; L]; MR];
    let mut wt = [[0u16; L]; R];
    for (i, xi) in xt.iter_mut().enumerate() {
        xi[..k - t].copy_from_slice(&x[i * k + t..(i + 1) * k]);
    }
    for (j, wj) in wt.iter_mut().enumerate() {
        wj[..k - t].copy_from_slice(&w[j * k + t..(j + 1) * k]);
    }
    (xt, wt)
}

/// The same tile in plain Rust, eight independent lanes per accumulator so that the compiler
/// can vectorise it with whatever the target offers.
fn tile_portable<const MR: usize, const R: usize>(
    x: &[f32],
    k: usize,
    w: &[u16],
) -> [[f32; R]; MR] {
    const L: usize = 8;
    let mut acc = [[[0f32; L]; R]; MR];
    let body = k / L * L;
    for t in (0..body).step_by(L) {
        let mut wv = [[0f32; L]; R];
        for (j, wj) in wv.iter_mut().enumerate() {
            for (d, &s) in wj.iter_mut().zip(&w[j * k + t..j * k + t + L]) {
                *d = bf16_to_f32(s);
            }
        }
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let xi = &x[i * k + t..i * k + t + L];
            for (a, wj) in acc_i.iter_mut().zip(&wv) {
                for l in 0..L {
                    // Not mul_add: without hardware FMA that is a slow library call.
                    a[l] += xi[l] * wj[l];
                }
            }
        }
    }
    let mut out = [[0f32; R]; MR];
    for (i, out_i) in out.iter_mut().enumerate() {
        for (j, o) in out_i.iter_mut().enumerate() {
            let a = &acc[i][j];
            let mut s = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
            for t in body..k {
                s += x[i * k + t] * bf16_to_f32(w[j * k + t]);
            }
            *o = s;
        }
    }
    out
}

fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}
