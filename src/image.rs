//! Image decoding to 8-bit RGB, matching what transformers sees from Pillow.
//!
//! The reference pipeline is `ImageOps.exif_transpose(Image.open(f))` followed by the
//! transformers 5.x `convert_to_rgb`: images with an alpha band or a transparency key are
//! composited onto opaque white with `Image.alpha_composite`, everything else goes through
//! `convert("RGB")`. This module reproduces the pixel arithmetic of those Pillow calls for the
//! pixel layouts the `image` crate produces:
//!
//! * 8-bit gray, gray+alpha, RGB, RGBA and palette images (palettes arrive expanded);
//! * 16-bit RGB(A) and gray+alpha keep the high byte, as Pillow's `;16B` unpackers do;
//! * 16-bit gray is Pillow's `I;16` mode, whose conversion to RGB saturates at 255 rather than
//!   scaling (so most 16-bit gray images come out white in Pillow, and here too);
//! * TIFF alpha follows the `ExtraSamples` tag as Pillow reads it (premultiplied alpha is
//!   un-premultiplied, an "unspecified" extra sample is ignored);
//! * a GIF's first frame smaller than its canvas is surrounded by palette index 0, as in Pillow;
//! * orientation comes from the EXIF tag (PNG `eXIf` anywhere in the file, JPEG, WebP, the TIFF
//!   tag) or, when there is no tag, from XMP `tiff:Orientation`, as `exif_transpose` does.
//!
//! Known differences from Pillow: JPEG pixels differ by a few levels (a different IDCT and
//! chroma upsampling; orientation handling is still exact); EXIF stored in PNG text chunks
//! ("Raw profile type exif") is not read; for TIFF an explicit orientation of 1 cannot be told
//! from a missing tag, so XMP would then be consulted.
//!
//! Note that transformers' own `load_image(path)` (used when a path or URL is handed to the
//! processor) calls `convert("RGB")` itself, which drops an alpha band (RGBA, LA) instead of
//! compositing it (a palette transparency survives as a colour key); this module follows the
//! project's decision (DECISIONS.md item 2) to composite onto white, which is what the
//! processor does with an opened PIL image.
//!
//! Format is guessed from the content, never from the file name. Decoding is bounded by a pixel
//! count limit checked from the header before any pixel data is decoded.

use std::fmt;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use ::image::metadata::Orientation;
use ::image::{
    DynamicImage, ImageBuffer, ImageDecoder, ImageFormat, ImageReader, Limits, Pixel, Rgb, RgbImage,
};

/// Default ceiling on `width * height` of a decoded image (100 megapixels): well above any
/// camera photo, well below what would exhaust memory.
pub const DEFAULT_MAX_PIXELS: u64 = 100_000_000;

/// Options for decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Largest accepted `width * height`; larger images are rejected before decoding.
    pub max_pixels: u64,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

/// Where the bytes being decoded came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    File(PathBuf),
    Memory { len: usize },
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageSource::File(path) => write!(f, "image file {}", path.display()),
            ImageSource::Memory { len } => write!(f, "in-memory image ({len} bytes)"),
        }
    }
}

/// Why an image could not be loaded. Every variant names its source.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{source_name}: file not found")]
    NotFound { source_name: ImageSource },
    #[error("{source_name}: cannot read: {error}")]
    Io {
        source_name: ImageSource,
        #[source]
        error: std::io::Error,
    },
    #[error("{source_name}: empty (0 bytes), not an image")]
    Empty { source_name: ImageSource },
    #[error(
        "{source_name}: not a recognised image (the content does not start with a known \
         image signature; supported: JPEG, PNG, WebP, GIF, BMP, TIFF)"
    )]
    UnknownFormat { source_name: ImageSource },
    #[error("{source_name}: unsupported image format or feature: {detail}")]
    Unsupported {
        source_name: ImageSource,
        detail: String,
    },
    #[error("{source_name}: corrupt or truncated image data: {detail}")]
    Corrupt {
        source_name: ImageSource,
        detail: String,
    },
    #[error("{source_name}: zero-size image ({width}x{height})")]
    ZeroSize {
        source_name: ImageSource,
        width: u32,
        height: u32,
    },
    #[error(
        "{source_name}: image too large: {width}x{height} = {pixels} pixels exceeds the limit \
         of {max_pixels} pixels"
    )]
    TooLarge {
        source_name: ImageSource,
        width: u32,
        height: u32,
        pixels: u64,
        max_pixels: u64,
    },
}

