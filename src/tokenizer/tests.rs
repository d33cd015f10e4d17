//! Unit tests on tiny synthetic vocabularies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

/// GPT-2's byte -> character table.
fn byte_chars() -> Vec<char> {
    let mut visible: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    visible.extend(0xA1..=0xAC);
    visible.extend(0xAE..=0xFF);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if visible.contains(&b) {
                char::from_u32(b).unwrap()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap()
            }
        })
        .collect()
}

fn bpe_vocab() -> VocabSource {
    let mut tokens = vec![
        "<|endoftext|>".to_string(),
        "<|im_start|>".to_string(),
        "<|im_end|>".to_string(),
    ];
    let mut types = vec![3, 3, 3];
    for c in byte_chars() {
        tokens.push(c.to_string());
        types.push(1);
    }
    let merges = [
        "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d",
    ];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    VocabSource {
        model: "gpt2".into(),
        pre: Some("smollm".into()),
        tokens,
        token_types: Some(types),
        merges: Some(merges.iter().map(|s| s.to_string()).collect()),
        bos_id: Some(1),
        eos_id: Some(2),
        add_bos: Some(false),
        ..Default::default()
    }
}

fn id_of(tok: &GgufTokenizer, text: &str) -> u32 {
    (0..tok.vocab_size() as u32)
        .find(|&id| tok.token_text(id) == Some(text))
        .unwrap()
}

#[test]
fn bpe_merges_and_specials() {
    let tok = GgufTokenizer::from_vocab(&bpe_vocab()).unwrap();
    let hello = id_of(&tok, "hello");
    let world = id_of(&tok, "Ġworld");
    assert_eq!(
        tok.encode("hello world", false).unwrap(),
        vec![hello, world]
    );
    // parse_special decides whether "<|im_start|>" is one token or text
    assert_eq!(
        tok.encode("<|im_start|>hello", true).unwrap(),
        vec![1, hello]
    );
    let plain = tok.encode("<|im_start|>hello", false).unwrap();
    assert!(plain.len() > 2 && !plain.contains(&1));
    assert_eq!(tok.decode(&plain, true).unwrap(), "<|im_start|>hello");
    // add_bos is false: no BOS
    assert_eq!(tok.encode_prompt("hello").unwrap(), vec![hello]);
    assert_eq!(tok.stop_ids(), &[0, 2]);
    assert!(tok.is_stop(2) && !tok.is_stop(1));
    assert_eq!(tok.bos_text(), Some("<|im_start|>"));
    assert_eq!(tok.eos_text(), Some("<|im_end|>"));
    assert_eq!(tok.encode("", true).unwrap(), Vec::<u32>::new());
}

#[test]
fn bpe_digits_are_split_for_smollm() {
    let tok = GgufTokenizer::from_vocab(&bpe_vocab()).unwrap();
    let ids = tok.encode("a 12", false).unwrap();
    // "a", " " (isolated before the digits), "1", "2"
    assert_eq!(ids.len(), 4);
}

#[test]
fn bpe_decode_skips_specials_and_streams_multibyte() {
    let tok = GgufTokenizer::from_vocab(&bpe_vocab()).unwrap();
    let text = "héllo 🦀 world";
    let mut ids = tok.encode(text, false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    ids.push(2);
    assert_eq!(tok.decode(&ids, true).unwrap(), text);
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        format!("{text}<|im_end|>")
    );
    let mut dec = tok.decoder();
    let mut out = String::new();
    let mut held = 0;
    for &id in &ids {
        match dec.step(id).unwrap() {
            Some(piece) => out.push_str(&piece),
            None => held += 1,
        }
    }
    assert_eq!(out, text);
    assert!(
        held >= 3,
        "the crab's 4 bytes must be held back until complete"
    );
}

#[test]
fn invalid_ids_are_errors() {
    let tok = GgufTokenizer::from_vocab(&bpe_vocab()).unwrap();
    let n = tok.vocab_size() as u32;
    assert!(matches!(
        tok.decode(&[n], false),
        Err(TokenizerError::InvalidTokenId { id, .. }) if id == n
    ));
    assert!(tok.decoder().step(n).is_err());
}

