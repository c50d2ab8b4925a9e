//! A synthetic "shapes" dataset for fine-tuning PaliGemma: coloured circles, squares,
//! triangles, stars and hexagons on pale backgrounds, with exact captions, answers and boxes.
//!
//! The data is meant to be learnable by a tiny model trained from scratch, and its ground truth
//! exact, so every choice below favours unambiguity over realism.
//!
//! # Scenes
//!
//! - A square image ([`random_scene`], `size` × `size`) with a pale, low-saturation background
//!   ([`Background`]: solid, two-colour gradient, low-contrast stripes or blotchy noise). Every
//!   background pixel has all channels ≥ [`BACKGROUND_MIN_CHANNEL`], while every palette colour
//!   has a channel ≤ 60, so a pixel is a shape pixel exactly when it has a palette colour.
//! - 1 to 3 shapes, each of a kind ([`ShapeKind`]) and a colour ([`Colour`]) drawn uniformly,
//!   inscribed in a square *frame* whose side is 15–40 % of the image side, placed fully inside
//!   the image. Kinds and colours may repeat (two red circles is a valid scene).
//! - Shapes are drawn without anti-aliasing: a pixel belongs to a shape when its centre lies
//!   inside the shape's outline (so the pixels are exact and platform-independent: only IEEE
//!   `+ - × /` on constants, no `sin`/`cos`, whose libm results vary between platforms).
//! - A shape's [`Shape::bbox`] is the tight box of the pixels actually drawn for it
//!   (`[x0, y0, x1, y1]`, end exclusive), computed from the rasterisation, not from the frame.
//! - Boxes never overlap: any two are at least [`gap`] pixels apart (IoU 0). This is stricter
//!   than "limited overlap", on purpose: no shape hides part of another, so counts, colours and
//!   tight boxes are exact, and every shape is a separate blob of its own colour.
//!
//! # Tasks ([`examples`]), in this order for each scene
//!
//! "Reading order" means left to right by box centre (ties: top to bottom, then kind, colour).
//!
//! | task | prefix | suffix |
//! |---|---|---|
//! | caption | `caption en` | [`caption`]: groups of identical (colour, kind) in reading order of their first member, `a red circle`, `an orange star`, `two blue squares`, joined `x and y` / `x, y and z` |
//! | vqa | `answer en how many shapes are there?` | `2` |
//! | vqa | `answer en how many circles are there?` (every kind) | `1`, `0`, … |
//! | vqa | `answer en what colour is the circle?` (only kinds present exactly once) | `red` |
//! | detect | `detect circle` (every kind) | `<loc…>×4 circle` per circle in reading order, joined by ` ; `; empty when there is none |
//! | detect | `detect circle ; square` (the kinds present, when there are ≥ 2) | objects grouped by the prompt's label order, each group in reading order |
//! | detect | `detect circle ; square ; triangle ; star ; hexagon` | the same rule over all five kinds |
//!
//! With `--present-only` ([`examples_with`]) the per-kind rows are written only for kinds in
//! the scene (no "0" counts, no empty detections); `--max-shapes N` draws 1 to N shapes.
//!
//! An absent object gives an empty suffix, as in big_vision's detection targets (the model
//! learns to answer `<eos>` at once). Boxes go through [`crate::parse::encode_detections`], so
//! the text is the project's detection syntax (big_vision's `round(v·1023)` bins).
//!
//! # Files ([`write_dataset`], `paligemma shapes --out DIR --n N [--seed S] [--size 224] [--max-shapes 3] [--present-only]`)
//!
//! ```text
//! DIR/images/00000.png …     scene i as images/{i:05}.png (more digits when N > 100000)
//! DIR/train.jsonl            every example, scene by scene, in the order of the table above
//! DIR/caption.jsonl          the same lines split by task
//! DIR/vqa.jsonl
//! DIR/detect.jsonl
//! DIR/meta.json              seed, n, size, kinds, palette, example counts (written last)
//! ```
//!
//! Each JSONL line is `{"image":"images/00012.png","prefix":"…","suffix":"…"}` (big_vision's
//! `bv:jsonl` keys; the path is relative to the JSONL file). A held-out set is another run with
//! another seed, or [`scene`]`(seed, i, size)` regenerated in memory. `DIR` must be empty unless
//! `--force`, which overwrites files of the same name and leaves others (e.g. images beyond a
//! smaller new `N`, which no JSONL line refers to).
//!
//! # Determinism
//!
//! Scene `i` of seed `s` comes from its own generator, [`scene_rng`]`(s, i)`, so any scene can
//! be regenerated alone (held-out evaluation) and scenes can be made in parallel. The
//! generator is SplitMix64, written here rather than `rand::rngs::StdRng` because rand
//! documents StdRng's algorithm as free to change between releases (and its range sampling
//! changed in 0.9): a seed here means the same scenes with any dependency versions. PNG bytes
//! additionally depend on the `png` encoder version (pinned by `Cargo.lock`); pixels do not.

use crate::parse::{Object, encode_detections};
use crate::task::Task;
use anyhow::{Context, Result, bail};
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ImageEncoder, Rgb, RgbImage};
use rayon::prelude::*;
use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Random numbers

/// The golden-ratio increment of SplitMix64.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64 (Steele, Lea & Flood 2014; the generator Java's `SplittableRandom` uses): 64 bits
/// of state, passes BigCrush, and is defined by the ten lines below, so a seed gives the same
/// numbers forever (see the module docs for why not `StdRng`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix64(self.state)
    }

    /// Uniform in `0..n` (0 when `n` is 0) by Lemire's multiply-high. The bias, at most
    /// `n / 2^64`, is far below anything a dataset could show.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`; `lo` when `hi < lo`.
    pub fn between(&mut self, lo: u32, hi: u32) -> u32 {
        if hi <= lo {
            return lo;
        }
        lo + self.below(u64::from(hi - lo) + 1) as u32
    }

    /// One element of a non-empty slice, uniformly.
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// SplitMix64's output function: a bijective 64-bit mixer.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The generator of scene `index` of dataset `seed`: independent of every other scene, so a
/// scene can be regenerated without the ones before it.
pub fn scene_rng(seed: u64, index: u64) -> SplitMix64 {
    SplitMix64::new(mix64(mix64(seed).wrapping_add(index)))
}

