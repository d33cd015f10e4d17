//! Builds GGUF byte buffers for tests, with correct layout by default and
//! hooks to corrupt any single field.

use super::super::value::code;
use super::super::{Array, GgmlType, Value};

/// A tensor to write. `offset`/`n_dims`/`ty` can be overridden to corrupt it.
#[derive(Clone, Debug)]
pub struct T {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: u32,
    pub offset: Option<u64>,
    pub n_dims: Option<u32>,
}

impl T {
    pub fn new(name: &str, dims: &[u64], ty: GgmlType) -> T {
        T {
            name: name.into(),
            dims: dims.to_vec(),
            ty: ty.code(),
            offset: None,
            n_dims: None,
        }
    }

    fn size(&self) -> u64 {
        let n = self.dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        match (GgmlType::from_code(self.ty), n) {
            (Some(t), Some(n)) => t.bytes_for(n).unwrap_or(0),
            _ => 0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Builder {
    pub magic: [u8; 4],
    pub version: u32,
    /// Key, value type code, encoded value.
    pub kvs: Vec<(String, u32, Vec<u8>)>,
    pub tensors: Vec<T>,
    /// Overrides for the header counts.
    pub kv_count: Option<u64>,
    pub tensor_count: Option<u64>,
    /// Layout alignment (should match `general.alignment` if set).
    pub alignment: u64,
}

pub fn string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

fn array_body(a: &Array) -> (u32, Vec<u8>) {
    fn num<T: Copy, const N: usize>(c: u32, v: &[T], f: fn(T) -> [u8; N]) -> (u32, Vec<u8>) {
        (c, v.iter().flat_map(|&x| f(x)).collect())
    }
    match a {
        Array::U8(v) => num(code::U8, v, u8::to_le_bytes),
        Array::I8(v) => num(code::I8, v, i8::to_le_bytes),
        Array::U16(v) => num(code::U16, v, u16::to_le_bytes),
        Array::I16(v) => num(code::I16, v, i16::to_le_bytes),
        Array::U32(v) => num(code::U32, v, u32::to_le_bytes),
        Array::I32(v) => num(code::I32, v, i32::to_le_bytes),
        Array::U64(v) => num(code::U64, v, u64::to_le_bytes),
        Array::I64(v) => num(code::I64, v, i64::to_le_bytes),
        Array::F32(v) => num(code::F32, v, f32::to_le_bytes),
        Array::F64(v) => num(code::F64, v, f64::to_le_bytes),
        Array::Bool(v) => (code::BOOL, v.iter().map(|&b| u8::from(b)).collect()),
        Array::String(v) => (
            code::STRING,
            v.iter().flat_map(|s| string(s.as_bytes())).collect(),
        ),
        Array::Array(v) => (code::ARRAY, v.iter().flat_map(encode_array).collect()),
    }
}

/// Element type, count, elements.
pub fn encode_array(a: &Array) -> Vec<u8> {
    let (ty, body) = array_body(a);
    let mut out = ty.to_le_bytes().to_vec();
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    out.extend(body);
    out
}

/// Value type code and encoded value.
pub fn encode(v: &Value) -> (u32, Vec<u8>) {
    match v {
        Value::U8(x) => (code::U8, x.to_le_bytes().to_vec()),
        Value::I8(x) => (code::I8, x.to_le_bytes().to_vec()),
        Value::U16(x) => (code::U16, x.to_le_bytes().to_vec()),
        Value::I16(x) => (code::I16, x.to_le_bytes().to_vec()),
        Value::U32(x) => (code::U32, x.to_le_bytes().to_vec()),
        Value::I32(x) => (code::I32, x.to_le_bytes().to_vec()),
        Value::U64(x) => (code::U64, x.to_le_bytes().to_vec()),
        Value::I64(x) => (code::I64, x.to_le_bytes().to_vec()),
        Value::F32(x) => (code::F32, x.to_le_bytes().to_vec()),
        Value::F64(x) => (code::F64, x.to_le_bytes().to_vec()),
        Value::Bool(x) => (code::BOOL, vec![u8::from(*x)]),
        Value::String(s) => (code::STRING, string(s.as_bytes())),
        Value::Array(a) => (code::ARRAY, encode_array(a)),
    }
}

pub fn strs(v: &[&str]) -> Value {
    Value::Array(Array::String(v.iter().map(|s| s.to_string()).collect()))
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            magic: *b"GGUF",
            version: 3,
            kvs: Vec::new(),
            tensors: Vec::new(),
            kv_count: None,
            tensor_count: None,
            alignment: 32,
        }
    }
}

impl Builder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces, keeping position) a key.
    pub fn kv(mut self, key: &str, v: Value) -> Self {
        let (ty, bytes) = encode(&v);
        self.set_raw(key, ty, bytes);
        self
    }

    pub fn kv_raw(mut self, key: &str, ty: u32, bytes: Vec<u8>) -> Self {
        self.set_raw(key, ty, bytes);
        self
    }

    fn set_raw(&mut self, key: &str, ty: u32, bytes: Vec<u8>) {
        match self.kvs.iter_mut().find(|(k, _, _)| k == key) {
            Some(slot) => *slot = (key.into(), ty, bytes),
            None => self.kvs.push((key.into(), ty, bytes)),
        }
    }

    /// Appends a key even if it already exists.
    pub fn kv_dup(mut self, key: &str, v: Value) -> Self {
        let (ty, bytes) = encode(&v);
        self.kvs.push((key.into(), ty, bytes));
        self
    }

    pub fn without(mut self, key: &str) -> Self {
        self.kvs.retain(|(k, _, _)| k != key);
        self
    }

    pub fn tensor(mut self, t: T) -> Self {
        self.tensors.push(t);
        self
    }

    pub fn without_tensor(mut self, name: &str) -> Self {
        self.tensors.retain(|t| t.name != name);
        self
    }

    pub fn map_tensor(mut self, name: &str, f: impl FnOnce(&mut T)) -> Self {
        if let Some(t) = self.tensors.iter_mut().find(|t| t.name == name) {
            f(t);
        }
        self
    }

    /// Returns the file and the offset where the header (tensor infos) ends.
    pub fn build_with_header_len(&self) -> (Vec<u8>, usize) {
        let a = self.alignment.max(1);
        let up = |x: u64| x.div_ceil(a).saturating_mul(a);
        let mut out = self.magic.to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        let tc = self.tensor_count.unwrap_or(self.tensors.len() as u64);
        let kc = self.kv_count.unwrap_or(self.kvs.len() as u64);
        out.extend_from_slice(&tc.to_le_bytes());
        out.extend_from_slice(&kc.to_le_bytes());
        for (k, ty, bytes) in &self.kvs {
            out.extend(string(k.as_bytes()));
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(bytes);
        }
        let mut next = 0u64;
        let mut data_end = 0u64;
        for t in &self.tensors {
            out.extend(string(t.name.as_bytes()));
            let n_dims = t.n_dims.unwrap_or(t.dims.len() as u32);
            out.extend_from_slice(&n_dims.to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.to_le_bytes());
            let off = t.offset.unwrap_or(next);
            out.extend_from_slice(&off.to_le_bytes());
            next = up(off.saturating_add(t.size()));
            data_end = data_end.max(off.saturating_add(t.size()));
        }
        let header_len = out.len();
        if !self.tensors.is_empty() {
            out.resize(
                up(out.len() as u64) as usize + data_end.min(1 << 24) as usize,
                0,
            );
        }
        (out, header_len)
    }

    pub fn build(&self) -> Vec<u8> {
        self.build_with_header_len().0
    }
}

