//! Video input: a fixed number of RGB frames sampled from a clip, for multi-frame prompts.
//!
//! A clip is an animated GIF, an animated WebP, or a folder of frame images. [`load_frames`]
//! returns exactly the number of frames asked for, each at the clip's own resolution (the
//! image processor resizes them like any other image).
//!
//! **Which frames.** For a clip of `n` frames and `k` requested ([`sample_indices`]):
//!
//! * `n ≥ k`: frame `floor((2i + 1) · n / (2k))` for `i = 0 … k−1`, i.e. the clip is cut into
//!   `k` equal segments and the frame at the middle of each is taken. The picks are spread
//!   symmetrically over the whole clip (neither end is favoured), and `n = k` takes every
//!   frame once.
//! * `n < k`: frame `i mod n`, i.e. the whole clip repeated cyclically, as big_vision's
//!   `video_replicate_img(k, k)` tiles a short frame list and keeps the first `k`. Both rules
//!   agree at `n = k`.
//!
//! (big_vision's own video readers sample with a fixed stride from frame 0 and are not
//! released; the centred rule is our choice for covering a whole clip with any `k`.)
//!
//! **Decoding.** Only what the sampled frames need is decoded, and only they are kept.
//!
//! * Animated WebP: frames come out identical to Pillow's (libwebp's `WebPAnimDecoder`): each
//!   frame's bitstream is decoded on its own and composited here with libwebp's rules and
//!   integer blending (the `image` crate's own animation compositing is off by one level on
//!   blended sub-frames). The canvas is then converted as Pillow and the transformers
//!   processor do: composited onto white ([`crate::image::composite_on_white`]) when the file
//!   declares alpha, alpha dropped when it does not. Decoding restarts at the last keyframe
//!   before each sampled frame, so frames between samples are mostly skipped.
//! * Animated GIF: the full canvas after each frame's offset, transparency and disposal (the
//!   `image` crate's frame iterator), composited onto white. GIF frames depend on all earlier
//!   ones, so decoding runs in order up to the last sampled frame.
//! * Frame counts come from the container's block structure, without decoding pixels; a
//!   truncated last frame is left out (as viewers do).
//! * A folder lists its files whose names end in an image extension (`jpg jpeg png webp gif
//!   bmp tif tiff`, any case; hidden files and everything else are ignored), sorts them in
//!   natural order (`frame2` before `frame10`, see [`natural_cmp`]), and decodes only the
//!   sampled files, with [`crate::image::load_image`] (so EXIF orientation and alpha are
//!   handled as for any image; an animated file in a folder contributes its first frame).
//!   Frames may differ in size; each is resized on its own later.
//!
//! **Stills.** A path holding a still image (any format [`crate::image`] reads, a one-frame
//! GIF, a WebP without animation) is a one-frame clip: that frame repeated `k` times, decoded
//! exactly like [`crate::image::load_image`].
//!
//! Known differences from Pillow: GIF frames after the first may differ where Pillow's own
//! disposal rules differ from browsers' (the `image` crate starts from a transparent canvas,
//! i.e. white here, where Pillow shows palette index 0 around a first frame smaller than the
//! canvas, and clears "restore to background" areas to transparent); EXIF orientation in an
//! animated WebP is not applied; APNG is read as a still (its first frame).

use std::cmp::Ordering;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::codecs::gif::GifDecoder;
use image::{AnimationDecoder, Frame, ImageDecoder, ImageFormat, ImageResult, Limits, RgbImage};

use crate::image::{
    DecodeOptions, ImageError, ImageSource, check_dimensions, composite_on_white, load_image_with,
};

/// Largest number of frames one call may ask for. big_vision uses 8–16; this only stops an
/// absurd request from exhausting memory with copies of frames.
pub const MAX_FRAMES: usize = 1024;

/// File name endings (compared case-insensitively) taken as frames in a folder.
pub const FRAME_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];