/// Scene `index` of the dataset written with `seed` and `size` (what `paligemma shapes` wrote
/// as image `index`).
pub fn scene(seed: u64, index: u64, size: u32) -> Scene {
    random_scene(&mut scene_rng(seed, index), size)
}

/// Scene `index` of a dataset written with `--max-shapes max_shapes` (1 to [`MAX_SHAPES`]);
/// with [`MAX_SHAPES`] it is [`scene`].
pub fn scene_with(seed: u64, index: u64, size: u32, max_shapes: usize) -> Scene {
    random_scene_with(&mut scene_rng(seed, index), size, max_shapes)
}

// ---------------------------------------------------------------------------------------------
// Palette and kinds

/// The shapes' colours: saturated and far apart, so that none is mistaken for another or for
/// the pale backgrounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
}

impl Colour {
    pub const ALL: [Colour; 6] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::Orange,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
        }
    }

    /// The exact pixel value; each has a channel ≤ 60 (see [`BACKGROUND_MIN_CHANNEL`]).
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 40, 40],
            Colour::Green => [40, 170, 60],
            Colour::Blue => [40, 80, 220],
            Colour::Yellow => [235, 200, 30],
            Colour::Purple => [140, 60, 190],
            Colour::Orange => [245, 130, 20],
        }
    }

    /// The palette colour with exactly this pixel value, if any.
    pub fn from_rgb(rgb: [u8; 3]) -> Option<Colour> {
        Colour::ALL.into_iter().find(|c| c.rgb() == rgb)
    }
}

/// The shapes, all with a fixed upright orientation (a rotated square would read as a diamond).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ShapeKind {
    Circle,
    Square,
    Triangle,
    Star,
    Hexagon,
}

/// A five-pointed star inscribed in the unit square (outer radius 0.526, inner radius half of
/// it so the arms stay thick at small sizes), point up, clockwise from the top.
const STAR: [(f64, f64); 10] = [
    (0.5, 0.024_471_741_852_423_29),
    (0.654_508_497_187_473_7, 0.337_540_151_883_546_9),
    (1.0, 0.387_743_005_855_103_7),
    (0.75, 0.631_432_778_029_783_5),
    (0.809_016_994_374_947_5, 0.975_528_258_147_576_8),
    (0.5, 0.813_068_410_031_123_6),
    (0.190_983_005_625_052_66, 0.975_528_258_147_576_9),
    (0.25, 0.631_432_778_029_783_5),
    (0.0, 0.387_743_005_855_103_8),
    (0.345_491_502_812_526_2, 0.337_540_151_883_546_9),
];

/// Half the height of a regular hexagon of width 1: √3/4.
const HEX_H: f64 = 0.433_012_701_892_219_3;

/// A regular hexagon with flat top and bottom, as wide as the unit square.
const HEXAGON: [(f64, f64); 6] = [
    (0.0, 0.5),
    (0.25, 0.5 - HEX_H),
    (0.75, 0.5 - HEX_H),
    (1.0, 0.5),
    (0.75, 0.5 + HEX_H),
    (0.25, 0.5 + HEX_H),
];

/// An isosceles triangle, apex up, filling the unit square.
const TRIANGLE: [(f64, f64); 3] = [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)];

impl ShapeKind {
    pub const ALL: [ShapeKind; 5] = [
        ShapeKind::Circle,
        ShapeKind::Square,
        ShapeKind::Triangle,
        ShapeKind::Star,
        ShapeKind::Hexagon,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circle",
            ShapeKind::Square => "square",
            ShapeKind::Triangle => "triangle",
            ShapeKind::Star => "star",
            ShapeKind::Hexagon => "hexagon",
        }
    }

    pub fn plural(self) -> String {
        format!("{}s", self.name())
    }

    /// Whether the point `(u, v)` of the unit square (y down) is inside the shape inscribed in
    /// it.
    pub fn contains(self, u: f64, v: f64) -> bool {
        match self {
            ShapeKind::Circle => (u - 0.5) * (u - 0.5) + (v - 0.5) * (v - 0.5) <= 0.25,
            ShapeKind::Square => (0.0..=1.0).contains(&u) && (0.0..=1.0).contains(&v),
            ShapeKind::Triangle => inside_polygon(&TRIANGLE, u, v),
            ShapeKind::Star => inside_polygon(&STAR, u, v),
            ShapeKind::Hexagon => inside_polygon(&HEXAGON, u, v),
        }
    }
}

/// Even-odd crossing test: a horizontal ray from `(x, y)` crosses the outline an odd number of
/// times when the point is inside. Works for the non-convex star.
fn inside_polygon(poly: &[(f64, f64)], x: f64, y: f64) -> bool {
    let mut inside = false;
    let mut j = poly.len() - 1;
    for i in 0..poly.len() {
        let (xi, yi) = poly[i];
        let (xj, yj) = poly[j];
        if (yi > y) != (yj > y) && x < xj + (y - yj) * (xi - xj) / (yi - yj) {
            inside = !inside;
        }
        j = i;
    }
    inside
}

// ---------------------------------------------------------------------------------------------
// Scenes

/// One shape of a scene.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub kind: ShapeKind,
    pub colour: Colour,
    /// The tight box `[x0, y0, x1, y1]` (ends exclusive) of the pixels drawn for the shape.
    pub bbox: [u32; 4],
    /// The rectangle `[x0, y0, x1, y1]` (ends exclusive) the shape is inscribed in: what
    /// [`render`] draws from. `bbox` lies inside it.
    pub frame: [u32; 4],
}

