//! SentencePiece vocabularies (`tokenizer.ggml.model = "llama"`), as llama.cpp tokenizes them.
//!
//! llama.cpp's SPM tokenizer replaces spaces with `▁` (U+2581), optionally prepends one
//! (`add_space_prefix`), splits the text into characters and then repeatedly merges the adjacent
//! pair whose concatenation is a token with the highest score (leftmost on ties). Characters that
//! never become tokens are written as `<0xNN>` byte tokens. There is no pre-tokenizer: a text
//! fragment between special tokens is tokenized as one piece.
//!
//! [`Spm`] is that procedure (llama.cpp's `llm_tokenizer_spm`): a priority queue of adjacent
//! pairs whose concatenation is a token, highest score first, leftmost on ties. It holds only
//! the vocabulary and the scores: an earlier version expressed it as a BPE with every split of
//! every token as a merge, which for Gemma 3's 262,144 tokens held millions of merges (over
//! 100 MB of memory).

use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::{DecoderWrapper, NormalizerWrapper, Token};

use super::TokenizerError;

/// SentencePiece's escaped space.
pub(super) const SPACE: &str = "\u{2581}";

/// A SentencePiece vocabulary: token texts, their ids and scores. Cheap to clone.
#[derive(Clone)]
pub(super) struct Spm {
    shared: Arc<Vocab>,
}

struct Vocab {
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    scores: Vec<f32>,
    /// The `<0xNN>` token of each byte, where the vocabulary has it.
    bytes: [Option<u32>; 256],
    unk: Option<u32>,
}

/// A piece of the text being merged: a byte range, and its neighbours still alive.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// Two adjacent symbols whose concatenation is a token.
struct Pair {
    score: f32,
    left: usize,
    right: usize,
    /// Bytes of the concatenation: a pair is stale once either side has changed size.
    len: usize,
}