/// Why a clip could not be loaded. Every message names the path.
#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error("{}: video not found (expected an animated GIF/WebP or a folder of frames)", path.display())]
    NotFound { path: PathBuf },
    #[error("{}: cannot read: {error}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error(
        "{}: folder holds no frame images (looked for files ending in .jpg, .jpeg, .png, \
         .webp, .gif, .bmp, .tif or .tiff)",
        path.display()
    )]
    EmptyFolder { path: PathBuf },
    #[error("{}: cannot take {requested} frames: ask for between 1 and {MAX_FRAMES}", path.display())]
    InvalidFrameCount { path: PathBuf, requested: usize },
    #[error("{}: corrupt or unsupported animation: {detail}", path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error("{}: cannot decode frame {index} of {count}: {detail}", path.display())]
    Frame {
        path: PathBuf,
        index: usize,
        count: usize,
        detail: String,
    },
    /// A still image or a folder's frame file failed; the inner error names that file.
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// Loads `frames` frames sampled evenly from the clip at `path` (see the module
/// documentation for the sampling rule and the accepted inputs), with the default
/// [`DecodeOptions`].
pub fn load_frames(path: &Path, frames: usize) -> Result<Vec<RgbImage>, VideoError> {
    load_frames_with(path, frames, &DecodeOptions::default())
}

/// [`load_frames`] with decoding options; `max_pixels` bounds the canvas of an animation and
/// each frame file of a folder, checked from headers before any pixel is decoded.
pub fn load_frames_with(
    path: &Path,
    frames: usize,
    options: &DecodeOptions,
) -> Result<Vec<RgbImage>, VideoError> {
    if frames == 0 || frames > MAX_FRAMES {
        return Err(VideoError::InvalidFrameCount {
            path: path.to_path_buf(),
            requested: frames,
        });
    }
    let metadata = std::fs::metadata(path).map_err(|e| io_error(path, e))?;
    if metadata.is_dir() {
        load_folder(path, frames, options)
    } else {
        load_file(path, frames, options)
    }
}

/// Which clip frame fills each of `frames` output slots, for a clip of `clip_len` frames
/// (empty when the clip is). The rule is in the module documentation.
pub fn sample_indices(clip_len: usize, frames: usize) -> Vec<usize> {
    if clip_len == 0 {
        return Vec::new();
    }
    (0..frames)
        .map(|i| {
            if clip_len >= frames {
                // u128 keeps (2i+1)·n exact for any usize inputs.
                let pick = (2 * i as u128 + 1) * clip_len as u128 / (2 * frames as u128);
                pick as usize
            } else {
                i % clip_len
            }
        })
        .collect()
}

/// Natural order of file names: runs of ASCII digits compare as numbers (`frame2` <
/// `frame10`), other text compares case-insensitively; names equal under those rules (such as
/// `f01` and `f1`) fall back to plain string order so the order is total.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (ra, rb) = (runs(a), runs(b));
    for (x, y) in ra.iter().zip(&rb) {
        let x_num = x.starts_with(|c: char| c.is_ascii_digit());
        let y_num = y.starts_with(|c: char| c.is_ascii_digit());
        let order = if x_num && y_num {
            // Compare digit strings as numbers without parsing, so no length can overflow.
            let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
            x.len().cmp(&y.len()).then_with(|| x.cmp(y))
        } else {
            x.chars()
                .map(|c| c.to_ascii_lowercase())
                .cmp(y.chars().map(|c| c.to_ascii_lowercase()))
        };
        if order != Ordering::Equal {
            return order;
        }
    }
    ra.len().cmp(&rb.len()).then_with(|| a.cmp(b))
}