impl Shape {
    /// The shape of `kind` inscribed in `frame`, in a `width`×`height` image, with its `bbox`
    /// computed from the pixels it covers; `None` when it covers none (an empty frame, or one
    /// outside the image).
    pub fn new(
        kind: ShapeKind,
        colour: Colour,
        frame: [u32; 4],
        width: u32,
        height: u32,
    ) -> Option<Shape> {
        let bbox = tight_box(shape_pixels(kind, frame, width, height))?;
        Some(Shape {
            kind,
            colour,
            bbox,
            frame,
        })
    }

    /// Twice the box centre, `(x0 + x1, y0 + y1)`: integers, so ordering needs no floats.
    fn centre2(&self) -> (u32, u32) {
        let [x0, y0, x1, y1] = self.bbox;
        (x0 + x1, y0 + y1)
    }
}

/// The pixels of a `width`×`height` image whose centres lie in the shape of `kind` inscribed
/// in `frame`, row by row.
pub fn shape_pixels(
    kind: ShapeKind,
    frame: [u32; 4],
    width: u32,
    height: u32,
) -> impl Iterator<Item = (u32, u32)> {
    let [fx0, fy0, fx1, fy1] = frame;
    let (fw, fh) = (
        f64::from(fx1.saturating_sub(fx0)),
        f64::from(fy1.saturating_sub(fy0)),
    );
    let xs = fx0.min(width)..fx1.min(width);
    (fy0.min(height)..fy1.min(height)).flat_map(move |y| {
        let v = (f64::from(y - fy0) + 0.5) / fh;
        xs.clone()
            .filter(move |&x| kind.contains((f64::from(x - fx0) + 0.5) / fw, v))
            .map(move |x| (x, y))
    })
}

/// The tight box `[x0, y0, x1, y1]` (ends exclusive) of some pixels; `None` when there are none.
fn tight_box(pixels: impl Iterator<Item = (u32, u32)>) -> Option<[u32; 4]> {
    pixels.fold(None, |acc, (x, y)| {
        Some(match acc {
            None => [x, y, x + 1, y + 1],
            Some([x0, y0, x1, y1]) => [x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1)],
        })
    })
}

/// Which way a gradient or stripes run: the colour changes along this axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    /// Left to right.
    X,
    /// Top to bottom.
    Y,
    /// Top-left to bottom-right.
    Diagonal,
    /// Bottom-left to top-right.
    AntiDiagonal,
}

impl Axis {
    const ALL: [Axis; 4] = [Axis::X, Axis::Y, Axis::Diagonal, Axis::AntiDiagonal];

    /// Position of pixel `(x, y)` along the axis, from 0 to [`Axis::extent`].
    fn position(self, x: u32, y: u32, height: u32) -> u64 {
        let (x, y, h) = (u64::from(x), u64::from(y), u64::from(height));
        match self {
            Axis::X => x,
            Axis::Y => y,
            Axis::Diagonal => x + y,
            Axis::AntiDiagonal => x + h.saturating_sub(1).saturating_sub(y),
        }
    }

    fn extent(self, width: u32, height: u32) -> u64 {
        let (w, h) = (
            u64::from(width.saturating_sub(1)),
            u64::from(height.saturating_sub(1)),
        );
        match self {
            Axis::X => w,
            Axis::Y => h,
            Axis::Diagonal | Axis::AntiDiagonal => w + h,
        }
    }
}

/// A scene's background: always pale and nearly grey, so it cannot be read as a shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Background {
    Solid([u8; 3]),
    /// A linear blend from `from` to `to` along `axis`.
    Gradient {
        from: [u8; 3],
        to: [u8; 3],
        axis: Axis,
    },
    /// Bands `width` pixels wide, alternating `a` and `b`, changing along `axis`.
    Stripes {
        a: [u8; 3],
        b: [u8; 3],
        width: u32,
        axis: Axis,
    },
    /// `base` lightened or darkened by up to `amplitude` in square cells of `cell` pixels,
    /// the offset of each cell a hash of `seed` and the cell.
    Noise {
        base: [u8; 3],
        amplitude: u8,
        cell: u32,
        seed: u64,
    },
}

/// Every pixel of a [`random_scene`] background has all channels at least this high; every
/// palette colour has a channel at most 60.
pub const BACKGROUND_MIN_CHANNEL: u8 = 150;
/// Pale colours have channels from this up; noise subtracts at most [`MAX_NOISE`].
const PALE_MIN: u8 = 165;
const MAX_NOISE: u8 = 12;
// The darkest background pixel (pale minimum less the noise) stays within the promise.
const _: () = assert!(PALE_MIN - MAX_NOISE >= BACKGROUND_MIN_CHANNEL);

impl Background {
    /// The colour of pixel `(x, y)` of a `width`×`height` image: a pure function, so
    /// [`render`] needs no random state.
    pub fn colour_at(&self, x: u32, y: u32, width: u32, height: u32) -> [u8; 3] {
        match *self {
            Background::Solid(c) => c,
            Background::Gradient { from, to, axis } => {
                let extent = axis.extent(width, height);
                if extent == 0 {
                    return from;
                }
                let p = axis.position(x, y, height).min(extent);
                // Integer blend with rounding: exact on every machine.
                let blend = |a: u8, b: u8| {
                    ((u64::from(a) * (extent - p) + u64::from(b) * p + extent / 2) / extent) as u8
                };
                [
                    blend(from[0], to[0]),
                    blend(from[1], to[1]),
                    blend(from[2], to[2]),
                ]
            }
            Background::Stripes {
                a,
                b,
                width: w,
                axis,
            } => {
                if (axis.position(x, y, height) / u64::from(w.max(1))) % 2 == 0 {
                    a
                } else {
                    b
                }
            }
            Background::Noise {
                base,
                amplitude,
                cell,
                seed,
            } => {
                let cell = cell.max(1);
                let key = (u64::from(x / cell) << 32) | u64::from(y / cell);
                let span = 2 * u64::from(amplitude) + 1;
                let offset = (mix64(seed ^ mix64(key)) % span) as i32 - i32::from(amplitude);
                base.map(|c| (i32::from(c) + offset).clamp(0, 255) as u8)
            }
        }
    }
}

