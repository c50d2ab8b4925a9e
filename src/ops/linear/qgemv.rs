//! Few-row products with quantized weights (decoding), on integer dot products.
//!
//! Unpacking a group of weights to f32 costs more instructions than reading it from memory
//! takes time: f32 kernels on q8/q4 ran no faster than bf16 here. So the rows of `x` are
//! quantized too, per group of [`GROUP`] to int8 with their own scale (`dx = max|x| / 127`),
//! and each group's product is an exact integer sum, scaled once:
//!
//! `y = Σ_g dw_g · dx_g · Σ_j qw_j · qx_j`
//!
//! This adds the rounding of `x` to that of the weights (the same scheme as llama.cpp's
//! q8_0/q4_0 products). Every kernel computes the same integer sums; they differ only in the
//! order the f32 terms are added.
//!
//! - AVX-512 VNNI: `vpdpbusd` multiplies 64 unsigned bytes by 64 signed bytes and adds groups
//!   of four into 16 int32 lanes. q8 weights are made unsigned by flipping their sign bit
//!   (`w + 128`), q4 nibbles already are (`q + 8`); the excess (`128·Σqx`, `8·Σqx` over each
//!   lane's four values) is subtracted per lane from sums precomputed with `x`. Each lane is
//!   then scaled by `dx·dw` of its group, in f32.
//! - AVX2: `vpmaddubsw` + `vpmaddwd`, one group per step ([`rows_avx2`]).
//! - Elsewhere, plain Rust.

use super::Isa;
use super::quant::{GROUP, QuantFormat, f16_to_f32};

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// The rows of `x`, quantized per group, laid out for the kernels.
pub struct QuantizedRows {
    pub m: usize,
    /// Padded row length (whole groups).
    pub kp: usize,
    /// `[m, kp]` int8 values, in the order the kernel reads the weights' bytes: natural, or
    /// for q4 under the VNNI kernel each block of four groups as the low nibbles' values (16
    /// per group) then the high ones'.
    q: Vec<i8>,
    /// `[m, kp / GROUP]` scales.
    d: Vec<f32>,
    /// `[m, kp / 4]`: per four consecutive values of `q`, their sum times the weights' offset
    /// (128 for q8, 8 for q4), what the unsigned weights add to a lane.
    excess: Vec<i32>,
    /// `[m, kp / 4]`: the scale `dx` of each lane's group.
    lane_d: Vec<f32>,
    /// `[m, kp / GROUP]`: the sum of each group's values.
    group_sum: Vec<i32>,
    /// Whether q4 values are in the VNNI kernel's block order (else natural order).
    blocked: bool,
}

/// Quantizes up to [`GROUP`] values of `x` to int8 with one scale `dx = max|x| / 127`
/// (rounding half away from zero), zero-padding the rest of `out`; returns `dx`.
pub(super) fn quantize_x_group(src: &[f32], out: &mut [i8; GROUP]) -> f32 {
    let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
    let dx = amax / 127.0;
    let inv = if dx > 0.0 { 1.0 / dx } else { 0.0 };
    out.fill(0);
    for (dst, &v) in out.iter_mut().zip(src) {
        let r = v * inv;
        *dst = ((r + 0.5f32.copysign(r)) as i32).clamp(-127, 127) as i8;
    }
    dx
}

/// Groups per block in the q4 layout: 64 bytes of packed weights, one AVX-512 register.
const Q4_BLOCK: usize = 4;

