//! The Rust tokenizer against the Python `tokenizers` library (fixtures written by
//! tools/make_tokenizer_fixtures.py) and against the ids the PaliGemma references document.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use paligemma::tokenizer::{LOC_BINS, SEG_CODES, Tokenizer, TokenizerError};
use serde::Deserialize;

const TOKENIZER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/paligemma-tokenizer.json"
);
const CASES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/tokenizer/cases.json"
);

/// Fewer cases than this means the fixture was truncated or regenerated wrongly.
const MIN_CASES: usize = 400;

#[derive(Deserialize)]
struct Fixture {
    tokenizers_version: String,
    cases: Vec<EncodeCase>,
    decode_cases: Vec<DecodeCase>,
}

#[derive(Deserialize)]
struct EncodeCase {
    text: String,
    ids: Vec<u32>,
    decoded: String,
    decoded_skip_special: String,
    prompt_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct DecodeCase {
    ids: Vec<u32>,
    decoded: String,
    decoded_skip_special: String,
}

// Parsing the 13 MB tokenizer.json takes a while; every test in this binary shares one.
fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| Tokenizer::from_file(TOKENIZER).expect("load test tokenizer"))
}

fn fixture() -> &'static Fixture {
    static FIX: OnceLock<Fixture> = OnceLock::new();
    FIX.get_or_init(|| {
        let text = std::fs::read_to_string(CASES).expect("read tokenizer fixture");
        serde_json::from_str(&text).expect("parse tokenizer fixture")
    })
}

/// Every (ids, expected decode, skip flag) triple the fixture holds, for the decode-side tests.
fn decode_expectations() -> Vec<(&'static [u32], &'static str, bool)> {
    let fix = fixture();
    let encoded = fix.cases.iter().flat_map(|c| {
        [
            (&c.ids[..], &c.decoded[..], false),
            (&c.ids[..], &c.decoded_skip_special[..], true),
        ]
    });
    let decoded = fix.decode_cases.iter().flat_map(|c| {
        [
            (&c.ids[..], &c.decoded[..], false),
            (&c.ids[..], &c.decoded_skip_special[..], true),
        ]
    });
    encoded.chain(decoded).collect()
}

fn scratch_file(name: &str, contents: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, contents).expect("write scratch file");
    path
}

