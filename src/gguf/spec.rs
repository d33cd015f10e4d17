//! Typed model hyper-parameters extracted from GGUF metadata.
//!
//! [`ModelSpec::from_gguf`] works in two phases so users see every problem
//! at once: first all required keys are looked up and type-checked (a
//! [`GgufError::InvalidMetadata`] lists every missing/mistyped key), then the
//! values are cross-checked against each other and the tensor shapes (a
//! [`GgufError::InconsistentModel`] lists every inconsistency).

use std::fmt;
use std::str::FromStr;

use super::error::GgufError;
use super::value::{Array, Value};
use super::GgufFile;

/// Model families this engine can run, named as in `general.architecture`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Architecture {
    Llama,
    Gemma3,
    Qwen2,
    Qwen3,
}

impl Architecture {
    /// All supported architectures.
    pub const ALL: [Architecture; 4] = [
        Architecture::Llama,
        Architecture::Gemma3,
        Architecture::Qwen2,
        Architecture::Qwen3,
    ];

    /// The GGUF name (`general.architecture` value and key prefix).
    pub fn as_str(&self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Gemma3 => "gemma3",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }

    /// Comma-separated list of supported names, for messages.
    pub fn supported_list() -> String {
        Self::ALL
            .iter()
            .map(|a| a.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Architecture {
    type Err = GgufError;

    fn from_str(s: &str) -> Result<Self, GgufError> {
        Self::ALL
            .iter()
            .copied()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| GgufError::UnsupportedArchitecture {
                arch: s.to_string(),
                supported: Self::supported_list(),
            })
    }
}

/// Validated hyper-parameters and tokenizer facts of a supported model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub architecture: Architecture,
    /// `general.name`.
    pub name: Option<String>,
    pub context_length: usize,
    pub embedding_length: usize,
    pub block_count: usize,
    pub feed_forward_length: usize,
    pub head_count: usize,
    /// Defaults to `head_count` when absent.
    pub head_count_kv: usize,
    /// Per-head key dimension; defaults to `embedding_length / head_count`.
    pub key_length: usize,
    /// Per-head value dimension; defaults to `key_length`.
    pub value_length: usize,
    /// `{arch}.rope.freq_base`, default 10000.
    pub rope_freq_base: f32,
    /// RoPE base of sliding-window (local) layers: `{arch}.rope.freq_base_swa`
    /// if present, else 10000 for gemma3 (as llama.cpp), else `None`.
    pub rope_local_freq_base: Option<f32>,
    pub rope_dimension_count: Option<usize>,
    /// `{arch}.attention.layer_norm_rms_epsilon` (required).
    pub rms_eps: f32,
    pub sliding_window: Option<usize>,
    /// Number of entries in `tokenizer.ggml.tokens`.
    pub vocab_size: usize,
    /// `tokenizer.ggml.model` (`llama`, `gpt2`, ...).
    pub tokenizer_model: String,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// `general.file_type` (llama_ftype).
    pub file_type: Option<u32>,
}

/// Default RoPE base for gemma3's sliding-window layers (llama.cpp hard-codes it).
pub const GEMMA3_LOCAL_ROPE_BASE: f32 = 10_000.0;
/// Special-token keys checked against the vocabulary size.
pub const SPECIAL_TOKEN_KINDS: [&str; 6] = ["bos", "eos", "unknown", "padding", "eot", "eom"];

/// Collects phase-1 problems while reading typed keys.
struct Keys<'a> {
    f: &'a GgufFile,
    problems: Vec<String>,
}

impl<'a> Keys<'a> {
    fn mistyped(&mut self, key: &str, expected: &str, v: &Value) {
        self.problems.push(format!(
            "{key} (expected {expected}, found {})",
            v.type_name()
        ));
    }

    fn opt_int(&mut self, key: &str) -> Option<u64> {
        let v = self.f.get(key)?;
        let n = v.as_u64();
        if n.is_none() {
            self.mistyped(key, "non-negative integer", v);
        }
        n
    }

    fn opt_usize(&mut self, key: &str) -> Option<usize> {
        let n = self.opt_int(key)?;
        match usize::try_from(n) {
            Ok(n) => Some(n),
            Err(_) => {
                self.problems.push(format!("{key} (value {n} too large)"));
                None
            }
        }
    }

    fn opt_u32(&mut self, key: &str) -> Option<u32> {
        let n = self.opt_int(key)?;
        match u32::try_from(n) {
            Ok(n) => Some(n),
            Err(_) => {
                self.problems.push(format!("{key} (value {n} exceeds u32)"));
                None
            }
        }
    }

