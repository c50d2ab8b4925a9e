//! Group-wise quantized weights, `q8` and `q4`, and their few-row product kernels.
//!
//! A matrix `W` `[n, k]` is cut along `k` into groups of [`GROUP`] values; each group stores
//! one f16 scale `d` and small signed integers `q` with `w ≈ d·q`:
//!
//! | format | `q` | bits per weight | scale |
//! |---|---|---|---|
//! | q8 | −127..=127, one byte each | 8.5 | `max|w| / 127` |
//! | q4 | −8..=7, two per byte | 4.5 | the group's largest-magnitude value over −8, so it maps to −8 exactly |
//!
//! Rows are padded with zeros to a whole number of groups (`k = 4304` in SigLIP is not a
//! multiple of 32). In a q4 group byte `j` holds value `j` in its low nibble and value
//! `j + 16` in its high nibble, stored as `q + 8`: one mask and one shift unpack a whole
//! group into two halves, with no shuffles.
//!
//! Products with few rows (decoding) quantize `x` to int8 per group as well and use integer
//! dot products ([`super::qgemv`]); products with many rows (prefill) dequantize slabs of
//! weights and go through the same f32 GEMM as bf16.

use super::{Isa, qgemv};
use crate::weights::SharedBytes;
use rayon::prelude::*;
use std::sync::Arc;

/// Values per group (one scale each).
pub const GROUP: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    Q8,
    Q4,
}

impl QuantFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8 => "q8",
            Self::Q4 => "q4",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "q8" => Some(Self::Q8),
            "q4" => Some(Self::Q4),
            _ => None,
        }
    }

    /// Bytes of packed values in one row of `k` weights (padding included).
    pub fn row_bytes(self, k: usize) -> usize {
        match self {
            Self::Q8 => padded(k),
            Self::Q4 => padded(k) / 2,
        }
    }
}

/// `k` rounded up to whole groups.
pub fn padded(k: usize) -> usize {
    k.div_ceil(GROUP) * GROUP
}

/// Bytes shared between tensors: a memory-mapped checkpoint's range or a buffer of our own.
#[derive(Clone)]
pub struct ByteSlice {
    bytes: SharedBytes,
    start: usize,
    len: usize,
}

impl ByteSlice {
    pub fn new(bytes: SharedBytes, start: usize, len: usize) -> Self {
        assert!(
            start + len <= (*bytes).as_ref().len(),
            "byte range out of bounds"
        );
        Self { bytes, start, len }
    }

    pub fn owned(bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        Self::new(Arc::new(bytes), 0, len)
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.bytes).as_ref()[self.start..self.start + self.len]
    }
}

/// A quantized `[n, k]` matrix: packed values `[n, row_bytes(k)]` and f16 scales
/// `[n, padded(k) / GROUP]` (little-endian bits).
#[derive(Clone)]
pub struct QuantMatrix {
    pub format: QuantFormat,
    pub n: usize,
    pub k: usize,
    values: ByteSlice,
    scales: ByteSlice,
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantMatrix({}, [{}, {}])",
            self.format.name(),
            self.n,
            self.k
        )
    }
}

/// Why a matrix cannot be quantized or a stored one cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("row {row} holds a non-finite value ({value}), which cannot be quantized")]
    NonFinite { row: usize, value: f32 },
    #[error("row {row} holds {value}, too large for an f16 scale")]
    TooLarge { row: usize, value: f32 },
    #[error("{what} has {found} bytes, expected {expected} for a {format} matrix [{n}, {k}]")]
    Size {
        what: &'static str,
        found: usize,
        expected: usize,
        format: &'static str,
        n: usize,
        k: usize,
    },
}

impl QuantMatrix {
    /// Quantizes `w` `[n, k]` (row-major f32).
    pub fn quantize(
        format: QuantFormat,
        w: &[f32],
        n: usize,
        k: usize,
    ) -> Result<Self, QuantError> {
        assert_eq!(w.len(), n * k, "w has the wrong length");
        Self::quantize_rows(format, n, k, &|r, dst| {
            dst.copy_from_slice(&w[r * k..(r + 1) * k])
        })
    }

