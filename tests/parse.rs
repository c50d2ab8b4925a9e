//! Parsing and encoding PaliGemma's detection/segmentation text (`paligemma::parse`).
//!
//! Expected boxes use a 1023×2046 image (width × height) so that pixels are exact: an x bin `b`
//! is `b` pixels and a y bin `2b` pixels.

use paligemma::parse::{
    EncodeError, LOC_MAX, Object, Parsed, SEG_MAX, bbox_to_loc, bin_value, encode_detections,
    encode_object, encode_tokens, loc_bin, loc_to_bbox, loc_to_pixel_box, parse_detections,
    parse_segmentations,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;

const W: u32 = 1023;
const H: u32 = 2046;

/// Bins as given in the text → the expected pixel box on the W×H image.
fn px(loc: [u16; 4]) -> [f32; 4] {
    let [ymin, xmin, ymax, xmax] = loc.map(f32::from);
    [xmin, 2.0 * ymin, xmax, 2.0 * ymax]
}

fn obj(label: &str, loc: [u16; 4], seg: Option<[u8; 16]>) -> Object {
    Object {
        label: label.to_string(),
        loc,
        bbox: px(loc),
        seg,
    }
}

fn seg_text(codes: &[u8]) -> String {
    codes.iter().map(|c| format!("<seg{c:03}>")).collect()
}

const SEG: [u8; 16] = [0, 1, 2, 3, 10, 20, 30, 40, 100, 110, 120, 127, 5, 6, 7, 8];

/// Asserts the objects exactly and that each expected fragment occurs in its own warning, in
/// order, with no other warnings.
#[track_caller]
fn check(parsed: &Parsed, objects: &[Object], warnings: &[&[&str]]) {
    assert_eq!(parsed.objects, objects, "warnings: {:#?}", parsed.warnings);
    assert_eq!(
        parsed.warnings.len(),
        warnings.len(),
        "warnings: {:#?}",
        parsed.warnings
    );
    for (got, want) in parsed.warnings.iter().zip(warnings) {
        for frag in *want {
            assert!(got.contains(frag), "warning {got:?} lacks {frag:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Well-formed output

#[test]
fn single_detection() {
    let p = parse_detections("<loc0123><loc0045><loc0678><loc0999> cat", W, H);
    check(&p, &[obj("cat", [123, 45, 678, 999], None)], &[]);
    assert_eq!(p.objects[0].bbox, [45.0, 246.0, 999.0, 1356.0]);
}

#[test]
fn multiple_detections() {
    let text =
        "<loc0123><loc0045><loc0678><loc0999> cat ; <loc0001><loc0002><loc0500><loc0600> dog";
    let p = parse_detections(text, W, H);
    check(
        &p,
        &[
            obj("cat", [123, 45, 678, 999], None),
            obj("dog", [1, 2, 500, 600], None),
        ],
        &[],
    );
}

#[test]
fn full_image_box_and_odd_sizes() {
    let p = parse_detections("<loc0000><loc0000><loc1023><loc1023> sky", 640, 480);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    assert_eq!(p.objects.len(), 1);
    assert_eq!(p.objects[0].bbox, [0.0, 0.0, 640.0, 480.0]);
    // 512/1023 of 640 and 511/1023 of 480, unrounded.
    let p = parse_detections("<loc0511><loc0512><loc0511><loc0512> x", 640, 480);
    let b = p.objects[0].bbox;
    assert!(
        (b[0] - 320.312_8).abs() < 1e-3 && (b[1] - 239.765_4).abs() < 1e-3,
        "{b:?}"
    );
    assert_eq!(b[0], b[2]);
}

#[test]
fn multiword_and_unicode_labels_are_trimmed() {
    let text = "<loc0010><loc0020><loc0030><loc0040>   red  car \t; <loc0001><loc0001><loc0002><loc0002> 猫 ; <loc0003><loc0003><loc0004><loc0004>chat noir";
    let p = parse_detections(text, W, H);
    check(
        &p,
        &[
            obj("red  car", [10, 20, 30, 40], None),
            obj("猫", [1, 1, 2, 2], None),
            obj("chat noir", [3, 3, 4, 4], None),
        ],
        &[],
    );
}

#[test]
fn missing_label_is_kept_empty() {
    let p = parse_detections("<loc0010><loc0020><loc0030><loc0040>", W, H);
    check(&p, &[obj("", [10, 20, 30, 40], None)], &[]);
}

#[test]
fn objects_without_separator_like_the_canonical_regex() {
    let text = "<loc0010><loc0020><loc0030><loc0040> a<loc0001><loc0002><loc0003><loc0004> b";
    let p = parse_detections(text, W, H);
    check(
        &p,
        &[
            obj("a", [10, 20, 30, 40], None),
            obj("b", [1, 2, 3, 4], None),
        ],
        &[],
    );
}

#[test]
fn extra_spaces_between_tokens_and_separators() {
    let text = "  <loc0010> <loc0020>\n<loc0030>  <loc0040>   cat   ;   <loc0001><loc0002><loc0003><loc0004>dog  ";
    let p = parse_detections(text, W, H);
    check(
        &p,
        &[
            obj("cat", [10, 20, 30, 40], None),
            obj("dog", [1, 2, 3, 4], None),
        ],
        &[],
    );
}

#[test]
fn zero_size_box_is_a_detection() {
    let p = parse_detections("<loc0100><loc0200><loc0100><loc0200> dot", W, H);
    check(&p, &[obj("dot", [100, 200, 100, 200], None)], &[]);
}

#[test]
fn eos_and_pad_remnants() {
    let body = "<loc0010><loc0020><loc0030><loc0040> cat";
    let want = [obj("cat", [10, 20, 30, 40], None)];
    for text in [
        format!("{body}<eos>"),
        format!("{body}<eos><pad><pad>"),
        format!("{body}<pad><pad> "),
        format!("{body} <eos> <pad>"),
    ] {
        check(&parse_detections(&text, W, H), &want, &[]);
    }
    let p = parse_detections(&format!("{body}<eos> ; <loc0001>junk"), W, H);
    check(&p, &want, &[&["byte 45", "after <eos>", "junk"]]);
}

#[test]
fn empty_and_whitespace_only_mean_no_objects() {
    for text in ["", "   ", "\n\t", "<eos>", "<pad><pad>", " <eos><pad>"] {
        check(&parse_detections(text, W, H), &[], &[]);
        check(&parse_segmentations(text, W, H), &[], &[]);
    }
}

#[test]
fn segmentation_with_label() {
    let text = format!(
        "<loc0100><loc0200><loc0300><loc0400>{} cat ; <loc0001><loc0002><loc0003><loc0004> {} dog",
        seg_text(&SEG),
        seg_text(&[9; 16])
    );
    let p = parse_segmentations(&text, W, H);
    check(
        &p,
        &[
            obj("cat", [100, 200, 300, 400], Some(SEG)),
            obj("dog", [1, 2, 3, 4], Some([9; 16])),
        ],
        &[],
    );
    // The detection parser keeps a complete mask too.
    assert_eq!(parse_detections(&text, W, H), p);
}

#[test]
fn refcoco_segmentation_without_label() {
    let text = format!("<loc0100><loc0200><loc0300><loc0400>{}", seg_text(&SEG));
    let p = parse_segmentations(&text, W, H);
    check(&p, &[obj("", [100, 200, 300, 400], Some(SEG))], &[]);
}

// ---------------------------------------------------------------------------------------------
// Malformed, truncated and adversarial output

#[test]
fn too_few_loc_tokens() {
    let p = parse_detections(
        "<loc0010><loc0020><loc0030> cat ; <loc0001><loc0002><loc0003><loc0004> dog",
        W,
        H,
    );
    check(
        &p,
        &[obj("dog", [1, 2, 3, 4], None)],
        &[&[
            "object at byte 0",
            "only 3 of 4 loc tokens, then \"cat \" at byte 28",
            "skipped",
        ]],
    );
}

#[test]
fn loc_out_of_range_or_wrong_width() {
    let good = " ; <loc0001><loc0002><loc0003><loc0004> dog";
    // The warning quotes the token up to the first character that cannot continue it.
    for (bad, quoted) in [
        ("<loc1024>", "\"<loc1024>\""),
        ("<loc10000>", "\"<loc10000>\""),
        ("<loc123>", "\"<loc123>\""),
        ("<loc>", "\"<loc>\""),
        ("<loc12a4>", "\"<loc12a\""),
    ] {
        let text = format!("<loc0010><loc0020>{bad}<loc0040> cat{good}");
        check(
            &parse_detections(&text, W, H),
            &[obj("dog", [1, 2, 3, 4], None)],
            &[&[
                "object at byte 0",
                &format!("{quoted} at byte 18 is not a loc token"),
            ]],
        );
    }
}

#[test]
fn inverted_boxes_are_skipped() {
    let p = parse_detections(
        "<loc0500><loc0020><loc0100><loc0040> a ; <loc0010><loc0400><loc0030><loc0300> b ; <loc0001><loc0002><loc0003><loc0004> c",
        W,
        H,
    );
    check(
        &p,
        &[obj("c", [1, 2, 3, 4], None)],
        &[
            &["object at byte 0", "inverted box", "ymin 500", "ymax 100"],
            &["object at byte 41", "inverted box", "xmin 400", "xmax 300"],
        ],
    );
}

#[test]
fn truncated_inside_a_token() {
    let first = "<loc0010><loc0020><loc0030><loc0040> cat";
    let want = [obj("cat", [10, 20, 30, 40], None)];
    for tail in [
        " ; <loc01",
        " ; <loc0001><lo",
        " ; <loc0001><",
        " ; <",
        " ; <l",
        "<loc0001><loc0",
    ] {
        let p = parse_detections(&format!("{first}{tail}"), W, H);
        check(&p, &want, &[&["output ends inside a token"]]);
    }
    // Cut after whole loc tokens: too few of them.
    let p = parse_detections(&format!("{first} ; <loc0001><loc0002>"), W, H);
    check(
        &p,
        &want,
        &[&["only 2 of 4 loc tokens", "the end of the entry"]],
    );
}

#[test]
fn truncated_or_broken_segmentation() {
    let loc = "<loc0100><loc0200><loc0300><loc0400>";
    let good = format!(
        " ; <loc0001><loc0002><loc0003><loc0004>{} dog",
        seg_text(&[9; 16])
    );
    let dog = obj("dog", [1, 2, 3, 4], Some([9; 16]));

    // Fewer than 16 seg tokens.
    let p = parse_segmentations(&format!("{loc}{} cat{good}", seg_text(&SEG[..10])), W, H);
    check(
        &p,
        std::slice::from_ref(&dog),
        &[&["only 10 of 16 seg tokens, then \"cat \" at byte 117"]],
    );

    // Seg value above 127, or with the wrong number of digits.
    for bad in ["<seg128>", "<seg999>", "<seg12>", "<seg0001>"] {
        let text = format!(
            "{loc}{}{bad}{} cat{good}",
            seg_text(&SEG[..3]),
            seg_text(&SEG[..12])
        );
        let p = parse_segmentations(&text, W, H);
        check(
            &p,
            std::slice::from_ref(&dog),
            &[&["is not a seg token", "at byte 60"]],
        );
    }

    // Output cut inside the masks.
    for cut in ["<seg01", "<se", "<"] {
        let text = format!("{loc}{}{cut}", seg_text(&SEG[..5]));
        check(
            &parse_segmentations(&text, W, H),
            &[],
            &[&["output ends inside a token"]],
        );
    }
}

#[test]
fn segmentation_box_without_mask_is_kept_with_a_warning() {
    let p = parse_segmentations("<loc0100><loc0200><loc0300><loc0400> cat", W, H);
    check(
        &p,
        &[obj("cat", [100, 200, 300, 400], None)],
        &[&[
            "object at byte 0",
            "\"cat\"",
            "no seg tokens",
            "kept without a mask",
        ]],
    );
    // The detection parser expects no mask, so says nothing.
    check(
        &parse_detections("<loc0100><loc0200><loc0300><loc0400> cat", W, H),
        &[obj("cat", [100, 200, 300, 400], None)],
        &[],
    );
}

#[test]
fn segmentation_skips_empty_boxes() {
    let text = format!(
        "<loc0100><loc0200><loc0100><loc0400>{} flat",
        seg_text(&SEG)
    );
    check(
        &parse_segmentations(&text, W, H),
        &[],
        &[&["empty box", "ymin 100", "ymax 100", "skipped"]],
    );
}

#[test]
fn labels_with_angle_brackets_are_skipped() {
    let good = " ; <loc0001><loc0002><loc0003><loc0004> dog";
    for (label, at) in [
        ("a > b", 39),
        ("cat <3", 41),
        ("x<unk>y", 38),
        ("cat<pad>", 40),
    ] {
        let text = format!("<loc0010><loc0020><loc0030><loc0040> {label}{good}");
        check(
            &parse_detections(&text, W, H),
            &[obj("dog", [1, 2, 3, 4], None)],
            &[&[
                "object at byte 0",
                &format!("at byte {at} after the tokens"),
                "cannot contain",
            ]],
        );
    }
}

#[test]
fn semicolon_in_a_label_splits_it() {
    // `;` always separates; the tail of such a label is text outside any object.
    let p = parse_detections("<loc0010><loc0020><loc0030><loc0040> salt;pepper", W, H);
    check(
        &p,
        &[obj("salt", [10, 20, 30, 40], None)],
        &[&["byte 42", "text outside any object", "\"pepper\""]],
    );
}

#[test]
fn stray_text_and_empty_entries() {
    let text = "sure! <loc0010><loc0020><loc0030><loc0040> cat ; ; hello ; <loc0001><loc0002><loc0003><loc0004> dog ;";
    let p = parse_detections(text, W, H);
    check(
        &p,
        &[
            obj("cat", [10, 20, 30, 40], None),
            obj("dog", [1, 2, 3, 4], None),
        ],
        &[
            &["byte 0", "text outside any object", "\"sure!\""],
            &["byte 48", "empty entry"], // the entry starts after the first `;`
            &["byte 51", "\"hello\""],
            &["byte 101", "empty entry"], // after the final `;`
        ],
    );
}

#[test]
fn plain_text_answer_has_no_objects() {
    let p = parse_detections("a cat sitting on a mat", W, H);
    check(&p, &[], &[&["byte 0", "text outside any object"]]);
}

#[test]
fn seg_tokens_after_the_label_are_not_a_mask() {
    let text = format!(
        "<loc0100><loc0200><loc0300><loc0400> cat {}",
        seg_text(&SEG)
    );
    check(
        &parse_segmentations(&text, W, H),
        &[],
        &[&["\"<seg000>", "cannot contain"]],
    );
}

#[test]
fn warnings_quote_unicode_and_control_characters_safely() {
    let text = "ü\u{0}ß😀 <loc0010><loc0020><loc0030><loc0040> ok";
    let p = parse_detections(text, W, H);
    check(
        &p,
        &[obj("ok", [10, 20, 30, 40], None)],
        &[&["byte 0", "\\0", "😀"]],
    );
    // Long junk is cut to a short excerpt.
    let long = "z".repeat(1000);
    let p = parse_detections(&long, W, H);
    assert!(p.warnings[0].len() < 120, "{}", p.warnings[0]);
}

// ---------------------------------------------------------------------------------------------
// Coordinates and encoding

#[test]
fn loc_bin_matches_big_vision() {
    assert_eq!(loc_bin(0.0), 0);
    assert_eq!(loc_bin(1.0), 1023);
    assert_eq!(loc_bin(0.5), 512); // 511.5 → ties to even, like tf.round / np.round
    assert_eq!(loc_bin(-0.3), 0);
    assert_eq!(loc_bin(7.0), 1023);
    assert_eq!(loc_bin(f32::NAN), 0);
    assert_eq!(loc_bin(f32::INFINITY), 1023);
    assert_eq!(loc_bin(f32::NEG_INFINITY), 0);
    assert_eq!(bin_value(1023), 1.0);
    assert_eq!(bin_value(5000), 1.0);
}

#[test]
fn pixel_box_truncates_like_big_vision() {
    // int(511/1023·480) = int(239.77) = 239; int(1023/1023·640) = 640.
    assert_eq!(
        loc_to_pixel_box([511, 0, 1023, 1023], 640, 480),
        [0, 239, 640, 480]
    );
    assert_eq!(loc_to_pixel_box([1, 1, 2, 2], 640, 480), [0, 0, 1, 0]);
    assert_eq!(loc_to_bbox([0, 0, 1023, 1023], 0, 0), [0.0; 4]);
}

#[test]
fn encode_examples() {
    let s = encode_object([45.0, 246.0, 999.0, 1356.0], " cat ", W, H).unwrap();
    assert_eq!(s, "<loc0123><loc0045><loc0678><loc0999> cat");
    assert_eq!(
        encode_object([0.0, 0.0, 10.0, 10.0], "", W, H).unwrap(),
        "<loc0000><loc0000><loc0005><loc0010>"
    );
    // Outside the image clips to its edges, as big_vision clips the bins.
    assert_eq!(
        encode_object([-5.0, -1.0, 5000.0, 9999.0], "all", W, H).unwrap(),
        "<loc0000><loc0000><loc1023><loc1023> all"
    );
    let objects = [
        obj("cat", [123, 45, 678, 999], None),
        obj("", [100, 200, 300, 400], Some(SEG)),
    ];
    assert_eq!(
        encode_detections(&objects, W, H).unwrap(),
        format!(
            "<loc0123><loc0045><loc0678><loc0999> cat ; <loc0100><loc0200><loc0300><loc0400>{}",
            seg_text(&SEG)
        )
    );
    assert_eq!(encode_detections(&[], W, H).unwrap(), "");
}

#[test]
fn encode_errors() {
    use EncodeError::*;
    let b = [1.0, 2.0, 3.0, 4.0];
    assert!(matches!(
        encode_object(b, "x", 0, 5),
        Err(EmptyImage { .. })
    ));
    assert!(matches!(
        encode_object([f32::NAN, 0.0, 1.0, 1.0], "x", 5, 5),
        Err(NonFiniteBox(_))
    ));
    assert!(matches!(
        encode_object([3.0, 0.0, 1.0, 1.0], "x", 5, 5),
        Err(InvertedBox(_))
    ));
    for label in ["a;b", "<loc0001>", "x > y"] {
        assert!(
            matches!(encode_object(b, label, 5, 5), Err(BadLabel(_))),
            "{label}"
        );
    }
    assert!(matches!(
        encode_tokens([0, 0, 1024, 1], None, ""),
        Err(BadLoc(_))
    ));
    assert!(matches!(
        encode_tokens([5, 0, 4, 1], None, ""),
        Err(BadLoc(_))
    ));
    assert!(matches!(
        encode_tokens([0, 0, 1, 1], Some(&[128; 16]), ""),
        Err(BadSeg(128))
    ));
    assert!(encode_tokens([0, 0, 1, 1], Some(&SEG), "").is_ok());
}

// ---------------------------------------------------------------------------------------------
// Properties

/// Pieces that look like PaliGemma output, so that random strings reach deep into the parser.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "(<loc0[0-9]{3}>){4}",
        1 => "(<seg0[0-9]{2}>){16}",
        1 => "(<seg[0-9]{3}>){1,16}",
        4 => "<loc[0-9]{4}>",
        2 => "<seg[0-9]{3}>",
        1 => "<loc[0-9]{0,6}>?",
        1 => "<seg[0-9]{0,5}>?",
        1 => Just("<loc".to_string()),
        1 => Just("<seg".to_string()),
        1 => Just("0123>".to_string()),
        1 => Just(">".to_string()),
        1 => Just("<".to_string()),
        2 => Just(" ; ".to_string()),
        1 => Just(";".to_string()),
        1 => Just("<eos>".to_string()),
        1 => Just("<pad>".to_string()),
        1 => "[0-9]{1,5}",
        2 => "[a-z ]{1,8}",
        1 => "\\PC{1,3}",
        1 => "[ \t\n]{1,3}",
    ]
}

/// Output as the model writes it (random bins, optional masks, labels), then damaged: a few
/// fragments inserted at random places, and maybe cut off.
fn damaged_output() -> impl Strategy<Value = String> {
    let object = (
        prop::array::uniform4(0u16..=1023),
        prop::bool::weighted(0.8),
        prop::option::of(prop::array::uniform16(0u8..=127)),
        label(),
    )
        .prop_map(|(mut loc, ordered, seg, label)| {
            // Mostly valid boxes, so that damage rather than chance decides what survives.
            if ordered {
                loc = [
                    loc[0].min(loc[2]),
                    loc[1].min(loc[3]),
                    loc[0].max(loc[2]),
                    loc[1].max(loc[3]),
                ];
            }
            let mut s: String = loc.iter().map(|b| format!("<loc{b:04}>")).collect();
            if let Some(seg) = seg {
                s += &seg_text(&seg);
            }
            if !label.is_empty() {
                s += " ";
                s += &label;
            }
            s
        });
    (
        prop::collection::vec(object, 0..5),
        prop::collection::vec((0.0f64..=1.0, fragment()), 0..3),
        prop::option::of(0.0f64..=1.0),
    )
        .prop_map(|(objects, inserts, cut)| {
            // Positions as fractions of the length in chars, so every cut is a char boundary.
            let mut chars: Vec<char> = objects.join(" ; ").chars().collect();
            for (at, fragment) in inserts {
                let i = (at * chars.len() as f64) as usize;
                chars.splice(i..i, fragment.chars());
            }
            if let Some(cut) = cut {
                chars.truncate((cut * chars.len() as f64) as usize);
            }
            chars.into_iter().collect()
        })
}

fn output_like() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(fragment(), 0..40).prop_map(|v| v.concat()),
        damaged_output(),
    ]
}

/// Guards the fuzz itself: enough generated strings must get through to objects (with and
/// without masks) and to warnings, or the properties below would hold vacuously.
#[test]
fn fuzz_strings_reach_objects_and_warnings() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut with_box, mut with_mask, mut with_warning) = (0, 0, 0);
    let n = 2_000;
    for _ in 0..n {
        let text = output_like().new_tree(&mut runner).unwrap().current();
        let d = parse_detections(&text, 640, 480);
        with_box += usize::from(!d.objects.is_empty());
        with_warning += usize::from(!d.warnings.is_empty());
        let s = parse_segmentations(&text, 640, 480);
        with_mask += usize::from(s.objects.iter().any(|o| o.seg.is_some()));
    }
    eprintln!(
        "of {n}: {with_box} with boxes, {with_mask} with masks, {with_warning} with warnings"
    );
    assert!(with_box > n / 4 && with_mask > n / 20 && with_warning > n / 2);
}