/// Reads and decodes an image file to RGB with the default [`DecodeOptions`].
pub fn load_image(path: &Path) -> Result<RgbImage, ImageError> {
    load_image_with(path, &DecodeOptions::default())
}

/// Reads and decodes an image file to RGB.
pub fn load_image_with(path: &Path, options: &DecodeOptions) -> Result<RgbImage, ImageError> {
    let source_name = ImageSource::File(path.to_path_buf());
    let bytes = std::fs::read(path).map_err(|error| {
        if error.kind() == std::io::ErrorKind::NotFound {
            ImageError::NotFound {
                source_name: source_name.clone(),
            }
        } else {
            ImageError::Io {
                source_name: source_name.clone(),
                error,
            }
        }
    })?;
    decode_from(&bytes, source_name, options)
}

/// Decodes an encoded image held in memory to RGB with the default [`DecodeOptions`].
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage, ImageError> {
    decode_image_with(bytes, &DecodeOptions::default())
}

/// Decodes an encoded image held in memory to RGB.
pub fn decode_image_with(bytes: &[u8], options: &DecodeOptions) -> Result<RgbImage, ImageError> {
    decode_from(bytes, ImageSource::Memory { len: bytes.len() }, options)
}

fn decode_from(
    bytes: &[u8],
    source_name: ImageSource,
    options: &DecodeOptions,
) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty { source_name });
    }
    let corrupt = |e: ::image::ImageError| classify(e, &source_name);

    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|error| ImageError::Io {
            source_name: source_name.clone(),
            error,
        })?;
    let Some(format) = reader.format() else {
        return Err(ImageError::UnknownFormat { source_name });
    };
    reader.limits(allocation_limits(options.max_pixels));
    let mut decoder = reader.into_decoder().map_err(corrupt)?;

    let (width, height) = decoder.dimensions();
    check_dimensions(width, height, options.max_pixels, &source_name)?;
    let orientation = orientation_like_pillow(&mut decoder, format, bytes);

    let mut decoded = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    if format == ImageFormat::Tiff {
        decoded = tiff_alpha_like_pillow(decoded, tiff_extra_samples(bytes));
    }
    let mut rgb = to_rgb_like_pillow(decoded).ok_or_else(|| ImageError::Unsupported {
        source_name: source_name.clone(),
        detail: "floating-point pixels (only 8- and 16-bit integer images are supported)".into(),
    })?;
    if format == ImageFormat::Gif
        && let Some(frame) = gif_first_frame(bytes)
    {
        fill_outside_opaque_gif_frame(&mut rgb, &frame);
    }
    apply_orientation(&mut rgb, orientation);
    Ok(rgb)
}