/// Splits a name into maximal runs of ASCII digits and of everything else.
fn runs(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut previous_digit = None;
    for (i, c) in s.char_indices() {
        let digit = c.is_ascii_digit();
        if previous_digit.is_some_and(|p| p != digit) {
            out.push(&s[start..i]);
            start = i;
        }
        previous_digit = Some(digit);
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

fn io_error(path: &Path, error: std::io::Error) -> VideoError {
    if error.kind() == std::io::ErrorKind::NotFound {
        VideoError::NotFound {
            path: path.to_path_buf(),
        }
    } else {
        VideoError::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

fn load_folder(
    dir: &Path,
    frames: usize,
    options: &DecodeOptions,
) -> Result<Vec<RgbImage>, VideoError> {
    let files = frame_files(dir)?;
    if files.is_empty() {
        return Err(VideoError::EmptyFolder {
            path: dir.to_path_buf(),
        });
    }
    let indices = sample_indices(files.len(), frames);
    pick_frames(&indices, |wanted| {
        // Files are independent, so only the sampled ones are decoded.
        wanted
            .iter()
            .map(|&i| load_image_with(&files[i], options).map_err(VideoError::from))
            .collect()
    })
}

/// The folder's frame files in natural order of their names.
fn frame_files(dir: &Path) -> Result<Vec<PathBuf>, VideoError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
        let path = entry.map_err(|e| io_error(dir, e))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue; // a name that is not UTF-8 has no extension we could recognise
        };
        if is_frame_name(name) && path.is_file() {
            files.push(path);
        }
    }
    files.sort_by(|a, b| natural_cmp(&file_name(a), &file_name(b)));
    Ok(files)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether a folder entry's name marks it as a frame: an image extension, not hidden (editors
/// and file managers leave hidden files such as `._frame1.jpg` next to real frames).
fn is_frame_name(name: &str) -> bool {
    if name.starts_with('.') {
        return false;
    }
    name.rsplit_once('.').is_some_and(|(_, ext)| {
        FRAME_EXTENSIONS
            .iter()
            .any(|known| ext.eq_ignore_ascii_case(known))
    })
}

fn load_file(
    path: &Path,
    frames: usize,
    options: &DecodeOptions,
) -> Result<Vec<RgbImage>, VideoError> {
    let bytes = std::fs::read(path).map_err(|e| io_error(path, e))?;
    match image::guess_format(&bytes) {
        Ok(ImageFormat::Gif) => {
            if let Some(count) = gif_frame_count(&bytes).filter(|&n| n >= 2) {
                return load_gif(path, &bytes, count, frames, options);
            }
        }
        Ok(ImageFormat::WebP) => {
            if let Some(animation) = webp_animation(&bytes) {
                return load_webp(path, &bytes, &animation, frames, options);
            }
        }
        _ => {}
    }
    // A still (or something unreadable, which load_image_with reports with its exact cause).
    let still = load_image_with(path, options)?;
    Ok(vec![still; frames])
}

fn load_gif(
    path: &Path,
    bytes: &[u8],
    count: usize,
    frames: usize,
    options: &DecodeOptions,
) -> Result<Vec<RgbImage>, VideoError> {
    let corrupt = |e: image::ImageError| VideoError::Corrupt {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    pick_frames(&sample_indices(count, frames), |wanted| {
        let mut decoder = GifDecoder::new(Cursor::new(bytes)).map_err(corrupt)?;
        let (w, h) = decoder.dimensions();
        check_dimensions(
            w,
            h,
            options.max_pixels,
            &ImageSource::File(path.to_path_buf()),
        )?;
        decoder.set_limits(Limits::default()).map_err(corrupt)?;
        decode_sequential(decoder.into_frames(), wanted, count, path)
    })
}

/// Builds the output from `indices`: `decode` gets the distinct wanted clip indices in
/// increasing order and returns their frames in that order; repeats are copies.
fn pick_frames(
    indices: &[usize],
    decode: impl FnOnce(&[usize]) -> Result<Vec<RgbImage>, VideoError>,
) -> Result<Vec<RgbImage>, VideoError> {
    let mut wanted = indices.to_vec();
    wanted.sort_unstable();
    wanted.dedup();
    let decoded = decode(&wanted)?;
    Ok(indices
        .iter()
        .filter_map(|i| wanted.binary_search(i).ok().and_then(|k| decoded.get(k)))
        .cloned()
        .collect())
}

/// Runs an animation's frames in order (each frame depends on the canvas left by the ones
/// before) and keeps the `wanted` ones (sorted, distinct), stopping after the last.
fn decode_sequential(
    frames: impl Iterator<Item = ImageResult<Frame>>,
    wanted: &[usize],
    count: usize,
    path: &Path,
) -> Result<Vec<RgbImage>, VideoError> {
    let last = wanted.last().copied().unwrap_or(0);
    let mut kept = Vec::with_capacity(wanted.len());
    let mut frames = frames;
    for index in 0..=last {
        let frame = match frames.next() {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                return Err(VideoError::Frame {
                    path: path.to_path_buf(),
                    index,
                    count,
                    detail: e.to_string(),
                });
            }
            None => {
                return Err(VideoError::Frame {
                    path: path.to_path_buf(),
                    index,
                    count,
                    detail: "the decoder found no more frames".into(),
                });
            }
        };
        if wanted.binary_search(&index).is_ok() {
            kept.push(rgba_on_white(&frame.into_buffer()));
        }
    }
    Ok(kept)
}

/// Composites an RGBA canvas onto white with the same arithmetic as still images.
fn rgba_on_white(rgba: &image::RgbaImage) -> RgbImage {
    let (w, h) = rgba.dimensions();
    RgbImage::from_fn(w, h, |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        image::Rgb(composite_on_white([r, g, b], a))
    })
}

/// Number of complete frames (image descriptors with all their data) in a GIF, read from its
/// block structure without decompressing anything. A truncated last frame is not counted, as
/// viewers drop it too; `None` when the header is unreadable.
pub fn gif_frame_count(gif: &[u8]) -> Option<usize> {
    /// Position after a chain of data sub-blocks starting at `i`, or `None` if cut short.
    fn skip_sub_blocks(b: &[u8], mut i: usize) -> Option<usize> {
        loop {
            let n = usize::from(*b.get(i)?);
            i += 1 + n;
            if n == 0 {
                return (i <= b.len()).then_some(i);
            }
        }
    }
    fn table_len(packed: u8) -> usize {
        if packed & 0x80 == 0 {
            0
        } else {
            3 << ((packed & 0x07) + 1)
        }
    }

    if !(gif.starts_with(b"GIF87a") || gif.starts_with(b"GIF89a")) {
        return None;
    }
    let mut pos = 13 + table_len(*gif.get(10)?);
    let mut count = 0;
    // Any malformed or missing block ends the walk: the frames before it are what a decoder
    // can deliver.
    while let Some(&block) = gif.get(pos) {
        match block {
            0x21 => match skip_sub_blocks(gif, pos + 2) {
                Some(next) => pos = next,
                None => break,
            },
            0x2C => {
                let Some(&packed) = gif.get(pos + 9) else {
                    break;
                };
                // Descriptor (10 bytes), local colour table, LZW minimum code size, data.
                let data = pos + 10 + table_len(packed) + 1;
                match skip_sub_blocks(gif, data) {
                    Some(next) => {
                        count += 1;
                        pos = next;
                    }
                    None => break,
                }
            }
            _ => break, // 0x3B trailer, or garbage
        }
    }
    Some(count)
}

/// The number of frames of an animated WebP; `None` for a still or unreadable WebP.
pub fn webp_animation_frames(webp: &[u8]) -> Option<usize> {
    webp_animation(webp).map(|a| a.frames.len())
}

/// What the container says about an animated WebP, read without decoding any pixels.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WebpAnimation {
    width: u32,
    height: u32,
    /// The `VP8X` alpha flag. Pillow opens a WebP without it in mode RGB, dropping the alpha
    /// channel (untouched canvas stays black), and with it in mode RGBA (composited onto
    /// white by the processor).
    alpha: bool,
    frames: Vec<WebpFrame>,
}

