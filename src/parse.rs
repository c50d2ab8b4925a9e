//! PaliGemma's detection and segmentation outputs: text → objects, and objects → text.
//!
//! # Output syntax
//!
//! `detect cat ; dog` answers, for each object, `<locYMIN><locXMIN><locYMAX><locXMAX> label`,
//! objects joined by ` ; `:
//!
//! ```text
//! <loc0123><loc0045><loc0678><loc0999> cat ; <loc0001><loc0002><loc0500><loc0600> dog
//! ```
//!
//! `segment cat` adds 16 mask codes after the box: `<loc×4><seg×16> label` (refcoco-style
//! transfers leave the label out). `<locNNNN>` runs over 0000..=1023 and `<segNNN>` over
//! 000..=127. They are ordinary vocabulary pieces, so decoded text carries them literally.
//!
//! # Coordinates (DECISIONS.md item 6: follow big_vision)
//!
//! - A bin `b` stands for the fraction `b / 1023` of the image side (y bins of the height, x
//!   bins of the width), so bin 0 is the top/left edge and bin 1023 the bottom/right edge.
//!   Google's demo divides by 1024 instead; the difference is under 0.1% of the side.
//! - [`Object::bbox`] is `[x0, y0, x1, y1]` in original-image pixels, `b / 1023 · side`
//!   computed in f64 and stored as f32 (no rounding to whole pixels), so it always lies in
//!   `[0, side]`.
//! - [`loc_to_pixel_box`] gives the integer box big_vision's segmentation evaluator pastes the
//!   mask into: `int(b / 1023 · side)`, truncated.
//! - Encoding is big_vision's `clip(round(v · 1023), 0, 1023)` with `tf.round`'s ties-to-even
//!   ([`loc_bin`]). A box that is encoded and decoded again moves by at most half a bin,
//!   `side / 2046` pixels (plus float rounding), and bins → pixels → bins is exact.
//!
//! # Grammar the parser accepts
//!
//! ```text
//! output  := entry (";" entry)*              (";" never occurs inside an entry)
//! entry   := ws* object+ ws*
//! object  := LOC ws* LOC ws* LOC ws* LOC (ws* SEG ×16)? label
//! label   := any text without "<", ">" or ";", up to the next "<loc" or the end of the entry;
//!            trimmed; may be empty
//! LOC     := "<loc" 4 digits ">" with value ≤ 1023
//! SEG     := "<seg" 3 digits ">" with value ≤ 127
//! ```
//!
//! This is the language of the canonical regex in Google's demo
//! (`(.*?)<loc(\d{4})>×4\s*(?:<seg(\d{3})>×16)?\s*([^;<>]+)? ?(?:; )?`) with two loosenings —
//! whitespace between tokens is allowed, and consecutive objects need no separator, as in the
//! regex — and every place where the regex would silently drop or cut text turned into a
//! warning.
//!
//! # Malformed output
//!
//! Nothing panics, and an object is returned only when all of its tokens are well-formed.
//! Everything else is dropped with a warning naming the problem and its byte offset in the
//! input:
//!
//! - Generation ends at the first `<eos>`; text after it other than `<pad>` and whitespace is
//!   reported. Trailing `<pad>`s are dropped silently. Empty or whitespace-only output means "no
//!   objects" and is not a warning.
//! - Fewer than 4 loc tokens, a token out of range (`<loc1024>`, `<loc10000>`, `<seg128>`) or
//!   with the wrong number of digits, output ending inside a token (`<loc01`), 1 to 15 seg
//!   tokens, or a label containing `<` or `>` (the syntax cannot carry them, so the label may
//!   have been cut): the object is skipped, and so is the rest of its entry (up to the next
//!   `;`), whose meaning is unclear after a broken token.
//! - An inverted box (`ymin > ymax` or `xmin > xmax` in bins): skipped, as big_vision's
//!   evaluator marks it invalid. Swapping would invent a box the model did not give.
//! - Text that is not part of an object (before the first `<loc`, or an entry without one),
//!   and empty entries (`a ; ; b`, a trailing `;`) are reported and ignored.
//! - Segmentation only: a box with zero height or width in bins is skipped (big_vision's
//!   evaluator requires `ymax > ymin` and `xmax > xmin`, and a mask cannot be pasted into it);
//!   a box without seg tokens is kept with `seg: None` and a warning, since the box itself is
//!   sound. [`parse_detections`] keeps zero-size boxes and keeps 16 seg tokens if present.

use thiserror::Error;