impl QuantizedRows {
    /// Quantizes `x` `[m, k]` for products with weights of `format` (rows padded to `kp`) on
    /// the kernel for `isa`.
    pub fn new(isa: Isa, format: QuantFormat, x: &[f32], m: usize, k: usize, kp: usize) -> Self {
        let groups = kp / GROUP;
        let blocked = format == QuantFormat::Q4 && isa == Isa::Avx512 && has_vnni();
        let mut q = vec![0i8; m * kp];
        let mut d = vec![0f32; m * groups];
        let mut group_sum = vec![0i32; m * groups];
        let mut natural = [0i8; GROUP];
        for i in 0..m {
            let row = &x[i * k..(i + 1) * k];
            for g in 0..groups {
                let src = &row[(g * GROUP).min(k)..((g + 1) * GROUP).min(k)];
                let dx = quantize_x_group(src, &mut natural);
                d[i * groups + g] = dx;
                group_sum[i * groups + g] = natural.iter().map(|&v| v as i32).sum();
                let out = &mut q[i * kp..(i + 1) * kp];
                match blocked {
                    false => out[g * GROUP..(g + 1) * GROUP].copy_from_slice(&natural),
                    true => {
                        // Block of Q4_BLOCK groups: low-nibble values of each group (16 each)
                        // first, then the high ones; a partial last block keeps the order.
                        let (block, slot) = (g / Q4_BLOCK, g % Q4_BLOCK);
                        let base = block * Q4_BLOCK * GROUP;
                        let in_block = Q4_BLOCK.min(groups - block * Q4_BLOCK);
                        let half = GROUP / 2;
                        out[base + slot * half..base + (slot + 1) * half]
                            .copy_from_slice(&natural[..half]);
                        let hi = base + in_block * half + slot * half;
                        out[hi..hi + half].copy_from_slice(&natural[half..]);
                    }
                }
            }
        }
        let offset = match format {
            QuantFormat::Q8 => 128,
            QuantFormat::Q4 => 8,
        };
        let excess = q
            .chunks_exact(4)
            .map(|c| offset * c.iter().map(|&v| v as i32).sum::<i32>())
            .collect();
        // Which group a lane (four values of `q`) belongs to depends on the layout.
        let mut lane_d = vec![0f32; m * kp / 4];
        for i in 0..m {
            for lane in 0..kp / 4 {
                let g = match blocked {
                    false => lane * 4 / GROUP,
                    true => {
                        let pos = lane * 4;
                        let base = pos / (Q4_BLOCK * GROUP);
                        let in_block = Q4_BLOCK.min(groups - base * Q4_BLOCK);
                        let within = pos % (Q4_BLOCK * GROUP) % (in_block * GROUP / 2);
                        base * Q4_BLOCK + within / (GROUP / 2)
                    }
                };
                lane_d[i * kp / 4 + lane] = d[i * groups + g];
            }
        }
        Self {
            m,
            kp,
            q,
            d,
            excess,
            lane_d,
            group_sum,
            blocked,
        }
    }

    /// Where group `g`'s values for the low and the high nibbles start in a q4 row.
    #[inline(always)]
    fn q4_halves(&self, g: usize) -> (usize, usize) {
        const HALF: usize = GROUP / 2;
        if !self.blocked {
            return (g * GROUP, g * GROUP + HALF);
        }
        let groups = self.kp / GROUP;
        let (block, slot) = (g / Q4_BLOCK, g % Q4_BLOCK);
        let base = block * Q4_BLOCK * GROUP;
        let in_block = Q4_BLOCK.min(groups - block * Q4_BLOCK);
        (base + slot * HALF, base + (in_block + slot) * HALF)
    }
}

/// Whether this CPU has the AVX-512 VNNI kernel's instructions.
pub fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `out` `[rows, m]`: the packed weight rows `vals` (f16 scales `scales`, little-endian
/// bytes) against every row of `xq`, with the kernel for `isa`.
pub fn rows(
    isa: Isa,
    format: QuantFormat,
    xq: &QuantizedRows,
    vals: &[u8],
    scales: &[u8],
    out: &mut [f32],
) {
    match isa {
        // Safety: the CPU has the instructions (checked here, and `isa.available()` by the
        // caller); the slices hold whole padded rows.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if has_vnni() => unsafe { rows_vnni(format, xq, vals, scales, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 if std::is_x86_feature_detected!("f16c") => unsafe {
            match format {
                QuantFormat::Q8 => rows_avx2::<false>(xq, vals, scales, out),
                QuantFormat::Q4 => rows_avx2::<true>(xq, vals, scales, out),
            }
        },
        _ => rows_portable(format, xq, vals, scales, out),
    }
}

