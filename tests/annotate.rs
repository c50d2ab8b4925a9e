//! Pixel-level checks of `paligemma::annotate`: what is painted where, in which colour.

use std::collections::HashSet;

use image::{GrayImage, Luma, Rgb, RgbImage};
use paligemma::annotate::{
    Annotation, MASK_ALPHA, PALETTE, PixelRect, annotate, blend, box_pixels,
    contrasting_text_color, label_colors, layout_label, outline_strips, style_for,
};

const GREY: [u8; 3] = [90, 100, 110];

fn grey(w: u32, h: u32) -> RgbImage {
    RgbImage::from_pixel(w, h, Rgb(GREY))
}

fn pixels_of(rect: PixelRect, w: u32, h: u32) -> Vec<(u32, u32)> {
    let Some(r) = rect.clip(w, h) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for y in r.y0..r.y1 {
        for x in r.x0..r.x1 {
            out.push((x as u32, y as u32));
        }
    }
    out
}

/// Outline pixels of `bbox` as `annotate` draws them on a `w × h` image.
fn outline_of(bbox: [f32; 4], w: u32, h: u32) -> HashSet<(u32, u32)> {
    let style = style_for(w, h);
    outline_strips(box_pixels(bbox).unwrap(), style.thickness)
        .into_iter()
        .flat_map(|s| pixels_of(s, w, h))
        .collect()
}

/// Tag pixels for a label on `bbox`.
fn tag_of(label: &str, bbox: [f32; 4], w: u32, h: u32) -> HashSet<(u32, u32)> {
    let clipped = box_pixels(bbox).unwrap().clip(w, h).unwrap();
    let layout = layout_label(label, clipped, w, &style_for(w, h)).unwrap();
    pixels_of(layout.tag, w, h).into_iter().collect()
}

#[test]
fn no_objects_leaves_the_image_unchanged() {
    let img = RgbImage::from_fn(37, 23, |x, y| Rgb([x as u8, y as u8, (x * y) as u8]));
    assert_eq!(annotate(&img, &[]), img);
}

#[test]
fn blend_arithmetic() {
    assert_eq!(blend([10, 20, 30], [200, 100, 0], 0), [10, 20, 30]);
    assert_eq!(blend([10, 20, 30], [200, 100, 0], 255), [200, 100, 0]);
    // (90·140 + 230·115 + 127) / 255 = 39177 / 255 = 153.6, i.e. 153 (153.3 rounded).
    assert_eq!(blend([90, 0, 255], [230, 0, 255], MASK_ALPHA)[0], 153);
    assert_eq!(blend([0, 0, 0], [255, 255, 255], 128), [128, 128, 128]);
}

#[test]
fn mask_box_and_tag_pixels() {
    let (w, h) = (320, 240);
    let img = grey(w, h);
    let bbox = [100.0, 80.0, 220.0, 200.0];
    // The mask is a disc that spills outside the box on the left, so some masked pixels are
    // neither box nor tag.
    let mask = GrayImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as f32 - 110.0, y as f32 - 150.0);
        Luma([if dx * dx + dy * dy < 40.0 * 40.0 {
            255
        } else {
            0
        }])
    });
    let objects = [Annotation::new("cat", bbox).with_mask(mask.clone())];
    let out = annotate(&img, &objects);

    let color = PALETTE[0];
    let outline = outline_of(bbox, w, h);
    let tag = tag_of("cat", bbox, w, h);
    let masked_color = blend(GREY, color, MASK_ALPHA);
    let (mut masked_seen, mut outline_seen) = (0, 0);
    for (x, y, px) in out.enumerate_pixels() {
        let p = (x, y);
        if tag.contains(&p) {
            continue;
        }
        if outline.contains(&p) {
            assert_eq!(px.0, color, "outline pixel {p:?}");
            outline_seen += 1;
        } else if mask.get_pixel(x, y).0[0] == 255 {
            assert_eq!(px.0, masked_color, "masked pixel {p:?}");
            masked_seen += 1;
        } else {
            assert_eq!(px.0, GREY, "untouched pixel {p:?}");
        }
    }
    assert!(masked_seen > 1000 && outline_seen > 400);

    // The tag sits above the box and holds both the tag colour and the text colour.
    let text = contrasting_text_color(color);
    let tag_colors: HashSet<[u8; 3]> = tag.iter().map(|&(x, y)| out.get_pixel(x, y).0).collect();
    assert!(tag_colors.contains(&color), "tag colour missing");
    assert!(tag_colors.contains(&text), "text colour missing");
    assert!(tag.iter().all(|&(_, y)| y < 80), "tag is above the box");
    assert!(
        tag.iter().all(|&(x, _)| x >= 100),
        "tag is aligned with the box"
    );
}

