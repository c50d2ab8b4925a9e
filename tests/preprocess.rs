//! Image decoding, Pillow-exact bicubic resize and SigLIP preprocessing, checked against the
//! fixtures written by `tools/make_image_fixtures.py` (transformers 5.24 PIL image processor on
//! Pillow 13.0.0). Every comparison that can be exact is bit-exact.

use std::path::{Path, PathBuf};

use ::image::RgbImage;
use candle_core::Device;
use paligemma::image::{DecodeOptions, ImageError, decode_image, load_image, load_image_with};
use paligemma::preprocess::PreprocessorConfig;
use paligemma::resize::resize_bicubic;
use serde::Deserialize;

#[derive(Deserialize)]
struct Manifest {
    pillow_version: String,
    decode_cases: Vec<DecodeCase>,
    preprocess_cases: Vec<PreprocessCase>,
    error_cases: Vec<ErrorCase>,
}

#[derive(Deserialize)]
struct DecodeCase {
    name: String,
    source: String,
    format: String,
    exact: bool,
    width: u32,
    height: u32,
    expected: String,
}

#[derive(Deserialize)]
struct PreprocessCase {
    name: String,
    source: String,
    config: String,
    value_table: String,
    input_width: u32,
    input_height: u32,
    width: u32,
    height: u32,
    resized: String,
    pixel_values: Option<String>,
}

#[derive(Deserialize)]
struct ErrorCase {
    source: String,
    message_contains: String,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images")
}

fn manifest() -> Manifest {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).expect("manifest");
    serde_json::from_str(&text).expect("manifest parses")
}