impl PartialEq for Pair {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for Pair {}
impl PartialOrd for Pair {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pair {
    /// Highest score first, then leftmost (the heap pops the greatest).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.left.cmp(&self.left))
    }
}

impl Spm {
    /// # Errors
    /// A token that appears twice (the caller checks this first), or an unknown token id that
    /// is out of range.
    pub(super) fn new(
        tokens: &[String],
        scores: Option<&[f32]>,
        unk: Option<u32>,
    ) -> Result<Self, TokenizerError> {
        let ids: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.clone(), id as u32))
            .collect();
        let mut bytes = [None; 256];
        for (b, slot) in bytes.iter_mut().enumerate() {
            *slot = ids.get(&format!("<0x{b:02X}>")).copied();
        }
        let scores = match scores {
            Some(s) => s.to_vec(),
            None => vec![0.0; tokens.len()],
        };
        if unk.is_some_and(|u| u as usize >= tokens.len()) {
            return Err(TokenizerError::Build(
                "unknown-token id out of range".into(),
            ));
        }
        Ok(Self {
            shared: Arc::new(Vocab {
                tokens: tokens.to_vec(),
                ids,
                scores,
                bytes,
                unk,
            }),
        })
    }

    pub(super) fn id(&self, text: &str) -> Option<u32> {
        self.shared.ids.get(text).copied()
    }

    pub(super) fn text(&self, id: u32) -> Option<&str> {
        self.shared.tokens.get(id as usize).map(String::as_str)
    }

    pub(super) fn len(&self) -> usize {
        self.shared.tokens.len()
    }

    pub(super) fn vocab(&self) -> HashMap<String, u32> {
        self.shared.ids.clone()
    }

    /// Characters, merged pairwise by the score of the token they form until no adjacent pair
    /// forms a token; pieces that are not tokens (single characters outside the vocabulary)
    /// become their bytes' `<0xNN>` tokens, or the unknown token.
    pub(super) fn tokenize(&self, text: &str) -> Vec<Token> {
        let v = &*self.shared;
        let mut symbols: Vec<Symbol> = text
            .char_indices()
            .map(|(start, c)| Symbol {
                start,
                len: c.len_utf8(),
                prev: None,
                next: None,
            })
            .collect();
        let n = symbols.len();
        for (i, s) in symbols.iter_mut().enumerate() {
            s.prev = i.checked_sub(1);
            s.next = (i + 1 < n).then_some(i + 1);
        }
        let mut queue = BinaryHeap::new();
        let pair = |symbols: &[Symbol], left: usize, right: usize| -> Option<Pair> {
            let (l, r) = (symbols[left], symbols[right]);
            let joined = &text[l.start..r.start + r.len];
            v.ids.get(joined).map(|&id| Pair {
                score: v.scores.get(id as usize).copied().unwrap_or(0.0),
                left,
                right,
                len: joined.len(),
            })
        };
        for i in 1..n {
            queue.extend(pair(&symbols, i - 1, i));
        }
        while let Some(p) = queue.pop() {
            let (l, r) = (symbols[p.left], symbols[p.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != p.len {
                continue;
            }
            symbols[p.left].len += r.len;
            symbols[p.left].next = r.next;
            symbols[p.right].len = 0;
            if let Some(next) = r.next {
                symbols[next].prev = Some(p.left);
            }
            if let Some(prev) = symbols[p.left].prev {
                queue.extend(pair(&symbols, prev, p.left));
            }
            if let Some(next) = symbols[p.left].next {
                queue.extend(pair(&symbols, p.left, next));
            }
        }
        let mut out = Vec::new();
        let mut at = (n > 0).then_some(0);
        while let Some(i) = at {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match v.ids.get(piece) {
                Some(&id) => out.push(Token::new(
                    id,
                    piece.to_string(),
                    (s.start, s.start + s.len),
                )),
                None => {
                    for (k, b) in piece.bytes().enumerate() {
                        let offsets = (s.start + k, s.start + k + 1);
                        if let Some(id) = v.bytes[b as usize].or(v.unk) {
                            out.push(Token::new(id, v.tokens[id as usize].clone(), offsets));
                        }
                    }
                }
            }
            at = s.next;
        }
        out
    }
}

/// Spaces to `▁`, and a leading `▁` on every text fragment when `add_space_prefix` (llama.cpp
/// prefixes the first fragment and every fragment that follows a special token, which is every
/// fragment).
pub(super) fn normalizer(add_space_prefix: bool) -> Result<NormalizerWrapper, TokenizerError> {
    let replace = Replace::new(" ", SPACE)
        .map_err(|e| TokenizerError::Build(format!("space normalizer: {e}")))?;
    if !add_space_prefix {
        return Ok(replace.into());
    }
    Ok(
        NormalizerSequence::new(vec![replace.into(), Prepend::new(SPACE.to_string()).into()])
            .into(),
    )
}

/// `▁` back to spaces, `<0xNN>` tokens back to bytes, and the prefix space removed.
pub(super) fn decoder(add_space_prefix: bool) -> Result<DecoderWrapper, TokenizerError> {
    let replace = Replace::new(SPACE, " ")
        .map_err(|e| TokenizerError::Build(format!("space decoder: {e}")))?;
    let mut steps: Vec<DecoderWrapper> = vec![
        DecoderWrapper::Replace(replace),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        steps.push(Strip::new(' ', 1, 0).into());
    }
    Ok(DecoderSequence::new(steps).into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn spm(tokens: &[&str], scores: &[f32]) -> Spm {
        let tokens: Vec<String> = tokens.iter().map(|s| s.to_string()).collect();
        Spm::new(&tokens, Some(scores), None).unwrap()
    }

    fn ids(m: &Spm, text: &str) -> Vec<u32> {
        m.tokenize(text).iter().map(|t| t.id).collect()
    }

    #[test]
    fn the_highest_scoring_pair_merges_first() {
        // "bc" outscores "ab": a + bc, not ab + c, and "abc" is never reached through "ab".
        let m = spm(
            &["a", "b", "c", "ab", "bc", "abc"],
            &[0.0, 0.0, 0.0, -2.0, -1.0, -3.0],
        );
        assert_eq!(ids(&m, "abc"), [5]);
        let m = spm(&["a", "b", "c", "ab", "bc"], &[0.0, 0.0, 0.0, -2.0, -1.0]);
        assert_eq!(ids(&m, "abc"), [0, 4]);
        let m = spm(&["a", "b", "c", "ab", "bc"], &[0.0, 0.0, 0.0, -1.0, -2.0]);
        assert_eq!(ids(&m, "abc"), [3, 2]);
    }

    #[test]
    fn equal_scores_merge_leftmost_first() {
        let m = spm(&["a", "aa"], &[0.0, -1.0]);
        assert_eq!(ids(&m, "aaa"), [1, 0]);
    }

    #[test]
    fn characters_outside_the_vocabulary_become_bytes_with_offsets() {
        let m = spm(&["x", "<0xC3>", "<0xA9>"], &[0.0, 0.0, 0.0]);
        let t = m.tokenize("xé");
        let got: Vec<(u32, (usize, usize))> = t.iter().map(|t| (t.id, t.offsets)).collect();
        assert_eq!(got, [(0, (0, 1)), (1, (1, 2)), (2, (2, 3))]);
        assert!(m.tokenize("").is_empty());
    }
}