/// One group (32 values) per step: `vpmaddubsw` multiplies unsigned by signed bytes into
/// pairs, `vpmaddwd` adds the pairs into 8 int32 lanes of four values each. q8 weights are
/// signed, so they are made unsigned with their sign moved onto `x` (`|w|·sign(x, w)`, at
/// most 2·127² per pair, no saturation); q4 nibbles are unsigned already (`q + 8`), and the
/// `8·Σx` they add is taken off per group.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; the slices hold whole padded rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2<const Q4: bool>(
    xq: &QuantizedRows,
    vals: &[u8],
    scales: &[u8],
    out: &mut [f32],
) {
    const HALF: usize = GROUP / 2;
    let (m, kp, groups) = (xq.m, xq.kp, xq.kp / GROUP);
    let rb = if Q4 { kp / 2 } else { kp };
    let mut dw = vec![0f32; groups.div_ceil(8) * 8];
    let ones = _mm256_set1_epi16(1);
    for (r, o) in out.chunks_exact_mut(m).enumerate() {
        let row = &vals[r * rb..(r + 1) * rb];
        // The row's scales, eight at a time.
        let sc = &scales[r * 2 * groups..(r + 1) * 2 * groups];
        for (c, d) in sc.chunks(16).zip(dw.chunks_exact_mut(8)) {
            let mut h = [0u8; 16];
            h[..c.len()].copy_from_slice(c);
            // Safety: both arrays hold 8 values.
            let v = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(h.as_ptr().cast()) });
            unsafe { _mm256_storeu_ps(d.as_mut_ptr(), v) };
        }
        for (i, o) in o.iter_mut().enumerate() {
            let x = &xq.q[i * kp..(i + 1) * kp];
            let dx = &xq.d[i * groups..(i + 1) * groups];
            let sums = &xq.group_sum[i * groups..(i + 1) * groups];
            let mut acc = [_mm256_setzero_ps(); 2];
            let mut correction = 0f32;
            for g in 0..groups {
                let s = dw[g] * dx[g];
                // Safety (loads): group g's bytes and values lie inside the row and x.
                let lanes = if !Q4 {
                    let w = unsafe { _mm256_loadu_si256(row.as_ptr().add(g * GROUP).cast()) };
                    let xv = unsafe { _mm256_loadu_si256(x.as_ptr().add(g * GROUP).cast()) };
                    let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(xv, w));
                    _mm256_madd_epi16(pairs, ones)
                } else {
                    let v = unsafe { _mm_loadu_si128(row.as_ptr().add(g * HALF).cast()) };
                    let mask = _mm_set1_epi8(15);
                    let lo = _mm_and_si128(v, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
                    let w = _mm256_set_m128i(hi, lo);
                    let (lo_at, hi_at) = xq.q4_halves(g);
                    let xl = unsafe { _mm_loadu_si128(x.as_ptr().add(lo_at).cast()) };
                    let xh = unsafe { _mm_loadu_si128(x.as_ptr().add(hi_at).cast()) };
                    correction += (8 * sums[g]) as f32 * s;
                    _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_set_m128i(xh, xl)), ones)
                };
                let a = g & 1;
                acc[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), _mm256_set1_ps(s), acc[a]);
            }
            let v = _mm256_add_ps(acc[0], acc[1]);
            let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
            let v = _mm_add_ss(v, _mm_shuffle_ps::<1>(v, v));
            *o = _mm_cvtss_f32(v) - correction;
        }
    }
}

