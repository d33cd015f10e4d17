use super::super::{Architecture, Array, GgmlType, GgufError, ModelSpec, Value};
use super::builder::{llama, strs};
use super::{ok, T};

fn spec(b: &super::Builder) -> Result<ModelSpec, GgufError> {
    let r = ModelSpec::from_gguf(&ok(&b.build()));
    if let Err(e) = &r {
        let msg = e.to_string();
        assert!(!msg.contains('\n'));
        println!("{msg}");
    }
    r
}

/// Asserts a consistency failure whose message contains `needle`.
fn inconsistent(b: &super::Builder, needle: &str) {
    match spec(b) {
        Err(GgufError::InconsistentModel(p)) => {
            assert!(
                p.iter().any(|m| m.contains(needle)),
                "{needle:?} not in {p:?}"
            )
        }
        other => panic!("expected InconsistentModel, got {other:?}"),
    }
}

fn invalid(b: &super::Builder, needles: &[&str]) {
    match spec(b) {
        Err(GgufError::InvalidMetadata(p)) => {
            assert_eq!(p.len(), needles.len(), "{p:?}");
            for n in needles {
                assert!(p.iter().any(|m| m.contains(n)), "{n:?} not in {p:?}");
            }
        }
        other => panic!("expected InvalidMetadata, got {other:?}"),
    }
}

#[test]
fn valid_llama_spec_and_defaults() {
    let s = spec(&llama()).unwrap();
    assert_eq!(s.architecture, Architecture::Llama);
    assert_eq!(s.name.as_deref(), Some("tiny"));
    assert_eq!(
        (s.context_length, s.embedding_length, s.block_count),
        (256, 64, 1)
    );
    assert_eq!(
        (s.head_count, s.head_count_kv, s.key_length, s.value_length),
        (4, 2, 16, 16)
    );
    assert_eq!((s.vocab_size, s.tokenizer_model.as_str()), (10, "llama"));
    assert_eq!(
        (s.bos_token_id, s.eos_token_id, s.file_type),
        (Some(1), Some(2), Some(7))
    );
    assert_eq!(
        (
            s.rope_local_freq_base,
            s.sliding_window,
            s.rope_dimension_count
        ),
        (None, None, None)
    );
    let s = spec(
        &llama()
            .without("llama.attention.head_count_kv")
            .without("llama.rope.freq_base"),
    )
    .unwrap();
    assert_eq!((s.head_count_kv, s.rope_freq_base), (4, 10_000.0));
}

#[test]
fn architecture_names() {
    for a in Architecture::ALL {
        assert_eq!(a.to_string().parse::<Architecture>().unwrap(), a);
    }
    let e = spec(&llama().kv("general.architecture", Value::String("mamba".into()))).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unsupported architecture 'mamba' (supported: llama, gemma3, qwen2, qwen3)"
    );
    let e = spec(&llama().without("general.architecture")).unwrap_err();
    assert!(matches!(e, GgufError::MissingKey(k) if k == "general.architecture"));
}

#[test]
fn every_missing_or_mistyped_key_reported_at_once() {
    let b = llama()
        .without("llama.block_count")
        .kv("llama.attention.head_count", Value::String("4".into()))
        .without("llama.attention.layer_norm_rms_epsilon")
        .kv("llama.rope.freq_base", Value::U32(1))
        .without("tokenizer.ggml.model");
    invalid(
        &b,
        &[
            "llama.block_count (missing)",
            "llama.attention.head_count (expected non-negative integer, found string)",
            "llama.attention.layer_norm_rms_epsilon (missing)",
            "llama.rope.freq_base (expected float, found u32)",
            "tokenizer.ggml.model (missing)",
        ],
    );
    let msg = spec(&b).unwrap_err().to_string();
    assert!(
        msg.starts_with("missing or invalid metadata: llama.block_count (missing), "),
        "{msg}"
    );
    invalid(
        &llama().kv("llama.context_length", Value::I32(-1)),
        &["llama.context_length"],
    );
    invalid(
        &llama().kv("tokenizer.ggml.eos_token_id", Value::U64(1 << 40)),
        &["exceeds u32"],
    );
}

