//! Drawing detection and segmentation results onto an image, for people to look at.
//!
//! [`annotate`] paints, for each [`Annotation`], its mask as a translucent overlay, its box as an
//! opaque outline and its label on a filled tag, all in one colour per distinct label. The
//! pieces are small pure functions ([`label_colors`], [`blend`], [`contrasting_text_color`],
//! [`style_for`], [`layout_label`], [`box_pixels`]) so the arithmetic can be tested exactly.
//!
//! Conventions:
//!
//! * A box `[x0, y0, x1, y1]` is in continuous pixel coordinates (pixel `i` spans `[i, i+1)`),
//!   which is how PaliGemma's `<locYYYY>` tokens scale to an image. It covers the pixel columns
//!   `round(x0) .. round(x1)` (end exclusive), likewise rows. Swapped corners are put in order;
//!   a box that rounds to zero width or height still covers one pixel (drawn as a point or a
//!   line); a box with a NaN or infinite coordinate is skipped.
//! * Everything is clipped to the image: parts of a box outside it are simply not drawn.
//! * The outline lies inside the box, so a box touching the image border stays visible.
//! * Draw order is all masks, then all outlines, then all tags, so no label is hidden under
//!   another object's box.

use std::sync::OnceLock;

use ab_glyph::{Font, FontRef, GlyphId, PxScale, ScaleFont, point};
use image::{GrayImage, Rgb, RgbImage};

/// The font for labels, compiled into the binary so annotation never depends on the system.
const FONT_BYTES: &[u8] = include_bytes!("../assets/fonts/DejaVuSans-Bold.ttf");

/// Opacity of mask overlays, out of 255 (115/255 ≈ 0.45): strong enough to see the region,
/// weak enough to see the object through it.
pub const MASK_ALPHA: u8 = 115;

/// Mask pixels at or above this value are inside the object.
pub const MASK_THRESHOLD: u8 = 128;

/// Twelve well-separated colours (from Sasha Trubetskoy's "20 distinct colours"), ordered so
/// that the first few, the ones most pictures use, differ the most.
pub const PALETTE: [[u8; 3]; 12] = [
    [230, 25, 75],   // red
    [60, 180, 75],   // green
    [0, 130, 200],   // blue
    [245, 130, 48],  // orange
    [145, 30, 180],  // purple
    [70, 240, 240],  // cyan
    [240, 50, 230],  // magenta
    [210, 245, 60],  // lime
    [0, 128, 128],   // teal
    [255, 225, 25],  // yellow
    [170, 110, 40],  // brown
    [250, 190, 212], // pink
];

/// One object to draw.
#[derive(Debug, Clone, PartialEq)]
pub struct Annotation {
    /// Text on the tag; may be empty (no tag is drawn), any Unicode (glyphs missing from the
    /// font show as its "notdef" box); control characters are shown as spaces.
    pub label: String,
    /// `[x0, y0, x1, y1]` in pixels (see the module documentation).
    pub bbox: [f32; 4],
    /// Binary mask the size of the image: pixels `>= MASK_THRESHOLD` (255 by convention) are
    /// the object. A mask of another size is used where it overlaps the image.
    pub mask: Option<GrayImage>,
}

impl Annotation {
    /// A box with a label and no mask.
    pub fn new(label: impl Into<String>, bbox: [f32; 4]) -> Self {
        Annotation {
            label: label.into(),
            bbox,
            mask: None,
        }
    }

    /// The same annotation with a mask.
    pub fn with_mask(mut self, mask: GrayImage) -> Self {
        self.mask = Some(mask);
        self
    }
}

/// Sizes that scale with the picture so annotations read the same on a 224 px thumbnail and
/// a 2000 px photo.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Style {
    /// Font size in pixels (ab_glyph's `PxScale`: ascent to descent).
    pub font_px: f32,
    /// Box outline width in pixels.
    pub thickness: u32,
    /// Space between the text and the tag's left/right edges.
    pub pad_x: u32,
    /// Space between the text and the tag's top/bottom edges.
    pub pad_y: u32,
}

/// The style for an image of this size, driven by its shorter side `s`: font `s/30` px (at
/// least 12 px, so labels stay legible on 224 px inputs), outline `s/250` px (at least 2 px).
pub fn style_for(width: u32, height: u32) -> Style {
    let short = width.min(height) as f32;
    let font_px = (short / 30.0).max(12.0);
    Style {
        font_px,
        thickness: ((short / 250.0).round() as u32).max(2),
        pad_x: (font_px * 0.3).round() as u32,
        pad_y: (font_px * 0.12).round() as u32,
    }
}

