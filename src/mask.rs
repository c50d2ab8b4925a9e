//! Segmentation masks: pasting a decoded 64×64 mask into its box, and COCO RLE.
//!
//! Pasting follows big_vision's RefCOCO evaluator
//! (`evaluators/proj/paligemma/transfers/segmentation.py`) exactly, since that is how the
//! published mIoU numbers were measured:
//!
//! 1. the prediction is invalid unless every bin is ≤ 1023, `ymax > ymin` and `xmax > xmin`;
//! 2. the pixel box is `int(bin / 1023 · side)` (float64, truncated) on the original image, and
//!    is invalid if empty;
//! 3. the raw float decoder output becomes a Pillow "F" (float32) image, is resized to the box
//!    with `BILINEAR`, and pixels `> 0.0` are in the mask.
//!
//! [`resize_bilinear_f32`] is Pillow 13.0.0's float resampler (`libImaging/Resample.c`)
//! reproduced operation for operation, so masks agree bit for bit, including pixels where the
//! interpolated value is exactly 0.
//!
//! COCO RLE ([`rle_encode`], [`rle_decode`]) is pycocotools' compressed format: run lengths in
//! column-major order starting with a run of zeros, each stored as the difference to the run
//! two before it (from the fourth run on) in a LEB128-like code of 5 data bits per character,
//! characters `'0'..='o'`.

use crate::parse::{LOC_MAX, loc_to_pixel_box};
use crate::vqvae::{MASK_PIXELS, MASK_SIDE};
use image::{GrayImage, Luma};
use serde::{Deserialize, Serialize};

/// A binary mask, row-major, `width × height`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryMask {
    width: u32,
    height: u32,
    bits: Vec<bool>,
}

impl BinaryMask {
    /// An all-false mask.
    pub fn new(width: u32, height: u32) -> Self {
        Self {
            width,
            height,
            bits: vec![false; width as usize * height as usize],
        }
    }

    /// Wraps row-major bits; `None` unless there are exactly `width · height` of them.
    pub fn from_bits(width: u32, height: u32, bits: Vec<bool>) -> Option<Self> {
        (bits.len() == width as usize * height as usize).then_some(Self {
            width,
            height,
            bits,
        })
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// Row-major bits.
    pub fn bits(&self) -> &[bool] {
        &self.bits
    }

    /// The bit at column `x`, row `y`; false outside the mask.
    pub fn get(&self, x: u32, y: u32) -> bool {
        x < self.width && y < self.height && self.bits[self.index(x, y)]
    }

    /// Number of set pixels.
    pub fn area(&self) -> usize {
        self.bits.iter().filter(|&&b| b).count()
    }

    /// 255 for set pixels, 0 elsewhere.
    pub fn to_gray_image(&self) -> GrayImage {
        GrayImage::from_fn(self.width, self.height, |x, y| {
            Luma([if self.get(x, y) { 255 } else { 0 }])
        })
    }

    fn index(&self, x: u32, y: u32) -> usize {
        y as usize * self.width as usize + x as usize
    }
}

/// A half-open pixel box: rows `y0..y1`, columns `x0..x1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelBox {
    pub y0: u32,
    pub x0: u32,
    pub y1: u32,
    pub x1: u32,
}

impl PixelBox {
    pub fn width(&self) -> u32 {
        self.x1 - self.x0
    }

    pub fn height(&self) -> u32 {
        self.y1 - self.y0
    }
}

/// A decoded mask pasted into a full image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PastedMask {
    /// The whole image; nothing outside `pixel_box` is set.
    pub mask: BinaryMask,
    pub pixel_box: PixelBox,
}

/// The pixel box big_vision's evaluator pastes into, or `None` when it counts the prediction
/// as invalid: a bin above 1023, `ymax <= ymin` or `xmax <= xmin` in bins, or a box that is
/// empty after truncation to pixels (small images, or a zero side).
pub fn evaluator_pixel_box(loc: [u16; 4], width: u32, height: u32) -> Option<PixelBox> {
    let [ymin, xmin, ymax, xmax] = loc;
    if loc.iter().any(|&b| b > LOC_MAX) || ymax <= ymin || xmax <= xmin {
        return None;
    }
    let [x0, y0, x1, y1] = loc_to_pixel_box(loc, width, height);
    (x1 > x0 && y1 > y0).then_some(PixelBox { y0, x0, y1, x1 })
}