#[test]
fn overlapping_masks_blend_in_turn() {
    let img = grey(40, 40);
    let full = GrayImage::from_pixel(40, 40, Luma([255]));
    let objects = [
        Annotation::new("", [100.0, 100.0, 101.0, 101.0]).with_mask(full.clone()),
        Annotation::new("b", [100.0, 100.0, 101.0, 101.0]).with_mask(full),
    ];
    let out = annotate(&img, &objects);
    let expected = blend(blend(GREY, PALETTE[0], MASK_ALPHA), PALETTE[1], MASK_ALPHA);
    assert!(out.pixels().all(|p| p.0 == expected));
}

#[test]
fn labels_choose_colours_by_first_appearance() {
    let colors = label_colors(["cat", "dog", "cat", "bird", "dog"]);
    assert_eq!(
        colors,
        [PALETTE[0], PALETTE[1], PALETTE[0], PALETTE[2], PALETTE[1]]
    );
    let many: Vec<String> = (0..13).map(|i| format!("l{i}")).collect();
    let colors = label_colors(many.iter().map(String::as_str));
    let distinct: HashSet<[u8; 3]> = colors[..12].iter().copied().collect();
    assert_eq!(distinct.len(), 12);
    assert_eq!(colors[12], colors[0], "the palette cycles after 12 labels");
    // The same label keeps its colour in the picture.
    let img = grey(200, 200);
    let out = annotate(
        &img,
        &[
            Annotation::new("dog", [10.0, 50.0, 60.0, 100.0]),
            Annotation::new("cat", [100.0, 50.0, 150.0, 100.0]),
            Annotation::new("dog", [100.0, 120.0, 150.0, 190.0]),
        ],
    );
    assert_eq!(out.get_pixel(10, 99).0, PALETTE[0]);
    assert_eq!(out.get_pixel(100, 99).0, PALETTE[1]);
    assert_eq!(out.get_pixel(100, 189).0, PALETTE[0]);
}

/// WCAG 2 contrast ratio of two colours.
fn contrast_ratio(a: [u8; 3], b: [u8; 3]) -> f32 {
    let luminance = |c: [u8; 3]| {
        let [r, g, b] = c.map(|v| {
            let v = f32::from(v) / 255.0;
            if v <= 0.04045 {
                v / 12.92
            } else {
                ((v + 0.055) / 1.055).powf(2.4)
            }
        });
        0.2126 * r + 0.7152 * g + 0.0722 * b
    };
    let (la, lb) = (luminance(a), luminance(b));
    (la.max(lb) + 0.05) / (la.min(lb) + 0.05)
}

#[test]
fn text_colour_contrasts_with_every_palette_colour() {
    for c in PALETTE {
        let ratio = contrast_ratio(c, contrasting_text_color(c));
        // 4.5:1 is WCAG's AA level for normal text.
        assert!(ratio >= 4.5, "{c:?}: {ratio}");
    }
    assert_eq!(contrasting_text_color([255, 225, 25]), [0, 0, 0]);
    assert_eq!(contrasting_text_color([0, 0, 200]), [255, 255, 255]);
    assert_eq!(contrasting_text_color([0, 0, 0]), [255, 255, 255]);
    assert_eq!(contrasting_text_color([255, 255, 255]), [0, 0, 0]);
}

