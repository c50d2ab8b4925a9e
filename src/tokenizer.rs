//! PaliGemma's tokenizer: Gemma's SentencePiece-derived BPE plus `<loc0000>`..`<loc1023>`,
//! `<seg000>`..`<seg127>` and `<image>`, loaded from a Hugging Face `tokenizer.json`.
//!
//! Everything here matches the Python `tokenizers` library as `PaliGemmaProcessor` calls it:
//! the processor forces `add_bos_token`/`add_eos_token` off and writes `<bos>` into the prompt
//! string itself, so [`Tokenizer::encode`] never adds special tokens.

use std::path::{Path, PathBuf};

/// Number of `<locNNNN>` tokens: box coordinates are quantised to 1024 bins.
pub const LOC_BINS: u32 = 1024;
/// Number of `<segNNN>` tokens: the VQ-VAE mask codebook has 128 entries.
pub const SEG_CODES: u32 = 128;

/// What the decoder emits for bytes that are not (yet) valid UTF-8.
const REPLACEMENT: char = '\u{FFFD}';

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read tokenizer file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin} is not a valid tokenizer.json: {source}")]
    Parse {
        origin: String,
        #[source]
        source: tokenizers::Error,
    },
    #[error("the tokenizer has no {0:?} token")]
    MissingToken(&'static str),
    #[error("encoding {text:?} failed: {source}")]
    Encode {
        text: String,
        #[source]
        source: tokenizers::Error,
    },
    #[error("decoding failed: {0}")]
    Decode(#[source] tokenizers::Error),
    #[error("streamed text {actual:?} does not extend the text already emitted ({prefix:?})")]
    Stream { prefix: String, actual: String },
}

pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// The ids the prompt layout and generation loop need, looked up by name so that a tokenizer
/// with a different vocabulary (or none of PaliGemma's extras) is caught at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    /// `None` for a plain Gemma tokenizer; the model config's `image_token_index` is authoritative.
    pub image: Option<u32>,
    /// The prompt/answer separator the processor appends to every prompt.
    pub newline: u32,
}

impl SpecialTokens {
    pub fn from_tokenizer(tokenizer: &Tokenizer) -> Result<Self> {
        let require = |name: &'static str| {
            tokenizer
                .token_id(name)
                .ok_or(TokenizerError::MissingToken(name))
        };
        Ok(Self {
            bos: require("<bos>")?,
            eos: require("<eos>")?,
            pad: require("<pad>")?,
            image: tokenizer.token_id("<image>"),
            newline: require("\n")?,
        })
    }
}

/// A loaded `tokenizer.json`. Cheap to share by reference; all methods take `&self`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    // The wrapped tokenizer's Debug prints the whole 257k-entry vocabulary.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    /// Loads a `tokenizer.json`. Errors name the file, whether it is missing or malformed.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        // Reading separately keeps the io::Error (and the path) instead of the crate's
        // stringly "No such file or directory".
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&bytes, path.display().to_string())
    }

    /// Loads a `tokenizer.json` already in memory.
    pub fn from_bytes(bytes: impl AsRef<[u8]>) -> Result<Self> {
        Self::parse(bytes.as_ref(), "tokenizer bytes".to_string())
    }

    fn parse(bytes: &[u8], origin: String) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|source| TokenizerError::Parse { origin, source })?;
        Ok(Self { inner })
    }

    /// The wrapped `tokenizers` tokenizer, for anything this wrapper does not cover.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Ids of `text` with no special tokens added, as Python's
    /// `Tokenizer.encode(text, add_special_tokens=False).ids`. Special tokens written in the
    /// text (`<bos>`, `<image>`, `<loc0042>`) are still matched as single tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // encode_fast skips offset tracking, which only the offsets (unused here) depend on.
        let encoding =
            self.inner
                .encode_fast(text, false)
                .map_err(|source| TokenizerError::Encode {
                    text: text.to_string(),
                    source,
                })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, as Python's `Tokenizer.decode(ids, skip_special_tokens=...)`. Ids outside
    /// the vocabulary (e.g. the embedding's padding rows) are dropped, as in Python.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(TokenizerError::Decode)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids including added tokens (257,153 for PaliGemma). The model's embedding
    /// has more rows (padded to a multiple of 64); those ids have no token.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn special_tokens(&self) -> Result<SpecialTokens> {
        SpecialTokens::from_tokenizer(self)
    }

    /// Whether `id` is a special added token, i.e. one `decode(.., true)` drops.
    pub fn is_special(&self, id: u32) -> bool {
        self.id_to_token(id)
            .is_some_and(|token| self.inner.get_added_vocabulary().is_special_token(&token))
    }

    /// Id of `<locNNNN>` for a box-coordinate bin, or `None` if the bin or token does not exist.
    pub fn loc_token_id(&self, bin: u32) -> Option<u32> {
        (bin < LOC_BINS).then(|| self.token_id(&format!("<loc{bin:04}>")))?
    }

    /// Id of `<segNNN>` for a mask codebook entry, or `None` if the code or token does not exist.
    pub fn seg_token_id(&self, code: u32) -> Option<u32> {
        (code < SEG_CODES).then(|| self.token_id(&format!("<seg{code:03}>")))?
    }

    /// The bin of a `<locNNNN>` token id; `None` for any other id.
    pub fn parse_loc(&self, id: u32) -> Option<u32> {
        parse_numbered(&self.id_to_token(id)?, "<loc", 4).filter(|&bin| bin < LOC_BINS)
    }

    /// The codebook entry of a `<segNNN>` token id; `None` for any other id.
    pub fn parse_seg(&self, id: u32) -> Option<u32> {
        parse_numbered(&self.id_to_token(id)?, "<seg", 3).filter(|&code| code < SEG_CODES)
    }

    /// Whether `id` is a byte-fallback token `<0xNN>`, matched the way the ByteFallback
    /// decoder matches it.
    fn is_byte_token(&self, id: u32) -> bool {
        self.id_to_token(id).is_some_and(|t| {
            t.len() == 6
                && t.starts_with("<0x")
                && t.ends_with('>')
                && u8::from_str_radix(&t[3..5], 16).is_ok()
        })
    }

    /// A streaming detokenizer over this tokenizer; see [`TextStream`].
    pub fn stream(&self, skip_special_tokens: bool) -> TextStream<'_> {
        TextStream::new(self, skip_special_tokens)
    }
}

