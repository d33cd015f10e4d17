//! SentencePiece vocabularies (`tokenizer.ggml.model = "llama"`), as llama.cpp tokenizes them.
//!
//! llama.cpp's SPM tokenizer replaces spaces with `▁` (U+2581), optionally prepends one
//! (`add_space_prefix`), splits the text into characters and then repeatedly merges the adjacent
//! pair whose concatenation is a token with the highest score (leftmost on ties). Characters that
//! never become tokens are written as `<0xNN>` byte tokens. There is no pre-tokenizer: a text
//! fragment between special tokens is tokenized as one piece.
//!
//! The same procedure is a BPE whose merges are every split of every token into two tokens,
//! ranked by the score of the merged token (highest first): at each step BPE applies the
//! lowest-ranked merge present, leftmost on ties. With `byte_fallback` for unknown characters, a
//! normalizer for the spaces and the usual SentencePiece decoders, the `tokenizers` crate then
//! reproduces llama.cpp. (One difference remains by construction: two *different* tokens with
//! exactly the same score are ordered by id here, by position in llama.cpp; real SentencePiece
//! vocabularies give every normal token its own score.)

use std::collections::HashSet;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::{DecoderWrapper, NormalizerWrapper};

use super::TokenizerError;

/// SentencePiece's escaped space.
pub(super) const SPACE: &str = "\u{2581}";

/// Derives the BPE merges from the vocabulary and scores: for each token, each split into two
/// pieces that are both tokens, ranked by the token's score (descending), then by token id, then
/// by split position.
pub(super) fn derive_merges(tokens: &[String], scores: Option<&[f32]>) -> Vec<(String, String)> {
    let index: HashSet<&str> = tokens.iter().map(String::as_str).collect();
    // (token id, byte offset of the split)
    let mut found: Vec<(u32, u32)> = Vec::new();
    for (id, text) in tokens.iter().enumerate() {
        for (split, _) in text.char_indices().skip(1) {
            if index.contains(&text[..split]) && index.contains(&text[split..]) {
                found.push((id as u32, split as u32));
            }
        }
    }
    let score = |id: u32| {
        scores
            .and_then(|s| s.get(id as usize))
            .copied()
            .unwrap_or(0.0)
    };
    found.sort_unstable_by(|a, b| {
        score(b.0)
            .total_cmp(&score(a.0))
            .then(a.0.cmp(&b.0))
            .then(a.1.cmp(&b.1))
    });
    found
        .into_iter()
        .map(|(id, split)| {
            let text = &tokens[id as usize];
            let (left, right) = text.split_at(split as usize);
            (left.to_string(), right.to_string())
        })
        .collect()
}

/// Builds the BPE model that reproduces llama.cpp's SPM tokenizer.
pub(super) fn model(
    tokens: &[String],
    scores: Option<&[f32]>,
    unk: Option<&str>,
) -> Result<BPE, TokenizerError> {
    let merges = derive_merges(tokens, scores);
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id as u32))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk.to_string());
    }
    builder
        .build()
        .map_err(|e| TokenizerError::Build(format!("SentencePiece model: {e}")))
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

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn merges_follow_scores() {
        let tokens = strings(&["a", "b", "c", "ab", "bc", "abc"]);
        let scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0];
        let merges = derive_merges(&tokens, Some(&scores));
        let got: Vec<(&str, &str)> = merges
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(got, vec![("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]);
    }

    #[test]
    fn merges_split_on_characters_not_bytes() {
        let tokens = strings(&["é", "x", "éx"]);
        let merges = derive_merges(&tokens, None);
        assert_eq!(merges, vec![("é".to_string(), "x".to_string())]);
    }
}