#[test]
fn labels_at_the_top_edge_go_inside_the_box() {
    let (w, h) = (300, 200);
    let style = style_for(w, h);
    let inside = PixelRect {
        x0: 20,
        y0: 3,
        x1: 200,
        y1: 150,
    };
    let layout = layout_label("person", inside, w, &style).unwrap();
    assert_eq!(layout.tag.y0, 3);
    assert_eq!(layout.tag.x0, 20);
    // Room above: outside, touching the box.
    let below = PixelRect { y0: 100, ..inside };
    let layout = layout_label("person", below, w, &style).unwrap();
    assert_eq!(layout.tag.y1, 100);
    // Near the right edge the tag shifts left to stay whole.
    let right = PixelRect {
        x0: 295,
        y0: 100,
        x1: 300,
        y1: 150,
    };
    let layout = layout_label("person", right, w, &style).unwrap();
    assert_eq!(layout.tag.x1, 300);
    assert!(layout.tag.x0 < 295);
    assert_eq!(layout_label("", right, w, &style), None);
    assert_eq!(layout_label(" \n", right, w, &style), None);
}

#[test]
fn long_labels_are_shortened_to_the_image_width() {
    let (w, h) = (224, 224);
    let style = style_for(w, h);
    let rect = PixelRect {
        x0: 10,
        y0: 50,
        x1: 100,
        y1: 100,
    };
    let long = "a remarkably long label that could never fit on such a small picture";
    let layout = layout_label(long, rect, w, &style).unwrap();
    assert!(layout.text.ends_with('…'), "{}", layout.text);
    assert!(layout.text.len() < long.len());
    assert!(layout.tag.x0 >= 0 && layout.tag.x1 <= i64::from(w));
}

#[test]
fn boxes_are_rounded_ordered_and_never_empty() {
    let r = box_pixels([10.4, 20.6, 30.5, 40.0]).unwrap();
    assert_eq!(
        r,
        PixelRect {
            x0: 10,
            y0: 21,
            x1: 31,
            y1: 40
        }
    );
    assert_eq!(
        box_pixels([30.0, 40.0, 10.0, 20.0]),
        box_pixels([10.0, 20.0, 30.0, 40.0])
    );
    let point = box_pixels([5.2, 5.2, 5.3, 5.3]).unwrap();
    assert_eq!(
        point,
        PixelRect {
            x0: 5,
            y0: 5,
            x1: 6,
            y1: 6
        }
    );
    assert_eq!(box_pixels([f32::NAN, 0.0, 1.0, 1.0]), None);
    assert_eq!(box_pixels([0.0, 0.0, f32::INFINITY, 1.0]), None);
}

#[test]
fn one_pixel_box_is_a_point() {
    let img = grey(30, 30);
    let out = annotate(&img, &[Annotation::new("", [10.2, 10.2, 10.4, 10.4])]);
    for (x, y, px) in out.enumerate_pixels() {
        let expected = if (x, y) == (10, 10) { PALETTE[0] } else { GREY };
        assert_eq!(px.0, expected, "({x}, {y})");
    }
    // With a label it does not panic either (the tag goes where it fits).
    annotate(&img, &[Annotation::new("tiny", [10.2, 10.2, 10.4, 10.4])]);
}