/// One `ANMF` chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WebpFrame {
    x: u32,
    y: u32,
    width: u32,
    height: u32,
    /// Alpha-blend onto the canvas (else overwrite).
    blend: bool,
    /// Clear this frame's rectangle to transparent before the next frame.
    dispose_background: bool,
    /// libwebp's demuxer's `has_alpha`: an `ALPH` chunk, or the alpha bit of a `VP8L` header.
    has_alpha: bool,
    /// The frame's `ALPH` chunk (header included), if any.
    alph: Option<std::ops::Range<usize>>,
    /// Its `VP8 ` or `VP8L` chunk, header included.
    image: std::ops::Range<usize>,
}

fn le24(b: &[u8]) -> u32 {
    u32::from(b[0]) | u32::from(b[1]) << 8 | u32::from(b[2]) << 16
}

/// Walks the RIFF chunks of a WebP: `(fourcc, payload range)` for each complete chunk from
/// `start` to `end` (a chunk running past `end` ends the walk).
fn riff_chunks(
    bytes: &[u8],
    start: usize,
    end: usize,
) -> impl Iterator<Item = ([u8; 4], std::ops::Range<usize>)> + '_ {
    let mut pos = start;
    std::iter::from_fn(move || {
        let header = bytes.get(pos..pos.checked_add(8)?)?;
        let size = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let payload = pos + 8..(pos + 8).checked_add(size)?;
        if payload.end > end {
            return None;
        }
        let fourcc = [header[0], header[1], header[2], header[3]];
        // Chunks are padded to an even length.
        pos = payload.end + (size & 1);
        Some((fourcc, payload))
    })
}