/// Integer sums per group in plain Rust.
fn rows_portable(
    format: QuantFormat,
    xq: &QuantizedRows,
    vals: &[u8],
    scales: &[u8],
    out: &mut [f32],
) {
    let (m, kp, groups) = (xq.m, xq.kp, xq.kp / GROUP);
    let rb = format.row_bytes(kp);
    const HALF: usize = GROUP / 2;
    for (r, o) in out.chunks_exact_mut(m).enumerate() {
        let row = &vals[r * rb..(r + 1) * rb];
        let dw = &scales[r * 2 * groups..(r + 1) * 2 * groups];
        for (i, o) in o.iter_mut().enumerate() {
            let xr = &xq.q[i * kp..(i + 1) * kp];
            let dx = &xq.d[i * groups..(i + 1) * groups];
            let mut acc = 0f32;
            for g in 0..groups {
                let sum: i32 = match format {
                    QuantFormat::Q8 => {
                        let w: &[u8; GROUP] = row[g * GROUP..][..GROUP].try_into().unwrap();
                        let x: &[i8; GROUP] = xr[g * GROUP..][..GROUP].try_into().unwrap();
                        let mut s = 0i32;
                        for j in 0..GROUP {
                            s += (w[j] as i8 as i32) * (x[j] as i32);
                        }
                        s
                    }
                    QuantFormat::Q4 => {
                        let w: &[u8; HALF] = row[g * HALF..][..HALF].try_into().unwrap();
                        let (lo_at, hi_at) = xq.q4_halves(g);
                        let lo: &[i8; HALF] = xr[lo_at..][..HALF].try_into().unwrap();
                        let hi: &[i8; HALF] = xr[hi_at..][..HALF].try_into().unwrap();
                        let mut s = 0i32;
                        for j in 0..HALF {
                            s += ((w[j] & 15) as i32 - 8) * (lo[j] as i32);
                            s += ((w[j] >> 4) as i32 - 8) * (hi[j] as i32);
                        }
                        s
                    }
                };
                acc += sum as f32 * (dx[g] * group_scale(dw, g));
            }
            *o = acc;
        }
    }
}

/// Group `g`'s weight scale from a row's f16 scale bytes.
#[inline(always)]
fn group_scale(scales: &[u8], g: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([scales[2 * g], scales[2 * g + 1]]))
}