/// One colour per object: distinct labels take palette colours in order of first appearance,
/// so up to 12 distinct labels never share a colour and a label keeps its colour everywhere
/// in the picture (beyond 12 the palette repeats).
pub fn label_colors<'a>(labels: impl IntoIterator<Item = &'a str>) -> Vec<[u8; 3]> {
    let mut seen: Vec<&str> = Vec::new();
    labels
        .into_iter()
        .map(|label| {
            let index = seen.iter().position(|s| *s == label).unwrap_or_else(|| {
                seen.push(label);
                seen.len() - 1
            });
            PALETTE[index % PALETTE.len()]
        })
        .collect()
}

/// `over` drawn on `under` with opacity `alpha`/255, per channel
/// `(under·(255−alpha) + over·alpha + 127) / 255` in integers (rounded to nearest), so
/// `alpha = 0` leaves `under` and `alpha = 255` gives `over` exactly.
pub fn blend(under: [u8; 3], over: [u8; 3], alpha: u8) -> [u8; 3] {
    let a = u32::from(alpha);
    std::array::from_fn(|c| {
        ((u32::from(under[c]) * (255 - a) + u32::from(over[c]) * a + 127) / 255) as u8
    })
}

/// Black or white, whichever contrasts more with `background` (WCAG relative luminance: the
/// two contrasts are equal at luminance ≈ 0.179).
pub fn contrasting_text_color(background: [u8; 3]) -> [u8; 3] {
    let linear = |c: u8| {
        let c = f32::from(c) / 255.0;
        if c <= 0.04045 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    };
    let [r, g, b] = background.map(linear);
    let luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b;
    if luminance > 0.179 {
        [0, 0, 0]
    } else {
        [255, 255, 255]
    }
}

/// A pixel rectangle `[x0, x1) × [y0, y1)`; may extend past the image (drawing clips it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelRect {
    pub x0: i64,
    pub y0: i64,
    pub x1: i64,
    pub y1: i64,
}

impl PixelRect {
    /// This rectangle cut to a `width × height` image; `None` when nothing is left.
    pub fn clip(self, width: u32, height: u32) -> Option<PixelRect> {
        let r = PixelRect {
            x0: self.x0.max(0),
            y0: self.y0.max(0),
            x1: self.x1.min(i64::from(width)),
            y1: self.y1.min(i64::from(height)),
        };
        (r.x0 < r.x1 && r.y0 < r.y1).then_some(r)
    }
}

/// The pixels a box covers (see the module documentation), before clipping; `None` for a box
/// with a non-finite coordinate.
pub fn box_pixels(bbox: [f32; 4]) -> Option<PixelRect> {
    if !bbox.iter().all(|v| v.is_finite()) {
        return None;
    }
    // Coordinates are clamped far outside any image (whose sides fit in u32) so that the
    // arithmetic on the rectangle can never overflow.
    const FAR: f32 = (1u64 << 40) as f32;
    let span = |a: f32, b: f32| {
        let lo = a.min(b).clamp(-FAR, FAR).round() as i64;
        let hi = (a.max(b).clamp(-FAR, FAR).round() as i64).max(lo + 1);
        (lo, hi)
    };
    let (x0, x1) = span(bbox[0], bbox[2]);
    let (y0, y1) = span(bbox[1], bbox[3]);
    Some(PixelRect { x0, y0, x1, y1 })
}

/// The four strips of a `thickness`-wide outline lying inside `rect`; in a box thinner than
/// twice the thickness they overlap and fill it.
pub fn outline_strips(rect: PixelRect, thickness: u32) -> [PixelRect; 4] {
    let t = i64::from(thickness);
    let PixelRect { x0, y0, x1, y1 } = rect;
    [
        PixelRect {
            x0,
            y0,
            x1,
            y1: (y0 + t).min(y1),
        },
        PixelRect {
            x0,
            y0: (y1 - t).max(y0),
            x1,
            y1,
        },
        PixelRect {
            x0,
            y0,
            x1: (x0 + t).min(x1),
            y1,
        },
        PixelRect {
            x0: (x1 - t).max(x0),
            y0,
            x1,
            y1,
        },
    ]
}

