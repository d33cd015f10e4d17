//! Checks against the real model files in `models/`, skipped when absent.

use std::path::{Path, PathBuf};

use super::super::{Architecture, Array, GgmlType, GgufFile, ModelSpec, Value};

fn model(name: &str) -> Option<GgufFile> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name);
    // The scratch crate used during development lives elsewhere.
    let path = if path.exists() {
        path
    } else {
        PathBuf::from("/work/main/models").join(name)
    };
    if !path.exists() {
        println!("skipping: {} not found", path.display());
        return None;
    }
    match GgufFile::open(&path) {
        Ok(f) => Some(f),
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

/// Prints every metadata key (values abbreviated) and the distinctive tensors.
fn dump(f: &GgufFile) {
    for (k, v) in &f.metadata {
        println!("  {k} [{}] = {v}", v.type_name());
    }
    for t in f
        .tensors
        .iter()
        .filter(|t| !t.name.starts_with("blk.") || t.name.starts_with("blk.0."))
    {
        println!(
            "  tensor {} {} {:?} @{} ({} bytes)",
            t.name, t.dtype, t.dims, t.offset, t.n_bytes
        );
    }
}

#[test]
fn smollm2_135m_q4_1() {
    let Some(f) = model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    dump(&f);
    let summary = f.summary().unwrap();
    println!("{summary}");
    assert_eq!(f.architecture().unwrap(), "llama");
    let spec = ModelSpec::from_gguf(&f).unwrap();
    println!("{spec:?}");
    assert_eq!(spec.architecture, Architecture::Llama);
    assert_eq!(spec.vocab_size, 49152);
    assert_eq!(spec.tokenizer_model, "gpt2");
    assert_eq!((spec.block_count, spec.embedding_length), (30, 576));
    assert_eq!(
        (spec.head_count, spec.head_count_kv, spec.key_length),
        (9, 3, 64)
    );
    assert_eq!(f.tensors.len(), 272);
    assert!(f.tensor("output.weight").is_none(), "tied embeddings");
    assert_eq!(
        f.tensor("token_embd.weight").unwrap().dims,
        vec![576, 49152]
    );
    assert!(summary.spec_check.is_ok());
    assert!(summary.has_chat_template);
    assert_eq!(f.tensor_bytes() + f.data_offset, f.file_size);
    assert!(f.tensors.iter().any(|t| t.dtype == GgmlType::Q4_1));
    assert_eq!(f.tensor("token_embd.weight").unwrap().dtype, GgmlType::Q8_0);
    assert_eq!(f.get_u64("llama.vocab_size").unwrap(), Some(49152));
    assert_eq!(spec.rope_dimension_count, Some(64));
    assert_eq!((spec.bos_token_id, spec.eos_token_id), (Some(1), Some(2)));
}

#[test]
fn gemma3_270m_q4_k_m() {
    let Some(f) = model("gemma-3-270m-q4_k_m.gguf") else {
        return;
    };
    dump(&f);
    let summary = f.summary().unwrap();
    println!("{summary}");
    let spec = ModelSpec::from_gguf(&f).unwrap();
    println!("{spec:?}");
    assert_eq!(spec.architecture, Architecture::Gemma3);
    assert_eq!(spec.vocab_size, 262144);
    assert_eq!(spec.tokenizer_model, "llama");
    assert_eq!(
        (
            spec.block_count,
            spec.embedding_length,
            spec.feed_forward_length
        ),
        (18, 640, 2048)
    );
    assert_eq!(
        (
            spec.head_count,
            spec.head_count_kv,
            spec.key_length,
            spec.value_length
        ),
        (4, 1, 256, 256)
    );
    assert_eq!(
        (spec.rope_freq_base, spec.rope_local_freq_base),
        (1e6, Some(10_000.0))
    );
    assert_eq!(
        (spec.sliding_window, spec.context_length, spec.rms_eps),
        (Some(512), 32768, 1e-6)
    );
    assert_eq!(
        (spec.bos_token_id, spec.eos_token_id, spec.file_type),
        (Some(2), Some(1), Some(15))
    );
    assert_eq!(f.tensors.len(), 236);
    assert!(f.tensor("output.weight").is_none(), "tied embeddings");
    let embd = f.tensor("token_embd.weight").unwrap();
    assert_eq!(
        (embd.dtype, embd.dims.as_slice()),
        (GgmlType::Q8_0, &[640, 262144][..])
    );
    assert!(summary.spec_check.is_ok());
    assert!(
        !summary.has_chat_template,
        "this file carries no chat template"
    );
    assert_eq!(f.tensor_bytes() + f.data_offset, f.file_size);
    if let Some(Value::Array(Array::String(tokens))) = f.get("tokenizer.ggml.tokens") {
        let eot = tokens.iter().position(|t| t == "<end_of_turn>");
        println!("<end_of_turn> id: {eot:?}");
        assert_eq!(eot, Some(106));
    }
}