#[test]
fn zero_sizes() {
    for key in [
        "context_length",
        "embedding_length",
        "block_count",
        "attention.head_count",
    ] {
        inconsistent(
            &llama().kv(&format!("llama.{key}"), Value::U32(0)),
            &format!("llama.{key} is 0"),
        );
    }
    inconsistent(
        &llama().kv("llama.attention.head_count_kv", Value::U32(0)),
        "head_count_kv is 0",
    );
}

#[test]
fn head_divisibility() {
    inconsistent(
        &llama().kv("llama.attention.head_count_kv", Value::U32(3)),
        "not a multiple",
    );
    // 64 is not divisible by 5 heads: fine only when key_length is given.
    let b = llama()
        .kv("llama.attention.head_count", Value::U32(5))
        .kv("llama.attention.head_count_kv", Value::U32(5));
    inconsistent(&b, "key_length is not given");
    let s = spec(&b.kv("llama.attention.key_length", Value::U32(16))).unwrap();
    assert_eq!((s.key_length, s.value_length), (16, 16));
    inconsistent(
        &llama().kv("llama.rope.dimension_count", Value::U32(17)),
        "rope.dimension_count",
    );
    assert_eq!(
        spec(&llama().kv("llama.rope.dimension_count", Value::U32(16)))
            .unwrap()
            .rope_dimension_count,
        Some(16)
    );
}

#[test]
fn bad_floats() {
    inconsistent(
        &llama().kv("llama.attention.layer_norm_rms_epsilon", Value::F32(0.0)),
        "rms_epsilon",
    );
    inconsistent(
        &llama().kv("llama.rope.freq_base", Value::F32(f32::NAN)),
        "rope.freq_base",
    );
}

#[test]
fn vocabulary_checks() {
    invalid(
        &llama().without("tokenizer.ggml.tokens"),
        &["tokenizer.ggml.tokens (missing)"],
    );
    invalid(
        &llama().kv("tokenizer.ggml.tokens", Value::Array(Array::String(vec![]))),
        &["tokenizer.ggml.tokens (empty)"],
    );
    invalid(
        &llama().kv("tokenizer.ggml.tokens", Value::Array(Array::I32(vec![1]))),
        &["tokenizer.ggml.tokens (expected array<string>, found array<i32>)"],
    );
    invalid(
        &llama().kv(
            "tokenizer.ggml.scores",
            Value::Array(Array::F64(vec![0.0; 10])),
        ),
        &["scores"],
    );
    invalid(
        &llama().kv(
            "tokenizer.ggml.token_type",
            Value::Array(Array::U32(vec![0; 10])),
        ),
        &["token_type"],
    );
    invalid(
        &llama().kv("tokenizer.ggml.merges", Value::Array(Array::U8(vec![0]))),
        &["merges"],
    );
    spec(&llama().kv("tokenizer.ggml.merges", strs(&["a b"]))).unwrap();
    inconsistent(
        &llama().kv(
            "tokenizer.ggml.scores",
            Value::Array(Array::F32(vec![0.0; 9])),
        ),
        "scores has 9",
    );
    inconsistent(
        &llama().kv(
            "tokenizer.ggml.token_type",
            Value::Array(Array::I32(vec![0; 11])),
        ),
        "token_type has 11",
    );
    spec(&llama().kv("llama.vocab_size", Value::U32(10))).unwrap();
    inconsistent(
        &llama().kv("llama.vocab_size", Value::U32(11)),
        "llama.vocab_size 11 differs",
    );
    spec(
        &llama()
            .without("tokenizer.ggml.scores")
            .without("tokenizer.ggml.token_type"),
    )
    .unwrap();
}

