//! Human-readable model summary (what `llmgenie inspect` prints).
//!
//! The summary is lenient: it works for any architecture, and a missing or
//! mistyped optional key just shows as unknown. Whether the file passes
//! [`ModelSpec::from_gguf`] is reported in [`Summary::spec_check`].

use std::collections::BTreeMap;
use std::fmt;

use super::error::GgufError;
use super::spec::{Architecture, ModelSpec};
use super::value::{Array, Value};
use super::GgufFile;

/// Tensor count and sizes for one ggml type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeStats {
    /// ggml type name (`Q4_K`, `F32`...).
    pub dtype: &'static str,
    pub tensors: usize,
    pub elements: u64,
    pub bytes: u64,
}

/// A special token id with its text from `tokenizer.ggml.tokens`, if in range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialToken {
    pub id: u32,
    pub text: Option<String>,
}

/// Overview of a GGUF model file.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub architecture: String,
    /// Whether `architecture` is one this engine supports.
    pub supported: bool,
    pub name: Option<String>,
    pub version: u32,
    pub file_size: u64,
    pub alignment: u64,
    pub parameter_count: u64,
    pub tensor_count: usize,
    pub tensor_bytes: u64,
    /// Per ggml type, sorted by bytes (largest first).
    pub tensor_types: Vec<TypeStats>,
    pub file_type: Option<u64>,
    pub context_length: Option<u64>,
    pub block_count: Option<u64>,
    pub head_count: Option<u64>,
    pub head_count_kv: Option<u64>,
    pub embedding_length: Option<u64>,
    pub feed_forward_length: Option<u64>,
    pub sliding_window: Option<u64>,
    pub rope_freq_base: Option<f32>,
    /// `tokenizer.ggml.model`.
    pub vocab_type: Option<String>,
    /// Length of `tokenizer.ggml.tokens`.
    pub vocab_size: Option<usize>,
    pub bos: Option<SpecialToken>,
    pub eos: Option<SpecialToken>,
    pub eot: Option<SpecialToken>,
    pub has_chat_template: bool,
    /// `Ok` if [`ModelSpec::from_gguf`] accepts the file, else its error message.
    pub spec_check: Result<(), String>,
}

/// Builds a [`Summary`]; fails only if `general.architecture` is missing or not a string.
pub fn summarize(file: &GgufFile) -> Result<Summary, GgufError> {
    let arch = file.architecture()?.to_string();
    let k = |s: &str| format!("{arch}.{s}");
    let int = |key: &str| file.get_u64(key).ok().flatten();

    let mut by_type: BTreeMap<&'static str, TypeStats> = BTreeMap::new();
    for t in &file.tensors {
        let e = by_type.entry(t.dtype.name()).or_insert(TypeStats {
            dtype: t.dtype.name(),
            tensors: 0,
            elements: 0,
            bytes: 0,
        });
        e.tensors += 1;
        e.elements = e.elements.saturating_add(t.n_elements);
        e.bytes = e.bytes.saturating_add(t.n_bytes);
    }
    let mut tensor_types: Vec<TypeStats> = by_type.into_values().collect();
    tensor_types.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.dtype.cmp(b.dtype)));

    let tokens = match file.get("tokenizer.ggml.tokens") {
        Some(Value::Array(Array::String(t))) => Some(t),
        _ => None,
    };
    let special = |kind: &str| {
        let id = int(&format!("tokenizer.ggml.{kind}_token_id"))?;
        let id = u32::try_from(id).ok()?;
        let text = tokens.and_then(|t| t.get(id as usize)).cloned();
        Some(SpecialToken { id, text })
    };

    Ok(Summary {
        supported: arch.parse::<Architecture>().is_ok(),
        name: file
            .get_str("general.name")
            .ok()
            .flatten()
            .map(str::to_string),
        version: file.version,
        file_size: file.file_size,
        alignment: file.alignment,
        parameter_count: file.parameter_count(),
        tensor_count: file.tensors.len(),
        tensor_bytes: file.tensor_bytes(),
        tensor_types,
        file_type: int("general.file_type"),
        context_length: int(&k("context_length")),
        block_count: int(&k("block_count")),
        head_count: int(&k("attention.head_count")),
        head_count_kv: int(&k("attention.head_count_kv")),
        embedding_length: int(&k("embedding_length")),
        feed_forward_length: int(&k("feed_forward_length")),
        sliding_window: int(&k("attention.sliding_window")),
        rope_freq_base: file.get_f32(&k("rope.freq_base")).ok().flatten(),
        vocab_type: file
            .get_str("tokenizer.ggml.model")
            .ok()
            .flatten()
            .map(str::to_string),
        vocab_size: tokens.map(Vec::len),
        bos: special("bos"),
        eos: special("eos"),
        eot: special("eot"),
        has_chat_template: file.get("tokenizer.chat_template").is_some(),
        spec_check: ModelSpec::from_gguf(file)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        architecture: arch,
    })
}