/// Where a label goes: the tag rectangle, the (possibly shortened) text, and the pen position
/// of its first glyph on the baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelLayout {
    pub tag: PixelRect,
    pub text: String,
    pub origin: (f32, f32),
}

/// Places the label of a box already clipped to an image `width` pixels wide (a tag running
/// past the bottom is clipped when drawn, like everything else).
///
/// The tag sits on top of the box, left edges aligned; when that would cross the top of the
/// image it goes inside the box instead. It is shifted left to stay within the right edge,
/// and text too wide for the image is cut and ends in "…". `None` for an empty label.
pub fn layout_label(
    label: &str,
    clipped_box: PixelRect,
    width: u32,
    style: &Style,
) -> Option<LabelLayout> {
    let text = printable(label);
    if text.trim().is_empty() {
        return None;
    }
    let font = font().as_scaled(PxScale::from(style.font_px));
    let (pad_x, pad_y) = (i64::from(style.pad_x), i64::from(style.pad_y));
    let max_text_width = (width as f32 - 2.0 * style.pad_x as f32).max(0.0);
    let text = fit_text(&font, &text, max_text_width);
    let text_width = text_width(&font, &text).ceil() as i64;
    let line_height = (font.ascent() - font.descent()).ceil() as i64;
    let (tag_w, tag_h) = (text_width + 2 * pad_x, line_height + 2 * pad_y);

    let above = clipped_box.y0 - tag_h;
    let y0 = if above >= 0 { above } else { clipped_box.y0 };
    let x0 = clipped_box.x0.min(i64::from(width) - tag_w).max(0);
    Some(LabelLayout {
        tag: PixelRect {
            x0,
            y0,
            x1: x0 + tag_w,
            y1: y0 + tag_h,
        },
        origin: ((x0 + pad_x) as f32, (y0 + pad_y) as f32 + font.ascent()),
        text,
    })
}

/// Draws `objects` onto a copy of `image`.
pub fn annotate(image: &RgbImage, objects: &[Annotation]) -> RgbImage {
    let mut out = image.clone();
    let (width, height) = out.dimensions();
    if width == 0 || height == 0 || objects.is_empty() {
        return out;
    }
    let style = style_for(width, height);
    let colors = label_colors(objects.iter().map(|o| o.label.as_str()));

    for (object, &color) in objects.iter().zip(&colors) {
        if let Some(mask) = &object.mask {
            paint_mask(&mut out, mask, color, MASK_ALPHA);
        }
    }
    let boxes: Vec<Option<PixelRect>> = objects
        .iter()
        .map(|o| box_pixels(o.bbox).and_then(|r| r.clip(width, height)))
        .collect();
    for (object, &color) in objects.iter().zip(&colors) {
        // The outline is computed on the unclipped box so that sides outside the image are
        // not drawn at the image border.
        if let Some(rect) = box_pixels(object.bbox) {
            for strip in outline_strips(rect, style.thickness) {
                fill_rect(&mut out, strip, color);
            }
        }
    }
    for ((object, &color), clipped) in objects.iter().zip(&colors).zip(&boxes) {
        let Some(clipped) = clipped else { continue };
        if let Some(layout) = layout_label(&object.label, *clipped, width, &style) {
            fill_rect(&mut out, layout.tag, color);
            draw_text(
                &mut out,
                &layout,
                style.font_px,
                contrasting_text_color(color),
            );
        }
    }
    out
}

/// The embedded font, parsed once.
fn font() -> &'static FontRef<'static> {
    static FONT: OnceLock<FontRef<'static>> = OnceLock::new();
    // The bytes are a fixed asset compiled in, so a failure here is a build defect that the
    // tests catch, not something input can cause.
    FONT.get_or_init(|| FontRef::try_from_slice(FONT_BYTES).expect("embedded DejaVu font parses"))
}