#[test]
fn special_token_ids_in_range() {
    for kind in ["bos", "eos", "unknown", "padding", "eot", "eom"] {
        let key = format!("tokenizer.ggml.{kind}_token_id");
        spec(&llama().kv(&key, Value::U32(9))).unwrap();
        inconsistent(&llama().kv(&key, Value::U32(10)), &key);
    }
}

#[test]
fn embedding_and_output_tensors() {
    inconsistent(
        &llama().without_tensor("token_embd.weight"),
        "'token_embd.weight' is missing",
    );
    let rows = llama().map_tensor("token_embd.weight", |t| t.dims = vec![64, 11]);
    inconsistent(&rows, "has 11 rows");
    let cols = llama().map_tensor("output.weight", |t| t.dims = vec![32, 10]);
    inconsistent(&cols, "'output.weight' has row length 32");
    spec(&llama().without_tensor("output.weight")).unwrap();
    let b = llama().without_tensor("output.weight").tensor(T::new(
        "output.weight",
        &[64, 12],
        GgmlType::F32,
    ));
    inconsistent(&b, "'output.weight' has 12 rows");
}

fn gemma3() -> super::Builder {
    let mut b = llama().kv("general.architecture", Value::String("gemma3".into()));
    let keys: Vec<(String, u32, Vec<u8>)> = b.kvs.clone();
    b.kvs = keys
        .into_iter()
        .map(|(k, t, v)| (k.replacen("llama.", "gemma3.", 1), t, v))
        .collect();
    b.kv("gemma3.attention.sliding_window", Value::U32(512))
        .kv("gemma3.attention.key_length", Value::U32(32))
        .kv("gemma3.rope.freq_base", Value::F32(1e6))
}

#[test]
fn gemma3_spec() {
    let s = spec(&gemma3()).unwrap();
    assert_eq!(s.architecture, Architecture::Gemma3);
    assert_eq!(
        (s.sliding_window, s.rope_local_freq_base, s.rope_freq_base),
        (Some(512), Some(10_000.0), 1e6)
    );
    assert_eq!(s.key_length, 32);
    let s = spec(&gemma3().kv("gemma3.rope.freq_base_swa", Value::F32(5e3))).unwrap();
    assert_eq!(s.rope_local_freq_base, Some(5e3));
    // Keys are looked up under the architecture's own prefix.
    invalid(
        &gemma3().without("gemma3.block_count"),
        &["gemma3.block_count (missing)"],
    );
}

#[test]
fn summary_of_synthetic_model() {
    let f = ok(&llama().build());
    let s = f.summary().unwrap();
    assert!(s.supported && s.spec_check.is_ok() && s.has_chat_template);
    assert_eq!(
        (s.vocab_size, s.vocab_type.as_deref()),
        (Some(10), Some("llama"))
    );
    assert_eq!(s.bos.as_ref().and_then(|t| t.text.as_deref()), Some("<s>"));
    assert_eq!(
        s.tensor_types.iter().map(|t| t.dtype).collect::<Vec<_>>(),
        ["Q4_0", "F16", "Q8_0", "F32"]
    );
    assert_eq!(s.tensor_types.iter().map(|t| t.tensors).sum::<usize>(), 5);
    let text = s.to_string();
    println!("{text}");
    for needle in [
        "architecture:    llama (supported)",
        "layers:          1",
        "heads:           4 (kv 2)",
        "bos 1 \"<s>\"",
        "model check:     ok",
    ] {
        assert!(text.contains(needle), "{needle:?} missing in\n{text}");
    }
    let bad = ok(&llama()
        .kv("general.architecture", Value::String("mamba".into()))
        .build());
    let s = bad.summary().unwrap();
    assert!(!s.supported && s.spec_check.is_err());
    assert!(s.to_string().contains("NOT supported"));
    assert!(ok(&super::Builder::new().build()).summary().is_err());
}