/// The first value of the TIFF `ExtraSamples` tag (338) in the first IFD: 0 = unspecified,
/// 1 = associated (premultiplied) alpha, 2 = unassociated alpha. `None` when absent or
/// unreadable.
pub fn tiff_extra_samples(tiff: &[u8]) -> Option<u16> {
    const EXTRA_SAMPLES: u16 = 338;
    const SHORT: u16 = 3;
    let big_endian = match tiff.get(0..4)? {
        b"II*\0" => false,
        b"MM\0*" => true,
        _ => return None,
    };
    let u16_at = |i: usize| -> Option<u16> {
        let b: [u8; 2] = tiff.get(i..i.checked_add(2)?)?.try_into().ok()?;
        Some(if big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    };
    let u32_at = |i: usize| -> Option<u32> {
        let b: [u8; 4] = tiff.get(i..i.checked_add(4)?)?.try_into().ok()?;
        Some(if big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    };
    let ifd = u32_at(4)? as usize;
    let entries = usize::from(u16_at(ifd)?);
    for k in 0..entries {
        let entry = ifd + 2 + 12 * k;
        if u16_at(entry)? != EXTRA_SAMPLES {
            continue;
        }
        let count = u32_at(entry + 4)?;
        if u16_at(entry + 2)? != SHORT || count == 0 {
            return None;
        }
        // Up to two SHORTs fit in the entry itself; more are stored at an offset.
        return if count <= 2 {
            u16_at(entry + 8)
        } else {
            u16_at(u32_at(entry + 8)? as usize)
        };
    }
    None
}

/// Pillow's unpacking of premultiplied 8-bit RGBA (`RGBa`): colour × 255 / alpha, truncated
/// and clipped; fully transparent pixels become all zero.
pub fn unpremultiply_like_pillow(px: [u8; 4]) -> [u8; 4] {
    let a = u32::from(px[3]);
    match a {
        0 => [0; 4],
        255 => px,
        _ => {
            let c = |v: u8| (u32::from(v) * 255 / a).min(255) as u8;
            [c(px[0]), c(px[1]), c(px[2]), px[3]]
        }
    }
}

/// Applies Pillow's reading of a TIFF's alpha sample: an "unspecified" extra sample (0) is
/// ignored, and associated alpha (1) is un-premultiplied (16-bit data keeps its high bytes
/// first, as Pillow's `RGBa;16` unpackers do). Other cases pass through.
fn tiff_alpha_like_pillow(img: DynamicImage, extra_samples: Option<u16>) -> DynamicImage {
    use DynamicImage as D;
    match (extra_samples, img) {
        (Some(0), D::ImageRgba8(c)) => D::ImageRgb8(map_pixels(&c, |p| [p[0], p[1], p[2]])),
        (Some(0), D::ImageRgba16(c)) => {
            D::ImageRgb8(map_pixels(&c, |p| [p[0], p[1], p[2]].map(high_byte)))
        }
        (Some(0), D::ImageLumaA8(g)) => D::ImageRgb8(map_pixels(&g, |p| [p[0]; 3])),
        (Some(1), D::ImageRgba8(c)) => D::ImageRgba8(map_rgba(&c, |p| {
            unpremultiply_like_pillow([p[0], p[1], p[2], p[3]])
        })),
        (Some(1), D::ImageRgba16(c)) => D::ImageRgba8(map_rgba(&c, |p| {
            unpremultiply_like_pillow([p[0], p[1], p[2], p[3]].map(high_byte))
        })),
        (_, other) => other,
    }
}

fn map_rgba<P: Pixel>(
    img: &ImageBuffer<P, Vec<P::Subpixel>>,
    f: impl Fn(&[P::Subpixel]) -> [u8; 4],
) -> ::image::RgbaImage {
    let (w, h) = img.dimensions();
    let data = img
        .pixels()
        .flat_map(|p| f(p.channels()))
        .collect::<Vec<u8>>();
    ::image::RgbaImage::from_raw(w, h, data).expect("four bytes per pixel")
}

/// Where the first frame of a GIF sits on its canvas, and what Pillow shows around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GifFirstFrame {
    pub left: u32,
    pub top: u32,
    pub width: u32,
    pub height: u32,
    /// The frame's transparent palette index, if its graphic control block sets one.
    pub transparent_index: Option<u8>,
    /// Colour of palette index 0 (local palette if the frame has one, else the global one;
    /// black without a palette).
    pub index0_color: [u8; 3],
}

/// Reads the first frame's placement from a GIF's block structure without decoding pixels.
/// Returns `None` for anything malformed; the decoder reports those errors.
pub fn gif_first_frame(gif: &[u8]) -> Option<GifFirstFrame> {
    fn u16_at(b: &[u8], i: usize) -> Option<u32> {
        Some(u32::from(u16::from_le_bytes([*b.get(i)?, *b.get(i + 1)?])))
    }
    fn table_len(packed: u8) -> usize {
        3 << ((packed & 0x07) + 1)
    }
    /// Skips a chain of data sub-blocks, returning the position after its terminator.
    fn skip_sub_blocks(b: &[u8], mut i: usize) -> Option<usize> {
        loop {
            let n = usize::from(*b.get(i)?);
            i += 1 + n;
            if n == 0 {
                return Some(i);
            }
        }
    }

    if !(gif.starts_with(b"GIF87a") || gif.starts_with(b"GIF89a")) {
        return None;
    }
    let screen_packed = *gif.get(10)?;
    let mut pos = 13;
    let mut global = None;
    if screen_packed & 0x80 != 0 {
        global = Some(gif.get(pos..pos + 3)?);
        pos += table_len(screen_packed);
    }
    let mut transparent_index = None;
    loop {
        match *gif.get(pos)? {
            0x21 => {
                let label = *gif.get(pos + 1)?;
                // Graphic control extension: block of 4, bit 0 of its flags = transparency.
                if label == 0xF9 && *gif.get(pos + 2)? == 4 && gif.get(pos + 3)? & 1 != 0 {
                    transparent_index = Some(*gif.get(pos + 6)?);
                }
                pos = skip_sub_blocks(gif, pos + 2)?;
            }
            0x2C => {
                let packed = *gif.get(pos + 9)?;
                let palette = if packed & 0x80 != 0 {
                    Some(gif.get(pos + 10..pos + 13)?)
                } else {
                    global
                };
                let index0_color = palette.map_or([0; 3], |p| [p[0], p[1], p[2]]);
                return Some(GifFirstFrame {
                    left: u16_at(gif, pos + 1)?,
                    top: u16_at(gif, pos + 3)?,
                    width: u16_at(gif, pos + 5)?,
                    height: u16_at(gif, pos + 7)?,
                    transparent_index,
                    index0_color,
                });
            }
            _ => return None,
        }
    }
}

/// Pillow starts the first GIF frame from a zeroed canvas, so outside a frame smaller than the
/// canvas it shows palette index 0 (or transparency, when the frame has a transparent index,
/// which the decoder already produces). The decoder here leaves that area transparent, which
/// would composite to white; paint it as Pillow does.
fn fill_outside_opaque_gif_frame(img: &mut RgbImage, frame: &GifFirstFrame) {
    if frame.transparent_index.is_some() {
        return;
    }
    let inside = |x: u32, y: u32| {
        x >= frame.left
            && y >= frame.top
            && x - frame.left < frame.width
            && y - frame.top < frame.height
    };
    for (x, y, px) in img.enumerate_pixels_mut() {
        if !inside(x, y) {
            *px = Rgb(frame.index0_color);
        }
    }
}

/// The orientation `ImageOps.exif_transpose` would apply.
///
/// Pillow takes the EXIF orientation tag (for TIFF, the tag in the first IFD) and, only when
/// that tag is absent, the first `tiff:Orientation` in the XMP packet of JPEG, PNG, TIFF and
/// WebP files (never GIF). Unreadable metadata means no rotation rather than an error, as in
/// Pillow, so a damaged EXIF block cannot make an otherwise good image fail.
fn orientation_like_pillow<D: ImageDecoder>(
    decoder: &mut D,
    format: ImageFormat,
    bytes: &[u8],
) -> Orientation {
    let tag_present = match format {
        ImageFormat::Tiff => {
            // The TIFF decoder reads the tag itself but cannot say whether it was absent or 1.
            let o = decoder.orientation().unwrap_or(Orientation::NoTransforms);
            if o != Orientation::NoTransforms {
                return o;
            }
            false
        }
        _ => {
            let chunk = if format == ImageFormat::Png {
                // Pillow also honours an eXIf chunk after the image data, which the PNG
                // decoder has not reached when it reports metadata.
                png_exif_chunk(bytes)
            } else {
                decoder.exif_metadata().ok().flatten()
            };
            let Some(chunk) = chunk else {
                return xmp_fallback(decoder, format);
            };
            if let Some(o) = Orientation::from_exif_chunk(&chunk) {
                return o;
            }
            // No valid value: only a missing tag lets Pillow consult XMP.
            exif_has_orientation_tag(chunk)
        }
    };
    if tag_present {
        Orientation::NoTransforms
    } else {
        xmp_fallback(decoder, format)
    }
}

/// Pillow's XMP orientation fallback, for the formats whose XMP packet it reads.
fn xmp_fallback<D: ImageDecoder>(decoder: &mut D, format: ImageFormat) -> Orientation {
    let xmp_formats = [
        ImageFormat::Jpeg,
        ImageFormat::Png,
        ImageFormat::Tiff,
        ImageFormat::WebP,
    ];
    if !xmp_formats.contains(&format) {
        return Orientation::NoTransforms;
    }
    match decoder.xmp_metadata() {
        Ok(Some(xmp)) => xmp_orientation(&xmp)
            .and_then(Orientation::from_exif)
            .unwrap_or(Orientation::NoTransforms),
        _ => Orientation::NoTransforms,
    }
}

/// The payload of the last `eXIf` chunk of a PNG file, wherever it sits (a later chunk
/// replaces an earlier one in Pillow's `info`).
pub fn png_exif_chunk(png: &[u8]) -> Option<Vec<u8>> {
    const SIGNATURE_LEN: usize = 8;
    let mut pos = SIGNATURE_LEN;
    let mut found = None;
    while let Some(header) = png.get(pos..pos + 8) {
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = &header[4..8];
        let data = png.get(pos + 8..(pos + 8).checked_add(len)?)?;
        match kind {
            b"eXIf" => found = Some(data.to_vec()),
            b"IEND" => break,
            _ => {}
        }
        // Length, type, data, CRC.
        pos += 12 + len;
    }
    found
}

/// Whether a raw EXIF (TIFF-structured) block has an orientation entry in its primary IFD.
fn exif_has_orientation_tag(chunk: Vec<u8>) -> bool {
    exif::Reader::new()
        .read_raw(chunk)
        .map(|e| {
            e.get_field(exif::Tag::Orientation, exif::In::PRIMARY)
                .is_some()
        })
        .unwrap_or(false)
}

/// The digit after the first `tiff:Orientation="` or `tiff:Orientation>` in an XMP packet,
/// which is exactly what Pillow's regular expression `tiff:Orientation(="|>)([0-9])` extracts.
pub fn xmp_orientation(xmp: &[u8]) -> Option<u8> {
    const KEY: &[u8] = b"tiff:Orientation";
    let mut rest = xmp;
    while let Some(pos) = rest.windows(KEY.len()).position(|w| w == KEY) {
        let after = &rest[pos + KEY.len()..];
        let digit = match after {
            [b'=', b'"', d, ..] | [b'>', d, ..] if d.is_ascii_digit() => Some(d - b'0'),
            _ => None,
        };
        if digit.is_some() {
            return digit;
        }
        rest = &rest[pos + 1..];
    }
    None
}

/// Decoder memory limits: room for the largest accepted image at the widest pixel format
/// (16-bit RGBA, 8 bytes) plus working space, and never below the `image` crate's default.
fn allocation_limits(max_pixels: u64) -> Limits {
    const DEFAULT_ALLOC: u64 = 512 * 1024 * 1024;
    let mut limits = Limits::default();
    limits.max_alloc = Some(
        max_pixels
            .saturating_mul(8)
            .saturating_add(64 * 1024 * 1024)
            .max(DEFAULT_ALLOC),
    );
    limits
}

/// Rejects empty images and images over the pixel budget, from the header alone.
pub fn check_dimensions(
    width: u32,
    height: u32,
    max_pixels: u64,
    source_name: &ImageSource,
) -> Result<(), ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::ZeroSize {
            source_name: source_name.clone(),
            width,
            height,
        });
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(ImageError::TooLarge {
            source_name: source_name.clone(),
            width,
            height,
            pixels,
            max_pixels,
        });
    }
    Ok(())
}