#[test]
fn encodes_like_python() {
    let tok = tokenizer();
    let fix = fixture();
    assert!(
        fix.cases.len() >= MIN_CASES,
        "only {} cases in {CASES}",
        fix.cases.len()
    );
    let mut mismatches = Vec::new();
    for case in &fix.cases {
        let ids = tok.encode(&case.text).unwrap();
        if ids != case.ids {
            mismatches.push(format!(
                "{:?}\n  rust:   {ids:?}\n  python: {:?}",
                case.text, case.ids
            ));
        }
        // The processor tokenizes the prompt with "\n" appended, not the two separately.
        let prompt = format!("{}\n", case.text);
        let prompt_ids = tok.encode(&prompt).unwrap();
        if prompt_ids != case.prompt_ids {
            mismatches.push(format!(
                "{prompt:?}\n  rust:   {prompt_ids:?}\n  python: {:?}",
                case.prompt_ids
            ));
        }
    }
    println!(
        "encode: checked {} strings (and each + \"\\n\") against Python tokenizers {}",
        fix.cases.len(),
        fix.tokenizers_version
    );
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

#[test]
fn decodes_like_python() {
    let tok = tokenizer();
    let expectations = decode_expectations();
    let mut mismatches = Vec::new();
    for &(ids, expected, skip) in &expectations {
        let text = tok.decode(ids, skip).unwrap();
        if text != expected {
            mismatches.push(format!(
                "{ids:?} (skip_special_tokens={skip})\n  rust:   {text:?}\n  python: {expected:?}"
            ));
        }
    }
    println!(
        "decode: checked {} id lists against Python",
        expectations.len()
    );
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

#[test]
fn special_token_ids_match_the_references() {
    let tok = tokenizer();
    let special = tok.special_tokens().unwrap();
    assert_eq!((special.pad, special.eos, special.bos), (0, 1, 2));
    assert_eq!(special.newline, 108);
    assert_eq!(special.image, Some(257152));
    assert_eq!(tok.token_id("<loc0000>"), Some(256000));
    assert_eq!(tok.token_id("<loc1023>"), Some(257023));
    assert_eq!(tok.token_id("<seg000>"), Some(257024));
    assert_eq!(tok.token_id("<seg127>"), Some(257151));
    assert_eq!(tok.id_to_token(257152).as_deref(), Some("<image>"));
    assert_eq!(tok.vocab_size(), 257153);
    assert_eq!(tok.encode("\n").unwrap(), [108]);
}

#[test]
fn special_tokens_are_matched_inside_text() {
    let tok = tokenizer();
    let special = tok.special_tokens().unwrap();
    let image = special.image.unwrap();
    let prompt = "answer en what is this?";
    let layout = format!("{}<bos>{prompt}\n", "<image>".repeat(4));
    let mut expected = vec![image; 4];
    expected.push(special.bos);
    expected.extend(tok.encode(&format!("{prompt}\n")).unwrap());
    assert_eq!(tok.encode(&layout).unwrap(), expected);
    assert_eq!(expected.last(), Some(&special.newline));
}

#[test]
fn only_image_and_the_gemma_control_tokens_are_special() {
    let tok = tokenizer();
    let special = tok.special_tokens().unwrap();
    for id in [
        special.bos,
        special.eos,
        special.pad,
        special.image.unwrap(),
    ] {
        assert!(tok.is_special(id), "{id} should be special");
    }
    let loc = tok.loc_token_id(5).unwrap();
    let seg = tok.seg_token_id(5).unwrap();
    for id in [loc, seg, special.newline] {
        assert!(
            !tok.is_special(id),
            "{id} should survive skip_special_tokens"
        );
    }
    assert_eq!(
        tok.decode(&[special.bos, loc, seg, special.eos], true)
            .unwrap(),
        "<loc0005><seg005>"
    );
}

#[test]
fn loc_tokens_round_trip() {
    let tok = tokenizer();
    for bin in 0..LOC_BINS {
        let id = tok
            .loc_token_id(bin)
            .unwrap_or_else(|| panic!("no token for loc bin {bin}"));
        assert_eq!(id, 256000 + bin);
        assert_eq!(tok.parse_loc(id), Some(bin));
        assert_eq!(tok.parse_seg(id), None);
        assert_eq!(tok.encode(&format!("<loc{bin:04}>")).unwrap(), [id]);
    }
    assert_eq!(tok.loc_token_id(LOC_BINS), None);
    assert_eq!(tok.loc_token_id(10000), None);
}

#[test]
fn seg_tokens_round_trip() {
    let tok = tokenizer();
    for code in 0..SEG_CODES {
        let id = tok
            .seg_token_id(code)
            .unwrap_or_else(|| panic!("no token for seg code {code}"));
        assert_eq!(id, 257024 + code);
        assert_eq!(tok.parse_seg(id), Some(code));
        assert_eq!(tok.parse_loc(id), None);
        assert_eq!(tok.encode(&format!("<seg{code:03}>")).unwrap(), [id]);
    }
    assert_eq!(tok.seg_token_id(SEG_CODES), None);
    assert_eq!(tok.seg_token_id(1000), None);
}

#[test]
fn loc_and_seg_parsers_reject_other_ids() {
    let tok = tokenizer();
    let special = tok.special_tokens().unwrap();
    let others = [
        special.bos,
        special.eos,
        special.pad,
        special.newline,
        special.image.unwrap(),
    ];
    // Look-alikes are split into ordinary pieces, none of which parses.
    let lookalikes = tok
        .encode("<loc123><loc10000><seg1000><seg45> loc0123 seg045")
        .unwrap();
    for id in others
        .into_iter()
        .chain(lookalikes)
        .chain([tok.vocab_size() as u32, u32::MAX])
    {
        assert_eq!(tok.parse_loc(id), None, "parse_loc({id})");
        assert_eq!(tok.parse_seg(id), None, "parse_seg({id})");
    }
}

/// Pushes `ids` one at a time; returns the chunks, with `finish`'s last if it had any.
fn stream_chunks(tok: &Tokenizer, ids: &[u32], skip: bool) -> Vec<String> {
    let mut stream = tok.stream(skip);
    let mut chunks: Vec<String> = ids
        .iter()
        .filter_map(|&id| stream.push(id).unwrap())
        .collect();
    chunks.extend(stream.finish().unwrap());
    chunks
}

#[test]
fn stream_concatenates_to_the_one_shot_decode() {
    let tok = tokenizer();
    let expectations = decode_expectations();
    let mut mismatches = Vec::new();
    for &(ids, expected, skip) in &expectations {
        let streamed = stream_chunks(tok, ids, skip).concat();
        if streamed != expected {
            mismatches.push(format!(
                "{ids:?} (skip={skip})\n  stream:  {streamed:?}\n  python: {expected:?}"
            ));
        }
    }
    println!(
        "stream: checked {} id lists against Python's one-shot decode",
        expectations.len()
    );
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

#[test]
fn stream_never_emits_replacement_chars_for_valid_text() {
    let tok = tokenizer();
    let mut checked = 0;
    for case in fixture()
        .cases
        .iter()
        .filter(|c| !c.text.contains('\u{FFFD}'))
    {
        for chunk in stream_chunks(tok, &case.ids, false) {
            assert!(
                !chunk.contains('\u{FFFD}'),
                "{:?} streamed a U+FFFD chunk {chunk:?}",
                case.text
            );
        }
        checked += 1;
    }
    assert!(checked >= MIN_CASES, "only {checked} cases without U+FFFD");
}

#[test]
fn stream_holds_multibyte_characters_until_complete() {
    let tok = tokenizer();
    // A rare CJK Extension B character is not in the vocabulary, so it is spelled as four
    // byte-fallback tokens; none of them alone is text.
    let ids = tok.encode("𠀋x").unwrap();
    let byte_tokens: Vec<_> = ids.iter().filter_map(|&id| tok.id_to_token(id)).collect();
    assert_eq!(byte_tokens, ["<0xF0>", "<0xA0>", "<0x80>", "<0x8B>", "x"]);

    let mut stream = tok.stream(true);
    for &id in &ids[..4] {
        assert_eq!(stream.push(id).unwrap(), None);
    }
    assert_eq!(stream.push(ids[4]).unwrap().as_deref(), Some("𠀋x"));
    assert_eq!(stream.finish().unwrap(), None);
}

#[test]
fn stream_emits_ordinary_tokens_immediately() {
    let tok = tokenizer();
    let ids = tok.encode("a cat on a sofa").unwrap();
    let chunks = stream_chunks(tok, &ids, true);
    assert_eq!(chunks.len(), ids.len(), "one chunk per token: {chunks:?}");
    assert_eq!(chunks.concat(), "a cat on a sofa");
}

#[test]
fn stream_flushes_an_incomplete_character_at_the_end() {
    let tok = tokenizer();
    let lead_byte = tok.token_id("<0xE2>").unwrap();
    let mut stream = tok.stream(false);
    assert_eq!(stream.push(lead_byte).unwrap(), None);
    assert_eq!(stream.finish().unwrap().as_deref(), Some("\u{FFFD}"));
}

#[test]
fn missing_file_error_names_the_file() {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("no-such-tokenizer.json");
    let err = Tokenizer::from_file(&path).unwrap_err();
    assert!(matches!(err, TokenizerError::Read { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn garbage_json_error_names_the_file() {
    for (name, contents) in [
        ("garbage.json", "this is not json {"),
        ("not-a-tokenizer.json", "{\"a\": 1}"),
    ] {
        let path = scratch_file(name, contents);
        let err = Tokenizer::from_file(&path).unwrap_err();
        assert!(matches!(err, TokenizerError::Parse { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
    assert!(matches!(
        Tokenizer::from_bytes(b"\x00\xff"),
        Err(TokenizerError::Parse { .. })
    ));
}

#[test]
fn missing_bos_is_reported_by_name() {
    // A valid tokenizer.json with none of Gemma's control tokens.
    let json = r#"{"version": "1.0", "added_tokens": [], "normalizer": null, "pre_tokenizer": null,
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 1}, "unk_token": "<unk>"}}"#;
    let tok = Tokenizer::from_bytes(json).unwrap();
    let err = tok.special_tokens().unwrap_err();
    assert!(
        matches!(err, TokenizerError::MissingToken("<bos>")),
        "{err:?}"
    );
    assert!(err.to_string().contains("<bos>"), "{err}");
    assert_eq!(tok.loc_token_id(0), None);
    assert_eq!(tok.parse_loc(1), None);
}

#[test]
fn stream_holds_back_incomplete_characters_of_byte_level_tokenizers() {
    // GPT-2-style byte-level tokens: "€" (E2 82 AC) is spelled "â", "Ĥ", "¬". Nothing marks
    // these as byte tokens, so only the trailing U+FFFD of the partial decode can hold them back.
    let json = r#"{"version": "1.0", "added_tokens": [], "normalizer": null, "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {"type": "WordLevel", "vocab": {"â": 0, "Ĥ": 1, "¬": 2, "a": 3}, "unk_token": "a"}}"#;
    let tok = Tokenizer::from_bytes(json).unwrap();
    assert_eq!(tok.decode(&[0, 1, 2, 3], false).unwrap(), "€a");
    assert_eq!(stream_chunks(&tok, &[0, 1, 2, 3], false), ["€", "a"]);
}
