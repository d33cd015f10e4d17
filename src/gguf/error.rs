//! Error type for GGUF parsing and validation.
//!
//! Every message is a single line that names the offending key, tensor or
//! file offset and, where a limit was hit, the limit itself.

use std::path::PathBuf;

/// Everything that can go wrong while reading or interpreting a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// Opening or reading the underlying file failed (other than a short read).
    #[error("I/O error {}: {source}", esc(context))]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// `GgufFile::open` failed to open the file.
    #[error("cannot open GGUF file '{}': {source}", esc(&path.to_string_lossy()))]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The first four bytes are not `GGUF`.
    #[error("not a GGUF file: bad magic {found:02x?} (expected \"GGUF\" = [47, 47, 55, 46])")]
    BadMagic { found: [u8; 4] },

    /// Only GGUF v2 and v3 are supported.
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),

    /// The file ends inside the header.
    #[error(
        "truncated file: {} needs {needed} bytes at offset {offset}, but the file is only {file_size} bytes",
        esc(what)
    )]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        file_size: u64,
    },

    /// An untrusted count cannot possibly fit in the rest of the file.
    #[error(
        "{}: count {count} needs at least {min_bytes} bytes but only {remaining} bytes remain after offset {offset}",
        esc(what)
    )]
    CountExceedsFile {
        what: String,
        count: u64,
        min_bytes: u64,
        remaining: u64,
        offset: u64,
    },

    /// A configured [`Limits`](super::Limits) value was exceeded.
    #[error("{}: {value} exceeds {limit_name} {limit}", esc(what))]
    LimitExceeded {
        what: String,
        value: u64,
        limit_name: &'static str,
        limit: u64,
    },

    /// The decoded metadata would use more memory than allowed.
    #[error(
        "metadata memory budget exceeded while reading {}: {needed} bytes needed in total, max_metadata_bytes is {limit}",
        esc(what)
    )]
    MetadataBudget {
        what: String,
        needed: u64,
        limit: u64,
    },

    /// A string is not valid UTF-8.
    #[error("invalid UTF-8 in {} at offset {offset}", esc(what))]
    InvalidUtf8 { what: String, offset: u64 },

    /// A metadata value type code is not one of 0..=12.
    #[error(
        "metadata key '{}': unknown value type {code} at offset {offset}",
        esc(key)
    )]
    UnknownValueType { key: String, code: u32, offset: u64 },

    /// A bool byte is neither 0 nor 1.
    #[error(
        "metadata key '{}': invalid bool byte {byte} at offset {offset}",
        esc(key)
    )]
    InvalidBool { key: String, byte: u8, offset: u64 },

    /// Arrays nested deeper than [`MAX_ARRAY_DEPTH`](super::MAX_ARRAY_DEPTH).
    #[error(
        "metadata key '{}': arrays nested deeper than {limit} levels",
        esc(key)
    )]
    ArrayTooDeep { key: String, limit: u32 },

    /// The same metadata key appears twice.
    #[error("duplicate metadata key '{}'", esc(.0))]
    DuplicateKey(String),

    /// The same tensor name appears twice.
    #[error("duplicate tensor name '{}'", esc(.0))]
    DuplicateTensor(String),

    /// `general.alignment` is unusable.
    #[error("general.alignment: {0}")]
    BadAlignment(String),

    /// A tensor uses a ggml type code we do not know.
    #[error("tensor '{}': unknown ggml type code {code}", esc(tensor))]
    UnknownGgmlType { tensor: String, code: u32 },

    /// A tensor's shape, offset or size is invalid.
    #[error("tensor '{}': {reason}", esc(tensor))]
    BadTensor { tensor: String, reason: String },

    /// Two tensors' data ranges overlap.
    #[error(
        "tensor '{}' at offset {second_offset} overlaps tensor '{}' which ends at offset {first_end}",
        esc(second),
        esc(first)
    )]
    OverlappingTensors {
        first: String,
        first_end: u64,
        second: String,
        second_offset: u64,
    },

    /// A metadata value has a different type than the caller asked for.
    #[error("metadata key '{}': expected {expected}, found {found}", esc(key))]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },

    /// A required metadata key is absent.
    #[error("missing required metadata key '{}'", esc(.0))]
    MissingKey(String),

    /// `general.architecture` names a model family we cannot run.
    #[error("unsupported architecture '{}' (supported: {supported})", esc(arch))]
    UnsupportedArchitecture { arch: String, supported: String },

    /// One or more required model keys are missing or mistyped (all listed).
    #[error("missing or invalid metadata: {}", esc_list(.0, ", "))]
    InvalidMetadata(Vec<String>),

    /// Metadata and tensors are individually valid but inconsistent.
    #[error("inconsistent model: {}", esc_list(.0, "; "))]
    InconsistentModel(Vec<String>),
}

/// Longest untrusted name shown in an error message, in characters.
const MAX_SHOWN_CHARS: usize = 200;

/// Makes an untrusted string safe for a one-line message: control
/// characters are escaped and long strings are cut short.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == MAX_SHOWN_CHARS {
            out.push_str(&format!("... ({} bytes)", s.len()));
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn esc_list(items: &[String], sep: &str) -> String {
    items.iter().map(|s| esc(s)).collect::<Vec<_>>().join(sep)
}
