//! Byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`), as llama.cpp tokenizes them.
//!
//! llama.cpp splits the text with a list of regexes chosen by `tokenizer.ggml.pre`, applied one
//! after the other, each splitting every piece left by the previous one and keeping both the
//! matches and the text between them (`Isolated`). Each piece is then mapped to the GPT-2 byte
//! alphabet and merged by BPE rank. Here that is a `Sequence` of `Split` pre-tokenizers followed
//! by a `ByteLevel` pre-tokenizer that only maps bytes, a `BPE` model built from the vocabulary
//! and merges, and a `ByteLevel` decoder.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::TokenizerError;

/// GPT-2's pre-tokenizer regex as llama.cpp writes it (no trailing `|\s+`).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// Llama 3's regex (case-insensitive contractions spelled out, as in llama.cpp).
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 2's regex: like Llama 3 but single digits.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const BLOOM: &str = " ?[^(\\s|.,!?…。，、।۔،)]+";

const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a pre-tokenizer name (`tokenizer.ggml.pre`) is handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PreConfig {
    /// The regexes, applied in order.
    pub regexes: Vec<&'static str>,
    /// Whether a piece that is itself a token skips the merges (llama.cpp `ignore_merges`).
    pub ignore_merges: bool,
    /// llama.cpp's default for `add_bos` with this pre-tokenizer (metadata overrides it).
    pub add_bos_default: bool,
}

/// The regexes llama.cpp (`llm_tokenizer_bpe`) uses for a given `tokenizer.ggml.pre`.
pub(super) fn pre_config(pre: Option<&str>) -> Result<PreConfig, TokenizerError> {
    let cfg = |regexes: Vec<&'static str>| PreConfig {
        regexes,
        ignore_merges: false,
        add_bos_default: false,
    };
    let name = pre.unwrap_or("default");
    Ok(match name {
        "default" => cfg(vec![
            r"[\p{P}\$\+<=>\^~\|]+",
            GPT2,
            r"\p{N}+",
            "[0-9][0-9][0-9]",
        ]),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => PreConfig {
            regexes: vec![LLAMA3],
            ignore_merges: true,
            add_bos_default: true,
        },
        "dbrx" | "smaug-bpe" | "chatglm-bpe" => cfg(vec![LLAMA3]),
        "qwen2" | "stablelm2" | "megrez" => cfg(vec![QWEN2]),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
        | "minerva-7b" => cfg(vec![r"\p{N}", GPT2]),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v1-en" | "jina-v2-es"
        | "jina-v2-de" | "jina-v2-code" | "roberta-bpe" | "mpt" | "olmo" | "jais" => {
            cfg(vec![GPT2])
        }
        "falcon" => cfg(vec![
            r"[\p{P}\$\+<=>\^~\|`]+",
            GPT2,
            "[0-9][0-9][0-9]",
        ]),
        "deepseek-coder" => cfg(vec![
            "[\r\n]",
            r"\s?\p{L}+",
            r"\s?\p{P}+",
            "[一-龥ࠀ-一가-퟿]+",
            r"\p{N}",
        ]),
        "deepseek-v3" => cfg(vec![
            r"\p{N}{1,3}",
            "[一-龥぀-ゟ゠-ヿ]+",
            "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
        ]),
        "poro-chat" | "bloom" | "gpt3-finnish" => cfg(vec![BLOOM]),
        "viking" => cfg(vec![BLOOM, r"\p{N}"]),
        "tekken" => PreConfig {
            regexes: vec![TEKKEN],
            ignore_merges: true,
            add_bos_default: true,
        },
        "chameleon" => PreConfig {
            regexes: vec![
                "<sentinel:[0-9]+>",
                "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
                "([\\t\\n]|    |  )",
                r"\p{N}",
                r"[\p{P}!-/:-@\[-`{-~]",
                GPT2,
            ],
            ignore_merges: false,
            add_bos_default: true,
        },
        other => return Err(TokenizerError::UnsupportedPreTokenizer(other.to_string())),
    })
}