#[test]
fn vocabulary_errors() {
    let mut v = bpe_vocab();
    v.model = "bert".into();
    let err = GgufTokenizer::from_vocab(&v).unwrap_err();
    assert!(err.to_string().contains("\"bert\""), "{err}");

    let mut v = bpe_vocab();
    v.pre = Some("mystery".into());
    assert!(matches!(
        GgufTokenizer::from_vocab(&v),
        Err(TokenizerError::UnsupportedPreTokenizer(p)) if p == "mystery"
    ));

    let mut v = bpe_vocab();
    v.merges = None;
    assert!(matches!(
        GgufTokenizer::from_vocab(&v),
        Err(TokenizerError::MissingMerges)
    ));

    let mut v = bpe_vocab();
    v.token_types = Some(vec![1]);
    assert!(matches!(
        GgufTokenizer::from_vocab(&v),
        Err(TokenizerError::LengthMismatch {
            field: "token_type",
            ..
        })
    ));

    let mut v = bpe_vocab();
    v.tokens.push("hello".into());
    v.token_types = None;
    assert!(matches!(
        GgufTokenizer::from_vocab(&v),
        Err(TokenizerError::DuplicateToken { .. })
    ));

    let v = VocabSource {
        model: "llama".into(),
        ..Default::default()
    };
    assert!(matches!(
        GgufTokenizer::from_vocab(&v),
        Err(TokenizerError::EmptyVocab)
    ));

    let mut v = bpe_vocab();
    v.add_bos = Some(true);
    v.bos_id = None;
    let tok = GgufTokenizer::from_vocab(&v).unwrap();
    assert!(matches!(
        tok.encode_prompt("hello"),
        Err(TokenizerError::MissingSpecialToken("BOS"))
    ));
}

/// A small SentencePiece vocabulary: specials, all bytes, a few pieces with scores.
fn spm_vocab(add_space_prefix: Option<bool>) -> VocabSource {
    let mut tokens: Vec<String> = vec![
        "<unk>".into(),
        "<s>".into(),
        "</s>".into(),
        "<start_of_turn>".into(),
        "  ".into(),
    ];
    let mut types = vec![2, 3, 3, 3, 4];
    let mut scores = vec![0.0f32; 5];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    let pieces = [
        ("▁", -1.0),
        ("h", -2.0),
        ("e", -3.0),
        ("l", -4.0),
        ("o", -5.0),
        ("w", -6.0),
        ("r", -7.0),
        ("d", -8.0),
        ("ll", -9.0),
        ("▁h", -10.0),
        ("he", -11.0),
        ("▁he", -12.0),
        ("▁hell", -13.0),
        ("▁hello", -14.0),
        ("▁w", -15.0),
        ("or", -16.0),
        ("▁wor", -17.0),
        ("ld", -18.0),
        ("▁world", -19.0),
        ("hello", -20.0),
    ];
    for (p, s) in pieces {
        tokens.push(p.into());
        types.push(1);
        scores.push(s);
    }
    VocabSource {
        model: "llama".into(),
        tokens,
        scores: Some(scores),
        token_types: Some(types),
        bos_id: Some(1),
        eos_id: Some(2),
        unk_id: Some(0),
        add_space_prefix,
        ..Default::default()
    }
}