/// A pale, low-saturation colour: a light grey level with a small tint.
fn pale_colour(rng: &mut SplitMix64) -> [u8; 3] {
    let level = rng.between(180, 240) as i32;
    let mut c = [0u8; 3];
    for ch in &mut c {
        let tint = rng.between(0, 30) as i32 - 15;
        *ch = (level + tint).clamp(i32::from(PALE_MIN), 255) as u8;
    }
    c
}

/// `c` shifted by `delta` grey levels, kept pale.
fn shade(c: [u8; 3], delta: i32) -> [u8; 3] {
    c.map(|v| (i32::from(v) + delta).clamp(i32::from(PALE_MIN), 255) as u8)
}

fn random_background(rng: &mut SplitMix64) -> Background {
    match rng.below(4) {
        0 => Background::Solid(pale_colour(rng)),
        1 => Background::Gradient {
            from: pale_colour(rng),
            to: pale_colour(rng),
            axis: rng.pick(&Axis::ALL),
        },
        2 => {
            let a = pale_colour(rng);
            let delta = rng.between(8, 20) as i32;
            // Darker stripes on light bases, lighter ones on darker bases, so they show.
            let b = shade(a, if a[0] > 210 { -delta } else { delta });
            Background::Stripes {
                a,
                b,
                width: rng.between(4, 16),
                axis: rng.pick(&Axis::ALL),
            }
        }
        _ => Background::Noise {
            base: pale_colour(rng),
            amplitude: rng.between(4, u32::from(MAX_NOISE)) as u8,
            cell: rng.between(2, 8),
            seed: rng.next_u64(),
        },
    }
}

/// A picture: background and shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scene {
    pub width: u32,
    pub height: u32,
    pub background: Background,
    pub shapes: Vec<Shape>,
}

/// Most shapes in a scene.
pub const MAX_SHAPES: usize = 3;
/// A frame's side is 15–40 % of the image side.
const FRAME_PERCENT: (u32, u32) = (15, 40);
/// Placement tries per shape before starting the scene's layout again, and layouts tried.
const PLACEMENT_TRIES: usize = 100;
const LAYOUT_TRIES: usize = 100;

/// The smallest distance in pixels between two shapes' boxes in a `size`-pixel scene: at
/// least 2, so shapes never touch, and about 1.5 % of the side.
pub fn gap(size: u32) -> u32 {
    (size / 64).max(2)
}

/// A random scene of `size`×`size` pixels: a background and 1 to [`MAX_SHAPES`] shapes
/// whose boxes are at least [`gap`] apart. Meant for sizes ≥ 32 (the CLI's minimum); smaller
/// sizes still work but may hold fewer shapes, or none at 0.
pub fn random_scene(rng: &mut SplitMix64, size: u32) -> Scene {
    random_scene_with(rng, size, MAX_SHAPES)
}

/// [`random_scene`] with 1 to `max_shapes` shapes (clamped to 1..=[`MAX_SHAPES`]).
pub fn random_scene_with(rng: &mut SplitMix64, size: u32, max_shapes: usize) -> Scene {
    let background = random_background(rng);
    let count = 1 + rng.below(max_shapes.clamp(1, MAX_SHAPES) as u64) as usize;
    Scene {
        width: size,
        height: size,
        background,
        shapes: place_shapes(rng, size, count),
    }
}

/// `count` shapes with separated boxes. A layout that gets stuck (earlier shapes leaving no
/// room) is started again; after [`LAYOUT_TRIES`] the fullest layout is kept, which in
/// practice never happens (the test suite checks the count over many scenes).
fn place_shapes(rng: &mut SplitMix64, size: u32, count: usize) -> Vec<Shape> {
    let mut best = Vec::new();
    for _ in 0..LAYOUT_TRIES {
        let shapes = try_layout(rng, size, count);
        if shapes.len() == count {
            return shapes;
        }
        if shapes.len() > best.len() {
            best = shapes;
        }
    }
    best
}

fn try_layout(rng: &mut SplitMix64, size: u32, count: usize) -> Vec<Shape> {
    let lo = (size * FRAME_PERCENT.0).div_ceil(100).max(1);
    let hi = size * FRAME_PERCENT.1 / 100;
    let mut placed: Vec<Shape> = Vec::with_capacity(count);
    for _ in 0..count {
        let kind = rng.pick(&ShapeKind::ALL);
        let colour = rng.pick(&Colour::ALL);
        let found = (0..PLACEMENT_TRIES).find_map(|_| {
            let side = rng.between(lo, hi).min(size);
            let x0 = rng.between(0, size - side);
            let y0 = rng.between(0, size - side);
            let shape = Shape::new(kind, colour, [x0, y0, x0 + side, y0 + side], size, size)?;
            let clear = placed
                .iter()
                .all(|p| boxes_apart(p.bbox, shape.bbox, gap(size)));
            clear.then_some(shape)
        });
        match found {
            Some(shape) => placed.push(shape),
            None => break,
        }
    }
    placed
}

/// Whether two boxes are separated by at least `gap` empty pixels horizontally or vertically.
fn boxes_apart(a: [u32; 4], b: [u32; 4], gap: u32) -> bool {
    a[2] + gap <= b[0] || b[2] + gap <= a[0] || a[3] + gap <= b[1] || b[3] + gap <= a[1]
}

/// Intersection over union of two boxes `[x0, y0, x1, y1]` (0 when both are empty), for
/// evaluating detections against [`Shape::bbox`].
pub fn iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    let area = |r: [f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let inter = area([
        a[0].max(b[0]),
        a[1].max(b[1]),
        a[2].min(b[2]),
        a[3].min(b[3]),
    ]);
    let union = area(a) + area(b) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// The image of a scene: background, then each shape's pixels in its colour. Shapes are drawn
/// from their frames (clipped to the image); `bbox` is not read.
pub fn render(scene: &Scene) -> RgbImage {
    let (w, h) = (scene.width, scene.height);
    let mut img = RgbImage::from_fn(w, h, |x, y| Rgb(scene.background.colour_at(x, y, w, h)));
    for shape in &scene.shapes {
        for (x, y) in shape_pixels(shape.kind, shape.frame, w, h) {
            img.put_pixel(x, y, Rgb(shape.colour.rgb()));
        }
    }
    img
}

// ---------------------------------------------------------------------------------------------
// Tasks

/// Which kind of task an example trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskType {
    Caption,
    Vqa,
    Detect,
}