/// Parses `<prefixDDDD>` with exactly `digits` ASCII digits, so look-alikes such as `<loc123>`
/// (which the tokenizer splits into pieces anyway) never parse.
fn parse_numbered(token: &str, prefix: &str, digits: usize) -> Option<u32> {
    let number = token.strip_prefix(prefix)?.strip_suffix('>')?;
    let well_formed = number.len() == digits && number.bytes().all(|b| b.is_ascii_digit());
    well_formed.then(|| number.parse().ok())?
}

/// Turns generated ids into text as they arrive, so that concatenating every chunk (including
/// [`TextStream::finish`]'s) gives exactly `decode(all_ids)`.
///
/// Only a window of recent ids is re-decoded, so the cost per token stays constant. A chunk is
/// released only at a "clean" cut, where decoding the two sides separately equals decoding them
/// together. With Gemma's decoder (Replace ▁ → space, ByteFallback, Fuse) that fails only inside a
/// run of `<0xNN>` byte tokens, which ByteFallback turns into text all at once (or into one U+FFFD
/// per byte if the run as a whole is not UTF-8), so the stream holds back while:
/// - the last token is a byte token (the run may continue), or
/// - the last token is special and `skip_special_tokens` drops it (a byte run may continue
///   across it), or
/// - the text ends with U+FFFD (an incomplete character, or a decoder this reasoning misses).
#[derive(Debug)]
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    skip_special_tokens: bool,
    /// Ids from the start of the last released chunk on: the released chunk is kept as context
    /// for decoders whose output depends on the previous token.
    window: Vec<u32>,
    /// How many ids of `window` belong to the already released chunk.
    released: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            skip_special_tokens,
            window: Vec::new(),
            released: 0,
        }
    }

    /// Adds one id; returns the text it completes, if any can be released yet.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.window.push(id);
        if !self.at_clean_cut(id) {
            return Ok(None);
        }
        let new_text = self.pending_text()?;
        if new_text.is_empty() || new_text.ends_with(REPLACEMENT) {
            return Ok(None);
        }
        self.window.drain(..self.released);
        self.released = self.window.len();
        Ok(Some(new_text))
    }

    /// Releases whatever is held back (e.g. a byte run that never became valid UTF-8, which
    /// then reads as U+FFFD exactly as a one-shot decode shows it). Call once generation ends.
    pub fn finish(self) -> Result<Option<String>> {
        let rest = self.pending_text()?;
        Ok((!rest.is_empty()).then_some(rest))
    }

    fn at_clean_cut(&self, last: u32) -> bool {
        let invisible = self.skip_special_tokens && self.tokenizer.is_special(last);
        !invisible && !self.tokenizer.is_byte_token(last)
    }

    /// Text of the ids after the released chunk, decoded in context of that chunk.
    fn pending_text(&self) -> Result<String> {
        let decode = |ids: &[u32]| self.tokenizer.decode(ids, self.skip_special_tokens);
        let context = decode(&self.window[..self.released])?;
        let all = decode(&self.window)?;
        match all.strip_prefix(context.as_str()) {
            Some(rest) => Ok(rest.to_string()),
            None => Err(TokenizerError::Stream {
                prefix: context,
                actual: all,
            }),
        }
    }
}