/// Labels are one line: line breaks, tabs and other control characters become spaces.
fn printable(label: &str) -> String {
    label
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Pen advances of `text` with kerning, in pixels.
fn text_width<F: Font>(font: &impl ScaleFont<F>, text: &str) -> f32 {
    glyph_positions(font, text)
        .last()
        .map_or(0.0, |&(id, x)| x + font.h_advance(id))
}

/// Each character's glyph and its pen offset from the start of the line.
fn glyph_positions<F: Font>(font: &impl ScaleFont<F>, text: &str) -> Vec<(GlyphId, f32)> {
    let mut caret = 0.0;
    let mut previous: Option<GlyphId> = None;
    text.chars()
        .map(|c| {
            let id = font.glyph_id(c);
            if let Some(p) = previous {
                caret += font.h_advance(p) + font.kern(p, id);
            }
            previous = Some(id);
            (id, caret)
        })
        .collect()
}

/// `text` unchanged if it fits in `max_width` pixels, else its longest prefix that fits with
/// "…" appended (just "…" if nothing does). Linear in the text length.
fn fit_text<F: Font>(font: &impl ScaleFont<F>, text: &str, max_width: f32) -> String {
    if text_width(font, text) <= max_width {
        return text.to_string();
    }
    let ellipsis = font.h_advance(font.glyph_id('…'));
    let positions = glyph_positions(font, text);
    // A prefix of k characters ends where character k starts.
    let keep = positions
        .iter()
        .take_while(|&&(_, x)| x + ellipsis <= max_width)
        .count()
        .saturating_sub(1);
    let mut cut: String = text.chars().take(keep).collect();
    cut.truncate(cut.trim_end().len());
    cut.push('…');
    cut
}

/// Blends `color` over the pixels where `mask` is set.
fn paint_mask(img: &mut RgbImage, mask: &GrayImage, color: [u8; 3], alpha: u8) {
    let w = img.width().min(mask.width());
    let h = img.height().min(mask.height());
    for y in 0..h {
        for x in 0..w {
            if mask.get_pixel(x, y).0[0] >= MASK_THRESHOLD {
                let px = img.get_pixel_mut(x, y);
                *px = Rgb(blend(px.0, color, alpha));
            }
        }
    }
}

/// Fills the part of `rect` inside the image with an opaque colour.
fn fill_rect(img: &mut RgbImage, rect: PixelRect, color: [u8; 3]) {
    let Some(r) = rect.clip(img.width(), img.height()) else {
        return;
    };
    // Clipping bounds the coordinates to the image, so they fit in u32.
    for y in r.y0 as u32..r.y1 as u32 {
        for x in r.x0 as u32..r.x1 as u32 {
            img.put_pixel(x, y, Rgb(color));
        }
    }
}

/// Renders the laid-out text, antialiased (glyph coverage is the blend opacity), clipped to
/// both the tag and the image.
fn draw_text(img: &mut RgbImage, layout: &LabelLayout, font_px: f32, color: [u8; 3]) {
    let font = font();
    let scaled = font.as_scaled(PxScale::from(font_px));
    let Some(clip) = layout.tag.clip(img.width(), img.height()) else {
        return;
    };
    let (ox, oy) = layout.origin;
    for (id, x) in glyph_positions(&scaled, &layout.text) {
        let glyph = id.with_scale_and_position(font_px, point(ox + x, oy));
        let Some(outline) = font.outline_glyph(glyph) else {
            continue; // spaces have no outline
        };
        let bounds = outline.px_bounds();
        let (left, top) = (bounds.min.x as i64, bounds.min.y as i64);
        outline.draw(|gx, gy, coverage| {
            let (x, y) = (left + i64::from(gx), top + i64::from(gy));
            if x < clip.x0 || x >= clip.x1 || y < clip.y0 || y >= clip.y1 {
                return;
            }
            let alpha = (coverage.clamp(0.0, 1.0) * 255.0).round() as u8;
            let px = img.get_pixel_mut(x as u32, y as u32);
            *px = Rgb(blend(px.0, color, alpha));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_font_parses_and_has_the_scripts_we_promise() {
        let f = font();
        for c in ['A', 'é', 'ß', 'Ω', 'Ж', '…'] {
            assert_ne!(f.glyph_id(c), GlyphId(0), "{c}");
        }
    }

    #[test]
    fn fit_text_cuts_with_ellipsis() {
        let f = font().as_scaled(PxScale::from(20.0));
        assert_eq!(fit_text(&f, "cat", 1000.0), "cat");
        let cut = fit_text(&f, "a very long label indeed", 60.0);
        assert!(cut.ends_with('…'), "{cut}");
        assert!(text_width(&f, &cut) <= 60.0);
        assert_eq!(fit_text(&f, "wide", 0.0), "…");
    }
}