impl TaskType {
    pub const ALL: [TaskType; 3] = [TaskType::Caption, TaskType::Vqa, TaskType::Detect];

    /// Also the name of the task's JSONL file.
    pub fn name(self) -> &'static str {
        match self {
            TaskType::Caption => "caption",
            TaskType::Vqa => "vqa",
            TaskType::Detect => "detect",
        }
    }
}

/// One training example: the prompt (`prefix`) and the expected answer (`suffix`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub task: TaskType,
    pub prefix: String,
    pub suffix: String,
}

/// The shapes in reading order: left to right by box centre, then top to bottom, then kind and
/// colour (so the order is total even for a hand-made scene).
pub fn reading_order(shapes: &[Shape]) -> Vec<&Shape> {
    let mut sorted: Vec<&Shape> = shapes.iter().collect();
    sorted.sort_by_key(|s| (s.centre2(), s.kind, s.colour));
    sorted
}

/// The caption of a scene (see the module docs); `no shapes` for a scene without any.
pub fn caption(scene: &Scene) -> String {
    let mut groups: Vec<(Colour, ShapeKind, usize)> = Vec::new();
    for s in reading_order(&scene.shapes) {
        match groups
            .iter_mut()
            .find(|(c, k, _)| (*c, *k) == (s.colour, s.kind))
        {
            Some(group) => group.2 += 1,
            None => groups.push((s.colour, s.kind, 1)),
        }
    }
    let phrases: Vec<String> = groups
        .into_iter()
        .map(|(colour, kind, n)| noun_phrase(n, colour, kind))
        .collect();
    if phrases.is_empty() {
        return "no shapes".to_string();
    }
    join_english(&phrases)
}

/// `a red circle`, `an orange star`, `two blue squares`.
fn noun_phrase(count: usize, colour: Colour, kind: ShapeKind) -> String {
    if count == 1 {
        let article = if colour.name().starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        format!("{article} {} {}", colour.name(), kind.name())
    } else {
        format!("{} {} {}", number_word(count), colour.name(), kind.plural())
    }
}

fn number_word(n: usize) -> String {
    const WORDS: [&str; 11] = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    ];
    WORDS
        .get(n)
        .map_or_else(|| n.to_string(), |w| w.to_string())
}

/// `x`, `x and y`, `x, y and z`.
fn join_english(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [only] => only.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

fn count_of(scene: &Scene, kind: ShapeKind) -> usize {
    scene.shapes.iter().filter(|s| s.kind == kind).count()
}

fn answer(question: String, suffix: String) -> Result<Example> {
    let prefix = Task::Answer {
        lang: "en".into(),
        question,
    }
    .prompt()?;
    Ok(Example {
        task: TaskType::Vqa,
        prefix,
        suffix,
    })
}

fn vqa_examples(scene: &Scene, present_only: bool) -> Result<Vec<Example>> {
    let mut out = vec![answer(
        "how many shapes are there?".into(),
        scene.shapes.len().to_string(),
    )?];
    for kind in ShapeKind::ALL {
        if present_only && count_of(scene, kind) == 0 {
            continue;
        }
        out.push(answer(
            format!("how many {} are there?", kind.plural()),
            count_of(scene, kind).to_string(),
        )?);
    }
    // Asked only when the answer is a single colour, so every question has one answer.
    for kind in ShapeKind::ALL {
        if let [only] = scene
            .shapes
            .iter()
            .filter(|s| s.kind == kind)
            .collect::<Vec<_>>()[..]
        {
            out.push(answer(
                format!("what colour is the {}?", kind.name()),
                only.colour.name().to_string(),
            )?);
        }
    }
    Ok(out)
}

/// The `detect` example for `kinds`: objects grouped by kind in prompt order, each group in
/// reading order; empty text when none is present.
fn detect_example(scene: &Scene, kinds: &[ShapeKind]) -> Result<Example> {
    let labels = kinds.iter().map(|k| k.name().to_string()).collect();
    let prefix = Task::Detect { labels }.prompt()?;
    let ordered = reading_order(&scene.shapes);
    let objects: Vec<Object> = kinds
        .iter()
        .flat_map(|&kind| ordered.iter().filter(move |s| s.kind == kind))
        .map(|s| Object {
            label: s.kind.name().to_string(),
            // Not read by `encode_detections`, which encodes `bbox`.
            loc: [0; 4],
            bbox: s.bbox.map(|v| v as f32),
            seg: None,
        })
        .collect();
    let suffix = encode_detections(&objects, scene.width, scene.height)
        .with_context(|| format!("cannot encode the boxes of {prefix:?}"))?;
    Ok(Example {
        task: TaskType::Detect,
        prefix,
        suffix,
    })
}

fn detect_examples(scene: &Scene, present_only: bool) -> Result<Vec<Example>> {
    let mut out = ShapeKind::ALL
        .iter()
        .filter(|&&k| !present_only || count_of(scene, k) > 0)
        .map(|&k| detect_example(scene, &[k]))
        .collect::<Result<Vec<_>>>()?;
    let present: Vec<ShapeKind> = ShapeKind::ALL
        .into_iter()
        .filter(|&k| count_of(scene, k) > 0)
        .collect();
    if present.len() >= 2 && present.len() < ShapeKind::ALL.len() {
        out.push(detect_example(scene, &present)?);
    }
    out.push(detect_example(scene, &ShapeKind::ALL)?);
    Ok(out)
}

/// Every example of a scene, in the order of the table in the module docs. Fails only for a
/// hand-made scene whose boxes cannot be encoded (an image side of 0, an inverted box).
pub fn examples(scene: &Scene) -> Result<Vec<Example>> {
    examples_with(scene, false)
}

/// [`examples`], or with `present_only` only the per-kind questions (`how many circles`,
/// `detect circle`) about kinds present in the scene: no "0" answers and no empty detections.
/// Those are most of a scene's examples and can be answered well without looking (a count of
/// 0 is right two times in three), which pulls a model trained from scratch towards ignoring
/// the image; a first phase without them teaches it to look (see tools/train_demo.sh).
pub fn examples_with(scene: &Scene, present_only: bool) -> Result<Vec<Example>> {
    let mut out = vec![Example {
        task: TaskType::Caption,
        prefix: Task::Caption {
            lang: "en".into(),
            long: false,
        }
        .prompt()?,
        suffix: caption(scene),
    }];
    out.extend(vqa_examples(scene, present_only)?);
    out.extend(detect_examples(scene, present_only)?);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Writing a dataset

/// Smallest and largest image side the dataset writer accepts: below 32 pixels the shapes are
/// a few pixels wide and no longer recognisable; above 4096 an image is tens of megabytes.
pub const MIN_SIZE: u32 = 32;
pub const MAX_SIZE: u32 = 4096;
/// The file with every example; each task also has its own file, `{task}.jsonl`.
pub const COMBINED_FILE: &str = "train.jsonl";
/// What a run records about itself (seed, size, count, palette), written last.
pub const META_FILE: &str = "meta.json";
pub const IMAGES_DIR: &str = "images";

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSpec {
    /// Number of scenes (images).
    pub n: usize,
    pub seed: u64,
    /// Image side in pixels.
    pub size: u32,
    /// Shapes per scene: 1 to this (at most [`MAX_SHAPES`]).
    pub max_shapes: usize,
    /// Only the per-kind questions about kinds present (see [`examples_with`]).
    pub present_only: bool,
}

impl DatasetSpec {
    pub fn check(&self) -> Result<()> {
        if self.n == 0 {
            bail!("--n must be at least 1 (the number of images to generate)");
        }
        if !(1..=MAX_SHAPES).contains(&self.max_shapes) {
            bail!(
                "--max-shapes {} is out of range: scenes hold 1 to {MAX_SHAPES} shapes",
                self.max_shapes
            );
        }
        if !(MIN_SIZE..=MAX_SIZE).contains(&self.size) {
            bail!(
                "--size {} is out of range: images must be {MIN_SIZE} to {MAX_SIZE} pixels wide \
                 (shapes are 15-40% of the side and unrecognisable below {MIN_SIZE} pixels)",
                self.size
            );
        }
        Ok(())
    }

    /// The image path of scene `index`, relative to the output folder: zero-padded to five
    /// digits (more when `n` needs them), so names sort in scene order.
    pub fn image_path(&self, index: usize) -> String {
        let digits = self.n.saturating_sub(1).to_string().len().max(5);
        format!("{IMAGES_DIR}/{index:0digits$}.png")
    }
}

/// What [`write_dataset`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Summary {
    pub images: usize,
    /// Examples per task, in [`TaskType::ALL`] order.
    pub examples: [usize; 3],
}

/// One JSONL line, fields in big_vision's `bv:jsonl` naming.
#[derive(Serialize)]
struct Line<'a> {
    image: &'a str,
    prefix: &'a str,
    suffix: &'a str,
}

