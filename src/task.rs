//! PaliGemma's task prompts, built from what the user wants so they need not know the syntax
//! (big_vision's transfer configs and the mix checkpoints' training prefixes).

use anyhow::{Result, bail};

/// The 35 languages of PaliGemma's multilingual captioning (big_vision `coco35l`), plus
/// Quechua (`quz`), which the XM3600 evaluation adds.
pub const LANGUAGES: [&str; 36] = [
    "ar", "bn", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fil", "fr", "he", "hi", "hr",
    "hu", "id", "it", "ja", "ko", "mi", "nl", "no", "pl", "pt", "ro", "ru", "sv", "sw", "te", "th",
    "tr", "uk", "vi", "zh", "quz",
];

/// What to ask of an image.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// `caption {lang}` (short, COCO-like) or `describe {lang}` (long).
    Caption { lang: String, long: bool },
    /// `answer {lang} {question}`.
    Answer { lang: String, question: String },
    /// `ocr`: all text in raster order.
    Ocr,
    /// `detect a ; b`: boxes as `<loc>`×4 + label.
    Detect { labels: Vec<String> },
    /// `segment a ; b`: boxes plus 16 `<seg>` mask codes per object.
    Segment { labels: Vec<String> },
}

impl Task {
    /// The prompt text the model was trained on for this task.
    pub fn prompt(&self) -> Result<String> {
        Ok(match self {
            Task::Caption { lang, long } => {
                check_lang(lang)?;
                format!("{} {lang}", if *long { "describe" } else { "caption" })
            }
            Task::Answer { lang, question } => {
                check_lang(lang)?;
                let q = question.trim();
                if q.is_empty() {
                    bail!("the question is empty");
                }
                format!("answer {lang} {q}")
            }
            Task::Ocr => "ocr".to_string(),
            Task::Detect { labels } => format!("detect {}", join_labels(labels)?),
            Task::Segment { labels } => format!("segment {}", join_labels(labels)?),
        })
    }
}

fn check_lang(lang: &str) -> Result<()> {
    if !LANGUAGES.contains(&lang) {
        bail!(
            "unknown language code {lang:?}; PaliGemma knows: {}",
            LANGUAGES.join(" ")
        );
    }
    Ok(())
}

/// Object names joined by ` ; ` as the detection and segmentation prompts expect; `;`, `<` and
/// `>` would be read as separators or tokens, so they are refused.
fn join_labels(labels: &[String]) -> Result<String> {
    if labels.is_empty() {
        bail!("name at least one thing to look for (e.g. cat)");
    }
    let mut out = Vec::with_capacity(labels.len());
    for label in labels {
        let l = label.trim();
        if l.is_empty() {
            bail!("an object name is empty");
        }
        if l.contains([';', '<', '>']) {
            bail!("object name {l:?} contains ';', '<' or '>', which PaliGemma reads as syntax");
        }
        out.push(l);
    }
    Ok(out.join(" ; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_follow_big_vision_syntax() {
        let s = |t: Task| t.prompt().unwrap();
        assert_eq!(
            s(Task::Caption {
                lang: "en".into(),
                long: false
            }),
            "caption en"
        );
        assert_eq!(
            s(Task::Caption {
                lang: "de".into(),
                long: true
            }),
            "describe de"
        );
        assert_eq!(
            s(Task::Answer {
                lang: "en".into(),
                question: " what is this? ".into()
            }),
            "answer en what is this?"
        );
        assert_eq!(s(Task::Ocr), "ocr");
        assert_eq!(
            s(Task::Detect {
                labels: vec!["cat".into(), "red car".into()]
            }),
            "detect cat ; red car"
        );
        assert_eq!(
            s(Task::Segment {
                labels: vec!["dog".into()]
            }),
            "segment dog"
        );
    }

    #[test]
    fn bad_requests_are_refused() {
        let err = |t: Task| t.prompt().unwrap_err().to_string();
        assert!(
            err(Task::Caption {
                lang: "xx".into(),
                long: false
            })
            .contains("unknown language")
        );
        assert!(err(Task::Detect { labels: vec![] }).contains("at least one"));
        assert!(
            err(Task::Detect {
                labels: vec!["a;b".into()]
            })
            .contains("';'")
        );
        assert!(
            err(Task::Answer {
                lang: "en".into(),
                question: "  ".into()
            })
            .contains("empty")
        );
    }
}