/// Parses an animated WebP's container; `None` unless it is one (extended format with the
/// animation flag). Frames cut short at the end of the file are left out.
fn webp_animation(webp: &[u8]) -> Option<WebpAnimation> {
    if webp.get(0..4)? != b"RIFF" || webp.get(8..12)? != b"WEBP" {
        return None;
    }
    let mut animation = None;
    let mut frames = Vec::new();
    for (fourcc, payload) in riff_chunks(webp, 12, webp.len()) {
        let data = &webp[payload.clone()];
        match &fourcc {
            b"VP8X" if data.len() >= 10 => {
                // Flags: bit 4 alpha, bit 1 animation; then canvas size minus one, 24-bit.
                if data[0] & 0x02 == 0 {
                    return None;
                }
                animation = Some((
                    1 + le24(&data[4..7]),
                    1 + le24(&data[7..10]),
                    data[0] & 0x10 != 0,
                ));
            }
            b"ANMF" if data.len() >= 16 => {
                if let Some(frame) = webp_frame(webp, payload) {
                    frames.push(frame);
                }
            }
            _ => {}
        }
    }
    let (width, height, alpha) = animation?;
    Some(WebpAnimation {
        width,
        height,
        alpha,
        frames,
    })
}

/// Reads one `ANMF` payload: its 16-byte header, then an optional `ALPH` and the `VP8 ` or
/// `VP8L` image chunk (other chunks are skipped, as libwebp does).
fn webp_frame(webp: &[u8], payload: std::ops::Range<usize>) -> Option<WebpFrame> {
    let h = &webp[payload.start..payload.start + 16];
    let flags = h[15];
    let mut alph = None;
    for (fourcc, chunk) in riff_chunks(webp, payload.start + 16, payload.end) {
        let with_header = chunk.start - 8..chunk.end;
        match &fourcc {
            b"ALPH" if alph.is_none() => alph = Some(with_header),
            b"VP8 " | b"VP8L" => {
                let lossless = &fourcc == b"VP8L";
                // VP8L header: signature byte, then 14+14 bits of size and the alpha bit.
                let vp8l_alpha = lossless
                    && webp.get(chunk.start + 1..chunk.start + 5).is_some_and(|b| {
                        (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) >> 28) & 1 != 0
                    });
                return Some(WebpFrame {
                    x: 2 * le24(&h[0..3]),
                    y: 2 * le24(&h[3..6]),
                    width: 1 + le24(&h[6..9]),
                    height: 1 + le24(&h[9..12]),
                    blend: flags & 0x02 == 0,
                    dispose_background: flags & 0x01 != 0,
                    has_alpha: vp8l_alpha || (!lossless && alph.is_some()),
                    alph: if lossless { None } else { alph },
                    image: with_header,
                });
            }
            _ => {}
        }
    }
    None
}

