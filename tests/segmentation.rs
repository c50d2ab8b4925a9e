//! Segmentation against the references in tests/fixtures/segmentation/ (written by
//! tools/make_segmentation_fixtures.py): the mask VQ-VAE decoder against PyTorch, pasting
//! against big_vision's evaluator on Pillow 13.0.0, COCO RLE against pycocotools.

use paligemma::mask::{
    BinaryMask, CocoRle, evaluator_pixel_box, paste_mask, resize_bilinear_f32, rle_decode,
    rle_encode,
};
use paligemma::npz::NpzArchive;
use paligemma::vqvae::{MASK_PIXELS, VqVaeDecoder, VqVaeError};
use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/segmentation")
}

fn vae_path() -> PathBuf {
    fixtures().join("vae-oid-random.npz")
}

fn reference() -> &'static Value {
    static REF: OnceLock<Value> = OnceLock::new();
    REF.get_or_init(|| {
        let text = std::fs::read_to_string(fixtures().join("reference.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    })
}

fn decoder() -> &'static VqVaeDecoder {
    static DEC: OnceLock<VqVaeDecoder> = OnceLock::new();
    DEC.get_or_init(|| VqVaeDecoder::load(vae_path()).unwrap())
}

fn npz(name: &str) -> NpzArchive {
    NpzArchive::open(fixtures().join(name)).unwrap()
}

fn as_mask64(values: &[f32]) -> [f32; MASK_PIXELS] {
    values.try_into().unwrap()
}

fn u16s(v: &Value) -> Vec<u16> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u16)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Decoder

fn reference_codes() -> Vec<[u8; 16]> {
    let codes = npz("decoder_reference.npz").array("codes").unwrap();
    assert_eq!(codes.shape()[1], 16);
    codes
        .to_f32_vec()
        .chunks_exact(16)
        .map(|c| std::array::from_fn(|i| c[i] as u8))
        .collect()
}

#[test]
fn decoder_matches_pytorch() {
    let codes = reference_codes();
    let want = npz("decoder_reference.npz").array("masks").unwrap();
    assert_eq!(want.shape(), [codes.len(), 64, 64]);
    let want = want.to_f32_vec();
    let got = decoder().decode(&codes).unwrap();
    assert_eq!(got.len(), codes.len());
    let mut max_diff = 0f32;
    for (g, w) in got.iter().flatten().zip(&want) {
        max_diff = max_diff.max((g - w).abs());
    }
    // Outputs span about [-3.5, 5]; both sides accumulate in f32, in different orders.
    eprintln!("decoder vs PyTorch: max abs diff {max_diff:e}");
    assert!(max_diff <= 1e-5, "max abs diff {max_diff}");
}

#[test]
fn batching_does_not_change_a_mask() {
    let codes = reference_codes();
    let batch = decoder().decode(&codes).unwrap();
    for (i, c) in codes.iter().enumerate().step_by(3) {
        let single = decoder().decode(std::slice::from_ref(c)).unwrap();
        let diff = single[0]
            .iter()
            .zip(&batch[i])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-6, "mask {i}: {diff}");
    }
    assert!(decoder().decode(&[]).unwrap().is_empty());
}