#[test]
fn spm_prefix_merges_and_byte_fallback() {
    let tok = GgufTokenizer::from_vocab(&spm_vocab(None)).unwrap();
    let hello = id_of(&tok, "▁hello");
    let world = id_of(&tok, "▁world");
    assert_eq!(
        tok.encode("hello world", false).unwrap(),
        vec![hello, world]
    );
    // BOS added by default for SPM, and not twice
    assert_eq!(tok.encode_prompt("hello").unwrap(), vec![1, hello]);
    assert_eq!(tok.encode_prompt("<s>hello").unwrap(), vec![1, hello]);
    // "é" is not a piece: two byte tokens
    let ids = tok.encode("hé", false).unwrap();
    assert_eq!(
        ids,
        vec![
            id_of(&tok, "▁h"),
            id_of(&tok, "<0xC3>"),
            id_of(&tok, "<0xA9>")
        ]
    );
    assert_eq!(tok.decode(&ids, false).unwrap(), "hé");
    // a special token is followed by a new "▁" prefix, as in llama.cpp
    let ids = tok.encode("<start_of_turn>hello", true).unwrap();
    assert_eq!(ids, vec![3, hello]);
    // user-defined "  " is always one token, even without parse_special
    let ids = tok.encode("hello  world", false).unwrap();
    assert_eq!(ids, vec![hello, 4, id_of(&tok, "▁world")]);
    // llama.cpp prefixes the fragment after a user-defined token too, so the text comes back
    // with an extra space
    assert_eq!(tok.decode(&ids, true).unwrap(), "hello   world");
}

#[test]
fn spm_without_space_prefix() {
    let tok = GgufTokenizer::from_vocab(&spm_vocab(Some(false))).unwrap();
    // "hello" is a token but no chain of merges reaches it ("hell" and "llo" are not tokens)
    let want = vec![id_of(&tok, "he"), id_of(&tok, "ll"), id_of(&tok, "o")];
    assert_eq!(tok.encode("hello", false).unwrap(), want);
    let ids = tok.encode(" hello", false).unwrap();
    assert_eq!(ids, vec![id_of(&tok, "▁hello")]);
    assert_eq!(tok.decode(&ids, false).unwrap(), " hello");
}

/// llama.cpp's SPM algorithm, written naively: merge the best-scoring adjacent pair whose
/// concatenation is a token (leftmost on ties) until none is left; unknown pieces become bytes.
fn naive_spm(tok: &GgufTokenizer, scores: &[f32], text: &str) -> Vec<u32> {
    let lookup: HashMap<&str, u32> = (0..tok.vocab_size() as u32)
        .map(|id| (tok.token_text(id).unwrap(), id))
        .collect();
    let escaped = format!("▁{}", text.replace(' ', "▁"));
    let mut syms: Vec<String> = escaped.chars().map(String::from).collect();
    loop {
        let mut best: Option<(usize, f32)> = None;
        for i in 0..syms.len().saturating_sub(1) {
            let joined = format!("{}{}", syms[i], syms[i + 1]);
            if let Some(&id) = lookup.get(joined.as_str()) {
                let s = scores[id as usize];
                if best.is_none_or(|(_, b)| s > b) {
                    best = Some((i, s));
                }
            }
        }
        let Some((i, _)) = best else { break };
        let right = syms.remove(i + 1);
        syms[i].push_str(&right);
    }
    let mut out = Vec::new();
    for s in syms {
        match lookup.get(s.as_str()) {
            Some(&id) => out.push(id),
            None => out.extend(s.bytes().map(|b| lookup[format!("<0x{b:02X}>").as_str()])),
        }
    }
    out
}

#[test]
fn spm_matches_naive_llama_cpp_algorithm() {
    let v = spm_vocab(None);
    let scores = v.scores.clone().unwrap();
    let tok = GgufTokenizer::from_vocab(&v).unwrap();
    // deterministic pseudo-random strings over an alphabet that makes many overlapping merges
    let alphabet: Vec<char> = "helowrd é".chars().collect();
    let mut state = 0x2545_f491_u64;
    for _ in 0..500 {
        let len = 1 + (state % 12) as usize;
        let mut s = String::new();
        for _ in 0..len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            s.push(alphabet[(state % alphabet.len() as u64) as usize]);
        }
        if s.contains("  ") {
            continue; // user-defined token: partitioned first, not part of this check
        }
        assert_eq!(
            tok.encode(&s, false).unwrap(),
            naive_spm(&tok, &scores, &s),
            "{s:?}"
        );
    }
}

#[test]
fn tokenizer_is_send_sync_clone() {
    fn check<T: Send + Sync + Clone>() {}
    check::<GgufTokenizer>();
    check::<OwnedIncrementalDecoder>();
    check::<IncrementalDecoder<'static>>();
}
