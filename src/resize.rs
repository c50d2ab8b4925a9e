//! Bicubic resampling that reproduces Pillow 13.0.0 bit for bit.
//!
//! The reference is `Image.resize((w, h), Image.BICUBIC, reducing_gap=None)` on an 8-bit RGB
//! image (the default `box`, i.e. the whole source), which is what the transformers PIL image
//! processor runs. Pillow resamples separably: each axis gets a table of fixed-point weights, and
//! the two passes are applied one after the other with an 8-bit image in between. Because of that
//! intermediate rounding, the order of the passes changes the result, so it is reproduced exactly
//! (see [`vertical_pass_first`]).
//!
//! The coefficient maths is split into small pure functions so that each step can be checked on
//! its own; the passes themselves only do integer multiply-adds.

use ::image::RgbImage;
use rayon::prelude::*;

/// The `a` parameter of the cubic convolution kernel Pillow uses (Keys' kernel with a = -0.5,
/// also known as Catmull-Rom).
pub const BICUBIC_A: f64 = -0.5;

/// Radius of the bicubic kernel in source pixels when upscaling.
pub const BICUBIC_SUPPORT: f64 = 2.0;

/// Fractional bits of the fixed-point weights. 8 bits are left for the pixel value and 2 for
/// the sum of the weights overshooting 1 (the kernel has negative lobes), so a 32-bit
/// accumulator cannot overflow.
pub const PRECISION_BITS: u32 = 32 - 8 - 2;

const CHANNELS: usize = 3;

/// Cubic convolution kernel, evaluated with the same operation order as Pillow so that the
/// double-precision weights (and therefore their fixed-point rounding) agree to the last bit.
pub fn bicubic_kernel(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        ((BICUBIC_A + 2.0) * x - (BICUBIC_A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * BICUBIC_A
    } else {
        0.0
    }
}

/// How one axis is mapped: `scale` source pixels per output pixel, and the kernel stretch.
///
/// When shrinking, the kernel is widened by the scale factor (`filter_scale`), which turns the
/// interpolation filter into an antialiasing filter; when enlarging it keeps its natural width.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AxisScale {
    pub scale: f64,
    pub filter_scale: f64,
    pub support: f64,
}

/// Scale factors for resampling `in_size` source pixels onto `out_size` output pixels, covering
/// the whole source (Pillow's default box `(0, in_size)`).
pub fn axis_scale(in_size: u32, out_size: u32) -> AxisScale {
    let scale = f64::from(in_size) / f64::from(out_size);
    let filter_scale = scale.max(1.0);
    AxisScale {
        scale,
        filter_scale,
        support: BICUBIC_SUPPORT * filter_scale,
    }
}

/// The source window `[start, start + len)` that feeds output pixel `out_index`.
///
/// Pillow rounds both ends with a C `(int)` cast, which truncates toward zero; a negative start
/// is then clamped to 0 and the end to the source size.
pub fn source_window(out_index: u32, in_size: u32, axis: &AxisScale) -> (usize, usize) {
    let center = (f64::from(out_index) + 0.5) * axis.scale;
    let start = ((center - axis.support + 0.5) as i64).max(0);
    let end = ((center + axis.support + 0.5) as i64).min(i64::from(in_size));
    let len = (end - start).max(0);
    (start as usize, len as usize)
}

/// Normalised double-precision weights for one output pixel over its source window.
///
/// The kernel is sampled at the centres of the source pixels relative to the output pixel's
/// centre, in units of the stretched kernel; the weights are then divided by their sum (not
/// multiplied by its reciprocal, which would round differently).
pub fn window_weights(out_index: u32, start: usize, len: usize, axis: &AxisScale) -> Vec<f64> {
    let center = (f64::from(out_index) + 0.5) * axis.scale;
    let inv_filter_scale = 1.0 / axis.filter_scale;
    let mut weights: Vec<f64> = (0..len)
        .map(|i| bicubic_kernel(((i + start) as f64 - center + 0.5) * inv_filter_scale))
        .collect();
    let sum: f64 = weights.iter().sum();
    if sum != 0.0 {
        for w in &mut weights {
            *w /= sum;
        }
    }
    weights
}

/// Converts a normalised weight to fixed point, rounding half away from zero as Pillow does.
pub fn to_fixed_point(weight: f64) -> i32 {
    let scaled = weight * f64::from(1u32 << PRECISION_BITS);
    if weight < 0.0 {
        (scaled - 0.5) as i32
    } else {
        (scaled + 0.5) as i32
    }
}