#[test]
fn out_of_range_codes_are_errors() {
    let mut codes = vec![[3u8; 16]; 3];
    codes[2][15] = 200;
    let err = decoder().decode(&codes).unwrap_err();
    assert!(
        matches!(
            err,
            VqVaeError::CodeOutOfRange {
                mask: 2,
                position: 15,
                code: 200
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("0..=127"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Load errors

/// Copies the fixture VAE, dropping `drop` and optionally replacing one member's bytes.
fn edited_vae(file: &str, drop: &str, replace: Option<(&str, &str)>) -> PathBuf {
    let mut src = zip::ZipArchive::new(std::fs::File::open(vae_path()).unwrap()).unwrap();
    let mut members = Vec::new();
    for i in 0..src.len() {
        let mut entry = src.by_index(i).unwrap();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        members.push((entry.name().unwrap().to_string(), bytes));
    }
    let lookup = |name: &str| members.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(file);
    let mut out = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in &members {
        if name == drop {
            continue;
        }
        let bytes = match replace {
            Some((target, source)) if target == name => lookup(source),
            _ => bytes.clone(),
        };
        out.start_file(name.as_str(), options).unwrap();
        out.write_all(&bytes).unwrap();
    }
    out.finish().unwrap();
    path
}

#[test]
fn missing_file_names_the_path() {
    let path = fixtures().join("no-such-vae.npz");
    let err = VqVaeDecoder::load(&path).unwrap_err().to_string();
    assert!(err.contains("no-such-vae.npz"), "{err}");
}

#[test]
fn truncated_file_is_an_error_naming_the_path() {
    let bytes = std::fs::read(vae_path()).unwrap();
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vae-truncated.npz");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = VqVaeDecoder::load(&path).unwrap_err().to_string();
    assert!(err.contains("vae-truncated.npz"), "{err}");
}

#[test]
fn missing_tensor_is_named() {
    let path = edited_vae("vae-missing.npz", "decoder.6.bias.npy", None);
    let err = VqVaeDecoder::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("decoder.6.bias") && err.contains("vae-missing.npz"),
        "{err}"
    );
    // The encoder is never read: removing it changes nothing.
    let path = edited_vae("vae-no-encoder.npz", "encoder.10.weight.npy", None);
    assert!(VqVaeDecoder::load(&path).is_ok());
}

#[test]
fn wrong_shape_is_named() {
    let path = edited_vae(
        "vae-shape.npz",
        "",
        Some(("decoder.6.bias.npy", "decoder.8.bias.npy")),
    );
    let err = VqVaeDecoder::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("decoder.6.bias") && err.contains("[32]") && err.contains("[64]"),
        "{err}"
    );
    assert!(err.contains("vae-shape.npz"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Pasting

fn raw_masks() -> Vec<[f32; MASK_PIXELS]> {
    let raw = npz("paste_reference.npz").array("raw").unwrap();
    assert_eq!(&raw.shape()[1..], [64, 64]);
    raw.to_f32_vec()
        .chunks_exact(MASK_PIXELS)
        .map(as_mask64)
        .collect()
}

#[test]
fn resize_is_bit_identical_to_pillow() {
    let raws = raw_masks();
    let archive = npz("paste_reference.npz");
    let cases = reference()["resize_cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let (w, h) = (
            case["width"].as_u64().unwrap() as usize,
            case["height"].as_u64().unwrap() as usize,
        );
        let raw = &raws[case["raw"].as_u64().unwrap() as usize];
        let want = archive.array(case["member"].as_str().unwrap()).unwrap();
        assert_eq!(want.shape(), [h, w]);
        let got = resize_bilinear_f32(raw, 64, 64, w, h).unwrap();
        let mismatches = got
            .iter()
            .zip(want.to_f32_vec())
            .filter(|(g, w)| g.to_bits() != w.to_bits())
            .count();
        assert_eq!(
            mismatches, 0,
            "{w}x{h}: {mismatches} values differ from Pillow"
        );
    }
}

#[test]
fn paste_matches_big_vision_evaluator() {
    let raws = raw_masks();
    let cases = reference()["paste_cases"].as_array().unwrap();
    let mut valid = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let loc: [u16; 4] = u16s(&case["loc"]).try_into().unwrap();
        let (w, h) = (
            case["width"].as_u64().unwrap() as u32,
            case["height"].as_u64().unwrap() as u32,
        );
        let raw = &raws[case["raw"].as_u64().unwrap() as usize];
        let got = paste_mask(raw, loc, w, h);
        if !case["valid"].as_bool().unwrap() {
            assert!(got.is_none(), "{name}: expected an invalid prediction");
            assert!(evaluator_pixel_box(loc, w, h).is_none(), "{name}");
            continue;
        }
        valid += 1;
        let got = got.unwrap_or_else(|| panic!("{name}: expected a mask"));
        let b = got.pixel_box;
        assert_eq!(
            u16s(&case["box"]),
            [b.y0, b.x0, b.y1, b.x1].map(|v| v as u16),
            "{name}"
        );
        assert_eq!((got.mask.width(), got.mask.height()), (w, h), "{name}");
        assert_eq!(
            got.mask.area() as u64,
            case["area"].as_u64().unwrap(),
            "{name}: area"
        );
        let rle = rle_encode(&got.mask);
        assert_eq!(
            rle.counts,
            case["rle"].as_str().unwrap(),
            "{name}: mask differs"
        );
        // Nothing outside the box.
        for y in 0..h {
            for x in 0..w {
                if got.mask.get(x, y) {
                    assert!(x >= b.x0 && x < b.x1 && y >= b.y0 && y < b.y1, "{name}");
                }
            }
        }
    }
    assert!(valid >= 100, "only {valid} valid cases");
}

#[test]
fn decoded_mask_pastes_end_to_end() {
    let codes = reference_codes();
    let masks = decoder().decode(&codes[4..5]).unwrap();
    let pasted = paste_mask(&masks[0], [200, 300, 500, 600], 160, 120).unwrap();
    assert_eq!(pasted.mask.to_gray_image().dimensions(), (160, 120));
    let round_trip = rle_decode(&rle_encode(&pasted.mask)).unwrap();
    assert_eq!(round_trip, pasted.mask);
}

// ---------------------------------------------------------------------------------------------
// COCO RLE

#[test]
fn rle_matches_pycocotools() {
    let archive = npz("rle_reference.npz");
    let cases = reference()["rle_cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (w, h) = (
            case["width"].as_u64().unwrap() as u32,
            case["height"].as_u64().unwrap() as u32,
        );
        let array = archive.array(name).unwrap();
        assert_eq!(array.shape(), [h as usize, w as usize], "{name}");
        let bits = array.to_f32_vec().iter().map(|&v| v != 0.0).collect();
        let mask = BinaryMask::from_bits(w, h, bits).unwrap();
        assert_eq!(mask.area() as u64, case["area"].as_u64().unwrap(), "{name}");
        let rle = rle_encode(&mask);
        let want = CocoRle {
            size: [h, w],
            counts: case["counts"].as_str().unwrap().to_string(),
        };
        assert_eq!(rle, want, "{name}");
        assert_eq!(rle_decode(&want).unwrap(), mask, "{name}: decode");
    }
}

#[test]
fn rle_serialises_like_coco_json() {
    let mut bits = vec![false; 6];
    bits[1] = true;
    let rle = rle_encode(&BinaryMask::from_bits(3, 2, bits).unwrap());
    let json = serde_json::to_string(&rle).unwrap();
    assert_eq!(json, r#"{"size":[2,3],"counts":"213"}"#);
}

/// Random masks of random sizes round-trip, including the 4-run difference coding.
#[test]
fn rle_round_trips_random_masks() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..200 {
        let (w, h) = ((next() % 40) as u32, (next() % 40) as u32);
        let density = next() % 100;
        let bits = (0..w * h).map(|_| next() % 100 < density).collect();
        let mask = BinaryMask::from_bits(w, h, bits).unwrap();
        let rle = rle_encode(&mask);
        assert_eq!(rle_decode(&rle).unwrap(), mask, "{w}x{h}");
    }
}