/// Every object honours the documented invariants.
fn assert_sound(p: &Parsed, width: u32, height: u32, segment: bool) {
    for o in &p.objects {
        let [ymin, xmin, ymax, xmax] = o.loc;
        assert!(o.loc.iter().all(|&b| b <= LOC_MAX), "{o:?}");
        assert!(ymin <= ymax && xmin <= xmax, "{o:?}");
        if segment {
            assert!(ymin < ymax && xmin < xmax, "{o:?}");
        }
        if let Some(seg) = o.seg {
            assert!(seg.iter().all(|&c| c <= SEG_MAX), "{o:?}");
        }
        assert_eq!(o.bbox, loc_to_bbox(o.loc, width, height));
        let [x0, y0, x1, y1] = o.bbox;
        assert!(o.bbox.iter().all(|v| v.is_finite() && *v >= 0.0), "{o:?}");
        assert!(x0 <= x1 && y0 <= y1, "{o:?}");
        assert!(x1 <= width as f32 && y1 <= height as f32, "{o:?}");
        assert_eq!(o.label, o.label.trim());
        assert!(!o.label.contains([';', '<', '>']), "{o:?}");
    }
}

/// Nothing may vanish silently: text with something besides whitespace and end markers yields
/// an object or a warning.
fn assert_accounted(text: &str, p: &Parsed) {
    let rest = text.replace("<eos>", "").replace("<pad>", "");
    if !rest.trim().is_empty() && !text.contains("<eos>") {
        assert!(!p.objects.is_empty() || !p.warnings.is_empty(), "{text:?}");
    }
}