    /// Quantizes an `[n, k]` matrix whose row `r` `fill(r, dst)` writes as f32: rows are
    /// read one at a time (in parallel), so a checkpoint's bf16 matrix is never widened whole.
    pub fn quantize_rows(
        format: QuantFormat,
        n: usize,
        k: usize,
        fill: &(dyn Fn(usize, &mut [f32]) + Sync),
    ) -> Result<Self, QuantError> {
        let groups = padded(k) / GROUP;
        let row_bytes = format.row_bytes(k);
        let mut values = vec![0u8; n * row_bytes];
        let mut scales = vec![0u8; n * groups * 2];
        let rows: Vec<Result<(), QuantError>> = values
            .par_chunks_mut(row_bytes.max(1))
            .zip(scales.par_chunks_mut((groups * 2).max(1)))
            .enumerate()
            .map_init(
                || vec![0f32; k],
                |row, (r, (vals, scs))| {
                    fill(r, row);
                    if let Some(&bad) = row.iter().find(|v| !v.is_finite()) {
                        return Err(QuantError::NonFinite { row: r, value: bad });
                    }
                    let mut group = [0f32; GROUP];
                    for g in 0..groups {
                        let src = &row[(g * GROUP).min(k)..((g + 1) * GROUP).min(k)];
                        group.fill(0.0);
                        group[..src.len()].copy_from_slice(src);
                        let d = quantize_group(format, &group, g, vals).ok_or(
                            QuantError::TooLarge {
                                row: r,
                                value: max_abs(&group),
                            },
                        )?;
                        scs[2 * g..2 * g + 2].copy_from_slice(&d.to_le_bytes());
                    }
                    Ok(())
                },
            )
            .collect();
        rows.into_iter().collect::<Result<(), _>>()?;
        Ok(Self {
            format,
            n,
            k,
            values: ByteSlice::owned(values),
            scales: ByteSlice::owned(scales),
        })
    }

    /// A matrix from stored bytes (a checkpoint written by `paligemma quantize`).
    pub fn from_parts(
        format: QuantFormat,
        n: usize,
        k: usize,
        values: ByteSlice,
        scales: ByteSlice,
    ) -> Result<Self, QuantError> {
        let size = |what, found, expected| QuantError::Size {
            what,
            found,
            expected,
            format: format.name(),
            n,
            k,
        };
        let want_values = n * format.row_bytes(k);
        let want_scales = n * padded(k) / GROUP * 2;
        if values.len != want_values {
            return Err(size("values", values.len, want_values));
        }
        if scales.len != want_scales {
            return Err(size("scales", scales.len, want_scales));
        }
        Ok(Self {
            format,
            n,
            k,
            values,
            scales,
        })
    }

    /// Packed values, `[n, row_bytes(k)]`.
    pub fn values(&self) -> &[u8] {
        self.values.as_slice()
    }

    /// f16 scales as little-endian bytes, `[n, padded(k) / GROUP]`.
    pub fn scales(&self) -> &[u8] {
        self.scales.as_slice()
    }

