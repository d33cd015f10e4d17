//! Decoded GGUF metadata values.
//!
//! Arrays are stored typed (`Vec<u8>`, `Vec<f32>`, ...) so that a large
//! array costs the same memory as on disk instead of one enum per element.

use std::fmt;

/// A single metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Array),
}

/// A typed metadata array. Nested arrays are `Array::Array`.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<Array>),
}

/// GGUF value type codes.
pub(crate) mod code {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

impl Value {
    /// Short type name (`u32`, `string`, `array<f32>`...) for messages.
    pub fn type_name(&self) -> String {
        match self {
            Value::U8(_) => "u8".into(),
            Value::I8(_) => "i8".into(),
            Value::U16(_) => "u16".into(),
            Value::I16(_) => "i16".into(),
            Value::U32(_) => "u32".into(),
            Value::I32(_) => "i32".into(),
            Value::U64(_) => "u64".into(),
            Value::I64(_) => "i64".into(),
            Value::F32(_) => "f32".into(),
            Value::F64(_) => "f64".into(),
            Value::Bool(_) => "bool".into(),
            Value::String(_) => "string".into(),
            Value::Array(a) => format!("array<{}>", a.elem_type_name()),
        }
    }

    /// The value as a non-negative integer, if it is one (any integer type).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
}

impl Array {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::F64(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element type name (`u8`, `string`, `array`...).
    pub fn elem_type_name(&self) -> &'static str {
        match self {
            Array::U8(_) => "u8",
            Array::I8(_) => "i8",
            Array::U16(_) => "u16",
            Array::I16(_) => "i16",
            Array::U32(_) => "u32",
            Array::I32(_) => "i32",
            Array::U64(_) => "u64",
            Array::I64(_) => "i64",
            Array::F32(_) => "f32",
            Array::F64(_) => "f64",
            Array::Bool(_) => "bool",
            Array::String(_) => "string",
            Array::Array(_) => "array",
        }
    }
}

/// Writes at most `MAX_SHOWN` elements of a slice.
fn fmt_list<T: fmt::Debug>(f: &mut fmt::Formatter<'_>, v: &[T]) -> fmt::Result {
    const MAX_SHOWN: usize = 8;
    f.write_str("[")?;
    for (i, x) in v.iter().take(MAX_SHOWN).enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{x:?}")?;
    }
    if v.len() > MAX_SHOWN {
        write!(f, ", ... ({} total)", v.len())?;
    }
    f.write_str("]")
}

impl fmt::Display for Array {
    /// Abbreviated: at most 8 elements, then the total count.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Array::U8(v) => fmt_list(f, v),
            Array::I8(v) => fmt_list(f, v),
            Array::U16(v) => fmt_list(f, v),
            Array::I16(v) => fmt_list(f, v),
            Array::U32(v) => fmt_list(f, v),
            Array::I32(v) => fmt_list(f, v),
            Array::U64(v) => fmt_list(f, v),
            Array::I64(v) => fmt_list(f, v),
            Array::F32(v) => fmt_list(f, v),
            Array::F64(v) => fmt_list(f, v),
            Array::Bool(v) => fmt_list(f, v),
            Array::String(v) => fmt_list(f, v),
            Array::Array(v) => {
                f.write_str("[")?;
                for (i, a) in v.iter().take(8).enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{a}")?;
                }
                if v.len() > 8 {
                    write!(f, ", ... ({} total)", v.len())?;
                }
                f.write_str("]")
            }
        }
    }
}

impl fmt::Display for Value {
    /// Strings are quoted and escaped; long strings and arrays are abbreviated.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::U8(v) => write!(f, "{v}"),
            Value::I8(v) => write!(f, "{v}"),
            Value::U16(v) => write!(f, "{v}"),
            Value::I16(v) => write!(f, "{v}"),
            Value::U32(v) => write!(f, "{v}"),
            Value::I32(v) => write!(f, "{v}"),
            Value::U64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::String(s) => {
                const MAX_CHARS: usize = 120;
                let shown: String = s.chars().take(MAX_CHARS).collect();
                if shown.len() < s.len() {
                    write!(f, "{shown:?}... ({} bytes)", s.len())
                } else {
                    write!(f, "{shown:?}")
                }
            }
            Value::Array(a) => write!(f, "{a}"),
        }
    }
}