    fn req_usize(&mut self, key: &str) -> usize {
        if self.f.get(key).is_none() {
            self.problems.push(format!("{key} (missing)"));
            return 0;
        }
        self.opt_usize(key).unwrap_or(0)
    }

    fn opt_f32(&mut self, key: &str) -> Option<f32> {
        match self.f.get(key)? {
            Value::F32(x) => Some(*x),
            Value::F64(x) => Some(*x as f32),
            v => {
                self.mistyped(key, "float", v);
                None
            }
        }
    }

    fn opt_str(&mut self, key: &str) -> Option<&'a str> {
        match self.f.get(key)? {
            Value::String(s) => Some(s),
            v => {
                self.mistyped(key, "string", v);
                None
            }
        }
    }

    /// An array of the expected element type, or a problem.
    fn opt_array(&mut self, key: &str, expected: &str) -> Option<&'a Array> {
        match self.f.get(key)? {
            Value::Array(a) if a.elem_type_name() == expected => Some(a),
            v => {
                self.mistyped(key, &format!("array<{expected}>"), v);
                None
            }
        }
    }
}

fn check_tensor_vocab(f: &GgufFile, name: &str, vocab: usize, embd: usize, out: &mut Vec<String>) {
    let Some(t) = f.tensor(name) else { return };
    match t.dims.as_slice() {
        [cols, rows] => {
            if *rows != vocab as u64 {
                out.push(format!(
                    "tensor '{name}' has {rows} rows (dims[1]) but the vocabulary has {vocab} tokens"
                ));
            }
            if *cols != embd as u64 {
                out.push(format!(
                    "tensor '{name}' has row length {cols} (dims[0]) but embedding_length is {embd}"
                ));
            }
        }
        dims => out.push(format!("tensor '{name}' should be 2-D, has dims {dims:?}")),
    }
}

impl ModelSpec {
    /// Extracts and validates the model spec. Errors list every problem found.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, GgufError> {
        let architecture: Architecture = f.architecture()?.parse()?;
        let a = architecture.as_str();
        let k = |s: &str| format!("{a}.{s}");
        let mut keys = Keys {
            f,
            problems: Vec::new(),
        };

        let name = keys.opt_str("general.name").map(str::to_string);
        let context_length = keys.req_usize(&k("context_length"));
        let embedding_length = keys.req_usize(&k("embedding_length"));
        let block_count = keys.req_usize(&k("block_count"));
        let feed_forward_length = keys.req_usize(&k("feed_forward_length"));
        let head_count = keys.req_usize(&k("attention.head_count"));
        let head_count_kv = keys.opt_usize(&k("attention.head_count_kv"));
        let key_length = keys.opt_usize(&k("attention.key_length"));
        let value_length = keys.opt_usize(&k("attention.value_length"));
        let rope_freq_base = keys.opt_f32(&k("rope.freq_base"));
        let rope_swa_base = keys.opt_f32(&k("rope.freq_base_swa"));
        let rope_dimension_count = keys.opt_usize(&k("rope.dimension_count"));
        let eps_key = k("attention.layer_norm_rms_epsilon");
        let rms_eps = keys.opt_f32(&eps_key);
        if f.get(&eps_key).is_none() {
            keys.problems.push(format!("{eps_key} (missing)"));
        }
        let sliding_window = keys.opt_usize(&k("attention.sliding_window"));
        let file_type = keys.opt_u32("general.file_type");
        let declared_vocab = keys.opt_usize(&k("vocab_size"));

        let tokenizer_model = keys.opt_str("tokenizer.ggml.model").map(str::to_string);
        if f.get("tokenizer.ggml.model").is_none() {
            keys.problems.push("tokenizer.ggml.model (missing)".into());
        }
        let tokens = keys.opt_array("tokenizer.ggml.tokens", "string");
        match tokens {
            None if f.get("tokenizer.ggml.tokens").is_none() => {
                keys.problems.push("tokenizer.ggml.tokens (missing)".into())
            }
            Some(t) if t.is_empty() => keys.problems.push("tokenizer.ggml.tokens (empty)".into()),
            _ => {}
        }
        let scores = keys.opt_array("tokenizer.ggml.scores", "f32");
        let token_type = keys.opt_array("tokenizer.ggml.token_type", "i32");
        keys.opt_array("tokenizer.ggml.merges", "string");
        let mut special = Vec::new();
        for kind in SPECIAL_TOKEN_KINDS {
            let key = format!("tokenizer.ggml.{kind}_token_id");
            if let Some(id) = keys.opt_u32(&key) {
                special.push((key, id));
            }
        }
        if !keys.problems.is_empty() {
            return Err(GgufError::InvalidMetadata(keys.problems));
        }
        let vocab_size = tokens.map_or(0, Array::len);