/// The pre-tokenizer: the regex splits, then the byte-to-character mapping.
pub(super) fn pre_tokenizer(cfg: &PreConfig) -> Result<PreTokenizerWrapper, TokenizerError> {
    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(cfg.regexes.len() + 1);
    for re in &cfg.regexes {
        let split = Split::new(
            SplitPattern::Regex((*re).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| TokenizerError::Build(format!("pre-tokenizer regex {re:?}: {e}")))?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());
    Ok(Sequence::new(steps).into())
}

/// The decoder: GPT-2 byte alphabet back to bytes.
pub(super) fn decoder() -> DecoderWrapper {
    ByteLevelDecoder::new(false, false, false).into()
}

/// Splits a GGUF merge line `"a b"` the way llama.cpp does: at the first space after the first
/// byte, so that a first part that is itself a space still works.
fn split_merge(line: &str) -> Option<(&str, &str)> {
    let pos = line.bytes().skip(1).position(|b| b == b' ')? + 1;
    Some((&line[..pos], &line[pos + 1..]))
}

/// Builds the BPE model. Merges whose parts or result are not tokens are dropped (llama.cpp
/// would merge them into a non-token and then fall back to bytes; well-formed files have none).
pub(super) fn model(
    tokens: &[String],
    merges: &[String],
    ignore_merges: bool,
) -> Result<(BPE, usize), TokenizerError> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id as u32))
        .collect();
    let mut kept: Vec<(String, String)> = Vec::with_capacity(merges.len());
    let mut dropped = 0usize;
    let mut joined = String::new();
    for line in merges {
        let Some((a, b)) = split_merge(line) else {
            dropped += 1;
            continue;
        };
        joined.clear();
        joined.push_str(a);
        joined.push_str(b);
        if vocab.contains_key(a) && vocab.contains_key(b) && vocab.contains_key(joined.as_str()) {
            kept.push((a.to_string(), b.to_string()));
        } else {
            dropped += 1;
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, kept)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| TokenizerError::Build(format!("byte-level BPE model: {e}")))?;
    Ok((bpe, dropped))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn merge_lines_split_like_llama_cpp() {
        assert_eq!(split_merge("Ġ t"), Some(("Ġ", "t")));
        assert_eq!(split_merge("  x"), Some((" ", "x")));
        assert_eq!(split_merge("ab"), None);
        assert_eq!(split_merge("é e"), Some(("é", "e")));
    }

    #[test]
    fn known_pre_tokenizers_compile() {
        for name in [
            "default",
            "llama-bpe",
            "llama3",
            "qwen2",
            "smollm",
            "gpt-2",
            "falcon",
            "deepseek-coder",
            "deepseek-v3",
            "bloom",
            "viking",
            "tekken",
            "chameleon",
            "dbrx",
        ] {
            let cfg = pre_config(Some(name)).unwrap();
            pre_tokenizer(&cfg).unwrap();
        }
        assert!(pre_config(None).is_ok());
        assert!(matches!(
            pre_config(Some("no-such-pre")),
            Err(TokenizerError::UnsupportedPreTokenizer(name)) if name == "no-such-pre"
        ));
    }

    #[test]
    fn llama3_ignores_merges_and_adds_bos() {
        let cfg = pre_config(Some("llama-bpe")).unwrap();
        assert!(cfg.ignore_merges && cfg.add_bos_default);
        let cfg = pre_config(Some("smollm")).unwrap();
        assert!(!cfg.ignore_merges && !cfg.add_bos_default);
        assert_eq!(cfg.regexes.len(), 2);
    }

    #[test]
    fn bad_merges_are_dropped() {
        let tokens: Vec<String> = ["a", "b", "ab", "c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let merges: Vec<String> = ["a b", "b c", "nonsense"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (_, dropped) = model(&tokens, &merges, false).unwrap();
        assert_eq!(dropped, 2);
    }
}