/// Reads an expected RGB PNG with the `image` crate directly, independently of the code under
/// test.
fn read_expected_png(rel: &str) -> RgbImage {
    ::image::open(fixtures().join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
        .to_rgb8()
}

fn read_f32(rel: &str) -> Vec<f32> {
    let bytes = std::fs::read(fixtures().join(rel)).unwrap();
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// (count of differing bytes, max |Δ|, mean |Δ|) between two images of the same size.
fn diff(a: &RgbImage, b: &RgbImage) -> (usize, u8, f64) {
    assert_eq!(a.dimensions(), b.dimensions());
    let mut count = 0;
    let mut max = 0;
    let mut sum = 0u64;
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        count += usize::from(d != 0);
        max = max.max(d);
        sum += u64::from(d);
    }
    (count, max, sum as f64 / a.as_raw().len() as f64)
}

/// Bitwise comparison of float outputs; returns the number of mismatches and the largest |Δ|.
fn float_mismatch(got: &[f32], want: &[f32]) -> (usize, f32) {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .filter(|(g, w)| g.to_bits() != w.to_bits())
        .fold((0, 0.0f32), |(n, m), (g, w)| (n + 1, m.max((g - w).abs())))
}

#[test]
fn fixtures_were_made_with_pillow_13_0_0() {
    assert_eq!(manifest().pillow_version, "13.0.0");
}

#[test]
fn decoding_matches_pillow_pipeline() {
    let mut failures = Vec::new();
    for case in manifest().decode_cases {
        let got = match load_image(&fixtures().join(&case.source)) {
            Ok(img) => img,
            Err(e) => {
                failures.push(format!("{}: {e}", case.name));
                continue;
            }
        };
        let want = read_expected_png(&case.expected);
        assert_eq!(want.dimensions(), (case.width, case.height));
        if got.dimensions() != want.dimensions() {
            failures.push(format!(
                "{}: size {:?}, expected {:?}",
                case.name,
                got.dimensions(),
                want.dimensions()
            ));
            continue;
        }
        let (count, max, mean) = diff(&got, &want);
        if case.exact {
            if count != 0 {
                failures.push(format!(
                    "{}: {count} bytes differ (max |Δ| {max})",
                    case.name
                ));
            }
        } else {
            // JPEG: libjpeg-turbo and zune-jpeg differ in IDCT rounding and chroma upsampling,
            // so only closeness is required; the orientation test below is exact.
            eprintln!(
                "{}: {count} bytes differ from Pillow, max |Δ| {max}, mean |Δ| {mean:.3}",
                case.name
            );
            if max > 6 || mean > 0.5 {
                failures.push(format!(
                    "{}: JPEG too far from Pillow: max |Δ| {max}, mean |Δ| {mean:.3}",
                    case.name
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_supported_format_decodes_from_memory_too() {
    let m = manifest();
    for format in ["png", "jpeg", "gif", "bmp", "tiff", "webp"] {
        let cases: Vec<_> = m
            .decode_cases
            .iter()
            .filter(|c| c.format == format)
            .collect();
        assert!(!cases.is_empty(), "no {format} fixture");
        for case in cases {
            let path = fixtures().join(&case.source);
            let bytes = std::fs::read(&path).unwrap();
            let from_memory = decode_image(&bytes).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(from_memory, load_image(&path).unwrap(), "{}", case.name);
        }
    }
}

#[test]
fn format_is_guessed_from_content_not_extension() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("preprocess-ext-test");
    std::fs::create_dir_all(&dir).unwrap();
    let renamed = dir.join("actually_a_png.jpg");
    std::fs::copy(fixtures().join("src/small_7x5.png"), &renamed).unwrap();
    assert_eq!(
        load_image(&renamed).unwrap(),
        read_expected_png("expected/decoded/small_7x5.png")
    );
}

/// EXIF orientation `o` applied to `img` by coordinate mapping (EXIF 2.3, tag 0x0112), written
/// independently of the library's implementation.
fn exif_transform(img: &RgbImage, o: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let swap = o >= 5;
    let (ow, oh) = if swap { (h, w) } else { (w, h) };
    RgbImage::from_fn(ow, oh, |x, y| {
        let (sx, sy) = match o {
            1 => (x, y),
            2 => (w - 1 - x, y),
            3 => (w - 1 - x, h - 1 - y),
            4 => (x, h - 1 - y),
            5 => (y, x),
            6 => (y, h - 1 - x),
            7 => (w - 1 - y, h - 1 - x),
            8 => (w - 1 - y, x),
            _ => unreachable!(),
        };
        *img.get_pixel(sx, sy)
    })
}

#[test]
fn exif_orientation_in_png_matches_pillow_and_the_exif_spec() {
    let base = load_image(&fixtures().join("src/png_orient1_6x4.png")).unwrap();
    assert_eq!(base.dimensions(), (6, 4));
    for o in 1..=8 {
        let name = format!("png_orient{o}_6x4.png");
        let got = load_image(&fixtures().join("src").join(&name)).unwrap();
        assert_eq!(got, exif_transform(&base, o), "{name} vs EXIF spec");
        let pillow = read_expected_png(&format!("expected/decoded/png_orient{o}.png"));
        assert_eq!(got, pillow, "{name} vs Pillow exif_transpose");
    }
}

#[test]
fn exif_orientation_in_jpeg_is_applied() {
    // All eight files hold the same compressed pixels; only the orientation tag differs, so the
    // decoded results must be exact rotations/flips of orientation 1.
    let base = load_image(&fixtures().join("src/jpeg_orient1_48x32.jpg")).unwrap();
    for o in 1..=8 {
        let name = format!("jpeg_orient{o}_48x32.jpg");
        let got = load_image(&fixtures().join("src").join(&name)).unwrap();
        assert_eq!(got, exif_transform(&base, o), "{name}");
    }
}

#[test]
fn resize_matches_pillow_bit_exactly() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in manifest().preprocess_cases {
        // Start from Pillow's own decode so that this test isolates the resize.
        let decoded_rel = format!(
            "expected/decoded/{}.png",
            case.name.split('@').next().unwrap()
        );
        let input = read_expected_png(&decoded_rel);
        assert_eq!(input.dimensions(), (case.input_width, case.input_height));
        let want = read_expected_png(&case.resized);
        let got = resize_bicubic(&input, case.width, case.height);
        let (count, max, _) = diff(&got, &want);
        if count != 0 {
            failures.push(format!(
                "{}: {}x{} -> {}x{}: {count} bytes differ, max |Δ| {max}",
                case.name, case.input_width, case.input_height, case.width, case.height
            ));
        }
        checked += 1;
    }
    assert!(checked >= 30);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn value_tables_match_numpy_for_every_byte() {
    let m = manifest();
    let mut seen = std::collections::BTreeSet::new();
    for case in &m.preprocess_cases {
        if !seen.insert(case.config.clone()) {
            continue;
        }
        let config = PreprocessorConfig::load(&fixtures().join(&case.config)).unwrap();
        let want = read_f32(&case.value_table);
        let got: Vec<f32> = config.value_table().iter().flatten().copied().collect();
        let (n, max) = float_mismatch(&got, &want);
        assert_eq!(
            n, 0,
            "{}: {n} of 768 values differ (max {max})",
            case.config
        );
    }
    assert!(seen.len() >= 6);
}

#[test]
fn pixel_values_match_transformers_bit_exactly() {
    let mut failures = Vec::new();
    let mut full_comparisons = 0;
    for case in manifest().preprocess_cases {
        let config = PreprocessorConfig::load(&fixtures().join(&case.config)).unwrap();
        let img = load_image(&fixtures().join(&case.source)).unwrap();
        assert_eq!(
            config.output_size(img.width(), img.height()),
            (case.width, case.height),
            "{}",
            case.name
        );
        let got = config.pixel_values(&img);
        let want = match &case.pixel_values {
            Some(rel) => {
                full_comparisons += 1;
                read_f32(rel)
            }
            // The generator checked that transformers' output is exactly the per-byte table
            // applied to its resized image, so this reconstructs it bit for bit.
            None => {
                let table = read_f32(&case.value_table);
                let resized = read_expected_png(&case.resized);
                (0..3)
                    .flat_map(|c| {
                        let table = &table;
                        resized
                            .pixels()
                            .map(move |p| table[c * 256 + p.0[c] as usize])
                    })
                    .collect()
            }
        };
        let expected_len = 3 * (case.width * case.height) as usize;
        assert_eq!(want.len(), expected_len, "{}", case.name);
        if got.len() != expected_len {
            failures.push(format!(
                "{}: {} values, expected {expected_len}",
                case.name,
                got.len()
            ));
            continue;
        }
        let (n, max) = float_mismatch(&got, &want);
        if n != 0 {
            failures.push(format!("{}: {n} values differ, max |Δ| {max}", case.name));
        }
    }
    assert!(full_comparisons >= 10);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn to_tensor_stacks_pixel_values() {
    let config = PreprocessorConfig::load(&fixtures().join("configs/paligemma_56.json")).unwrap();
    let names = ["photo_640x480.png", "strip_3x500.png", "rgba_300x200.png"];
    let images: Vec<RgbImage> = names
        .iter()
        .map(|n| load_image(&fixtures().join("src").join(n)).unwrap())
        .collect();
    let t = config.to_tensor(&images, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[3, 3, 56, 56]);
    assert_eq!(t.dtype(), candle_core::DType::F32);
    for (i, img) in images.iter().enumerate() {
        let row: Vec<f32> = t.get(i).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(row, config.pixel_values(img));
    }
}

#[test]
fn bad_inputs_are_errors_that_name_the_file_and_the_problem() {
    for case in manifest().error_cases {
        let path = fixtures().join(&case.source);
        let err = load_image(&path).expect_err(&case.source);
        let msg = err.to_string();
        assert!(
            msg.contains(&case.message_contains),
            "{}: message {msg:?} lacks {:?}",
            case.source,
            case.message_contains
        );
        assert!(
            msg.contains(&*path.to_string_lossy()),
            "{}: message {msg:?} does not name the file",
            case.source
        );
        // The same bytes from memory fail the same way.
        let bytes = std::fs::read(&path).unwrap();
        let err = decode_image(&bytes).expect_err(&case.source);
        assert!(err.to_string().contains(&case.message_contains), "{err}");
    }
}

#[test]
fn missing_file_is_a_not_found_error() {
    let path = fixtures().join("src/does_not_exist.png");
    let err = load_image(&path).unwrap_err();
    assert!(matches!(err, ImageError::NotFound { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("not found") && msg.contains("does_not_exist.png"),
        "{msg}"
    );
}

#[test]
fn pixel_limit_is_checked_before_decoding() {
    let options = DecodeOptions { max_pixels: 1000 };
    let err = load_image_with(&fixtures().join("src/photo_640x480.png"), &options).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::TooLarge {
                width: 640,
                height: 480,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("too large"));
}

#[test]
fn unsupported_resample_in_config_is_an_error() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("preprocess-resample-test");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("preprocessor_config.json"),
        r#"{"size": {"height": 224, "width": 224}, "resample": 2}"#,
    )
    .unwrap();
    let err = PreprocessorConfig::load(&dir).unwrap_err().to_string();
    assert!(err.contains("resample") && err.contains('2'), "{err}");
    assert!(err.contains("preprocessor_config.json"), "{err}");
}
