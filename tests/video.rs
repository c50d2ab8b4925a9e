//! `paligemma::video`: which frames come back, in what order, with what pixels, and how bad
//! input is reported. GIFs and folders are generated here; the animated WebP fixtures come from
//! `tests/fixtures/video/make_fixtures.py` (no WebP animation encoder exists in Rust's `image`).

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use paligemma::image::{DecodeOptions, ImageError};
use paligemma::video::{
    VideoError, gif_frame_count, load_frames, load_frames_with, natural_cmp, sample_indices,
    webp_animation_frames,
};

/// A distinct, exactly reproducible colour per frame index.
fn color(i: usize) -> [u8; 3] {
    let i = i as u32;
    [
        (17 + 37 * i) as u8,
        (200u32.wrapping_sub(23 * i) % 256) as u8,
        (5 + 61 * i) as u8,
    ]
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("video-tests")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/video")
        .join(name)
}

fn solid(w: u32, h: u32, c: [u8; 3]) -> RgbImage {
    RgbImage::from_pixel(w, h, Rgb(c))
}

fn colors_of(frames: &[RgbImage]) -> Vec<[u8; 3]> {
    frames
        .iter()
        .map(|f| {
            let c = f.get_pixel(0, 0).0;
            assert!(f.pixels().all(|p| p.0 == c), "frame is not solid");
            c
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// A minimal GIF writer, so fixtures with exact offsets, transparency and disposal can be built
// in the test (the `image` crate's encoder always writes full frames).

struct GifFrame {
    left: u16,
    top: u16,
    width: u16,
    height: u16,
    /// Palette indices, row-major.
    indices: Vec<u8>,
    transparent: Option<u8>,
    /// 1 = keep, 2 = restore to background, 3 = restore to previous.
    disposal: u8,
}

impl GifFrame {
    fn full(w: u16, h: u16, index: u8) -> Self {
        GifFrame {
            left: 0,
            top: 0,
            width: w,
            height: h,
            indices: vec![index; usize::from(w) * usize::from(h)],
            transparent: None,
            disposal: 1,
        }
    }
}

/// LZW with 8-bit literals only, resetting the table before it would widen the codes past 9
/// bits: valid GIF data that any decoder reads, without implementing compression.
fn lzw_literals(indices: &[u8]) -> Vec<u8> {
    const CLEAR: u32 = 256;
    const END: u32 = 257;
    let mut codes = vec![CLEAR];
    for chunk in indices.chunks(254) {
        codes.extend(chunk.iter().map(|&i| u32::from(i)));
        codes.push(CLEAR);
    }
    codes.push(END);
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for code in codes {
        acc |= code << bits;
        bits += 9;
        while bits >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            bits -= 8;
        }
    }
    if bits > 0 {
        out.push(acc as u8);
    }
    out
}

fn sub_blocks(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in data.chunks(255) {
        out.push(chunk.len() as u8);
        out.extend_from_slice(chunk);
    }
    out.push(0);
    out
}

/// A GIF89a with a 256-colour global palette `palette(i)`.
fn gif(w: u16, h: u16, palette: impl Fn(usize) -> [u8; 3], frames: &[GifFrame]) -> Vec<u8> {
    let mut out = b"GIF89a".to_vec();
    out.extend(w.to_le_bytes());
    out.extend(h.to_le_bytes());
    out.extend([0xF7, 0, 0]); // global table of 2^(7+1) entries
    for i in 0..256 {
        out.extend(palette(i));
    }
    for f in frames {
        let flags = (f.disposal << 2) | u8::from(f.transparent.is_some());
        out.extend([0x21, 0xF9, 4, flags, 10, 0, f.transparent.unwrap_or(0), 0]);
        out.push(0x2C);
        for v in [f.left, f.top, f.width, f.height] {
            out.extend(v.to_le_bytes());
        }
        out.push(0);
        out.push(8); // LZW minimum code size
        out.extend(sub_blocks(&lzw_literals(&f.indices)));
    }
    out.push(0x3B);
    out
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// `n` solid frames, frame `i` in `color(i)`.
fn counting_gif(n: usize) -> Vec<u8> {
    let frames: Vec<GifFrame> = (0..n).map(|i| GifFrame::full(8, 6, i as u8)).collect();
    gif(8, 6, color, &frames)
}

// ---------------------------------------------------------------------------------------------

#[test]
fn sampling_rule() {
    assert_eq!(sample_indices(10, 4), [1, 3, 6, 8]);
    assert_eq!(sample_indices(20, 4), [2, 7, 12, 17]);
    assert_eq!(sample_indices(5, 5), [0, 1, 2, 3, 4]);
    assert_eq!(sample_indices(100, 1), [50]);
    assert_eq!(sample_indices(2, 1), [1]);
    // Short clips repeat cyclically, like big_vision's video_replicate_img.
    assert_eq!(sample_indices(3, 8), [0, 1, 2, 0, 1, 2, 0, 1]);
    assert_eq!(sample_indices(1, 3), [0, 0, 0]);
    assert!(sample_indices(0, 3).is_empty());
    assert!(sample_indices(7, 0).is_empty());
    // Picks stay in range and in order for every clip length at least the request.
    for k in 1..20 {
        for n in k..60 {
            let s = sample_indices(n, k);
            assert_eq!(s.len(), k);
            assert!(s.windows(2).all(|w| w[0] < w[1]), "n={n} k={k}");
            assert!(*s.last().unwrap() < n);
        }
    }
    assert_eq!(
        sample_indices(usize::MAX, 2),
        [usize::MAX / 4, 3 * (usize::MAX / 4) + 2]
    );
}

#[test]
fn natural_order() {
    let mut names = vec![
        "frame10.png",
        "frame2.png",
        "Frame1.png",
        "frame9.png",
        "frame002.png",
        "frame100.png",
        "frame2b.png",
    ];
    names.sort_by(|a, b| natural_cmp(a, b));
    assert_eq!(
        names,
        [
            "Frame1.png",
            "frame002.png",
            "frame2.png",
            "frame2b.png",
            "frame9.png",
            "frame10.png",
            "frame100.png"
        ]
    );
    let huge = "f99999999999999999999999999999999999.png";
    assert_eq!(natural_cmp(huge, "f1.png"), std::cmp::Ordering::Greater);
}

#[test]
fn gif_frames_are_sampled_evenly() {
    let dir = scratch("gif_sampled");
    let path = write(&dir, "clip.gif", &counting_gif(20));
    assert_eq!(gif_frame_count(&std::fs::read(&path).unwrap()), Some(20));
    let frames = load_frames(&path, 4).unwrap();
    assert_eq!(frames.len(), 4);
    assert!(frames.iter().all(|f| f.dimensions() == (8, 6)));
    assert_eq!(colors_of(&frames), [2, 7, 12, 17].map(color));
    let all = load_frames(&path, 20).unwrap();
    assert_eq!(colors_of(&all), (0..20).map(color).collect::<Vec<_>>());
}

#[test]
fn short_gif_repeats_cyclically() {
    let dir = scratch("gif_short");
    let path = write(&dir, "clip.gif", &counting_gif(3));
    let frames = load_frames(&path, 7).unwrap();
    assert_eq!(colors_of(&frames), [0, 1, 2, 0, 1, 2, 0].map(color));
}

#[test]
fn gif_partial_frames_are_composited() {
    const RED: u8 = 1;
    const BLUE: u8 = 2;
    const GREEN: u8 = 3;
    const CLEAR: u8 = 9;
    let palette = |i: usize| match i {
        1 => [255, 0, 0],
        2 => [0, 0, 255],
        3 => [0, 255, 0],
        _ => [7, 7, 7],
    };
    let (w, h) = (8u16, 6u16);
    let frames = [
        // 0: red everywhere except a transparent hole at (0, 0), which shows white.
        GifFrame {
            transparent: Some(CLEAR),
            indices: {
                let mut v = vec![RED; 48];
                v[0] = CLEAR;
                v
            },
            ..GifFrame::full(w, h, RED)
        },
        // 1: a 2x2 blue patch at (3, 2), kept.
        GifFrame {
            left: 3,
            top: 2,
            width: 2,
            height: 2,
            indices: vec![BLUE; 4],
            transparent: None,
            disposal: 1,
        },
        // 2: a 3x1 green strip at (1, 5) whose middle pixel is transparent, then restored to
        // what was there before it ("previous").
        GifFrame {
            left: 1,
            top: 5,
            width: 3,
            height: 1,
            indices: vec![GREEN, CLEAR, GREEN],
            transparent: Some(CLEAR),
            disposal: 3,
        },
        // 3: a single blue pixel at (7, 0).
        GifFrame {
            left: 7,
            top: 0,
            width: 1,
            height: 1,
            indices: vec![BLUE],
            transparent: None,
            disposal: 1,
        },
    ];
    let dir = scratch("gif_partial");
    let path = write(&dir, "partial.gif", &gif(w, h, palette, &frames));
    let got = load_frames(&path, 4).unwrap();

    let mut expected = solid(8, 6, [255, 0, 0]);
    expected.put_pixel(0, 0, Rgb([255, 255, 255]));
    assert_eq!(got[0], expected, "frame 0");
    for (x, y) in [(3, 2), (4, 2), (3, 3), (4, 3)] {
        expected.put_pixel(x, y, Rgb([0, 0, 255]));
    }
    assert_eq!(got[1], expected, "frame 1");
    let mut with_strip = expected.clone();
    with_strip.put_pixel(1, 5, Rgb([0, 255, 0]));
    with_strip.put_pixel(3, 5, Rgb([0, 255, 0]));
    assert_eq!(got[2], with_strip, "frame 2");
    // The strip was disposed to the previous state before frame 3 was drawn.
    expected.put_pixel(7, 0, Rgb([0, 0, 255]));
    assert_eq!(got[3], expected, "frame 3");
}

#[test]
fn webp_animation_is_sampled_and_composited() {
    // 12 frames: the left half in color(i), the right half a constant grey, so the encoder
    // stores later frames as left-half sub-rectangles that must be composited.
    let path = fixture("counting.webp");
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(webp_animation_frames(&bytes), Some(12));
    let frames = load_frames(&path, 3).unwrap();
    assert_eq!(frames.len(), 3);
    for (frame, i) in frames.iter().zip([2, 6, 10]) {
        assert_eq!(frame.dimensions(), (16, 12));
        for (x, _, p) in frame.enumerate_pixels() {
            let want = if x < 8 { color(i) } else { [128, 128, 128] };
            assert_eq!(p.0, want, "frame {i} column {x}");
        }
    }
    let cycled = load_frames(&path, 14).unwrap();
    assert_eq!(cycled[12], cycled[0]);
    assert_eq!(cycled[13], cycled[1]);
}

#[test]
fn webp_transparency_composites_onto_white() {
    // 3 frames of 8x8: frame i is color(i) with alpha 255 on the top half, fully transparent
    // at the bottom, and half transparent (alpha 128) in the bottom-right quarter.
    let path = fixture("alpha.webp");
    let frames = load_frames(&path, 3).unwrap();
    for (i, frame) in frames.iter().enumerate() {
        let c = color(i);
        assert_eq!(frame.get_pixel(1, 1).0, c);
        assert_eq!(frame.get_pixel(1, 6).0, [255, 255, 255]);
        assert_eq!(
            frame.get_pixel(6, 6).0,
            paligemma::image::composite_on_white(c, 128)
        );
    }
}

#[test]
fn folder_in_natural_order_ignoring_other_files() {
    let dir = scratch("folder");
    let names = [
        "frame1.png",
        "frame2.png",
        "frame9.png",
        "frame10.png",
        "frame11.png",
    ];
    for (i, name) in names.iter().enumerate() {
        solid(4, 3, color(i)).save(dir.join(name)).unwrap();
    }
    // Not frames: text, hidden files (even with an image name), folders named like images.
    std::fs::write(dir.join("notes.txt"), "not a frame").unwrap();
    std::fs::write(dir.join(".frame0.png"), "not an image at all").unwrap();
    std::fs::create_dir(dir.join("frame5.png")).unwrap();

    let frames = load_frames(&dir, 5).unwrap();
    assert_eq!(colors_of(&frames), (0..5).map(color).collect::<Vec<_>>());
    let two = load_frames(&dir, 2).unwrap();
    assert_eq!(colors_of(&two), [color(1), color(3)]);
    let seven = load_frames(&dir, 7).unwrap();
    assert_eq!(colors_of(&seven), [0, 1, 2, 3, 4, 0, 1].map(color));
}

#[test]
fn folder_decodes_only_sampled_files() {
    // f2.png is corrupt; it is only read when the sampling picks it.
    let dir = scratch("folder_lazy");
    solid(4, 4, color(0)).save(dir.join("f1.png")).unwrap();
    std::fs::write(dir.join("f2.png"), b"corrupt").unwrap();
    solid(4, 4, color(2)).save(dir.join("f3.png")).unwrap();
    solid(4, 4, color(3)).save(dir.join("f4.png")).unwrap();
    // One frame of four is index 2, f3.png; two frames are indices 1 and 3, f2 and f4.
    assert_eq!(sample_indices(4, 1), [2]);
    assert_eq!(sample_indices(4, 2), [1, 3]);
    assert_eq!(colors_of(&load_frames(&dir, 1).unwrap()), [color(2)]);
    // A sampled corrupt frame is an error that names the file.
    let err = load_frames(&dir, 2).unwrap_err();
    assert!(matches!(err, VideoError::Image(_)), "{err:?}");
    assert!(err.to_string().contains("f2.png"), "{err}");
}

#[test]
fn still_images_are_one_frame_clips() {
    let dir = scratch("still");
    let png = dir.join("still.png");
    solid(5, 5, color(4)).save(&png).unwrap();
    assert_eq!(colors_of(&load_frames(&png, 3).unwrap()), [color(4); 3]);
    // A one-frame GIF and a still WebP are stills too.
    let one = write(&dir, "one.gif", &counting_gif(1));
    assert_eq!(colors_of(&load_frames(&one, 2).unwrap()), [color(0); 2]);
    let webp = dir.join("still.webp");
    solid(5, 5, color(6)).save(&webp).unwrap();
    assert_eq!(webp_animation_frames(&std::fs::read(&webp).unwrap()), None);
    assert_eq!(colors_of(&load_frames(&webp, 2).unwrap()), [color(6); 2]);
}

#[test]
fn truncated_gif_keeps_its_complete_frames() {
    let dir = scratch("truncated");
    let bytes = counting_gif(3);
    // Cut inside the last frame's data: two complete frames remain.
    let cut = &bytes[..bytes.len() - 20];
    assert_eq!(gif_frame_count(cut), Some(2));
    let path = write(&dir, "cut.gif", cut);
    assert_eq!(
        colors_of(&load_frames(&path, 2).unwrap()),
        [0, 1].map(color)
    );
}

#[test]
fn errors_name_the_path() {
    let dir = scratch("errors");
    let missing = dir.join("missing.gif");
    let err = load_frames(&missing, 4).unwrap_err();
    assert!(matches!(err, VideoError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("missing.gif"), "{err}");

    let empty = dir.join("empty_folder");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("readme.md"), "no frames here").unwrap();
    let err = load_frames(&empty, 4).unwrap_err();
    assert!(matches!(err, VideoError::EmptyFolder { .. }), "{err:?}");
    assert!(err.to_string().contains("empty_folder"), "{err}");

    let garbage = write(&dir, "garbage.gif", b"this is not a gif at all");
    let err = load_frames(&garbage, 4).unwrap_err();
    assert!(matches!(err, VideoError::Image(_)), "{err:?}");
    assert!(err.to_string().contains("garbage.gif"), "{err}");

    let zero = write(&dir, "zero.gif", b"");
    let err = load_frames(&zero, 4).unwrap_err();
    assert!(err.to_string().contains("zero.gif"), "{err}");

    let clip = write(&dir, "ok.gif", &counting_gif(3));
    // Canvases over the pixel limit are refused from the header.
    let small = DecodeOptions { max_pixels: 47 };
    for path in [clip.clone(), fixture("counting.webp")] {
        let err = load_frames_with(&path, 2, &small).unwrap_err();
        assert!(
            matches!(err, VideoError::Image(ImageError::TooLarge { .. })),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains(path.file_name().unwrap().to_str().unwrap()),
            "{err}"
        );
    }
    for bad in [0, paligemma::video::MAX_FRAMES + 1, usize::MAX] {
        let err = load_frames(&clip, bad).unwrap_err();
        assert!(
            matches!(err, VideoError::InvalidFrameCount { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("ok.gif"), "{err}");
    }
}

#[test]
fn corrupt_frame_data_is_reported_with_its_index() {
    // Two good frames, then a frame whose LZW stream starts with code 511, which no table
    // holds yet: structurally a complete frame, undecodable.
    let mut bytes = counting_gif(2);
    bytes.pop(); // trailer
    bytes.extend([0x21, 0xF9, 4, 4, 10, 0, 0, 0]);
    bytes.extend([0x2C, 0, 0, 0, 0, 8, 0, 6, 0, 0, 8]);
    bytes.extend(sub_blocks(&[0xFF; 12]));
    bytes.push(0x3B);
    assert_eq!(gif_frame_count(&bytes), Some(3));
    let dir = scratch("corrupt_frame");
    let path = write(&dir, "bad.gif", &bytes);

    let err = load_frames(&path, 3).unwrap_err();
    assert!(
        matches!(
            err,
            VideoError::Frame {
                index: 2,
                count: 3,
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("bad.gif") && msg.contains("frame 2 of 3"),
        "{msg}"
    );
    // One frame samples index 1; decoding stops there and never reaches the bad frame.
    assert_eq!(sample_indices(3, 1), [1]);
    assert_eq!(colors_of(&load_frames(&path, 1).unwrap()), [color(1)]);
}

#[test]
fn webp_frames_match_pillow_exactly() {
    // Lossy frames with alpha, blended sub-frames, disposal to background and keyframes;
    // the expected sheets are Pillow's (libwebp's) frames stacked top to bottom.
    for name in ["blend_lossy", "dispose_lossy"] {
        let path = fixture(&format!("{name}.webp"));
        let sheet = image::open(fixture(&format!("{name}.expected.png")))
            .unwrap()
            .to_rgb8();
        let n = webp_animation_frames(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(n, 10);
        let (w, h) = (sheet.width(), sheet.height() / n as u32);
        let expected: Vec<RgbImage> = (0..n as u32)
            .map(|k| image::imageops::crop_imm(&sheet, 0, k * h, w, h).to_image())
            .collect();
        // Every request size: sampled frames (decoding restarts at keyframes) must equal the
        // frames of a full sequential decode.
        for k in 1..=n {
            let frames = load_frames(&path, k).unwrap();
            for (slot, &i) in sample_indices(n, k).iter().enumerate() {
                assert!(
                    frames[slot] == expected[i],
                    "{name}: frame {i} (of {k} requested)"
                );
            }
        }
    }
}

#[test]
fn damaged_webp_animations() {
    let bytes = std::fs::read(fixture("blend_lossy.webp")).unwrap();
    let dir = scratch("webp_damaged");
    // RIFF header (12) + VP8X chunk (18) + ANIM chunk (14) + ANMF header (8 + 16), then the
    // first frame's "VP8 " chunk: its payload's bytes 3..6 are the VP8 start code.
    assert_eq!(&bytes[68..72], b"VP8 ");
    let mut bad = bytes.clone();
    bad[79..82].copy_from_slice(&[0, 0, 0]);
    let path = write(&dir, "bad_start_code.webp", &bad);
    let err = load_frames(&path, 10).unwrap_err();
    assert!(
        matches!(
            err,
            VideoError::Frame {
                index: 0,
                count: 10,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("bad_start_code.webp"), "{err}");

    // Cut in the middle: the complete frames before the cut remain a (shorter) clip.
    let cut = &bytes[..bytes.len() / 2];
    let n = webp_animation_frames(cut).unwrap();
    assert!((1..10).contains(&n), "{n}");
    let path = write(&dir, "cut.webp", cut);
    assert_eq!(load_frames(&path, 3).unwrap().len(), 3);

    // An animation flag with no frame at all.
    let empty = write(&dir, "no_frames.webp", &bytes[..44]);
    let err = load_frames(&empty, 2).unwrap_err();
    assert!(matches!(err, VideoError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("no_frames.webp"), "{err}");
}

#[test]
fn damaged_files_never_panic() {
    let dir = scratch("fuzz");
    let mut sources = vec![
        ("gif", counting_gif(5)),
        ("webp", std::fs::read(fixture("blend_lossy.webp")).unwrap()),
        (
            "webp",
            std::fs::read(fixture("dispose_lossy.webp")).unwrap(),
        ),
    ];
    sources.push(("webp", std::fs::read(fixture("counting.webp")).unwrap()));
    // A fixed xorshift sequence picks the corrupted bytes, so failures reproduce.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    // Damaged headers can claim huge canvases, which are legal up to the pixel limit but slow
    // to fill; a small limit keeps the test quick (and exercises that check).
    let options = DecodeOptions {
        max_pixels: 100_000,
    };
    for (k, (ext, bytes)) in sources.iter().enumerate() {
        let path = dir.join(format!("case{k}.{ext}"));
        let step = (bytes.len() / 80).max(1);
        for len in (0..bytes.len()).step_by(step) {
            std::fs::write(&path, &bytes[..len]).unwrap();
            let _ = load_frames_with(&path, 3, &options);
        }
        for _ in 0..120 {
            let mut damaged = bytes.clone();
            for _ in 0..1 + next() % 3 {
                let i = (next() % damaged.len() as u64) as usize;
                damaged[i] = next() as u8;
            }
            std::fs::write(&path, &damaged).unwrap();
            let _ = load_frames_with(&path, 3, &options);
        }
    }
}

proptest::proptest! {
    /// The container walkers read arbitrary bytes without panicking.
    #[test]
    fn container_walkers_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
        let _ = gif_frame_count(&bytes);
        let _ = webp_animation_frames(&bytes);
        let mut gif = b"GIF89a".to_vec();
        gif.extend(&bytes);
        let _ = gif_frame_count(&gif);
        let mut webp = b"RIFF\0\0\0\0WEBPVP8X".to_vec();
        webp.extend(&bytes);
        let _ = webp_animation_frames(&webp);
    }
}