/// # Safety
/// The CPU must support AVX-512F, AVX-512BW and AVX-512 VNNI; the slices hold whole rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn rows_vnni(
    format: QuantFormat,
    xq: &QuantizedRows,
    vals: &[u8],
    scales: &[u8],
    out: &mut [f32],
) {
    let (m, kp, groups) = (xq.m, xq.kp, xq.kp / GROUP);
    let (rb, sb, lanes) = (format.row_bytes(kp), 2 * groups, kp / 4);
    // Values per step: 64 for q8 (one register of weights, two groups), 128 for q4 (64
    // bytes, two registers of nibbles, four groups).
    let step = match format {
        QuantFormat::Q8 => 64,
        QuantFormat::Q4 => 128,
    };
    let full = kp / step * step;
    // Lane l of a step takes the scale of the step's group l / (16 / groups per step): the
    // index vector picks it from the step's scales widened into the low lanes.
    let spread = match format {
        QuantFormat::Q8 => _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
        QuantFormat::Q4 => _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
    };
    for (r, o) in out.chunks_exact_mut(m).enumerate() {
        let row = &vals[r * rb..(r + 1) * rb];
        let dw = &scales[r * sb..(r + 1) * sb];
        for (i, o) in o.iter_mut().enumerate() {
            let x = &xq.q[i * kp..(i + 1) * kp];
            let excess = &xq.excess[i * lanes..(i + 1) * lanes];
            let lane_d = &xq.lane_d[i * lanes..(i + 1) * lanes];
            // Two accumulators so consecutive FMAs do not wait on each other.
            let mut acc = [_mm512_setzero_ps(); 2];
            let mut t = 0;
            // Safety (loads): every offset stays inside its row of kp values (kp / 2 bytes
            // for q4 weights, kp / 4 lanes, 2 bytes per group of scales).
            while t < full {
                let gs = t / GROUP;
                // This step's f16 weight scales (2 or 4), widened and spread over the lanes.
                let raw = match format {
                    QuantFormat::Q8 => _mm_cvtsi32_si128(i32::from_le_bytes(
                        dw[2 * gs..2 * gs + 4].try_into().unwrap(),
                    )),
                    QuantFormat::Q4 => unsafe { _mm_loadl_epi64(dw.as_ptr().add(2 * gs).cast()) },
                };
                let wscale =
                    _mm512_permutexvar_ps(spread, _mm512_castps256_ps512(_mm256_cvtph_ps(raw)));
                let l = t / 4;
                // A macro, not a closure: a closure would not inherit this function's target
                // features, and every intrinsic in it would become a call.
                macro_rules! lane_sums {
                    ($sums:expr, $l:expr, $a:expr) => {{
                        let (sums, l, a) = ($sums, $l, $a);
                        let e = unsafe { _mm512_loadu_si512(excess.as_ptr().add(l).cast()) };
                        let s = _mm512_cvtepi32_ps(_mm512_sub_epi32(sums, e));
                        let d = unsafe { _mm512_loadu_ps(lane_d.as_ptr().add(l)) };
                        acc[a] = _mm512_fmadd_ps(s, _mm512_mul_ps(d, wscale), acc[a]);
                    }};
                }
                match format {
                    QuantFormat::Q8 => {
                        let w = unsafe { _mm512_loadu_si512(row.as_ptr().add(t).cast()) };
                        let w = _mm512_xor_si512(w, _mm512_set1_epi8(-128));
                        let xv = unsafe { _mm512_loadu_si512(x.as_ptr().add(t).cast()) };
                        lane_sums!(
                            _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xv),
                            l,
                            (t / 64) & 1
                        );
                    }
                    QuantFormat::Q4 => {
                        let w = unsafe { _mm512_loadu_si512(row.as_ptr().add(t / 2).cast()) };
                        let mask = _mm512_set1_epi8(15);
                        let lo = _mm512_and_si512(w, mask);
                        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(w), mask);
                        let xlo = unsafe { _mm512_loadu_si512(x.as_ptr().add(t).cast()) };
                        let xhi = unsafe { _mm512_loadu_si512(x.as_ptr().add(t + 64).cast()) };
                        let zero = _mm512_setzero_si512();
                        lane_sums!(_mm512_dpbusd_epi32(zero, lo, xlo), l, 0);
                        // The high nibbles' lanes: values t+64..t+128, the same four groups.
                        lane_sums!(_mm512_dpbusd_epi32(zero, hi, xhi), l + 16, 1);
                    }
                }
                t += step;
            }
            let mut total = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
            if t < kp {
                total += tail_lanes(format, x, row, dw, excess, lane_d, t, kp);
            }
            *o = total;
        }
    }
}

/// Lanes `t / 4 .. kp / 4` (a last partial step) with the unsigned-weight arithmetic of
/// [`rows_vnni`].
#[allow(clippy::too_many_arguments)]
fn tail_lanes(
    format: QuantFormat,
    x: &[i8],
    row: &[u8],
    dw: &[u8],
    excess: &[i32],
    lane_d: &[f32],
    t: usize,
    kp: usize,
) -> f32 {
    let mut total = 0f32;
    let half = (kp - t) / 2;
    for lane in t / 4..kp / 4 {
        let mut s = 0i32;
        let first = lane * 4;
        for pos in first..first + 4 {
            let w = match format {
                QuantFormat::Q8 => (row[pos] ^ 0x80) as i32,
                QuantFormat::Q4 => {
                    // In a partial q4 block the first half of the values are the low nibbles
                    // of bytes t/2.., the second half the high nibbles of the same bytes.
                    let within = pos - t;
                    let byte = row[t / 2 + within % half];
                    (if within < half { byte & 15 } else { byte >> 4 }) as i32
                }
            };
            s += w * x[pos] as i32;
        }
        let g = match format {
            QuantFormat::Q8 => first / GROUP,
            QuantFormat::Q4 => t / GROUP + (first - t) % half / (GROUP / 2),
        };
        total += (s - excess[lane]) as f32 * (lane_d[lane] * group_scale(dw, g));
    }
    total
}