/// `1.5 GiB`-style size.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

/// `134.5M`-style count.
pub(crate) fn human_count(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1}K", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.2}B", n as f64 / 1e9),
    }
}

fn opt<T: fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_string(), T::to_string)
}

fn special(t: &Option<SpecialToken>) -> String {
    match t {
        None => "-".into(),
        Some(SpecialToken { id, text: Some(s) }) => format!("{id} {s:?}"),
        Some(SpecialToken { id, text: None }) => format!("{id} (out of range)"),
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let support = if self.supported {
            "supported"
        } else {
            "NOT supported"
        };
        writeln!(f, "architecture:    {} ({support})", self.architecture)?;
        writeln!(f, "name:            {}", opt(&self.name))?;
        writeln!(
            f,
            "file:            {} (GGUF v{}, alignment {})",
            human_bytes(self.file_size),
            self.version,
            self.alignment
        )?;
        writeln!(
            f,
            "parameters:      {} ({}) in {} tensors, {} of tensor data",
            human_count(self.parameter_count),
            self.parameter_count,
            self.tensor_count,
            human_bytes(self.tensor_bytes)
        )?;
        if let Some(ft) = self.file_type {
            writeln!(f, "file type:       {ft}")?;
        }
        for (i, t) in self.tensor_types.iter().enumerate() {
            let label = if i == 0 { "tensor types:" } else { "" };
            writeln!(
                f,
                "{label:<17}{:<8} {:>5} tensors {:>12} params {:>11}",
                t.dtype,
                t.tensors,
                human_count(t.elements),
                human_bytes(t.bytes)
            )?;
        }
        writeln!(f, "context length:  {}", opt(&self.context_length))?;
        writeln!(f, "layers:          {}", opt(&self.block_count))?;
        writeln!(
            f,
            "heads:           {} (kv {})",
            opt(&self.head_count),
            opt(&self.head_count_kv.or(self.head_count))
        )?;
        writeln!(f, "embedding:       {}", opt(&self.embedding_length))?;
        writeln!(f, "feed forward:    {}", opt(&self.feed_forward_length))?;
        if let Some(w) = self.sliding_window {
            writeln!(f, "sliding window:  {w}")?;
        }
        writeln!(f, "rope base:       {}", opt(&self.rope_freq_base))?;
        writeln!(
            f,
            "vocabulary:      {}, {} tokens",
            opt(&self.vocab_type),
            opt(&self.vocab_size)
        )?;
        writeln!(
            f,
            "special tokens:  bos {}, eos {}, eot {}",
            special(&self.bos),
            special(&self.eos),
            special(&self.eot)
        )?;
        let tmpl = if self.has_chat_template { "yes" } else { "no" };
        writeln!(f, "chat template:   {tmpl}")?;
        match &self.spec_check {
            Ok(()) => write!(f, "model check:     ok"),
            Err(e) => write!(f, "model check:     FAILED: {e}"),
        }
    }
}
