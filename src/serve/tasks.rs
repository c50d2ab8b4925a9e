//! Structured answers of the task endpoints, in the fields `paligemma <task> --json` prints.

use crate::mask::{paste_mask, rle_encode};
use crate::parse::{Parsed, parse_detections, parse_segmentations};
use crate::vqvae::VqVaeDecoder;
use anyhow::Result;
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locate {
    Detect,
    Segment,
}

impl Locate {
    pub fn name(self) -> &'static str {
        match self {
            Locate::Detect => "detect",
            Locate::Segment => "segment",
        }
    }
}

/// Objects found in a detection or segmentation output for an image of `width`×`height`:
/// `task`, `text`, `width`, `height`, `objects` (`label`, `box` in pixels, `loc` bins and, when
/// segmenting, `mask` as COCO RLE) and `warnings`. `vae` loads the mask decoder, only when an
/// object has mask codes.
pub fn located(
    kind: Locate,
    text: &str,
    (width, height): (u32, u32),
    vae: impl FnOnce() -> Result<std::sync::Arc<VqVaeDecoder>>,
) -> Result<Value> {
    let Parsed {
        objects,
        mut warnings,
    } = match kind {
        Locate::Detect => parse_detections(text, width, height),
        Locate::Segment => parse_segmentations(text, width, height),
    };
    let coded: Vec<(usize, [u8; 16])> = objects
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.seg.map(|codes| (i, codes)))
        .collect();
    let mut masks = vec![None; objects.len()];
    if kind == Locate::Segment && !coded.is_empty() {
        let decoder = vae()?;
        let codes: Vec<[u8; 16]> = coded.iter().map(|(_, c)| *c).collect();
        for ((i, _), m64) in coded.iter().zip(decoder.decode(&codes)?) {
            let object = &objects[*i];
            match paste_mask(&m64, object.loc, width, height) {
                Some(pasted) => masks[*i] = Some(rle_encode(&pasted.mask)),
                None => warnings.push(format!(
                    "object {i} ({:?}): its box is empty in pixels or inverted, so it gets no mask",
                    object.label
                )),
            }
        }
    }
    let objects: Vec<Value> = objects
        .iter()
        .zip(masks)
        .map(|(o, mask)| {
            let mut obj = json!({ "label": o.label, "box": o.bbox, "loc": o.loc });
            if let Some(mask) = mask {
                obj["mask"] = json!(mask);
            }
            obj
        })
        .collect();
    Ok(json!({
        "task": kind.name(), "text": text, "width": width, "height": height,
        "objects": objects, "warnings": warnings,
    }))
}