/// Rounds an accumulated fixed-point sum back to an 8-bit value.
///
/// The accumulator starts at one half (see [`Taps::accumulator_start`]), so the arithmetic
/// shift rounds to nearest; overshoot from the negative lobes is clamped.
pub fn fixed_point_to_u8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// All fixed-point weights for one axis: output pixel `i` reads `len[i]` source pixels starting
/// at `start[i]`, with weights `weights[i * stride .. i * stride + len[i]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taps {
    pub start: Vec<usize>,
    pub len: Vec<usize>,
    pub weights: Vec<i32>,
    pub stride: usize,
}

impl Taps {
    /// Value the accumulator starts at: one half in fixed point, so that the final shift rounds.
    pub const fn accumulator_start() -> i32 {
        1 << (PRECISION_BITS - 1)
    }

    /// Fixed-point weights for resampling `in_size` pixels to `out_size` pixels.
    pub fn new(in_size: u32, out_size: u32) -> Self {
        let axis = axis_scale(in_size, out_size);
        // Upper bound on the window length, used as the row stride of the weight table.
        let stride = (axis.support.ceil() as usize) * 2 + 1;
        let n = out_size as usize;
        let mut taps = Taps {
            start: Vec::with_capacity(n),
            len: Vec::with_capacity(n),
            weights: vec![0; n * stride],
            stride,
        };
        for out_index in 0..out_size {
            let (start, len) = source_window(out_index, in_size, &axis);
            let row = &mut taps.weights[out_index as usize * stride..][..len];
            for (dst, w) in row
                .iter_mut()
                .zip(window_weights(out_index, start, len, &axis))
            {
                *dst = to_fixed_point(w);
            }
            taps.start.push(start);
            taps.len.push(len);
        }
        taps
    }

    /// Weights and window start of output pixel `i`.
    fn get(&self, i: usize) -> (usize, &[i32]) {
        (
            self.start[i],
            &self.weights[i * self.stride..][..self.len[i]],
        )
    }

    /// The source rows `[first, last)` that any output pixel reads.
    fn used_range(&self) -> (usize, usize) {
        match (self.start.first(), self.start.last(), self.len.last()) {
            (Some(&first), Some(&last_start), Some(&last_len)) => (first, last_start + last_len),
            _ => (0, 0),
        }
    }
}

/// Whether Pillow 13 runs the vertical pass before the horizontal one.
///
/// Pillow 13.0.0 does the vertical pass first when the height shrinks by more than twice as many
/// pixels as the width does (a speed heuristic: the horizontal pass then works on fewer rows).
/// Earlier releases always went horizontal first. The comparison is on pixel counts, not
/// ratios, and the width difference may be negative (an enlarged width).
pub fn vertical_pass_first(in_w: u32, in_h: u32, out_w: u32, out_h: u32) -> bool {
    let dh = i64::from(in_h) - i64::from(out_h);
    let dw = i64::from(in_w) - i64::from(out_w);
    dh > 0 && dh > dw * 2
}

/// A packed 8-bit RGB buffer with its width in pixels, used between the two passes.
struct Plane<'a> {
    width: usize,
    data: std::borrow::Cow<'a, [u8]>,
}

impl Plane<'_> {
    fn height(&self) -> usize {
        self.data.len() / (self.width * CHANNELS)
    }
}

/// Resamples source rows `[first, last)` horizontally to `taps.len()` pixels.
fn horizontal_pass(src: &Plane, rows: (usize, usize), taps: &Taps) -> Plane<'static> {
    let out_w = taps.start.len();
    let (first, last) = rows;
    let in_stride = src.width * CHANNELS;
    let out_stride = out_w * CHANNELS;
    let mut data = vec![0u8; out_stride * (last - first)];
    data.par_chunks_mut(out_stride)
        .enumerate()
        .for_each(|(y, out_row)| {
            let in_row = &src.data[(first + y) * in_stride..][..in_stride];
            for (x, out_px) in out_row.chunks_exact_mut(CHANNELS).enumerate() {
                let (start, weights) = taps.get(x);
                let mut acc = [Taps::accumulator_start(); CHANNELS];
                let window = &in_row[start * CHANNELS..][..weights.len() * CHANNELS];
                for (px, &w) in window.chunks_exact(CHANNELS).zip(weights) {
                    for c in 0..CHANNELS {
                        acc[c] += i32::from(px[c]) * w;
                    }
                }
                for c in 0..CHANNELS {
                    out_px[c] = fixed_point_to_u8(acc[c]);
                }
            }
        });
    Plane {
        width: out_w,
        data: data.into(),
    }
}