/// The largest loc bin: `<loc1023>`.
pub const LOC_MAX: u16 = 1023;
/// The largest mask code: `<seg127>`.
pub const SEG_MAX: u8 = 127;
/// Mask codes per object (a 4×4 grid of VQ-VAE codes, row-major).
pub const SEG_TOKENS: usize = 16;
/// What joins objects in the model's output.
pub const SEPARATOR: &str = " ; ";

/// One detected (or segmented) object.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// The label, trimmed; empty when the model gave none.
    pub label: String,
    /// Bins in output order: ymin, xmin, ymax, xmax, each ≤ [`LOC_MAX`].
    pub loc: [u16; 4],
    /// `[x0, y0, x1, y1]` in original-image pixels: `bin / 1023 · side` (see the module docs).
    pub bbox: [f32; 4],
    /// The 16 mask codes (each ≤ [`SEG_MAX`]) when the model gave them.
    pub seg: Option<[u8; 16]>,
}

/// The objects found in an output, and what was wrong with the rest of it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parsed {
    pub objects: Vec<Object>,
    /// One line per problem, each naming a byte offset in the input text.
    pub warnings: Vec<String>,
}

/// Why a box or label cannot be written in PaliGemma's output syntax.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum EncodeError {
    #[error("image size {width}x{height} has a zero side")]
    EmptyImage { width: u32, height: u32 },
    #[error("box {0:?} has a coordinate that is not finite")]
    NonFiniteBox([f32; 4]),
    #[error("box {0:?} is inverted: it needs x0 <= x1 and y0 <= y1")]
    InvertedBox([f32; 4]),
    #[error(
        "bins {0:?} are inverted or above 1023: they need ymin <= ymax <= 1023 and xmin <= xmax <= 1023"
    )]
    BadLoc([u16; 4]),
    #[error("mask code {0} is above 127")]
    BadSeg(u8),
    #[error("label {0:?} contains `;`, `<` or `>`, which the output syntax cannot carry")]
    BadLabel(String),
}

// ---------------------------------------------------------------------------------------------
// Coordinates

/// The bin of a fraction `v` of the image side: big_vision's `clip(round(v · 1023), 0, 1023)`
/// in f32 with ties to even (`tf.round`). Values outside `[0, 1]` clip; NaN gives 0.
pub fn loc_bin(v: f32) -> u16 {
    // `clamp` passes NaN through and `as` maps NaN to 0, so every input has an answer.
    (v * 1023.0).round_ties_even().clamp(0.0, 1023.0) as u16
}

/// The fraction of the image side a bin stands for: `bin / 1023` (bins above 1023 clip).
pub fn bin_value(bin: u16) -> f64 {
    f64::from(bin.min(LOC_MAX)) / 1023.0
}

/// Bins `[ymin, xmin, ymax, xmax]` → `[x0, y0, x1, y1]` in pixels, unrounded.
pub fn loc_to_bbox(loc: [u16; 4], width: u32, height: u32) -> [f32; 4] {
    let [ymin, xmin, ymax, xmax] = loc;
    // f64 so that the only rounding is the final cast; the result never exceeds `side`.
    let px = |bin: u16, side: u32| (bin_value(bin) * f64::from(side)) as f32;
    [
        px(xmin, width),
        px(ymin, height),
        px(xmax, width),
        px(ymax, height),
    ]
}

/// Bins → the integer pixel box `[x0, y0, x1, y1]` big_vision's segmentation evaluator uses:
/// `int(bin / 1023 · side)` (numpy float64, truncated). The evaluator treats `x1 <= x0` or
/// `y1 <= y0` as an invalid prediction; that check is left to the caller.
pub fn loc_to_pixel_box(loc: [u16; 4], width: u32, height: u32) -> [u32; 4] {
    let [ymin, xmin, ymax, xmax] = loc;
    let px = |bin: u16, side: u32| (bin_value(bin) * f64::from(side)) as u32;
    [
        px(xmin, width),
        px(ymin, height),
        px(xmax, width),
        px(ymax, height),
    ]
}