#[test]
fn boxes_over_the_border_are_clipped() {
    let (w, h) = (64, 48);
    let img = grey(w, h);
    // Sticks out at the top-left: only its right and bottom sides are inside the image.
    let bbox = [-20.0, -10.0, 30.0, 20.0];
    let out = annotate(&img, &[Annotation::new("", bbox)]);
    let t = style_for(w, h).thickness;
    for (x, y, px) in out.enumerate_pixels() {
        let on_right = (30 - t..30).contains(&x) && y < 20;
        let on_bottom = (20 - t..20).contains(&y) && x < 30;
        let expected = if on_right || on_bottom {
            PALETTE[0]
        } else {
            GREY
        };
        assert_eq!(px.0, expected, "({x}, {y})");
    }

    // None of these may panic: wholly outside, huge, inverted, NaN, at the corner, labelled.
    let nasty = [
        [-100.0, -100.0, -50.0, -50.0],
        [100.0, 100.0, 200.0, 200.0],
        [-1e30, -1e30, 1e30, 1e30],
        [1e30, 1e30, 2e30, 2e30],
        [f32::MAX, f32::MIN, f32::MAX, f32::MAX],
        [-f32::MAX, -f32::MAX, -f32::MAX, -f32::MAX],
        [60.0, 40.0, 10.0, 5.0],
        [f32::NAN, 1.0, 2.0, 3.0],
        [63.0, 47.0, 64.0, 48.0],
        [0.0, 0.0, 64.0, 48.0],
    ];
    let objects: Vec<Annotation> = nasty
        .iter()
        .map(|&b| Annotation::new("label at the border", b))
        .collect();
    let out = annotate(&img, &objects);
    assert_eq!(out.dimensions(), (w, h));
    // A box wholly outside draws nothing at all.
    let out = annotate(&img, &[Annotation::new("gone", nasty[0])]);
    assert_eq!(out, img);
}

#[test]
fn odd_inputs_do_not_panic() {
    // Masks of the wrong size are used where they overlap.
    let img = grey(20, 10);
    let small = GrayImage::from_pixel(5, 5, Luma([255]));
    let big = GrayImage::from_pixel(50, 50, Luma([255]));
    let out = annotate(
        &img,
        &[
            Annotation::new("", [100.0, 100.0, 101.0, 101.0]).with_mask(small),
            Annotation::new("", [100.0, 100.0, 101.0, 101.0]).with_mask(big),
        ],
    );
    let both = blend(blend(GREY, PALETTE[0], MASK_ALPHA), PALETTE[0], MASK_ALPHA);
    assert_eq!(out.get_pixel(2, 2).0, both);
    assert_eq!(out.get_pixel(10, 2).0, blend(GREY, PALETTE[0], MASK_ALPHA));
    // Empty and tiny images.
    let empty = RgbImage::new(0, 0);
    assert_eq!(
        annotate(&empty, &[Annotation::new("x", [0.0, 0.0, 1.0, 1.0])]),
        empty
    );
    let one = grey(1, 1);
    annotate(
        &one,
        &[Annotation::new("a long label", [0.0, 0.0, 1.0, 1.0])],
    );
}

#[test]
fn non_ascii_labels_render() {
    let (w, h) = (400, 300);
    let img = grey(w, h);
    let text = contrasting_text_color(PALETTE[0]);
    // Latin-1, Greek and Cyrillic are in DejaVu; the CJK character shows the notdef box, whose
    // thin strokes are antialiased, so ink is any pixel of the tag that is not tag colour.
    for (label, solid_text) in [
        ("Café ñ", true),
        ("ωμέγα", true),
        ("Кошка", true),
        ("猫", false),
    ] {
        let bbox = [50.0, 100.0, 350.0, 250.0];
        let out = annotate(&img, &[Annotation::new(label, bbox)]);
        let tag = tag_of(label, bbox, w, h);
        let count = |want: &dyn Fn([u8; 3]) -> bool| {
            tag.iter()
                .filter(|&&(x, y)| want(out.get_pixel(x, y).0))
                .count()
        };
        let ink = count(&|p| p != PALETTE[0]);
        assert!(ink > 10, "{label}: {ink} ink pixels");
        if solid_text {
            let exact = count(&|p| p == text);
            assert!(exact > 5, "{label}: {exact} pixels of text colour");
        }
    }
}

#[test]
fn sizes_scale_with_the_image() {
    let small = style_for(224, 224);
    let large = style_for(2000, 1500);
    assert!(small.font_px >= 12.0);
    assert_eq!(small.thickness, 2);
    assert!(large.font_px > 3.0 * small.font_px);
    assert!(large.thickness > small.thickness);
}

