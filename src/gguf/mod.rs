//! Hardened GGUF header/metadata parser and validator.
//!
//! [`GgufFile::open`] / [`GgufFile::read`] read only the GGUF *header* (the
//! metadata key/value pairs and tensor infos) through a seekable reader; tensor
//! data is never touched, so multi-GB files open instantly. GGUF v2 and v3,
//! little-endian only.
//!
//! Everything read is validated before it is trusted:
//! * magic and version; counts against the file size and [`Limits`];
//! * strings (length against the file and `max_string_len`, UTF-8);
//! * value types, array nesting depth ([`MAX_ARRAY_DEPTH`]), array counts
//!   against the file size and the decoded-metadata memory budget;
//! * duplicate keys and tensor names;
//! * `general.alignment` (u32, non-zero power of two, `<= max_alignment`);
//! * tensor shapes (1..=`max_dims` dims, no zero dims, no u64 overflow, row
//!   length a multiple of the block size), ggml type codes, offset alignment,
//!   bounds against the file size, and pairwise overlap.
//!
//! No untrusted count is used for an allocation before it has been checked
//! against the bytes left in the file and the memory budget.
//!
//! On top of the raw file, [`ModelSpec::from_gguf`] extracts and sanity-checks
//! the typed hyper-parameters of a supported [`Architecture`], and
//! [`summarize`] produces the human-readable [`Summary`] printed by
//! `llmgenie inspect`.
//!
//! ```no_run
//! use llmgenie::gguf::{GgufFile, ModelSpec};
//! let file = GgufFile::open(std::path::Path::new("model.gguf"))?;
//! let spec = ModelSpec::from_gguf(&file)?;
//! println!("{}", file.summary()?);
//! # Ok::<(), llmgenie::gguf::GgufError>(())
//! ```

mod decode;
mod error;
mod reader;
mod spec;
mod summary;
mod types;
mod value;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

pub use error::GgufError;
pub use reader::DEFAULT_ALIGNMENT;
pub use spec::{Architecture, ModelSpec};
pub use summary::{summarize, SpecialToken, Summary, TypeStats};
pub use types::GgmlType;
pub use value::{Array, Value};

/// Maximum nesting of metadata arrays (an array of arrays is depth 2).
/// Real GGUF files never nest arrays; this bounds recursion on hostile input.
pub const MAX_ARRAY_DEPTH: u32 = 4;

/// Resource limits applied while parsing untrusted files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Budget for decoded metadata memory (keys, values, tensor infos), in
    /// bytes. Default 1 GiB; real models use well under 100 MiB (mostly the
    /// tokenizer vocabulary and merges).
    pub max_metadata_bytes: u64,
    /// Longest single string accepted. Default 16 MiB, which fits
    /// `tokenizer.chat_template` and friends with a wide margin.
    pub max_string_len: u64,
    /// Most tensors accepted. Default 2^20.
    pub max_tensors: u64,
    /// Most metadata key/value pairs accepted. Default 2^20.
    pub max_kv: u64,
    /// Most dimensions per tensor. Default 4, as `GGML_MAX_DIMS`.
    pub max_dims: u32,
    /// Largest `general.alignment` accepted. Default 64 KiB: covers every
    /// page size in use (4 KiB, 16 KiB, 64 KiB) while rejecting absurd padding.
    pub max_alignment: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_metadata_bytes: 1 << 30,
            max_string_len: 16 << 20,
            max_tensors: 1 << 20,
            max_kv: 1 << 20,
            max_dims: 4,
            max_alignment: 1 << 16,
        }
    }
}

/// One tensor's header entry.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: GgmlType,
    /// Shape as stored in the file: `dims[0]` is the innermost (row length).
    pub dims: Vec<u64>,
    /// Absolute file offset of the tensor data.
    pub offset: u64,
    /// Product of `dims`.
    pub n_elements: u64,
    /// Size of the tensor data in bytes.
    pub n_bytes: u64,
}

/// A parsed and validated GGUF header.
#[derive(Clone, Debug)]
pub struct GgufFile {
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Data alignment (`general.alignment`, default 32).
    pub alignment: u64,
    /// All metadata in file order.
    pub metadata: Vec<(String, Value)>,
    index: HashMap<String, usize>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    /// Total file size in bytes.
    pub file_size: u64,
}

fn wrong_type(key: &str, expected: &'static str, found: &Value) -> GgufError {
    GgufError::WrongType {
        key: key.to_string(),
        expected,
        found: found.type_name(),
    }
}

impl GgufFile {
    /// Opens and parses the header of the GGUF file at `path` with default [`Limits`].
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let file = File::open(path).map_err(|source| GgufError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let mut r = BufReader::with_capacity(1 << 16, file);
        Self::read(&mut r, &Limits::default())
    }

    /// Parses a GGUF header from `r`. The GGUF stream must start at offset 0
    /// and end at the end of `r` (its length is found by seeking to the end);
    /// the reader is rewound first. Tensor data is not read.
    pub fn read<R: Read + Seek>(r: &mut R, limits: &Limits) -> Result<Self, GgufError> {
        reader::parse(r, limits)
    }

    /// Raw metadata lookup.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index
            .get(key)
            .and_then(|&i| self.metadata.get(i))
            .map(|(_, v)| v)
    }

    /// A string value; `Err(WrongType)` if present with another type.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(wrong_type(key, "string", v)),
        }
    }

    /// Any integer type holding a non-negative value.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => Ok(Some(n)),
                None => Err(GgufError::WrongType {
                    key: key.to_string(),
                    expected: "non-negative integer",
                    found: match v {
                        Value::I8(_) | Value::I16(_) | Value::I32(_) | Value::I64(_) => {
                            format!("{} {v}", v.type_name())
                        }
                        _ => v.type_name(),
                    },
                }),
            },
        }
    }

    /// An `f32` or `f64` value (the latter narrowed to `f32`).
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x)),
            Some(Value::F64(x)) => Ok(Some(*x as f32)),
            Some(v) => Err(wrong_type(key, "float", v)),
        }
    }

    /// A bool value.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(wrong_type(key, "bool", v)),
        }
    }

    /// An array value of any element type.
    pub fn get_array(&self, key: &str) -> Result<Option<&Array>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(wrong_type(key, "array", v)),
        }
    }

    /// `general.architecture` (required).
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str("general.architecture")?
            .ok_or_else(|| GgufError::MissingKey("general.architecture".into()))
    }

    /// Tensor info by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index
            .get(name)
            .and_then(|&i| self.tensors.get(i))
    }

    /// Total number of elements over all tensors.
    pub fn parameter_count(&self) -> u64 {
        self.tensors
            .iter()
            .fold(0u64, |acc, t| acc.saturating_add(t.n_elements))
    }

    /// Total bytes of tensor data.
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .fold(0u64, |acc, t| acc.saturating_add(t.n_bytes))
    }

    /// Human-readable summary; see [`summarize`].
    pub fn summary(&self) -> Result<Summary, GgufError> {
        summarize(self)
    }
}
