//! Tokenizers built from GGUF metadata alone, giving the same token ids as llama.cpp.
//!
//! A GGUF file carries its vocabulary as `tokenizer.ggml.*` keys. [`VocabSource`] holds those keys
//! (the GGUF parser fills it) and [`GgufTokenizer::from_vocab`] turns them into a
//! `tokenizers` pipeline configured to reproduce llama.cpp's `llama_tokenize`:
//!
//! * `tokenizer.ggml.model = "gpt2"`: byte-level BPE; the text is split with the regexes llama.cpp
//!   uses for `tokenizer.ggml.pre` (`smollm`, `llama-bpe`, `qwen2`, `default`, ...), mapped to the
//!   GPT-2 byte alphabet and merged by rank (see `bpe.rs`).
//! * `tokenizer.ggml.model = "llama"`: SentencePiece; spaces become `▁`, an optional `▁` prefix,
//!   highest-score merges (leftmost on ties) and `<0xNN>` byte fallback (see `spm.rs`).
//!
//! Token types follow llama.cpp: control (3) and unknown (2) tokens are *special*: they are
//! recognised in the text only when `parse_special` is true, and dropped by `decode` with
//! `skip_special`. User-defined tokens (4) are always recognised as whole tokens, before any
//! other processing, and always decoded. Tokens llama.cpp treats as end of generation
//! (`<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`, ...) are forced to control, as llama.cpp does.
//!
//! Known, deliberate differences from llama.cpp: special tokens that overlap in the text are
//! matched leftmost-longest (llama.cpp: longest token first, over the whole text); `decode` does
//! not apply llama.cpp's `clean_spaces` pass (so `decode(encode(x)) == x`).
//!
//! ```ignore
//! let tok = GgufTokenizer::from_vocab(&vocab)?;
//! let ids = tok.encode_prompt("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")?;
//! let mut out = tok.decoder();
//! for id in generated {
//!     if tok.stop_ids().contains(&id) { break; }
//!     if let Some(text) = out.step(id)? { print!("{text}"); }
//! }
//! ```

mod bpe;
mod error;
mod model;
mod spm;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use tokenizers::{
    step_decode_stream, AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, TokenizerImpl,
};

use model::VocabModel;

/// The `tokenizers` pipeline around this crate's vocabulary models.
type Tokenizer = TokenizerImpl<
    VocabModel,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

pub use error::TokenizerError;