/// `cases` cases, and no regression files written into the source tree.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn image_side() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..=16, 17u32..=8192, Just(u32::MAX)]
}

proptest! {
    // The fuzz: 50,000 output-like strings, each parsed both ways.
    #![proptest_config(config(50_000))]
    #[test]
    fn fuzz_output_like_strings(text in output_like(), w in image_side(), h in image_side()) {
        let d = parse_detections(&text, w, h);
        assert_sound(&d, w, h, false);
        assert_accounted(&text, &d);
        let s = parse_segmentations(&text, w, h);
        assert_sound(&s, w, h, true);
        assert_accounted(&text, &s);
    }
}

proptest! {
    #![proptest_config(config(10_000))]
    #[test]
    fn fuzz_arbitrary_strings(text in any::<String>(), w in image_side(), h in image_side()) {
        assert_sound(&parse_detections(&text, w, h), w, h, false);
        assert_sound(&parse_segmentations(&text, w, h), w, h, true);
    }
}

/// A label the syntax can carry (no `;`, `<`, `>`), possibly with surrounding spaces.
fn label() -> impl Strategy<Value = String> {
    "[ ]?[a-zA-Z0-9 _\\-.,'éü猫😀]{0,16}[ ]?"
}

/// A box `[x0, y0, x1, y1]` inside a `w`×`h` image, any size down to zero.
fn pixel_box() -> impl Strategy<Value = (u32, u32, [f32; 4])> {
    (1u32..=8192, 1u32..=8192).prop_flat_map(|(w, h)| {
        let xs = (0.0..=w as f32, 0.0..=w as f32);
        let ys = (0.0..=h as f32, 0.0..=h as f32);
        (Just(w), Just(h), xs, ys)
            .prop_map(|(w, h, (a, b), (c, d))| (w, h, [a.min(b), c.min(d), a.max(b), c.max(d)]))
    })
}