/// Pastes a raw 64×64 decoder output (row-major, as from
/// [`VqVaeDecoder::decode`](crate::vqvae::VqVaeDecoder::decode)) for the box `loc`
/// (`[ymin, xmin, ymax, xmax]` bins) into a `width × height` image, as big_vision's evaluator
/// does. `None` when the evaluator counts the prediction as invalid (see
/// [`evaluator_pixel_box`]).
pub fn paste_mask(
    mask64: &[f32; MASK_PIXELS],
    loc: [u16; 4],
    width: u32,
    height: u32,
) -> Option<PastedMask> {
    let pixel_box = evaluator_pixel_box(loc, width, height)?;
    let (bw, bh) = (pixel_box.width() as usize, pixel_box.height() as usize);
    let resized = resize_bilinear_f32(mask64, MASK_SIDE, MASK_SIDE, bw, bh)?;
    let mut mask = BinaryMask::new(width, height);
    for (dy, row) in resized.chunks_exact(bw).enumerate() {
        let start = mask.index(pixel_box.x0, pixel_box.y0 + dy as u32);
        for (dst, &v) in mask.bits[start..start + bw].iter_mut().zip(row) {
            // Strictly positive, like `mi > 0.0`: exact zeros and NaN stay out.
            *dst = v > 0.0;
        }
    }
    Some(PastedMask { mask, pixel_box })
}

// ---------------------------------------------------------------------------------------------
// Pillow's float ("F" mode) resize with the BILINEAR (triangle) filter.

/// Per output pixel along one axis: the first source index and the normalised weights.
#[derive(Debug, Clone, PartialEq)]
struct AxisTaps {
    taps: Vec<(usize, Vec<f64>)>,
}

/// Pillow's `bilinear_filter`: a triangle of radius 1.
fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

/// Pillow's `precompute_coeffs` for the triangle filter over the whole axis: pixel centres
/// aligned (`(i + 0.5) · scale`), the filter widened by the scale when shrinking, window ends
/// rounded by `+ 0.5` and truncation, weights divided by their sum. Every operation is done
/// in the same order and precision as Pillow's C so that the weights are bit-identical.
fn axis_taps(in_size: usize, out_size: usize) -> AxisTaps {
    // Pillow takes `(in1 - in0)` from a float box; sizes are far below 2^24, so exact.
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale; // the triangle's support of 1, widened
    let inv_filter_scale = 1.0 / filter_scale;
    let taps = (0..out_size)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            // C `(int)` truncates toward zero; the clamps follow it, as in Pillow.
            let start = ((center - support + 0.5) as i64).max(0) as usize;
            let end = ((center + support + 0.5) as i64).min(in_size as i64).max(0) as usize;
            let mut weights: Vec<f64> = (start..end.max(start))
                .map(|x| triangle((x as f64 - center + 0.5) * inv_filter_scale))
                .collect();
            let sum: f64 = weights.iter().fold(0.0, |acc, w| acc + w);
            if sum != 0.0 {
                weights.iter_mut().for_each(|w| *w /= sum);
            }
            (start, weights)
        })
        .collect();
    AxisTaps { taps }
}

/// One output value: a float64 dot product accumulated from the first tap, stored as f32.
fn convolve(taps: &[f64], mut sample: impl FnMut(usize) -> f32) -> f32 {
    let mut acc = 0.0f64;
    for (i, &w) in taps.iter().enumerate() {
        acc += f64::from(sample(i)) * w;
    }
    acc as f32
}