/// A small but complete llama model: valid for both the parser and `ModelSpec`.
pub fn llama() -> Builder {
    let vocab = ["<unk>", "<s>", "</s>", "a", "b", "c", "d", "e", "f", "g"];
    Builder::new()
        .kv("general.architecture", Value::String("llama".into()))
        .kv("general.name", Value::String("tiny".into()))
        .kv("llama.context_length", Value::U32(256))
        .kv("llama.embedding_length", Value::U32(64))
        .kv("llama.block_count", Value::U32(1))
        .kv("llama.feed_forward_length", Value::U32(128))
        .kv("llama.attention.head_count", Value::U32(4))
        .kv("llama.attention.head_count_kv", Value::U32(2))
        .kv("llama.rope.freq_base", Value::F32(10000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .kv("general.file_type", Value::U32(7))
        .kv("tokenizer.ggml.model", Value::String("llama".into()))
        .kv("tokenizer.ggml.tokens", strs(&vocab))
        .kv(
            "tokenizer.ggml.scores",
            Value::Array(Array::F32(vec![0.0; 10])),
        )
        .kv(
            "tokenizer.ggml.token_type",
            Value::Array(Array::I32(vec![1; 10])),
        )
        .kv("tokenizer.ggml.bos_token_id", Value::U32(1))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(2))
        .kv(
            "tokenizer.chat_template",
            Value::String("{{ messages }}".into()),
        )
        .tensor(T::new("token_embd.weight", &[64, 10], GgmlType::Q8_0))
        .tensor(T::new("blk.0.attn_q.weight", &[64, 64], GgmlType::Q4_0))
        .tensor(T::new("blk.0.attn_norm.weight", &[64], GgmlType::F32))
        .tensor(T::new("output_norm.weight", &[64], GgmlType::F32))
        .tensor(T::new("output.weight", &[64, 10], GgmlType::F16))
}