/// Maps an `image` crate error onto our error kinds.
fn classify(error: ::image::ImageError, source_name: &ImageSource) -> ImageError {
    use ::image::ImageError as E;
    let source_name = source_name.clone();
    match error {
        E::Unsupported(e) => ImageError::Unsupported {
            source_name,
            detail: e.to_string(),
        },
        E::Limits(e) => ImageError::Unsupported {
            source_name,
            detail: format!("decoder memory limit exceeded: {e}"),
        },
        E::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => ImageError::Corrupt {
            source_name,
            detail: format!("unexpected end of data ({e})"),
        },
        other => ImageError::Corrupt {
            source_name,
            detail: other.to_string(),
        },
    }
}

/// Composites one straight-alpha pixel onto opaque white with Pillow's `alpha_composite`
/// integer arithmetic, returning the colour (the result is always opaque).
///
/// Pillow's general formula blends with a 7-bit-precision coefficient and divides by 255 with a
/// shift-based approximation; with an opaque white destination the coefficient is exactly
/// `alpha * 128`, which is what this reproduces.
pub fn composite_on_white(rgb: [u8; 3], alpha: u8) -> [u8; 3] {
    const FRAC_BITS: u32 = 7;
    if alpha == 0 {
        return [255; 3];
    }
    let a = u32::from(alpha);
    // Weight of the source out of 255 * 2^7; Pillow's `a*255*255*2^7 / out_alpha*255` reduces
    // to this because the composite over opaque white is itself opaque.
    let src_coef = a << FRAC_BITS;
    let dst_coef = 255 * (1 << FRAC_BITS) - src_coef;
    rgb.map(|c| {
        let t = u32::from(c) * src_coef + 255 * dst_coef + (0x80 << FRAC_BITS);
        (div255_approx(t) >> FRAC_BITS) as u8
    })
}