    /// Rows `r0..r0 + rows` as f32 `[rows, k]` into `out`.
    pub fn dequantize_rows(&self, r0: usize, out: &mut [f32]) {
        let rows = out.len() / self.k.max(1);
        assert!(r0 + rows <= self.n, "rows out of range");
        // Prefill dequantizes every weight once per call: worth the vectorised build.
        #[cfg(target_arch = "x86_64")]
        if Isa::Avx2.available() {
            // Safety: the CPU has AVX2 and FMA.
            return unsafe { self.dequantize_rows_avx2(r0, out) };
        }
        self.dequantize_rows_plain(r0, out)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dequantize_rows_avx2(&self, r0: usize, out: &mut [f32]) {
        self.dequantize_rows_plain(r0, out)
    }

    #[inline(always)]
    fn dequantize_rows_plain(&self, r0: usize, out: &mut [f32]) {
        let k = self.k;
        let rows = out.len() / k.max(1);
        let (rb, sb) = (self.format.row_bytes(k), padded(k) / GROUP * 2);
        let mut group = [0f32; GROUP];
        for (i, dst) in out.chunks_exact_mut(k.max(1)).enumerate().take(rows) {
            let r = r0 + i;
            let vals = &self.values()[r * rb..(r + 1) * rb];
            let scs = &self.scales()[r * sb..(r + 1) * sb];
            for (g, chunk) in dst.chunks_mut(GROUP).enumerate() {
                unpack_group(self.format, vals, g, scale(scs, g), &mut group);
                chunk.copy_from_slice(&group[..chunk.len()]);
            }
        }
    }

    /// The whole matrix as f32 `[n, k]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        out.par_chunks_mut((64 * self.k).max(1))
            .enumerate()
            .for_each(|(c, dst)| self.dequantize_rows(c * 64, dst));
        out
    }

    /// `x` `[m, k]` times the transpose, `[m, n]`, streaming each weight once (few rows),
    /// with `x` quantized per group to int8 ([`qgemv`]).
    pub fn gemv(&self, isa: Isa, x: &[f32], m: usize) -> Vec<f32> {
        assert!(isa.available(), "this CPU cannot run the {isa:?} kernel");
        let (k, n) = (self.k, self.n);
        assert_eq!(x.len(), m * k, "x has the wrong length");
        let kp = padded(k);
        // The kernels write y transposed, `[n, m]`, so each task owns a contiguous range.
        let mut yt = vec![0f32; n * m];
        if m == 0 || n == 0 {
            return yt;
        }
        let xq = qgemv::QuantizedRows::new(isa, self.format, x, m, k, kp);
        let (rb, groups) = (self.format.row_bytes(k), kp / GROUP);
        let chunk = chunk_rows(n, rb + 2 * groups);
        yt.par_chunks_mut(chunk * m)
            .zip(self.values().par_chunks(chunk * rb.max(1)))
            .zip(self.scales().par_chunks(chunk * (2 * groups).max(1)))
            .for_each(|((out, vals), scs)| qgemv::rows(isa, self.format, &xq, vals, scs, out));
        let mut y = vec![0f32; m * n];
        for (j, col) in yt.chunks_exact(m).enumerate() {
            for (i, &v) in col.iter().enumerate() {
                y[i * n + j] = v;
            }
        }
        y
    }
}

/// Weight rows per rayon task: about four tasks per thread, and at least 256 KiB each.
fn chunk_rows(n: usize, row_bytes: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let min_rows = (256 << 10) / row_bytes.max(1);
    n.div_ceil(4 * threads).max(min_rows).max(1)
}

fn max_abs(group: &[f32]) -> f32 {
    group.iter().fold(0f32, |a, v| a.max(v.abs()))
}

/// Writes group `g`'s packed values into `vals` (a row) and returns its f16 scale bits, or
/// `None` if the scale overflows f16.
fn quantize_group(
    format: QuantFormat,
    group: &[f32; GROUP],
    g: usize,
    vals: &mut [u8],
) -> Option<u16> {
    // The extreme value sets the scale: ±127 for q8; for q4 the value of largest magnitude
    // maps to −8, using all 16 levels.
    let (d, lo, hi) = match format {
        QuantFormat::Q8 => (max_abs(group) / 127.0, -127, 127),
        QuantFormat::Q4 => {
            let extreme = group
                .iter()
                .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
            (extreme / -8.0, -8, 7)
        }
    };
    let d16 = half::f16::from_f32(d);
    if !d16.is_finite() {
        return None;
    }
    // Rounding against the stored scale, so the error is at most half a step of what is used.
    let d = d16.to_f32();
    let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
    // Half away from zero, as `f32::round`, without its library call on baseline x86-64.
    let q = |v: f32| {
        let r = v * inv;
        ((r + 0.5f32.copysign(r)) as i32).clamp(lo, hi)
    };
    match format {
        QuantFormat::Q8 => {
            for (dst, &v) in vals[g * GROUP..(g + 1) * GROUP].iter_mut().zip(group) {
                *dst = q(v) as i8 as u8;
            }
        }
        QuantFormat::Q4 => {
            let half = GROUP / 2;
            for j in 0..half {
                let (a, b) = (q(group[j]) + 8, q(group[j + half]) + 8);
                vals[g * half + j] = (a | (b << 4)) as u8;
            }
        }
    }
    Some(d16.to_bits())
}