        // Phase 2: consistency.
        let mut bad = Vec::new();
        for (key, v) in [
            ("context_length", context_length),
            ("embedding_length", embedding_length),
            ("block_count", block_count),
            ("feed_forward_length", feed_forward_length),
            ("attention.head_count", head_count),
        ] {
            if v == 0 {
                bad.push(format!("{a}.{key} is 0"));
            }
        }
        let head_count_kv = head_count_kv.unwrap_or(head_count);
        if head_count_kv == 0 {
            bad.push(format!("{a}.attention.head_count_kv is 0"));
        } else if !head_count.is_multiple_of(head_count_kv) {
            bad.push(format!(
                "{a}.attention.head_count {head_count} is not a multiple of head_count_kv {head_count_kv}"
            ));
        }
        let mut head_dim_unknown = false;
        let key_length = match key_length {
            Some(kl) => kl,
            None if head_count > 0 && embedding_length.is_multiple_of(head_count) => {
                embedding_length / head_count
            }
            None => {
                bad.push(format!(
                    "{a}.embedding_length {embedding_length} is not head_count {head_count} x head dim, and {a}.attention.key_length is not given"
                ));
                head_dim_unknown = true;
                0
            }
        };
        let value_length = value_length.unwrap_or(key_length);
        if !head_dim_unknown && (key_length == 0 || value_length == 0) {
            bad.push(format!(
                "attention key/value length is 0 (key {key_length}, value {value_length})"
            ));
        }
        if let Some(r) = rope_dimension_count {
            if r == 0 || r > key_length {
                bad.push(format!(
                    "{a}.rope.dimension_count {r} is outside 1..={key_length} (key_length)"
                ));
            }
        }
        let rope_freq_base = rope_freq_base.unwrap_or(10_000.0);
        let rope_local_freq_base = rope_swa_base.or(match architecture {
            Architecture::Gemma3 => Some(GEMMA3_LOCAL_ROPE_BASE),
            _ => None,
        });
        for (what, x) in [
            ("rope.freq_base", Some(rope_freq_base)),
            ("rope.freq_base_swa", rope_local_freq_base),
        ] {
            if let Some(x) = x.filter(|x| !(x.is_finite() && *x > 0.0)) {
                bad.push(format!("{a}.{what} {x} is not a positive number"));
            }
        }
        let rms_eps = rms_eps.unwrap_or(0.0);
        if !(rms_eps.is_finite() && rms_eps > 0.0) {
            bad.push(format!("{eps_key} {rms_eps} is not a positive number"));
        }
        for (key, arr) in [
            ("tokenizer.ggml.scores", scores),
            ("tokenizer.ggml.token_type", token_type),
        ] {
            if let Some(arr) = arr.filter(|arr| arr.len() != vocab_size) {
                bad.push(format!(
                    "{key} has {} entries but tokenizer.ggml.tokens has {vocab_size}",
                    arr.len()
                ));
            }
        }
        if let Some(n) = declared_vocab.filter(|&n| n != vocab_size) {
            bad.push(format!(
                "{a}.vocab_size {n} differs from the {vocab_size} entries of tokenizer.ggml.tokens"
            ));
        }
        for (key, id) in &special {
            if *id as usize >= vocab_size {
                bad.push(format!(
                    "{key} {id} is not below the vocabulary size {vocab_size}"
                ));
            }
        }
        if f.tensor("token_embd.weight").is_none() {
            bad.push("tensor 'token_embd.weight' is missing".into());
        }
        check_tensor_vocab(
            f,
            "token_embd.weight",
            vocab_size,
            embedding_length,
            &mut bad,
        );
        check_tensor_vocab(f, "output.weight", vocab_size, embedding_length, &mut bad);
        if !bad.is_empty() {
            return Err(GgufError::InconsistentModel(bad));
        }

        let id_of = |kind: &str| {
            let key = format!("tokenizer.ggml.{kind}_token_id");
            special.iter().find(|(k, _)| *k == key).map(|(_, id)| *id)
        };
        Ok(ModelSpec {
            architecture,
            name,
            context_length,
            embedding_length,
            block_count,
            feed_forward_length,
            head_count,
            head_count_kv,
            key_length,
            value_length,
            rope_freq_base,
            rope_local_freq_base,
            rope_dimension_count,
            rms_eps,
            sliding_window,
            vocab_size,
            tokenizer_model: tokenizer_model.unwrap_or_default(),
            bos_token_id: id_of("bos"),
            eos_token_id: id_of("eos"),
            file_type,
        })
    }
}