/// Pillow's shift-based stand-in for division by 255 (`((t >> 8) + t) >> 8`); it is not always
/// the exact quotient, which is why it is reproduced rather than replaced by `/ 255`.
fn div255_approx(t: u32) -> u32 {
    ((t >> 8) + t) >> 8
}

/// Pillow's `I;16` to `RGB` conversion: values above 255 saturate instead of being scaled.
pub fn gray16_to_u8_like_pillow(v: u16) -> u8 {
    v.min(255) as u8
}

/// The high byte of a 16-bit sample: Pillow's `;16B`/`;16L` unpackers drop the low byte.
pub fn high_byte(v: u16) -> u8 {
    (v >> 8) as u8
}

fn map_pixels<P: Pixel>(
    img: &ImageBuffer<P, Vec<P::Subpixel>>,
    f: impl Fn(&[P::Subpixel]) -> [u8; 3],
) -> RgbImage {
    let (w, h) = img.dimensions();
    let data = img
        .pixels()
        .flat_map(|p| f(p.channels()))
        .collect::<Vec<u8>>();
    RgbImage::from_raw(w, h, data).expect("three bytes per pixel")
}

/// Converts whatever the decoder produced to RGB8 exactly as Pillow's mode conversions would.
/// Returns `None` for floating-point images, which Pillow would not open in these modes.
pub fn to_rgb_like_pillow(img: DynamicImage) -> Option<RgbImage> {
    Some(match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageLuma8(g) => map_pixels(&g, |p| [p[0]; 3]),
        DynamicImage::ImageLumaA8(g) => map_pixels(&g, |p| composite_on_white([p[0]; 3], p[1])),
        DynamicImage::ImageRgba8(c) => {
            map_pixels(&c, |p| composite_on_white([p[0], p[1], p[2]], p[3]))
        }
        DynamicImage::ImageLuma16(g) => map_pixels(&g, |p| [gray16_to_u8_like_pillow(p[0]); 3]),
        DynamicImage::ImageLumaA16(g) => map_pixels(&g, |p| {
            composite_on_white([high_byte(p[0]); 3], high_byte(p[1]))
        }),
        DynamicImage::ImageRgb16(c) => map_pixels(&c, |p| [p[0], p[1], p[2]].map(high_byte)),
        DynamicImage::ImageRgba16(c) => map_pixels(&c, |p| {
            composite_on_white([p[0], p[1], p[2]].map(high_byte), high_byte(p[3]))
        }),
        _ => return None,
    })
}