fn load_webp(
    path: &Path,
    bytes: &[u8],
    animation: &WebpAnimation,
    frames: usize,
    options: &DecodeOptions,
) -> Result<Vec<RgbImage>, VideoError> {
    let count = animation.frames.len();
    if count == 0 {
        return Err(VideoError::Corrupt {
            path: path.to_path_buf(),
            detail: "animated WebP without any complete frame".into(),
        });
    }
    let (w, h) = (animation.width, animation.height);
    check_dimensions(
        w,
        h,
        options.max_pixels,
        &ImageSource::File(path.to_path_buf()),
    )?;
    if let Some((index, _)) = animation.frames.iter().enumerate().find(|(_, f)| {
        u64::from(f.x) + u64::from(f.width) > u64::from(w)
            || u64::from(f.y) + u64::from(f.height) > u64::from(h)
    }) {
        return Err(VideoError::Frame {
            path: path.to_path_buf(),
            index,
            count,
            detail: "frame lies outside the canvas".into(),
        });
    }
    let keyframes = webp_keyframes(animation);
    pick_frames(&sample_indices(count, frames), |wanted| {
        let mut compositor = WebpCompositor::new(w, h);
        let mut kept = Vec::with_capacity(wanted.len());
        let mut next = 0;
        for &target in wanted {
            // A keyframe does not depend on earlier frames, so decoding can jump to the last
            // one at or before the target.
            let restart = (next..=target)
                .rev()
                .find(|&i| keyframes[i])
                .unwrap_or(next);
            let span = animation.frames.iter().zip(&keyframes).enumerate();
            for (index, (frame, &keyframe)) in span.take(target + 1).skip(restart) {
                let pixels =
                    decode_webp_frame(bytes, frame).map_err(|detail| VideoError::Frame {
                        path: path.to_path_buf(),
                        index,
                        count,
                        detail,
                    })?;
                let previous = index.checked_sub(1).map(|p| &animation.frames[p]);
                compositor.draw(frame, &pixels, previous, keyframe);
            }
            next = target + 1;
            kept.push(compositor.to_rgb(animation.alpha));
        }
        Ok(kept)
    })
}

/// libwebp's `IsKeyFrame` for every frame: the first; one covering the whole canvas that
/// neither has alpha nor blends; or one after a frame that was disposed to transparent and
/// covered the canvas or was itself a keyframe. A keyframe starts from a transparent canvas.
fn webp_keyframes(animation: &WebpAnimation) -> Vec<bool> {
    let full = |f: &WebpFrame| f.width == animation.width && f.height == animation.height;
    let mut keys: Vec<bool> = Vec::with_capacity(animation.frames.len());
    for (i, frame) in animation.frames.iter().enumerate() {
        let key = match i.checked_sub(1) {
            None => true,
            Some(p) => {
                let previous = &animation.frames[p];
                ((!frame.has_alpha || !frame.blend) && full(frame))
                    || (previous.dispose_background && (full(previous) || keys[p]))
            }
        };
        keys.push(key);
    }
    keys
}

/// Decodes one frame's bitstream to straight RGBA by wrapping it in a still WebP file.
fn decode_webp_frame(bytes: &[u8], frame: &WebpFrame) -> Result<image::RgbaImage, String> {
    let mut body = b"WEBP".to_vec();
    if let Some(alph) = &frame.alph {
        // Lossy with alpha needs the extended header so the alpha chunk is read.
        let mut vp8x = [0u8; 10];
        vp8x[0] = 0x10;
        vp8x[4..7].copy_from_slice(&(frame.width - 1).to_le_bytes()[..3]);
        vp8x[7..10].copy_from_slice(&(frame.height - 1).to_le_bytes()[..3]);
        body.extend(b"VP8X");
        body.extend(10u32.to_le_bytes());
        body.extend(vp8x);
        push_chunk(&mut body, &bytes[alph.clone()]);
    }
    push_chunk(&mut body, &bytes[frame.image.clone()]);
    let mut file = b"RIFF".to_vec();
    file.extend((body.len() as u32).to_le_bytes());
    file.extend(body);
    let decoded = image::load_from_memory_with_format(&file, ImageFormat::WebP)
        .map_err(|e| e.to_string())?
        .into_rgba8();
    if decoded.dimensions() != (frame.width, frame.height) {
        return Err(format!(
            "bitstream is {}x{}, the frame header says {}x{}",
            decoded.width(),
            decoded.height(),
            frame.width,
            frame.height
        ));
    }
    Ok(decoded)
}

/// Appends a chunk (header included) with its padding byte.
fn push_chunk(out: &mut Vec<u8>, chunk: &[u8]) {
    out.extend_from_slice(chunk);
    if chunk.len() % 2 == 1 {
        out.push(0);
    }
}