/// The f32 value of group `g`'s scale in a row's scale bytes.
#[inline(always)]
fn scale(scales: &[u8], g: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([scales[2 * g], scales[2 * g + 1]]))
}

/// Exact f16 → f32 for finite values, branch-free: the exponent is rebiased by one multiply,
/// which also turns subnormals into the right normals.
#[inline(always)]
pub(super) fn f16_to_f32(h: u16) -> f32 {
    let magnitude = f32::from_bits(((h & 0x7fff) as u32) << 13) * f32::from_bits(0x7780_0000); // 2^112
    f32::from_bits(magnitude.to_bits() | (((h & 0x8000) as u32) << 16))
}

/// Group `g` of a row, scaled, into `out`.
#[inline(always)]
fn unpack_group(format: QuantFormat, vals: &[u8], g: usize, d: f32, out: &mut [f32; GROUP]) {
    match format {
        QuantFormat::Q8 => {
            let src: &[u8; GROUP] = vals[g * GROUP..(g + 1) * GROUP].try_into().unwrap();
            for (o, &v) in out.iter_mut().zip(src) {
                *o = (v as i8) as f32 * d;
            }
        }
        QuantFormat::Q4 => {
            const HALF: usize = GROUP / 2;
            let src: &[u8; HALF] = vals[g * HALF..(g + 1) * HALF].try_into().unwrap();
            let (lo, hi) = out.split_at_mut(HALF);
            for j in 0..HALF {
                lo[j] = ((src[j] & 15) as i32 - 8) as f32 * d;
                hi[j] = ((src[j] >> 4) as i32 - 8) as f32 * d;
            }
        }
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

    fn random(seed: &mut u64, len: usize) -> Vec<f32> {
        (0..len).map(|_| lcg(seed)).collect()
    }

    #[test]
    fn f16_conversion_is_exact_for_finite_values() {
        for bits in 0..=u16::MAX {
            let h = half::f16::from_bits(bits);
            if h.is_finite() {
                assert_eq!(
                    f16_to_f32(bits).to_bits(),
                    h.to_f32().to_bits(),
                    "{bits:#x}"
                );
            }
        }
    }

    #[test]
    fn quantization_error_is_bounded_by_the_step() {
        let mut seed = 1u64;
        for format in [QuantFormat::Q8, QuantFormat::Q4] {
            for &(n, k) in &[(3, 32), (5, 77), (2, 4304), (1, 1), (4, 0)] {
                let w = random(&mut seed, n * k);
                let q = QuantMatrix::quantize(format, &w, n, k).unwrap();
                let back = q.dequantize();
                // q4 maps the extreme to −8, so values of the other sign up to +8 steps are
                // clamped to +7: up to a whole step off there.
                let (levels, steps) = match format {
                    QuantFormat::Q8 => (127.0, 0.5),
                    QuantFormat::Q4 => (8.0, 1.0),
                };
                for r in 0..n {
                    for (g, grp) in w[r * k..(r + 1) * k].chunks(GROUP).enumerate() {
                        let step = max_abs(grp) / levels;
                        for (j, &v) in grp.iter().enumerate() {
                            let got = back[r * k + g * GROUP + j];
                            // The rounding, plus the f16 rounding of the scale times |q|.
                            let bound = step * steps * 1.01 + max_abs(grp) * 1e-3;
                            assert!(
                                (got - v).abs() <= bound,
                                "{format:?} [{r},{j}] {got} vs {v}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn q4_uses_minus_eight_for_the_extreme_and_zero_groups_stay_zero() {
        let mut w = vec![0f32; 64];
        w[3] = -2.0;
        w[5] = 1.0;
        let q = QuantMatrix::quantize(QuantFormat::Q4, &w, 1, 64).unwrap();
        let back = q.dequantize();
        assert_eq!(back[3], -2.0);
        assert_eq!(back[5], 1.0);
        assert!(back[32..].iter().all(|&v| v == 0.0));
        assert_eq!(q.values()[3] & 15, 0, "the extreme is stored as -8");
    }

    #[test]
    fn non_finite_weights_are_an_error() {
        let w = [1.0, f32::NAN, 0.5];
        let err = QuantMatrix::quantize(QuantFormat::Q8, &w, 1, 3).unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");
        let err = QuantMatrix::quantize(QuantFormat::Q4, &[1e9], 1, 1).unwrap_err();
        assert!(err.to_string().contains("f16"), "{err}");
    }

    /// Every kernel is within the rounding of `x` to int8 (half a step of its group's scale
    /// per value) of an f64 product with the dequantized matrix, and the kernels agree.
    #[test]
    fn every_kernel_matches_f64_reference_within_the_rounding_of_x() {
        let mut seed = 9u64;
        let shapes = [
            (1, 0, 3),
            (1, 1, 1),
            (2, 31, 5),
            (3, 32, 7),
            (4, 33, 9),
            (5, 77, 13),
            (7, 130, 3),
            (1, 4304, 6),
            (2, 200, 5),
            (6, 64, 300),
            (1, 2048, 20),
        ];
        for format in [QuantFormat::Q8, QuantFormat::Q4] {
            for &(m, k, n) in &shapes {
                let x = random(&mut seed, m * k);
                let w = random(&mut seed, n * k);
                let q = QuantMatrix::quantize(format, &w, n, k).unwrap();
                let wd = q.dequantize();
                let mut first: Option<Vec<f32>> = None;
                for isa in Isa::ALL.into_iter().filter(|isa| isa.available()) {
                    let y = q.gemv(isa, &x, m);
                    for i in 0..m {
                        let xr = &x[i * k..(i + 1) * k];
                        for j in 0..n {
                            let wr = &wd[j * k..(j + 1) * k];
                            let want: f64 =
                                xr.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum();
                            let bound: f64 = xr
                                .chunks(GROUP)
                                .zip(wr.chunks(GROUP))
                                .map(|(xg, wg)| {
                                    let half_step = max_abs(xg) as f64 / 127.0 / 2.0;
                                    wg.iter().map(|v| v.abs() as f64).sum::<f64>() * half_step
                                })
                                .sum();
                            let got = y[i * n + j] as f64;
                            assert!(
                                (got - want).abs() <= bound * 1.001 + 1e-5,
                                "{format:?} {isa:?} ({m},{k},{n}) [{i},{j}] {got} vs {want} (bound {bound})"
                            );
                        }
                    }
                    // Same integer sums everywhere: only the order of f32 additions differs.
                    match &first {
                        None => first = Some(y),
                        Some(f) => {
                            for (a, b) in y.iter().zip(f) {
                                assert!(
                                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                                    "{isa:?}: {a} vs {b}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn stored_parts_round_trip_and_wrong_sizes_are_refused() {
        let mut seed = 4u64;
        let w = random(&mut seed, 3 * 40);
        let q = QuantMatrix::quantize(QuantFormat::Q4, &w, 3, 40).unwrap();
        let again = QuantMatrix::from_parts(
            QuantFormat::Q4,
            3,
            40,
            ByteSlice::owned(q.values().to_vec()),
            ByteSlice::owned(q.scales().to_vec()),
        )
        .unwrap();
        assert_eq!(again.dequantize(), q.dequantize());
        let err = QuantMatrix::from_parts(
            QuantFormat::Q8,
            3,
            40,
            ByteSlice::owned(q.values().to_vec()),
            ByteSlice::owned(q.scales().to_vec()),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("values has 96 bytes, expected 192"),
            "{err}"
        );
    }
}