/// Applies an EXIF orientation in place, as `ImageOps.exif_transpose` does.
pub fn apply_orientation(img: &mut RgbImage, orientation: Orientation) {
    use ::image::imageops;
    let out: Option<ImageBuffer<Rgb<u8>, Vec<u8>>> = match orientation {
        Orientation::NoTransforms => None,
        Orientation::FlipHorizontal => Some(imageops::flip_horizontal(img)),
        Orientation::Rotate180 => Some(imageops::rotate180(img)),
        Orientation::FlipVertical => Some(imageops::flip_vertical(img)),
        // EXIF 5: transpose (mirror across the main diagonal).
        Orientation::Rotate90FlipH => Some(imageops::flip_horizontal(&imageops::rotate90(img))),
        Orientation::Rotate90 => Some(imageops::rotate90(img)),
        // EXIF 7: transverse (mirror across the anti-diagonal).
        Orientation::Rotate270FlipH => Some(imageops::flip_horizontal(&imageops::rotate270(img))),
        Orientation::Rotate270 => Some(imageops::rotate270(img)),
    };
    if let Some(out) = out {
        *img = out;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pillow's `alpha_composite` written out in full for an arbitrary destination, used to
    /// check the white-background specialisation.
    fn pillow_alpha_composite(dst: [u8; 4], src: [u8; 4]) -> [u8; 4] {
        if src[3] == 0 {
            return dst;
        }
        let (sa, da) = (u32::from(src[3]), u32::from(dst[3]));
        let blend = da * (255 - sa);
        let outa255 = sa * 255 + blend;
        let coef1 = sa * 255 * 255 * 128 / outa255;
        let coef2 = 255 * 128 - coef1;
        let mut out = [0u8; 4];
        for c in 0..3 {
            let t = u32::from(src[c]) * coef1 + u32::from(dst[c]) * coef2 + (0x80 << 7);
            out[c] = (div255_approx(t) >> 7) as u8;
        }
        out[3] = div255_approx(outa255 + 0x80) as u8;
        out
    }

    #[test]
    fn composite_on_white_matches_general_formula_exhaustively() {
        for a in 0..=255u8 {
            for v in 0..=255u8 {
                let general = pillow_alpha_composite([255; 4], [v, 255 - v, v / 2, a]);
                assert_eq!(general[3], 255);
                assert_eq!(
                    composite_on_white([v, 255 - v, v / 2], a),
                    [general[0], general[1], general[2]],
                    "v={v} a={a}"
                );
            }
        }
    }

    #[test]
    fn composite_extremes() {
        assert_eq!(composite_on_white([1, 2, 3], 255), [1, 2, 3]);
        assert_eq!(composite_on_white([1, 2, 3], 0), [255, 255, 255]);
        assert_eq!(composite_on_white([0, 0, 0], 128), [127, 127, 127]);
    }

    #[test]
    fn sixteen_bit_conversions() {
        assert_eq!(gray16_to_u8_like_pillow(200), 200);
        assert_eq!(gray16_to_u8_like_pillow(256), 255);
        assert_eq!(high_byte(0xABCD), 0xAB);
    }

    #[test]
    fn xmp_orientation_follows_pillows_pattern() {
        assert_eq!(xmp_orientation(br#"<x tiff:Orientation="6"/>"#), Some(6));
        assert_eq!(
            xmp_orientation(b"<tiff:Orientation>8</tiff:Orientation>"),
            Some(8)
        );
        // The first occurrence that fits the pattern wins; malformed ones are skipped.
        assert_eq!(
            xmp_orientation(br#"tiff:Orientation=6 tiff:Orientation="3""#),
            Some(3)
        );
        assert_eq!(xmp_orientation(b"exif:Orientation=\"6\""), None);
        assert_eq!(xmp_orientation(b""), None);
    }

    #[test]
    fn png_exif_chunk_walks_all_chunks() {
        fn chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
            let mut c = (data.len() as u32).to_be_bytes().to_vec();
            c.extend_from_slice(kind);
            c.extend_from_slice(data);
            c.extend_from_slice(&[0; 4]);
            c
        }
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend(chunk(b"IHDR", &[0; 13]));
        png.extend(chunk(b"IDAT", &[1, 2, 3]));
        assert_eq!(png_exif_chunk(&png), None);
        png.extend(chunk(b"eXIf", b"MM\0*"));
        png.extend(chunk(b"IEND", b""));
        assert_eq!(png_exif_chunk(&png), Some(b"MM\0*".to_vec()));
        // A chunk running past the end of the file stops the walk without panicking.
        let cut = &png[..png.len() - 20];
        assert_eq!(png_exif_chunk(cut), None);
    }

    #[test]
    fn gif_first_frame_reads_placement_palette_and_transparency() {
        let mut gif = b"GIF89a".to_vec();
        gif.extend([20, 0, 10, 0, 0x80, 0, 0]); // 20x10 canvas, 2-entry global palette
        gif.extend([9, 8, 7, 1, 2, 3]);
        gif.extend([0x21, 0xFE, 2, b'h', b'i', 0]); // a comment extension to skip
        gif.extend([0x21, 0xF9, 4, 1, 0, 0, 1, 0]); // transparent index 1
        gif.extend([0x2C, 2, 0, 3, 0, 5, 0, 4, 0, 0]);
        let frame = gif_first_frame(&gif).unwrap();
        assert_eq!(
            frame,
            GifFirstFrame {
                left: 2,
                top: 3,
                width: 5,
                height: 4,
                transparent_index: Some(1),
                index0_color: [9, 8, 7],
            }
        );
        assert_eq!(gif_first_frame(&gif[..30]), None);
        assert_eq!(gif_first_frame(b"not a gif"), None);
    }

    #[test]
    fn unpremultiply_matches_pillow_rgba_unpacker() {
        assert_eq!(unpremultiply_like_pillow([10, 20, 30, 0]), [0; 4]);
        assert_eq!(
            unpremultiply_like_pillow([10, 20, 30, 255]),
            [10, 20, 30, 255]
        );
        // 50 * 255 / 100 = 127.5, truncated; an over-range value clips.
        assert_eq!(
            unpremultiply_like_pillow([50, 100, 120, 100]),
            [127, 255, 255, 100]
        );
    }

    #[test]
    fn tiff_extra_samples_reads_first_ifd() {
        // Little-endian header, IFD at 8 with one entry: ExtraSamples, SHORT, count 1, value 1.
        let mut t = b"II*\0".to_vec();
        t.extend(8u32.to_le_bytes());
        t.extend(1u16.to_le_bytes());
        t.extend(338u16.to_le_bytes());
        t.extend(3u16.to_le_bytes());
        t.extend(1u32.to_le_bytes());
        t.extend([1, 0, 0, 0]);
        assert_eq!(tiff_extra_samples(&t), Some(1));
        assert_eq!(tiff_extra_samples(&t[..12]), None);
        assert_eq!(tiff_extra_samples(b"MM\0*\xff\xff\xff\xff"), None);
    }

    #[test]
    fn dimension_checks() {
        let s = ImageSource::Memory { len: 3 };
        assert!(matches!(
            check_dimensions(0, 5, 10, &s),
            Err(ImageError::ZeroSize { .. })
        ));
        assert!(matches!(
            check_dimensions(4, 3, 11, &s),
            Err(ImageError::TooLarge { pixels: 12, .. })
        ));
        assert!(check_dimensions(4, 3, 12, &s).is_ok());
    }

    #[test]
    fn orientations_move_the_corner_pixel() {
        // A 3x2 image with a marked top-left pixel; EXIF semantics say where it ends up.
        let mut base = RgbImage::new(3, 2);
        base.put_pixel(0, 0, Rgb([255, 0, 0]));
        let cases = [
            (Orientation::NoTransforms, (3, 2), (0, 0)),
            (Orientation::FlipHorizontal, (3, 2), (2, 0)),
            (Orientation::Rotate180, (3, 2), (2, 1)),
            (Orientation::FlipVertical, (3, 2), (0, 1)),
            (Orientation::Rotate90FlipH, (2, 3), (0, 0)),
            (Orientation::Rotate90, (2, 3), (1, 0)),
            (Orientation::Rotate270FlipH, (2, 3), (1, 2)),
            (Orientation::Rotate270, (2, 3), (0, 2)),
        ];
        for (o, dims, marked) in cases {
            let mut img = base.clone();
            apply_orientation(&mut img, o);
            assert_eq!(img.dimensions(), dims, "{o:?}");
            assert_eq!(img.get_pixel(marked.0, marked.1).0, [255, 0, 0], "{o:?}");
        }
    }
}