/// The canvas state of libwebp's `WebPAnimDecoder` (which Pillow uses), reproduced so frames
/// come out identical to Pillow's: RGBA, transparent at the start and where disposed, frames
/// written over their rectangle and then, when blending, every non-opaque pixel blended with
/// the previous (disposed) canvas in libwebp's integer arithmetic.
///
/// libwebp keeps two full canvases and copies between them every frame; they only ever differ
/// inside the previous frame's rectangle, so one canvas and a pending disposal do the same
/// work in time proportional to the frame rectangles.
struct WebpCompositor {
    width: u32,
    canvas: Vec<[u8; 4]>,
    /// The previous frame, when it asked to be cleared to transparent before the next one.
    pending_clear: Option<WebpFrame>,
}

impl WebpCompositor {
    fn new(width: u32, height: u32) -> Self {
        WebpCompositor {
            width,
            canvas: vec![[0; 4]; width as usize * height as usize],
            pending_clear: None,
        }
    }

    fn draw(
        &mut self,
        frame: &WebpFrame,
        pixels: &image::RgbaImage,
        previous: Option<&WebpFrame>,
        keyframe: bool,
    ) {
        let cleared = self.pending_clear.take();
        if keyframe {
            self.canvas.fill([0; 4]);
        } else if let Some(p) = &cleared {
            self.fill_rect(p, [0; 4]);
        }
        let stride = self.width as usize;
        // libwebp does not blend where the previous frame was just cleared to transparent
        // (in exact arithmetic that would be a no-op; in libwebp's it is not).
        let just_cleared = |x: u32, y: u32| {
            previous.is_some_and(|p| {
                p.dispose_background
                    && x >= p.x
                    && y >= p.y
                    && x - p.x < p.width
                    && y - p.y < p.height
            })
        };
        let blending = frame.blend && !keyframe && previous.is_some();
        for (fx, fy, px) in pixels.enumerate_pixels() {
            let (x, y) = (frame.x + fx, frame.y + fy);
            let i = y as usize * stride + x as usize;
            let mut out = px.0;
            if blending && out[3] != 255 && !just_cleared(x, y) {
                out = blend_pixel_like_libwebp(out, self.canvas[i]);
            }
            self.canvas[i] = out;
        }
        if frame.dispose_background {
            self.pending_clear = Some(frame.clone());
        }
    }

    fn fill_rect(&mut self, f: &WebpFrame, value: [u8; 4]) {
        let stride = self.width as usize;
        for y in f.y..f.y + f.height {
            let row = y as usize * stride;
            self.canvas[row + f.x as usize..row + (f.x + f.width) as usize].fill(value);
        }
    }

    /// The canvas as Pillow hands it on: alpha dropped for files without the alpha flag
    /// (mode RGB), otherwise composited onto white like any RGBA image.
    fn to_rgb(&self, alpha: bool) -> RgbImage {
        let height = (self.canvas.len() / self.width.max(1) as usize) as u32;
        RgbImage::from_fn(self.width, height, |x, y| {
            let [r, g, b, a] = self.canvas[y as usize * self.width as usize + x as usize];
            image::Rgb(if alpha {
                composite_on_white([r, g, b], a)
            } else {
                [r, g, b]
            })
        })
    }
}

/// libwebp's `BlendPixelNonPremult` (anim_decode.c): `src` over `dst`, straight alpha, with
/// its approximate integer arithmetic, which is what Pillow's frames contain.
fn blend_pixel_like_libwebp(src: [u8; 4], dst: [u8; 4]) -> [u8; 4] {
    let src_a = u32::from(src[3]);
    if src_a == 0 {
        return dst;
    }
    let dst_factor_a = (u32::from(dst[3]) * (256 - src_a)) >> 8;
    let blend_a = src_a + dst_factor_a;
    let scale = (1u32 << 24) / blend_a;
    let channel = |c: usize| {
        let unscaled = u32::from(src[c]) * src_a + u32::from(dst[c]) * dst_factor_a;
        ((unscaled * scale) >> 24) as u8
    };
    [channel(0), channel(1), channel(2), blend_a as u8]
}