/// Resamples `src` vertically to `taps.len()` rows. `row_offset` is the source row that
/// `src`'s first row corresponds to (the horizontal pass may have skipped unused rows).
fn vertical_pass(src: &Plane, row_offset: usize, taps: &Taps) -> Plane<'static> {
    let out_h = taps.start.len();
    let stride = src.width * CHANNELS;
    let mut data = vec![0u8; stride * out_h];
    data.par_chunks_mut(stride)
        .enumerate()
        .for_each(|(y, out_row)| {
            let (start, weights) = taps.get(y);
            // Row-at-a-time accumulation keeps the source reads sequential.
            let mut acc = vec![Taps::accumulator_start(); stride];
            for (k, &w) in weights.iter().enumerate() {
                let in_row = &src.data[(start + k - row_offset) * stride..][..stride];
                for (a, &v) in acc.iter_mut().zip(in_row) {
                    *a += i32::from(v) * w;
                }
            }
            for (o, &a) in out_row.iter_mut().zip(&acc) {
                *o = fixed_point_to_u8(a);
            }
        });
    Plane {
        width: src.width,
        data: data.into(),
    }
}

/// Resizes `src` to `width`×`height` with Pillow 13.0.0's bicubic filter, bit-exact with
/// `Image.resize((width, height), Image.BICUBIC, reducing_gap=None)`.
///
/// A same-size request returns a copy. A zero-sized source or target has no pixels to
/// interpolate and yields a black image of the requested size.
pub fn resize_bicubic(src: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = src.dimensions();
    if (in_w, in_h) == (width, height) {
        return src.clone();
    }
    if in_w == 0 || in_h == 0 || width == 0 || height == 0 {
        return RgbImage::new(width, height);
    }
    let need_horizontal = in_w != width;
    let need_vertical = in_h != height;
    let source = Plane {
        width: in_w as usize,
        data: src.as_raw().as_slice().into(),
    };

    let out = if vertical_pass_first(in_w, in_h, width, height) {
        // Only reachable when the height shrinks, so the vertical pass is always needed.
        let v = vertical_pass(&source, 0, &Taps::new(in_h, height));
        if need_horizontal {
            horizontal_pass(&v, (0, v.height()), &Taps::new(in_w, width))
        } else {
            v
        }
    } else {
        let v_taps = Taps::new(in_h, height);
        let (after_h, offset) = if need_horizontal {
            // Rows that no output pixel reads are skipped; this only saves work.
            let rows = v_taps.used_range();
            (
                horizontal_pass(&source, rows, &Taps::new(in_w, width)),
                rows.0,
            )
        } else {
            (source, 0)
        };
        if need_vertical {
            vertical_pass(&after_h, offset, &v_taps)
        } else {
            after_h
        }
    };
    RgbImage::from_raw(width, height, out.data.into_owned())
        .expect("resampled buffer holds width*height*3 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_matches_catmull_rom_at_known_points() {
        assert_eq!(bicubic_kernel(0.0), 1.0);
        assert_eq!(bicubic_kernel(1.0), 0.0);
        assert_eq!(bicubic_kernel(2.0), 0.0);
        assert_eq!(bicubic_kernel(-3.0), 0.0);
        assert_eq!(bicubic_kernel(0.5), 0.5625);
        assert_eq!(bicubic_kernel(-0.5), 0.5625);
        assert_eq!(bicubic_kernel(1.5), -0.0625);
    }

    #[test]
    fn axis_scale_widens_kernel_only_when_shrinking() {
        let up = axis_scale(100, 400);
        assert_eq!(up.scale, 0.25);
        assert_eq!(up.filter_scale, 1.0);
        assert_eq!(up.support, 2.0);
        let down = axis_scale(400, 100);
        assert_eq!(down.scale, 4.0);
        assert_eq!(down.filter_scale, 4.0);
        assert_eq!(down.support, 8.0);
    }

    #[test]
    fn source_window_is_clamped_to_the_image() {
        let axis = axis_scale(10, 5);
        // centre 1.0, support 4: [-2.5, 5.5) truncates to [-2, 5) and clamps to [0, 5).
        assert_eq!(source_window(0, 10, &axis), (0, 5));
        // centre 9.0: [5.5, 13.5) truncates to [5, 13) and clamps to [5, 10).
        assert_eq!(source_window(4, 10, &axis), (5, 5));
    }

    #[test]
    fn source_window_truncates_toward_zero() {
        // Upscaling 2 -> 8: centre of output 0 is 0.125, so the start is (int)(-1.375) = -1,
        // clamped to 0 (not floor(-1.375) = -2).
        let axis = axis_scale(2, 8);
        assert_eq!(source_window(0, 2, &axis), (0, 2));
    }

    #[test]
    fn window_weights_sum_to_one() {
        let axis = axis_scale(37, 11);
        for i in 0..11 {
            let (start, len) = source_window(i, 37, &axis);
            let sum: f64 = window_weights(i, start, len, &axis).iter().sum();
            assert!((sum - 1.0).abs() < 1e-12, "sum {sum}");
        }
    }

    #[test]
    fn fixed_point_rounds_half_away_from_zero() {
        let one = 1i32 << PRECISION_BITS;
        assert_eq!(to_fixed_point(1.0), one);
        assert_eq!(to_fixed_point(0.0), 0);
        assert_eq!(to_fixed_point(-0.0), 0);
        let half_ulp = 0.5 / f64::from(one);
        assert_eq!(to_fixed_point(half_ulp), 1);
        assert_eq!(to_fixed_point(-half_ulp), -1);
        assert_eq!(to_fixed_point(0.4 / f64::from(one)), 0);
        assert_eq!(to_fixed_point(-0.0625), -(one / 16));
    }

    #[test]
    fn fixed_point_to_u8_rounds_and_clamps() {
        let one = 1i32 << PRECISION_BITS;
        let start = Taps::accumulator_start();
        assert_eq!(fixed_point_to_u8(start + 100 * one), 100);
        assert_eq!(fixed_point_to_u8(start + 300 * one), 255);
        assert_eq!(fixed_point_to_u8(start - 3 * one), 0);
        // 99.5 rounds up, 99.4999 rounds down.
        assert_eq!(fixed_point_to_u8(start + 99 * one + one / 2), 100);
        assert_eq!(fixed_point_to_u8(start + 99 * one + one / 2 - 1), 99);
    }

    #[test]
    fn identity_taps_are_a_single_unit_weight() {
        let taps = Taps::new(6, 6);
        for i in 0..6 {
            let (start, w) = taps.get(i);
            let one_at = w.iter().position(|&v| v == 1 << PRECISION_BITS).unwrap();
            assert_eq!(start + one_at, i);
            assert_eq!(w.iter().filter(|&&v| v != 0).count(), 1);
        }
    }

    #[test]
    fn pass_order_follows_pillow_13_rule() {
        // Height shrinks by 776, width by 76: vertical first.
        assert!(vertical_pass_first(300, 1000, 224, 224));
        // Height shrinks by 200 = 2 * 100: not strictly more, horizontal first.
        assert!(!vertical_pass_first(324, 424, 224, 224));
        assert!(vertical_pass_first(323, 424, 224, 224));
        // Enlarged width counts as a negative shrink.
        assert!(vertical_pass_first(3, 500, 224, 224));
        // Height grows: never vertical first.
        assert!(!vertical_pass_first(1000, 37, 224, 224));
        assert!(!vertical_pass_first(640, 480, 224, 224));
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = RgbImage::from_pixel(37, 11, ::image::Rgb([10, 128, 250]));
        for (w, h) in [(224, 224), (5, 3), (100, 7), (1, 1)] {
            let out = resize_bicubic(&src, w, h);
            assert_eq!(out.dimensions(), (w, h));
            assert!(out.pixels().all(|p| p.0 == [10, 128, 250]));
        }
    }

    #[test]
    fn same_size_is_a_copy_and_empty_sizes_do_not_panic() {
        let src = RgbImage::from_fn(4, 3, |x, y| ::image::Rgb([x as u8, y as u8, 7]));
        assert_eq!(resize_bicubic(&src, 4, 3), src);
        assert_eq!(resize_bicubic(&src, 0, 5).dimensions(), (0, 5));
        assert_eq!(
            resize_bicubic(&RgbImage::new(0, 0), 3, 2).dimensions(),
            (3, 2)
        );
    }
}