proptest! {
    #![proptest_config(config(5_000))]

    /// Pixels → text → pixels moves a coordinate by at most half a bin. Exactly: the bin is
    /// `round(t)` with `t = fl(fl(px/side)·1023)`, so `|bin − px/side·1023| ≤ 0.5 + 2·1023·2⁻²⁴`
    /// (two f32 roundings of a value ≤ 1023); decoding divides by 1023, scales by `side` and
    /// rounds to f32 once more (≤ side·2⁻²⁴). So the bound is
    /// `side·(0.5/1023 + 3·2⁻²⁴)`; we test `side·(1/2046 + 2⁻²¹)`.
    #[test]
    fn boxes_round_trip_within_half_a_bin(
        objects in prop::collection::vec((pixel_box(), label()), 1..6),
        w in 1u32..=8192,
        h in 1u32..=8192,
    ) {
        // One image size for all objects: rescale each box into w×h.
        let boxes: Vec<([f32; 4], String)> = objects
            .iter()
            .map(|((bw, bh, b), l)| {
                let sx = w as f32 / *bw as f32;
                let sy = h as f32 / *bh as f32;
                let r = [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy];
                // Scaling can push a coordinate a hair past the edge; clip as the encoder does.
                let r = [r[0].min(w as f32), r[1].min(h as f32), r[2].min(w as f32), r[3].min(h as f32)];
                (r, l.clone())
            })
            .collect();
        let text = boxes
            .iter()
            .map(|(b, l)| encode_object(*b, l, w, h).unwrap())
            .collect::<Vec<_>>()
            .join(" ; ");
        let p = parse_detections(&text, w, h);
        prop_assert!(p.warnings.is_empty(), "{:?} from {text:?}", p.warnings);
        prop_assert_eq!(p.objects.len(), boxes.len());
        let tol = |side: u32| f64::from(side) * (1.0 / 2046.0 + 2f64.powi(-21));
        for (o, (b, l)) in p.objects.iter().zip(&boxes) {
            prop_assert_eq!(&o.label, l.trim());
            for k in 0..4 {
                let side = if k % 2 == 0 { w } else { h };
                let err = (f64::from(o.bbox[k]) - f64::from(b[k])).abs();
                prop_assert!(err <= tol(side), "coord {k}: {b:?} → {:?}, err {err}", o.bbox);
            }
        }
        // Encoding the parsed objects gives the same text.
        prop_assert_eq!(encode_detections(&p.objects, w, h).unwrap(), text);
    }

    /// Bins → text → bins and bins → pixels → bins are exact, with and without masks.
    #[test]
    fn bins_round_trip_exactly(
        a in 0u16..=1022, b in 0u16..=1022, c in 0u16..=1022, d in 0u16..=1022,
        seg in prop::array::uniform16(0u8..=127),
        with_mask in any::<bool>(),
        l in label(),
        w in 1u32..=100_000,
        h in 1u32..=100_000,
    ) {
        // Strictly ordered so that the segmentation parser accepts it too.
        let (ymin, ymax) = (a.min(c), a.max(c) + 1);
        let (xmin, xmax) = (b.min(d), b.max(d) + 1);
        let loc = [ymin, xmin, ymax, xmax];
        let seg = with_mask.then_some(seg);
        let text = encode_tokens(loc, seg.as_ref(), &l).unwrap();
        let parsed = if with_mask {
            parse_segmentations(&text, w, h)
        } else {
            parse_detections(&text, w, h)
        };
        prop_assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
        prop_assert_eq!(parsed.objects.len(), 1);
        let o = &parsed.objects[0];
        prop_assert_eq!(o.loc, loc);
        prop_assert_eq!(o.seg, seg);
        prop_assert_eq!(&o.label, l.trim());
        prop_assert_eq!(bbox_to_loc(o.bbox, w, h), loc);
    }
}