/// The `tokenizer.ggml.*` metadata of a GGUF file.
#[derive(Debug, Clone, Default)]
pub struct VocabSource {
    /// `tokenizer.ggml.model`: `"gpt2"` or `"llama"` (others are refused with a clear error).
    pub model: String,
    /// `tokenizer.ggml.pre` (e.g. `"smollm"`, `"llama-bpe"`, `"qwen2"`, `"default"`).
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores`.
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.token_type` (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges` (`"a b"` pairs).
    pub merges: Option<Vec<String>>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.eot_token_id`.
    pub eot_id: Option<u32>,
    /// `tokenizer.ggml.eom_token_id`.
    pub eom_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix`.
    pub add_space_prefix: Option<bool>,
}

const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;

/// Token texts llama.cpp treats as end of generation (and forces to control type).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
    // fill-in-the-middle pad / repo / file separators, also end of generation in llama.cpp
    "<|fim_pad|>",
    "<fim-pad>",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<|file_sep|>",
];

/// A tokenizer built from GGUF metadata. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct GgufTokenizer {
    shared: Arc<Shared>,
}

struct Shared {
    /// Special tokens in the text are parsed.
    special: Tokenizer,
    /// Special tokens in the text are tokenized as ordinary text: a copy of `special` with that
    /// flag set, made on first use (a large vocabulary's copy costs tens of MB, and serving
    /// never needs it: prompts are rendered chat templates, parsed with specials).
    plain: std::sync::OnceLock<Tokenizer>,
    tokens: Vec<String>,
    model: String,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    stop_ids: Vec<u32>,
}

impl fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("model", &self.shared.model)
            .field("vocab_size", &self.shared.tokens.len())
            .field("bos_id", &self.shared.bos_id)
            .field("eos_id", &self.shared.eos_id)
            .field("add_bos", &self.shared.add_bos)
            .field("stop_ids", &self.shared.stop_ids)
            .finish()
    }
}

/// Checks a per-token array's length.
fn check_len<T>(field: &'static str, v: Option<&Vec<T>>, n: usize) -> Result<(), TokenizerError> {
    match v {
        Some(v) if v.len() != n => Err(TokenizerError::LengthMismatch {
            field,
            expected: n,
            actual: v.len(),
        }),
        _ => Ok(()),
    }
}

/// A special token id from the metadata, or llama.cpp's default for the vocabulary type; ids
/// outside the vocabulary are ignored (llama.cpp warns and ignores them too).
fn special_id(which: &str, id: Option<u32>, default: Option<u32>, n: usize) -> Option<u32> {
    match id {
        Some(id) if (id as usize) < n => Some(id),
        Some(id) => {
            tracing::warn!("{which} token id {id} is outside the vocabulary ({n} tokens); ignored");
            default.filter(|&d| (d as usize) < n)
        }
        None => default.filter(|&d| (d as usize) < n),
    }
}

impl GgufTokenizer {
    /// Builds the tokenizer from the GGUF `tokenizer.ggml.*` metadata.
    pub fn from_vocab(v: &VocabSource) -> Result<Self, TokenizerError> {
        let is_spm = match v.model.as_str() {
            "gpt2" => false,
            "llama" => true,
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };
        let n = v.tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        if u32::try_from(n).is_err() {
            return Err(TokenizerError::VocabTooLarge(n));
        }
        check_len("scores", v.scores.as_ref(), n)?;
        check_len("token_type", v.token_types.as_ref(), n)?;

        // llama.cpp renames empty tokens and refuses duplicates.
        let tokens: Vec<String> = v
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if t.is_empty() {
                    format!("[EMPTY_{i}]")
                } else {
                    t.clone()
                }
            })
            .collect();
        let mut seen: HashMap<&str, u32> = HashMap::with_capacity(n);
        for (id, t) in tokens.iter().enumerate() {
            if let Some(first) = seen.insert(t.as_str(), id as u32) {
                return Err(TokenizerError::DuplicateToken {
                    text: t.clone(),
                    first,
                    second: id as u32,
                });
            }
        }
        drop(seen);

        let mut types: Vec<i32> = v
            .token_types
            .clone()
            .unwrap_or_else(|| vec![TYPE_NORMAL; n]);
        let (bos_default, eos_default, unk_default) = if is_spm {
            (Some(1), Some(2), Some(0))
        } else {
            (None, None, None)
        };
        let bos_id = special_id("BOS", v.bos_id, bos_default, n);
        let eos_id = special_id("EOS", v.eos_id, eos_default, n);
        let unk_id = special_id("UNK", v.unk_id, unk_default, n);
        let mut stops: BTreeSet<u32> = BTreeSet::new();
        for (id, t) in tokens.iter().enumerate() {
            if EOG_TEXTS.contains(&t.as_str()) {
                stops.insert(id as u32);
                types[id] = TYPE_CONTROL;
            }
        }
        for id in [
            eos_id,
            special_id("EOT", v.eot_id, None, n),
            special_id("EOM", v.eom_id, None, n),
        ]
        .into_iter()
        .flatten()
        {
            stops.insert(id);
        }

        let (mut tokenizer, add_bos_default) = if is_spm {
            let add_space_prefix = v.add_space_prefix.unwrap_or(true);
            let model = spm::Spm::new(&tokens, v.scores.as_deref(), unk_id)?;
            let mut tok = Tokenizer::new(VocabModel::Spm(model));
            tok.with_normalizer(Some(spm::normalizer(add_space_prefix)?))
                .map_err(|e| TokenizerError::Build(e.to_string()))?;
            tok.with_decoder(Some(spm::decoder(add_space_prefix)?));
            (tok, true)
        } else {
            let cfg = bpe::pre_config(v.pre.as_deref())?;
            let merges = v.merges.as_ref().ok_or(TokenizerError::MissingMerges)?;
            let (model, dropped) = bpe::model(&tokens, merges, cfg.ignore_merges)?;
            if dropped > 0 {
                tracing::warn!("{dropped} BPE merges name pieces outside the vocabulary; ignored");
            }
            let mut tok = Tokenizer::new(VocabModel::Bpe(Box::new(model)));
            tok.with_pre_tokenizer(Some(bpe::pre_tokenizer(&cfg)?));
            tok.with_decoder(Some(bpe::decoder()));
            (tok, cfg.add_bos_default)
        };

        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter_map(|(t, &ty)| match ty {
                TYPE_CONTROL | TYPE_UNKNOWN => Some(AddedToken::from(t.clone(), true)),
                TYPE_USER_DEFINED => Some(AddedToken::from(t.clone(), false).normalized(false)),
                _ => None,
            })
            .collect();
        if !added.is_empty() {
            tokenizer
                .add_tokens(added)
                .map_err(|e| TokenizerError::Build(format!("special tokens: {e}")))?;
        }

        Ok(Self {
            shared: Arc::new(Shared {
                special: tokenizer,
                plain: std::sync::OnceLock::new(),
                tokens,
                model: v.model.clone(),
                bos_id,
                eos_id,
                add_bos: v.add_bos.unwrap_or(add_bos_default),
                add_eos: v.add_eos.unwrap_or(false),
                stop_ids: stops.into_iter().collect(),
            }),
        })
    }

    /// Text -> ids. `parse_special`: whether special/control tokens written in the text (e.g.
    /// `"<|im_start|>"`) become their ids (true, for rendered chat prompts) or are tokenized as
    /// plain text (false, for user text). User-defined tokens are recognised either way, as in
    /// llama.cpp. No BOS is added here.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let tok = if parse_special {
            &self.shared.special
        } else {
            self.shared.plain.get_or_init(|| {
                let mut plain = self.shared.special.clone();
                plain.set_encode_special_tokens(true);
                plain
            })
        };
        let encoding = tok
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// A rendered chat prompt -> ids: special tokens parsed; BOS prepended when the vocabulary
    /// says `add_bos` and the text does not already begin with the BOS token (and EOS appended
    /// when it says `add_eos` and the text does not already end with it).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = self.encode(text, true)?;
        if self.shared.add_bos {
            let bos = self
                .shared
                .bos_id
                .ok_or(TokenizerError::MissingSpecialToken("BOS"))?;
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        if self.shared.add_eos {
            let eos = self
                .shared
                .eos_id
                .ok_or(TokenizerError::MissingSpecialToken("EOS"))?;
            if ids.last() != Some(&eos) {
                ids.push(eos);
            }
        }
        Ok(ids)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<(), TokenizerError> {
        let vocab_size = self.shared.tokens.len();
        match ids.iter().find(|&&id| id as usize >= vocab_size) {
            Some(&id) => Err(TokenizerError::InvalidTokenId { id, vocab_size }),
            None => Ok(()),
        }
    }

    /// Ids -> text. `skip_special` drops control and unknown tokens (BOS, EOS, `<|im_end|>`...).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.check_ids(ids)?;
        self.shared
            .special
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// A streaming decoder for generated ids that skips special tokens and never splits a
    /// multi-byte character (see [`IncrementalDecoder`]).
    pub fn decoder(&self) -> IncrementalDecoder<'_> {
        self.decoder_with(true)
    }

    /// Like [`GgufTokenizer::decoder`], choosing whether special tokens are skipped.
    pub fn decoder_with(&self, skip_special: bool) -> IncrementalDecoder<'_> {
        IncrementalDecoder {
            tok: self,
            skip_special,
            state: StreamState::default(),
        }
    }

    /// Like [`GgufTokenizer::decoder_with`], owning a clone of the tokenizer.
    pub fn owned_decoder(&self, skip_special: bool) -> OwnedIncrementalDecoder {
        OwnedIncrementalDecoder {
            tok: self.clone(),
            skip_special,
            state: StreamState::default(),
        }
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.shared.tokens.len()
    }

    /// The BOS token id, if the vocabulary has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.shared.bos_id
    }

    /// The EOS token id, if the vocabulary has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.shared.eos_id
    }

    /// Whether [`GgufTokenizer::encode_prompt`] prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.shared.add_bos
    }

    /// Ids that end generation, sorted: EOS, EOT, EOM and, as llama.cpp does, every token whose
    /// text is one of `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `<|end|>`, `<|endoftext|>`...
    pub fn stop_ids(&self) -> &[u32] {
        &self.shared.stop_ids
    }

    /// Whether `id` ends generation.
    pub fn is_stop(&self, id: u32) -> bool {
        self.shared.stop_ids.binary_search(&id).is_ok()
    }

    /// The raw vocabulary text of a token (`"Ġthe"`, `"▁the"`, `"<0x0A>"`, `"<|im_end|>"`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.shared.tokens.get(id as usize).map(String::as_str)
    }