/// A synthetic scene with the cases people meet: a masked object, overlapping boxes, a long
/// label, a label at the top edge, a box over the border, non-Latin text.
fn sample_scene(w: u32, h: u32) -> (RgbImage, Vec<Annotation>) {
    let s = |v: f32| v * w as f32 / 640.0;
    let horizon = h as f32 * 0.62;
    let img = RgbImage::from_fn(w, h, |x, y| {
        let (xf, yf) = (x as f32, y as f32);
        let sun = (xf - s(520.0)).hypot(yf - s(40.0)) < s(38.0);
        let ball = (xf - s(200.0)).hypot(yf - s(330.0)) < s(70.0);
        let t = yf / h as f32;
        if ball {
            let shade = 1.0 - ((xf - s(175.0)).hypot(yf - s(305.0)) / s(140.0)).min(1.0);
            let v = (150.0 + 105.0 * shade) as u8;
            Rgb([v, v, v])
        } else if sun {
            Rgb([255, 220, 120])
        } else if yf < horizon {
            Rgb([(120.0 + 80.0 * t) as u8, (170.0 + 50.0 * t) as u8, 235])
        } else {
            let stripe = ((xf / s(23.0)) as u32 + (yf / s(17.0)) as u32).is_multiple_of(2);
            Rgb(if stripe { [70, 130, 60] } else { [80, 145, 70] })
        }
    });
    let ball_mask = GrayImage::from_fn(w, h, |x, y| {
        let inside = (x as f32 - s(200.0)).hypot(y as f32 - s(330.0)) < s(70.0);
        Luma([if inside { 255 } else { 0 }])
    });
    let objects = vec![
        Annotation::new("ball", [s(128.0), s(258.0), s(272.0), s(402.0)]).with_mask(ball_mask),
        Annotation::new("sun", [s(480.0), 0.0, s(560.0), s(80.0)]),
        Annotation::new(
            "a remarkably long label for the striped lawn in the lower part of the picture",
            [s(300.0), horizon, w as f32 + s(40.0), h as f32],
        ),
        Annotation::new(
            "мяч · σφαίρα · Ball",
            [s(110.0), s(240.0), s(300.0), s(420.0)],
        ),
        Annotation::new("sun", [s(-30.0), s(60.0), s(60.0), s(150.0)]),
    ];
    (img, objects)
}

/// The picture in docs/ (shown in the README) is what `annotate` draws for the sample scene:
/// regenerate it with `PALIGEMMA_WRITE_DOCS=1 cargo test --test annotate docs_example`.
#[test]
fn docs_example_is_current() {
    let (img, objects) = sample_scene(640, 480);
    let drawn = annotate(&img, &objects);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/annotated-example.png");
    if std::env::var_os("PALIGEMMA_WRITE_DOCS").is_some() {
        drawn.save(&path).unwrap();
    }
    let committed = ::image::open(&path).unwrap().to_rgb8();
    assert!(
        committed == drawn,
        "docs/annotated-example.png is stale; see this test's comment"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

    /// Any boxes (NaN, infinite, huge, inverted) and any labels on any small image: no panic,
    /// same size out.
    #[test]
    fn anything_goes(
        w in 1u32..60,
        h in 1u32..60,
        boxes in proptest::collection::vec(
            (proptest::num::f32::ANY, proptest::num::f32::ANY, proptest::num::f32::ANY,
             proptest::num::f32::ANY, ".{0,20}"),
            0..5,
        ),
    ) {
        let img = grey(w, h);
        let objects: Vec<Annotation> = boxes
            .into_iter()
            .map(|(a, b, c, d, label)| Annotation::new(label, [a, b, c, d]))
            .collect();
        let out = annotate(&img, &objects);
        proptest::prop_assert_eq!(out.dimensions(), (w, h));
    }
}