/// Scenes rendered in parallel per chunk and written in order: bounded memory for any `n`.
const CHUNK: usize = 64;

/// Writes `spec.n` scenes into `out` (see `README` / the module docs for the layout): images
/// under `images/`, `train.jsonl` with every example, `caption.jsonl`, `vqa.jsonl`,
/// `detect.jsonl`, and `meta.json`. `out` is created if needed and must be empty unless `force`
/// (files of the same name are then overwritten; others are left alone). `progress` is called
/// with the number of scenes written so far.
pub fn write_dataset(
    out: &Path,
    spec: &DatasetSpec,
    force: bool,
    progress: &mut dyn FnMut(usize),
) -> Result<Summary> {
    spec.check()?;
    prepare_out_dir(out, force)?;
    let mut combined = create_jsonl(out, COMBINED_FILE)?;
    let mut per_task = TaskType::ALL
        .iter()
        .map(|t| create_jsonl(out, &format!("{}.jsonl", t.name())))
        .collect::<Result<Vec<_>>>()?;
    let mut summary = Summary::default();
    for start in (0..spec.n).step_by(CHUNK) {
        let end = (start + CHUNK).min(spec.n);
        let rendered = (start..end)
            .into_par_iter()
            .map(|i| make_scene_files(spec, i))
            .collect::<Result<Vec<_>>>()?;
        for (i, (png, examples)) in (start..end).zip(rendered) {
            let rel = spec.image_path(i);
            let path = out.join(&rel);
            std::fs::write(&path, png)
                .with_context(|| format!("cannot write {}", path.display()))?;
            for ex in &examples {
                let line = serde_json::to_string(&Line {
                    image: &rel,
                    prefix: &ex.prefix,
                    suffix: &ex.suffix,
                })?;
                let task = TaskType::ALL
                    .iter()
                    .position(|&t| t == ex.task)
                    .unwrap_or(0);
                writeln!(combined.1, "{line}")
                    .with_context(|| format!("cannot write {}", combined.0.display()))?;
                writeln!(per_task[task].1, "{line}")
                    .with_context(|| format!("cannot write {}", per_task[task].0.display()))?;
                summary.examples[task] += 1;
            }
            summary.images += 1;
        }
        progress(end);
    }
    for (path, mut w) in std::iter::once(combined).chain(per_task) {
        w.flush()
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    write_meta(out, spec, &summary)?;
    Ok(summary)
}

/// The PNG bytes and examples of scene `index`.
fn make_scene_files(spec: &DatasetSpec, index: usize) -> Result<(Vec<u8>, Vec<Example>)> {
    let scene = scene_with(spec.seed, index as u64, spec.size, spec.max_shapes);
    let img = render(&scene);
    let mut png = Vec::new();
    // Fixed encoder settings: the bytes depend only on the pixels (and the png crate version).
    PngEncoder::new_with_quality(&mut png, CompressionType::Default, FilterType::Adaptive)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .with_context(|| format!("cannot encode image {index} as PNG"))?;
    Ok((png, examples_with(&scene, spec.present_only)?))
}

/// Refuses a non-empty folder unless `force`, then creates `out/images`.
fn prepare_out_dir(out: &Path, force: bool) -> Result<()> {
    if out.exists() {
        if !out.is_dir() {
            bail!("--out {} exists and is not a folder", out.display());
        }
        let mut entries = std::fs::read_dir(out)
            .with_context(|| format!("cannot read the output folder {}", out.display()))?;
        if entries.next().is_some() && !force {
            bail!(
                "the output folder {} is not empty; choose another or pass --force to write \
                 into it (files of the same name are overwritten)",
                out.display()
            );
        }
    }
    let images = out.join(IMAGES_DIR);
    std::fs::create_dir_all(&images)
        .with_context(|| format!("cannot create the output folder {}", images.display()))?;
    Ok(())
}

fn create_jsonl(out: &Path, name: &str) -> Result<(PathBuf, BufWriter<File>)> {
    let path = out.join(name);
    let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok((path, BufWriter::new(file)))
}

fn write_meta(out: &Path, spec: &DatasetSpec, summary: &Summary) -> Result<()> {
    let counts: serde_json::Map<String, serde_json::Value> = TaskType::ALL
        .iter()
        .zip(summary.examples)
        .map(|(t, n)| (t.name().to_string(), n.into()))
        .collect();
    let meta = serde_json::json!({
        "generator": "paligemma shapes 1",
        "prng": "SplitMix64, scene i from scene_rng(seed, i)",
        "seed": spec.seed,
        "n": spec.n,
        "size": spec.size,
        "max_shapes": spec.max_shapes,
        "present_only": spec.present_only,
        "kinds": ShapeKind::ALL.map(|k| k.name()),
        "colours": Colour::ALL.map(|c| serde_json::json!({"name": c.name(), "rgb": c.rgb()})),
        "examples": counts,
        "files": {
            "all": COMBINED_FILE,
            "per_task": TaskType::ALL.map(|t| format!("{}.jsonl", t.name())),
        },
    });
    let path = out.join(META_FILE);
    let text = serde_json::to_string_pretty(&meta)? + "\n";
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_reference_sequence() {
        // From the reference C implementation (Vigna's splitmix64.c) with seed 1234567.
        let mut rng = SplitMix64::new(1234567);
        assert_eq!(rng.next_u64(), 6457827717110365317);
        assert_eq!(rng.next_u64(), 3203168211198807973);
        assert_eq!(rng.next_u64(), 9817491932198370423);
    }

    #[test]
    fn between_stays_in_range_and_reaches_both_ends() {
        let mut rng = SplitMix64::new(7);
        let draws: Vec<u32> = (0..2000).map(|_| rng.between(3, 9)).collect();
        assert!(draws.iter().all(|&v| (3..=9).contains(&v)));
        assert!(draws.contains(&3) && draws.contains(&9));
        assert_eq!(rng.between(5, 5), 5);
        assert_eq!(rng.between(5, 2), 5);
        assert_eq!(rng.below(0), 0);
    }

    #[test]
    fn palette_never_meets_the_background_range() {
        for c in Colour::ALL {
            assert!(c.rgb().iter().any(|&v| v <= 60), "{c:?}");
            assert_eq!(Colour::from_rgb(c.rgb()), Some(c));
        }
    }

    #[test]
    fn every_kind_fills_its_frame_sensibly() {
        for kind in ShapeKind::ALL {
            let s = Shape::new(kind, Colour::Red, [10, 20, 50, 60], 100, 100).unwrap();
            let [x0, y0, x1, y1] = s.bbox;
            // Every kind spans the frame's width and at least 85 % of its height.
            assert_eq!((x0, x1), (10, 50), "{kind:?}");
            assert!(
                y0 >= 20 && y1 <= 60 && y1 - y0 >= 34,
                "{kind:?} {:?}",
                s.bbox
            );
        }
        assert_eq!(
            Shape::new(ShapeKind::Square, Colour::Red, [10, 10, 10, 20], 100, 100),
            None
        );
        assert_eq!(
            Shape::new(ShapeKind::Circle, Colour::Red, [200, 0, 220, 20], 100, 100),
            None
        );
    }

    #[test]
    fn kinds_cover_distinct_areas() {
        // Coverage of the unit square, a rough check that the outlines are what they claim.
        let area = |k: ShapeKind| {
            let n = 200;
            let inside = (0..n * n)
                .filter(|i| {
                    let (u, v) = ((i % n) as f64 + 0.5, (i / n) as f64 + 0.5);
                    k.contains(u / n as f64, v / n as f64)
                })
                .count();
            inside as f64 / (n * n) as f64
        };
        let expect = [
            (ShapeKind::Circle, std::f64::consts::PI / 4.0),
            (ShapeKind::Square, 1.0),
            (ShapeKind::Triangle, 0.5),
            (ShapeKind::Hexagon, 3.0 * 3f64.sqrt() / 8.0),
        ];
        for (k, a) in expect {
            assert!((area(k) - a).abs() < 0.01, "{k:?}: {} vs {a}", area(k));
        }
        let star = area(ShapeKind::Star);
        assert!(star > 0.3 && star < 0.5, "star area {star}");
    }

    #[test]
    fn gradient_runs_between_its_colours() {
        let bg = Background::Gradient {
            from: [200, 200, 200],
            to: [240, 220, 180],
            axis: Axis::X,
        };
        assert_eq!(bg.colour_at(0, 5, 11, 11), [200, 200, 200]);
        assert_eq!(bg.colour_at(10, 5, 11, 11), [240, 220, 180]);
        assert_eq!(bg.colour_at(5, 0, 11, 11), [220, 210, 190]);
        let anti = Background::Gradient {
            from: [200; 3],
            to: [240; 3],
            axis: Axis::AntiDiagonal,
        };
        assert_eq!(anti.colour_at(0, 10, 11, 11), [200; 3]);
        assert_eq!(anti.colour_at(10, 0, 11, 11), [240; 3]);
        // A one-pixel image has no extent to blend over.
        assert_eq!(bg.colour_at(0, 0, 1, 1), [200, 200, 200]);
    }

    #[test]
    fn captions_group_and_order_shapes() {
        let shape = |kind, colour, x0: u32| Shape {
            kind,
            colour,
            bbox: [x0, 10, x0 + 10, 20],
            frame: [x0, 10, x0 + 10, 20],
        };
        let mut scene = Scene {
            width: 100,
            height: 100,
            background: Background::Solid([200; 3]),
            shapes: vec![
                shape(ShapeKind::Circle, Colour::Red, 60),
                shape(ShapeKind::Star, Colour::Orange, 40),
                shape(ShapeKind::Circle, Colour::Red, 10),
            ],
        };
        assert_eq!(caption(&scene), "two red circles and an orange star");
        scene.shapes[0].colour = Colour::Blue;
        assert_eq!(
            caption(&scene),
            "a red circle, an orange star and a blue circle"
        );
        scene.shapes.truncate(1);
        assert_eq!(caption(&scene), "a blue circle");
        scene.shapes.clear();
        assert_eq!(caption(&scene), "no shapes");
    }

    #[test]
    fn examples_follow_the_documented_templates() {
        let shape = |kind, colour, x0: u32| Shape {
            kind,
            colour,
            bbox: [x0, 10, x0 + 20, 30],
            frame: [x0, 10, x0 + 20, 30],
        };
        let scene = Scene {
            width: 100,
            height: 100,
            background: Background::Solid([200; 3]),
            shapes: vec![
                shape(ShapeKind::Square, Colour::Blue, 60),
                shape(ShapeKind::Circle, Colour::Green, 30),
                shape(ShapeKind::Circle, Colour::Red, 0),
            ],
        };
        let ex = examples(&scene).unwrap();
        let get = |prefix: &str| {
            ex.iter()
                .find(|e| e.prefix == prefix)
                .map(|e| e.suffix.as_str())
        };
        assert_eq!(
            get("caption en"),
            Some("a red circle, a green circle and a blue square")
        );
        assert_eq!(get("answer en how many shapes are there?"), Some("3"));
        assert_eq!(get("answer en how many circles are there?"), Some("2"));
        assert_eq!(get("answer en how many stars are there?"), Some("0"));
        assert_eq!(get("answer en what colour is the square?"), Some("blue"));
        assert_eq!(get("answer en what colour is the circle?"), None);
        assert_eq!(get("detect star"), Some(""));
        assert_eq!(
            get("detect square"),
            Some("<loc0102><loc0614><loc0307><loc0818> square")
        );
        assert_eq!(
            get("detect circle ; square"),
            Some(
                "<loc0102><loc0000><loc0307><loc0205> circle ; \
                 <loc0102><loc0307><loc0307><loc0512> circle ; \
                 <loc0102><loc0614><loc0307><loc0818> square"
            )
        );
        assert_eq!(
            get("detect circle ; square ; triangle ; star ; hexagon"),
            get("detect circle ; square")
        );
        // 1 caption, 1 + 5 counts, 1 colour, 5 single detections, 1 present, 1 all.
        assert_eq!(ex.len(), 15);
        // Present kinds only: no count of 0, no empty detection, the rest unchanged.
        let present = examples_with(&scene, true).unwrap();
        let kept: Vec<_> = ex
            .iter()
            .filter(|e| e.suffix != "0" && !(e.task == TaskType::Detect && e.suffix.is_empty()))
            .cloned()
            .collect();
        assert_eq!(present, kept);
        assert_eq!(present.len(), 15 - 3 - 3);
    }

    #[test]
    fn bad_hand_made_scenes_are_errors_not_panics() {
        let scene = Scene {
            width: 0,
            height: 0,
            background: Background::Solid([200; 3]),
            shapes: vec![Shape {
                kind: ShapeKind::Square,
                colour: Colour::Red,
                bbox: [0, 0, 5, 5],
                frame: [0, 0, 5, 5],
            }],
        };
        assert!(examples(&scene).is_err());
        assert_eq!(render(&scene).dimensions(), (0, 0));
        // Degenerate sizes give degenerate scenes, never a panic.
        for size in [0, 1, 2, 5, 31] {
            let s = random_scene(&mut SplitMix64::new(3), size);
            assert!(s.shapes.len() <= MAX_SHAPES);
            render(&s);
        }
    }

    #[test]
    fn iou_of_boxes() {
        assert_eq!(iou([0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]), 1.0);
        assert_eq!(iou([0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 3.0, 2.0]), 1.0 / 3.0);
        assert_eq!(iou([0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0]), 0.0);
        assert_eq!(iou([0.0; 4], [0.0; 4]), 0.0);
    }

    #[test]
    fn max_shapes_bounds_the_count_and_three_is_the_default() {
        for i in 0..40 {
            assert_eq!(scene_with(5, i, 112, 1).shapes.len(), 1);
            assert!(scene_with(5, i, 112, 2).shapes.len() <= 2);
            assert_eq!(scene_with(5, i, 112, MAX_SHAPES), scene(5, i, 112));
        }
        let spec = DatasetSpec {
            n: 1,
            seed: 0,
            size: 112,
            max_shapes: 4,
            present_only: false,
        };
        let err = spec.check().unwrap_err().to_string();
        assert!(err.contains("--max-shapes 4"), "{err}");
    }

    #[test]
    fn image_names_widen_past_five_digits() {
        let spec = |n| DatasetSpec {
            n,
            seed: 0,
            size: 224,
            max_shapes: MAX_SHAPES,
            present_only: false,
        };
        assert_eq!(spec(100_000).image_path(12), "images/00012.png");
        assert_eq!(spec(100_001).image_path(12), "images/000012.png");
    }
}