fn horizontal_pass(src: &[f32], src_w: usize, out_w: usize, axis: &AxisTaps) -> Vec<f32> {
    let mut out = Vec::with_capacity(out_w * (src.len() / src_w));
    for row in src.chunks_exact(src_w) {
        for (start, weights) in &axis.taps {
            out.push(convolve(weights, |i| row[start + i]));
        }
    }
    out
}

fn vertical_pass(src: &[f32], width: usize, axis: &AxisTaps) -> Vec<f32> {
    let mut out = Vec::with_capacity(width * axis.taps.len());
    for (start, weights) in &axis.taps {
        for x in 0..width {
            out.push(convolve(weights, |i| src[(start + i) * width + x]));
        }
    }
    out
}

/// Pillow 13.0.0's pass order: vertical first only when the height shrinks by more than
/// twice as many pixels as the width does (signed arithmetic, as in C).
fn vertical_first(src_w: usize, src_h: usize, out_w: usize, out_h: usize) -> bool {
    let dh = src_h as i64 - out_h as i64;
    let dw = src_w as i64 - out_w as i64;
    dh > 0 && dh > dw * 2
}

/// Resizes a row-major float image like Pillow 13.0.0's `Image.resize(size, BILINEAR)` on
/// mode "F": separable passes (an axis whose size does not change is skipped, so equal sizes
/// copy), each accumulating in float64 and rounding to float32 between passes. `None` when
/// `src` is not `src_w · src_h` long or a size is zero.
pub fn resize_bilinear_f32(
    src: &[f32],
    src_w: usize,
    src_h: usize,
    out_w: usize,
    out_h: usize,
) -> Option<Vec<f32>> {
    if src_w == 0 || src_h == 0 || out_w == 0 || out_h == 0 || src.len() != src_w * src_h {
        return None;
    }
    let horizontal = |img: &[f32]| horizontal_pass(img, src_w, out_w, &axis_taps(src_w, out_w));
    // The vertical pass runs on whatever width the image has at that point.
    let vertical = |img: &[f32], w: usize| vertical_pass(img, w, &axis_taps(src_h, out_h));
    let (need_h, need_v) = (out_w != src_w, out_h != src_h);
    let out = if vertical_first(src_w, src_h, out_w, out_h) {
        let img = if need_v {
            vertical(src, src_w)
        } else {
            src.to_vec()
        };
        if need_h { horizontal(&img) } else { img }
    } else {
        let img = if need_h {
            horizontal(src)
        } else {
            src.to_vec()
        };
        if need_v { vertical(&img, out_w) } else { img }
    };
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// COCO RLE.

/// A mask in COCO's compressed RLE, as pycocotools' `mask.encode` returns it (with `counts`
/// as text); serialises to COCO's JSON `{"size": [h, w], "counts": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CocoRle {
    /// `[height, width]`.
    pub size: [u32; 2],
    pub counts: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RleError {
    #[error("RLE counts: character {found:?} at byte {at} is outside '0'..='o'")]
    BadChar { at: usize, found: char },
    #[error("RLE counts: a run length does not fit 64 bits (at byte {at})")]
    Overflow { at: usize },
    #[error("RLE counts: the string ends inside a run length")]
    Truncated,
    #[error("RLE counts: run {index} has negative length {length}")]
    NegativeRun { index: usize, length: i64 },
    #[error("RLE size {height}x{width} is too large to allocate")]
    TooLarge { height: u32, width: u32 },
    #[error("RLE counts: the runs cover {covered} pixels, but the mask has {expected}")]
    WrongTotal { covered: u64, expected: u64 },
}

/// Run lengths in column-major order, starting with a (possibly empty) run of zeros.
fn column_major_runs(mask: &BinaryMask) -> Vec<u64> {
    let mut runs = Vec::new();
    let (mut current, mut len) = (false, 0u64);
    for x in 0..mask.width {
        for y in 0..mask.height {
            let bit = mask.get(x, y);
            if bit != current {
                runs.push(len);
                (current, len) = (bit, 0);
            }
            len += 1;
        }
    }
    runs.push(len);
    runs
}

/// Appends one signed value: 5 data bits per character, low bits first; bit 0x20 marks that
/// more characters follow; the last character's bit 0x10 is the sign.
fn push_varint(out: &mut String, mut x: i64) {
    loop {
        let mut c = (x & 0x1f) as u8;
        x >>= 5; // arithmetic shift, so negative values end at -1
        let more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
        if more {
            c |= 0x20;
        }
        out.push(char::from(c + b'0'));
        if !more {
            return;
        }
    }
}

/// Encodes like pycocotools' `mask.encode(np.asfortranarray(mask))`.
pub fn rle_encode(mask: &BinaryMask) -> CocoRle {
    let runs = column_major_runs(mask);
    let mut counts = String::new();
    for (i, &run) in runs.iter().enumerate() {
        // Runs alternate, so a run is usually close to the one two before it; pycocotools
        // stores that difference from the fourth run on (`i > 2`, not `i >= 2`).
        let x = if i > 2 {
            run as i64 - runs[i - 2] as i64
        } else {
            run as i64
        };
        push_varint(&mut counts, x);
    }
    CocoRle {
        size: [mask.height, mask.width],
        counts,
    }
}

/// Parses the run lengths of a counts string (undoing the difference coding).
fn parse_runs(counts: &str) -> Result<Vec<u64>, RleError> {
    let bytes = counts.as_bytes();
    let mut runs: Vec<u64> = Vec::new();
    let mut p = 0;
    while p < bytes.len() {
        let (mut x, mut shift) = (0i64, 0u32);
        loop {
            let Some(&b) = bytes.get(p) else {
                return Err(RleError::Truncated);
            };
            let c = match b.checked_sub(b'0') {
                Some(c) if c < 64 => i64::from(c),
                _ => {
                    let found = counts[p..].chars().next().unwrap_or('\u{fffd}');
                    return Err(RleError::BadChar { at: p, found });
                }
            };
            if shift > 58 {
                return Err(RleError::Overflow { at: p });
            }
            x |= (c & 0x1f) << shift;
            shift += 5;
            p += 1;
            if c & 0x20 == 0 {
                if c & 0x10 != 0 && shift < 64 {
                    x |= -1i64 << shift; // sign-extend
                }
                break;
            }
        }
        let index = runs.len();
        if index > 2 {
            x = x
                .checked_add(runs[index - 2] as i64)
                .ok_or(RleError::Overflow { at: p })?;
        }
        if x < 0 {
            return Err(RleError::NegativeRun { index, length: x });
        }
        runs.push(x as u64);
    }
    Ok(runs)
}

/// Decodes a compressed COCO RLE; the runs must cover the mask exactly.
pub fn rle_decode(rle: &CocoRle) -> Result<BinaryMask, RleError> {
    let [height, width] = rle.size;
    let runs = parse_runs(&rle.counts)?;
    let expected = u64::from(height) * u64::from(width);
    let covered = runs
        .iter()
        .try_fold(0u64, |acc, &r| acc.checked_add(r))
        .unwrap_or(u64::MAX);
    if covered != expected {
        return Err(RleError::WrongTotal { covered, expected });
    }
    // The size comes from outside: fail instead of aborting when it cannot be allocated.
    let mut bits = Vec::new();
    usize::try_from(expected)
        .ok()
        .and_then(|n| bits.try_reserve_exact(n).ok())
        .ok_or(RleError::TooLarge { height, width })?;
    bits.resize(expected as usize, false);
    let mut mask = BinaryMask {
        width,
        height,
        bits,
    };
    // Column-major position → row-major index.
    let h = height as usize;
    let mut pos = 0usize;
    for (i, &run) in runs.iter().enumerate() {
        let end = pos + run as usize;
        if i % 2 == 1 {
            for p in pos..end {
                let (x, y) = (p / h, p % h);
                let idx = mask.index(x as u32, y as u32);
                mask.bits[idx] = true;
            }
        }
        pos = end;
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_taps_are_unit_weights() {
        let axis = axis_taps(5, 5);
        for (i, (start, w)) in axis.taps.iter().enumerate() {
            assert_eq!(*start, i);
            assert_eq!(w[0], 1.0);
            assert!(w[1..].iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn shrinking_widens_the_window_and_weights_sum_to_one() {
        // Scale 6.4: the triangle spans ±6.4 source pixels (12 or 13 taps, fewer at the edges).
        let axis = axis_taps(64, 10);
        for (start, w) in &axis.taps {
            assert!(w.len() >= 7 && start + w.len() <= 64);
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        assert!(axis.taps[3..7].iter().all(|(_, w)| w.len() >= 12));
    }

    #[test]
    fn pass_order_follows_pillow_13() {
        assert!(!vertical_first(64, 64, 30, 30));
        assert!(vertical_first(64, 64, 100, 10)); // 54 > (64 - 100)·2
        assert!(!vertical_first(64, 64, 10, 100));
        assert!(vertical_first(64, 64, 60, 50));
    }

    #[test]
    fn resize_rejects_bad_sizes_and_copies_equal_sizes() {
        assert_eq!(resize_bilinear_f32(&[1.0; 4], 2, 2, 0, 3), None);
        assert_eq!(resize_bilinear_f32(&[1.0; 3], 2, 2, 1, 1), None);
        let src = [1.0, -2.0, 3.5, f32::MIN_POSITIVE];
        assert_eq!(resize_bilinear_f32(&src, 2, 2, 2, 2).unwrap(), src);
    }

    #[test]
    fn evaluator_box_validity() {
        assert_eq!(
            evaluator_pixel_box([0, 0, 1023, 1023], 10, 20)
                .unwrap()
                .width(),
            10
        );
        assert!(evaluator_pixel_box([5, 0, 5, 1023], 10, 20).is_none());
        assert!(evaluator_pixel_box([0, 0, 1024, 1023], 10, 20).is_none());
        assert!(evaluator_pixel_box([0, 0, 1023, 1023], 0, 20).is_none());
    }

    #[test]
    fn varint_round_trips_around_group_boundaries() {
        for v in [
            0i64,
            1,
            15,
            16,
            31,
            32,
            -1,
            -16,
            -17,
            1 << 20,
            -(1 << 33),
            (1 << 59) - 1,
        ] {
            let mut s = String::new();
            push_varint(&mut s, v);
            // One value alone is never difference-coded.
            assert_eq!(parse_runs(&s).map_err(|e| e.to_string()), {
                if v >= 0 {
                    Ok(vec![v as u64])
                } else {
                    Err(format!("RLE counts: run 0 has negative length {v}"))
                }
            });
        }
    }

    #[test]
    fn decode_refuses_sizes_it_cannot_allocate() {
        // 16 runs of 2^58 pixels (after the third, each is coded as "same as two before")
        // cover a 2^31 × 2^31 mask exactly.
        let mut counts = String::new();
        for _ in 0..3 {
            push_varint(&mut counts, 1 << 58);
        }
        counts.push_str(&"0".repeat(13));
        let rle = CocoRle {
            size: [1 << 31, 1 << 31],
            counts,
        };
        assert_eq!(parse_runs(&rle.counts).unwrap(), vec![1u64 << 58; 16]);
        assert!(matches!(rle_decode(&rle), Err(RleError::TooLarge { .. })));
    }

    #[test]
    fn decode_rejects_malformed_counts() {
        let rle = |counts: &str| CocoRle {
            size: [2, 2],
            counts: counts.into(),
        };
        assert!(matches!(rle_decode(&rle("4")), Ok(m) if m.area() == 0));
        assert_eq!(
            rle_decode(&rle("5")),
            Err(RleError::WrongTotal {
                covered: 5,
                expected: 4
            })
        );
        assert!(matches!(
            rle_decode(&rle("1 3")),
            Err(RleError::BadChar { at: 1, .. })
        ));
        assert_eq!(rle_decode(&rle("1_")), Err(RleError::Truncated)); // '_' = 47 + 48: "more"
        assert!(matches!(
            rle_decode(&rle("oooooooooooooo0")),
            Err(RleError::Overflow { .. })
        ));
    }
}