    /// The BOS token's text (e.g. `"<bos>"`).
    pub fn bos_text(&self) -> Option<&str> {
        self.shared.bos_id.and_then(|id| self.token_text(id))
    }

    /// The EOS token's text (e.g. `"<|im_end|>"`).
    pub fn eos_text(&self) -> Option<&str> {
        self.shared.eos_id.and_then(|id| self.token_text(id))
    }
}

/// State of a streaming decode: the window of recent ids and the text already returned for
/// them (the bookkeeping of `tokenizers`' `DecodeStream`).
#[derive(Debug, Default, Clone)]
struct StreamState {
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
}

impl StreamState {
    fn step(
        &mut self,
        tok: &GgufTokenizer,
        skip_special: bool,
        id: u32,
    ) -> Result<Option<String>, TokenizerError> {
        tok.check_ids(&[id])?;
        step_decode_stream(
            &tok.shared.special,
            vec![id],
            skip_special,
            &mut self.ids,
            &mut self.prefix,
            &mut self.prefix_index,
        )
        .map_err(|e| TokenizerError::Decode(e.to_string()))
    }
}

/// Turns generated ids into text one id at a time, holding back incomplete UTF-8 sequences
/// (byte tokens, partial byte-level pieces) until the character is complete. This is
/// `tokenizers`' `DecodeStream`: it decodes a short window of recent ids rather than each id
/// alone, so spaces and multi-byte characters come out exactly as a full decode would.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder<'a> {
    tok: &'a GgufTokenizer,
    skip_special: bool,
    state: StreamState,
}

impl IncrementalDecoder<'_> {
    /// Feeds one id; returns the new text, or `None` while a character is incomplete (or the
    /// token produced no text, e.g. a skipped special token).
    pub fn step(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.state.step(self.tok, self.skip_special, id)
    }
}

/// An [`IncrementalDecoder`] that owns (a cheap clone of) its tokenizer, for streams that
/// outlive the borrow, e.g. inside a spawned task.
#[derive(Debug, Clone)]
pub struct OwnedIncrementalDecoder {
    tok: GgufTokenizer,
    skip_special: bool,
    state: StreamState,
}

impl OwnedIncrementalDecoder {
    /// See [`IncrementalDecoder::step`].
    pub fn step(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.state.step(&self.tok, self.skip_special, id)
    }
}

#[cfg(test)]
mod tests;