/// `[x0, y0, x1, y1]` in pixels → bins `[ymin, xmin, ymax, xmax]`, clipping to the image.
/// No checks: [`encode_object`] rejects empty images and non-finite or inverted boxes first.
pub fn bbox_to_loc(bbox: [f32; 4], width: u32, height: u32) -> [u16; 4] {
    let [x0, y0, x1, y1] = bbox;
    // f32 like big_vision, whose boxes arrive normalised as float32.
    let bin = |px: f32, side: u32| loc_bin(px / side as f32);
    [
        bin(y0, height),
        bin(x0, width),
        bin(y1, height),
        bin(x1, width),
    ]
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// `<locYMIN><locXMIN><locYMAX><locXMAX>`, then the 16 seg tokens if given, then ` label` if
/// the trimmed label is not empty (refcoco targets are tokens only). Checks that the result
/// parses back to the same bins, codes and label.
pub fn encode_tokens(
    loc: [u16; 4],
    seg: Option<&[u8; 16]>,
    label: &str,
) -> Result<String, EncodeError> {
    let [ymin, xmin, ymax, xmax] = loc;
    if ymin > ymax || xmin > xmax || ymax > LOC_MAX || xmax > LOC_MAX {
        return Err(EncodeError::BadLoc(loc));
    }
    let label = label.trim();
    if label.contains([';', '<', '>']) {
        return Err(EncodeError::BadLabel(label.to_string()));
    }
    let mut out: String = loc.iter().map(|b| format!("<loc{b:04}>")).collect();
    if let Some(seg) = seg {
        if let Some(&bad) = seg.iter().find(|&&c| c > SEG_MAX) {
            return Err(EncodeError::BadSeg(bad));
        }
        out.extend(seg.iter().map(|c| format!("<seg{c:03}>")));
    }
    if !label.is_empty() {
        out.push(' ');
        out.push_str(label);
    }
    Ok(out)
}

/// PaliGemma's text for one box `[x0, y0, x1, y1]` in pixels of a `width`×`height` image:
/// `<loc…>×4 label`. Coordinates outside the image clip to its edge, as in big_vision.
pub fn encode_object(
    bbox: [f32; 4],
    label: &str,
    width: u32,
    height: u32,
) -> Result<String, EncodeError> {
    encode_tokens(checked_loc(bbox, width, height)?, None, label)
}

/// Objects joined by ` ; `, each encoded from its `bbox` (pixels; `loc` is not read, so boxes
/// edited in pixel space are honoured) with its seg tokens when `seg` is `Some` — so this also
/// writes segmentation targets.
pub fn encode_detections(
    objects: &[Object],
    width: u32,
    height: u32,
) -> Result<String, EncodeError> {
    let parts = objects
        .iter()
        .map(|o| {
            encode_tokens(
                checked_loc(o.bbox, width, height)?,
                o.seg.as_ref(),
                &o.label,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(parts.join(SEPARATOR))
}

fn checked_loc(bbox: [f32; 4], width: u32, height: u32) -> Result<[u16; 4], EncodeError> {
    if width == 0 || height == 0 {
        return Err(EncodeError::EmptyImage { width, height });
    }
    if !bbox.iter().all(|v| v.is_finite()) {
        return Err(EncodeError::NonFiniteBox(bbox));
    }
    let [x0, y0, x1, y1] = bbox;
    if x0 > x1 || y0 > y1 {
        return Err(EncodeError::InvertedBox(bbox));
    }
    Ok(bbox_to_loc(bbox, width, height))
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// Objects of a `detect …` answer for a `width`×`height` image (see the module docs for what
/// is accepted and what is warned about). Seg tokens, if present, are kept.
pub fn parse_detections(text: &str, width: u32, height: u32) -> Parsed {
    parse(text, Task::Detect, width, height)
}

/// Objects of a `segment …` (or refcoco) answer for a `width`×`height` image. Boxes without
/// seg tokens are kept with `seg: None` and a warning; zero-size boxes are skipped.
pub fn parse_segmentations(text: &str, width: u32, height: u32) -> Parsed {
    parse(text, Task::Segment, width, height)
}

#[derive(Clone, Copy, PartialEq)]
enum Task {
    Detect,
    Segment,
}

fn parse(text: &str, task: Task, width: u32, height: u32) -> Parsed {
    let mut out = Parsed::default();
    let body = strip_end_markers(text, &mut out.warnings);
    if body.trim().is_empty() {
        return out;
    }
    // `;` cannot occur in a token or a label, so it splits entries unambiguously.
    let count = body.split(';').count();
    let mut base = 0;
    for (i, s) in body.split(';').enumerate() {
        let entry = Entry {
            s,
            base,
            last: i + 1 == count,
        };
        entry.parse_into(task, width, height, &mut out);
        base += s.len() + 1;
    }
    out
}

/// The model's output proper: up to the first `<eos>`, without trailing `<pad>`s (batched
/// decoding pads finished rows), so that runtimes that keep special tokens parse the same.
fn strip_end_markers<'a>(text: &'a str, warnings: &mut Vec<String>) -> &'a str {
    const EOS: &str = "<eos>";
    const PAD: &str = "<pad>";
    let mut body = text;
    if let Some(i) = text.find(EOS) {
        body = &text[..i];
        let after = &text[i + EOS.len()..];
        if !after.replace(PAD, "").trim().is_empty() {
            warnings.push(format!(
                "byte {}: ignored text after <eos>: {}",
                i + EOS.len(),
                snippet(after)
            ));
        }
    }
    while let Some(rest) = body.trim_end().strip_suffix(PAD) {
        body = rest;
    }
    body
}

/// The text between two `;` (or an end of the output), at byte `base` of the input.
struct Entry<'a> {
    s: &'a str,
    base: usize,
    /// Whether this entry ends the output, so that a cut-off token means truncated output.
    last: bool,
}

/// An object whose tokens and label are well-formed; the box is checked afterwards.
struct RawObject<'a> {
    loc: [u16; 4],
    seg: Option<[u8; 16]>,
    label: &'a str,
    /// Where the label ends: the next `<loc` or the end of the entry.
    end: usize,
}

/// One `<locNNNN>` / `<segNNN>` token attempted at some position.
enum Lex<'a> {
    Token {
        value: u16,
        next: usize,
    },
    /// Something else is there (the object has fewer tokens of this kind).
    Absent,
    /// The output ends inside a token.
    Truncated,
    /// Starts like a token but is not a valid one (out of range, wrong digit count, ...).
    Invalid(&'a str),
}

impl<'a> Entry<'a> {
    fn parse_into(&self, task: Task, width: u32, height: u32, out: &mut Parsed) {
        let s = self.s;
        if s.trim().is_empty() {
            out.warnings.push(format!(
                "byte {}: empty entry (nothing before or after a `;`); ignored",
                self.base
            ));
            return;
        }
        let mut pos = skip_ws(s, 0);
        while pos < s.len() {
            if !s[pos..].starts_with("<loc") {
                let end = find_from(s, pos, "<loc").unwrap_or(s.len());
                out.warnings.push(self.stray_text(pos, end));
                pos = end;
                continue;
            }
            match self.object(pos) {
                Ok(raw) => {
                    if self.keep(pos, &raw, task, &mut out.warnings) {
                        out.objects.push(Object {
                            label: raw.label.to_string(),
                            loc: raw.loc,
                            bbox: loc_to_bbox(raw.loc, width, height),
                            seg: raw.seg,
                        });
                    }
                    pos = skip_ws(s, raw.end);
                }
                Err(why) => {
                    // After a broken token the rest of the entry has no reliable meaning.
                    out.warnings.push(format!(
                        "object at byte {}: {why}; skipped",
                        self.base + pos
                    ));
                    break;
                }
            }
        }
    }

    /// Warning for text in `[pos, end)` that is not part of any object.
    fn stray_text(&self, pos: usize, end: usize) -> String {
        let junk = self.s[pos..end].trim_end();
        let cut_token = self.last
            && end == self.s.len()
            && ("<loc".starts_with(junk) || "<seg".starts_with(junk));
        let why = if cut_token {
            "output ends inside a token"
        } else {
            "text outside any object (objects start with <locNNNN>)"
        };
        format!(
            "byte {}: {why}: {}; ignored",
            self.base + pos,
            snippet(junk)
        )
    }

    /// The object starting with `<loc` at `start`: its tokens and label, or why it is broken.
    fn object(&self, start: usize) -> Result<RawObject<'a>, String> {
        let s = self.s;
        let mut p = start;
        let mut loc = [0u16; 4];
        for (i, bin) in loc.iter_mut().enumerate() {
            if i > 0 {
                p = skip_ws(s, p);
            }
            match self.lex(p, "<loc", 4, LOC_MAX) {
                Lex::Token { value, next } => {
                    *bin = value;
                    p = next;
                }
                Lex::Absent => {
                    return Err(format!(
                        "only {i} of 4 loc tokens, then {}",
                        self.what_follows(p)
                    ));
                }
                Lex::Truncated => return Err(self.truncated(p)),
                Lex::Invalid(tok) => {
                    return Err(format!(
                        "{tok:?} at byte {} is not a loc token (<loc0000>..<loc1023>)",
                        self.base + p
                    ));
                }
            }
        }
        let mut seg = [0u8; SEG_TOKENS];
        let mut n = 0;
        while n < SEG_TOKENS {
            let q = skip_ws(s, p);
            match self.lex(q, "<seg", 3, u16::from(SEG_MAX)) {
                Lex::Token { value, next } => {
                    seg[n] = value as u8; // ≤ SEG_MAX, checked by `lex`
                    n += 1;
                    p = next;
                }
                Lex::Absent => break,
                Lex::Truncated => return Err(self.truncated(q)),
                Lex::Invalid(tok) => {
                    return Err(format!(
                        "{tok:?} at byte {} is not a seg token (<seg000>..<seg127>)",
                        self.base + q
                    ));
                }
            }
        }
        if n > 0 && n < SEG_TOKENS {
            return Err(format!(
                "only {n} of 16 seg tokens, then {}",
                self.what_follows(skip_ws(s, p))
            ));
        }
        let end = find_from(s, p, "<loc").unwrap_or(s.len());
        let label = &s[p..end];
        if let Some(k) = label.find(['<', '>']) {
            return Err(format!(
                "unexpected {} at byte {} after the tokens (a label cannot contain `<` or `>`)",
                snippet(&label[k..]),
                self.base + p + k
            ));
        }
        Ok(RawObject {
            loc,
            seg: (n == SEG_TOKENS).then_some(seg),
            label: label.trim(),
            end,
        })
    }

    /// The checks on a syntactically sound object; `false` (with a warning) drops it.
    fn keep(&self, start: usize, raw: &RawObject, task: Task, warnings: &mut Vec<String>) -> bool {
        let [ymin, xmin, ymax, xmax] = raw.loc;
        let at = self.base + start;
        let bins = || format!("ymin {ymin}, xmin {xmin}, ymax {ymax}, xmax {xmax}");
        if ymin > ymax || xmin > xmax {
            warnings.push(format!(
                "object at byte {at}: inverted box ({}); skipped",
                bins()
            ));
            return false;
        }
        if task == Task::Segment {
            if ymin == ymax || xmin == xmax {
                warnings.push(format!(
                    "object at byte {at}: empty box ({}) cannot hold a mask; skipped",
                    bins()
                ));
                return false;
            }
            if raw.seg.is_none() {
                warnings.push(format!(
                    "object at byte {at} ({:?}): no seg tokens; kept without a mask",
                    raw.label
                ));
            }
        }
        true
    }

    /// Reads `<{name}{digits}>` at `p` with a value ≤ `max`.
    fn lex(&self, p: usize, prefix: &str, digits: usize, max: u16) -> Lex<'a> {
        let rest = &self.s[p..];
        if !rest.starts_with(prefix) {
            let cut = self.last && !rest.is_empty() && prefix.starts_with(rest);
            return if cut { Lex::Truncated } else { Lex::Absent };
        }
        let after = &rest[prefix.len()..];
        let n = after.bytes().take_while(u8::is_ascii_digit).count();
        let Some(close) = after[n..].chars().next() else {
            // The entry ends inside the token: truncated output, or a `;` broke it.
            return if self.last {
                Lex::Truncated
            } else {
                Lex::Invalid(rest)
            };
        };
        let len = prefix.len() + n + close.len_utf8();
        let token = &rest[..len];
        if close != '>' || n != digits {
            return Lex::Invalid(token);
        }
        // `digits` ≤ 4, so the value fits a u16.
        match after[..n].parse::<u16>() {
            Ok(value) if value <= max => Lex::Token {
                value,
                next: p + len,
            },
            _ => Lex::Invalid(token),
        }
    }

    fn truncated(&self, p: usize) -> String {
        format!(
            "output ends inside a token: {} at byte {}",
            snippet(&self.s[p..]),
            self.base + p
        )
    }

    fn what_follows(&self, p: usize) -> String {
        if p >= self.s.len() {
            "the end of the entry".to_string()
        } else {
            format!("{} at byte {}", snippet(&self.s[p..]), self.base + p)
        }
    }
}

fn skip_ws(s: &str, p: usize) -> usize {
    s.len() - s[p..].trim_start().len()
}

fn find_from(s: &str, p: usize, pat: &str) -> Option<usize> {
    s[p..].find(pat).map(|i| p + i)
}

/// A short quoted excerpt for warnings; `{:?}` escapes control characters.
fn snippet(s: &str) -> String {
    const MAX_CHARS: usize = 24;
    match s.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{:?}…", &s[..cut]),
        None => format!("{s:?}"),
    }
}
