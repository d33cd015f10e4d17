//! Low-level, bounds-checked decoding of GGUF primitives, strings and
//! metadata values, shared by the header parser in `reader.rs`.
//!
//! Defensive rules followed throughout:
//! * every read is checked against the known file size first, so a short
//!   file yields [`GgufError::Truncated`] naming what was being read;
//! * every untrusted count is checked against the bytes left in the file
//!   (each element needs at least N bytes) and against the metadata memory
//!   budget *before* anything is allocated for it;
//! * all size and offset arithmetic is checked.

use std::fmt;
use std::io::{ErrorKind, Read, Seek};
use std::mem::size_of;

use super::error::GgufError;
use super::value::{code, Array, Value};
use super::{Limits, MAX_ARRAY_DEPTH};

pub(super) type Result<T> = std::result::Result<T, GgufError>;

/// Smallest encoded nested array: element type and count.
const ARRAY_HEADER_BYTES: u64 = 4 + 8;
/// Read buffer for numeric arrays.
const CHUNK: usize = 64 * 1024;

/// What is being read, rendered lazily only when an error occurs.
#[derive(Clone, Copy)]
pub(super) enum Ctx<'a> {
    Header(&'static str),
    Key(u64),
    Value(&'a str),
    Elem(&'a str, u64),
    TensorName(u64),
    Tensor(&'a str, &'static str),
}

impl fmt::Display for Ctx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ctx::Header(what) => write!(f, "header {what}"),
            Ctx::Key(i) => write!(f, "metadata key #{i}"),
            Ctx::Value(key) => write!(f, "value of metadata key '{key}'"),
            Ctx::Elem(key, i) => write!(f, "element {i} of metadata array '{key}'"),
            Ctx::TensorName(i) => write!(f, "name of tensor info #{i}"),
            Ctx::Tensor(name, field) => write!(f, "{field} of tensor '{name}'"),
        }
    }
}

pub(super) struct Parser<'a, R> {
    pub(super) r: &'a mut R,
    pub(super) pos: u64,
    pub(super) file_size: u64,
    pub(super) limits: &'a Limits,
    pub(super) budget_used: u64,
}

pub(super) fn to_usize(n: u64, ctx: Ctx<'_>) -> Result<usize> {
    usize::try_from(n).map_err(|_| GgufError::LimitExceeded {
        what: ctx.to_string(),
        value: n,
        limit_name: "usize::MAX",
        limit: usize::MAX as u64,
    })
}

impl<R: Read + Seek> Parser<'_, R> {
    pub(super) fn remaining(&self) -> u64 {
        self.file_size.saturating_sub(self.pos)
    }

    /// Errors unless `n` more bytes exist in the file.
    pub(super) fn ensure(&self, n: u64, ctx: Ctx<'_>) -> Result<()> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: ctx.to_string(),
                offset: self.pos,
                needed: n,
                file_size: self.file_size,
            });
        }
        Ok(())
    }

    /// Errors unless `count` elements of at least `min_each` bytes fit in the rest of the file.
    pub(super) fn check_count(&self, count: u64, min_each: u64, ctx: Ctx<'_>) -> Result<()> {
        let remaining = self.remaining();
        match count.checked_mul(min_each) {
            Some(need) if need <= remaining => Ok(()),
            _ => Err(GgufError::CountExceedsFile {
                what: ctx.to_string(),
                count,
                min_bytes: count.saturating_mul(min_each),
                remaining,
                offset: self.pos,
            }),
        }
    }

    /// Charges `bytes` of decoded memory against `max_metadata_bytes`.
    pub(super) fn charge(&mut self, bytes: u64, ctx: Ctx<'_>) -> Result<()> {
        let limit = self.limits.max_metadata_bytes;
        match self.budget_used.checked_add(bytes) {
            Some(total) if total <= limit => {
                self.budget_used = total;
                Ok(())
            }
            total => Err(GgufError::MetadataBudget {
                what: ctx.to_string(),
                needed: total.unwrap_or(u64::MAX),
                limit,
            }),
        }
    }

    /// Charges `count * each` bytes, failing on overflow.
    pub(super) fn charge_n(&mut self, count: u64, each: usize, ctx: Ctx<'_>) -> Result<()> {
        self.charge(count.saturating_mul(each as u64), ctx)
    }

    pub(super) fn fill(&mut self, buf: &mut [u8], ctx: Ctx<'_>) -> Result<()> {
        let n = buf.len() as u64;
        self.ensure(n, ctx)?;
        self.r.read_exact(buf).map_err(|e| {
            if e.kind() == ErrorKind::UnexpectedEof {
                GgufError::Truncated {
                    what: ctx.to_string(),
                    offset: self.pos,
                    needed: n,
                    file_size: self.file_size,
                }
            } else {
                GgufError::Io {
                    context: format!("reading {ctx} at offset {}", self.pos),
                    source: e,
                }
            }
        })?;
        self.pos += n;
        Ok(())
    }

    pub(super) fn bytes<const N: usize>(&mut self, ctx: Ctx<'_>) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.fill(&mut b, ctx)?;
        Ok(b)
    }

    pub(super) fn u32(&mut self, ctx: Ctx<'_>) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(ctx)?))
    }

    pub(super) fn u64(&mut self, ctx: Ctx<'_>) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(ctx)?))
    }

    pub(super) fn bool_byte(&mut self, b: u8, key: &str) -> Result<bool> {
        match b {
            0 => Ok(false),
            1 => Ok(true),
            byte => Err(GgufError::InvalidBool {
                key: key.to_string(),
                byte,
                offset: self.pos.saturating_sub(1),
            }),
        }
    }

    /// Reads a length-prefixed UTF-8 string; charges its bytes to the budget.
    pub(super) fn string(&mut self, ctx: Ctx<'_>) -> Result<String> {
        let len = self.u64(ctx)?;
        if len > self.limits.max_string_len {
            return Err(GgufError::LimitExceeded {
                what: format!("length of {ctx} at offset {}", self.pos - 8),
                value: len,
                limit_name: "max_string_len",
                limit: self.limits.max_string_len,
            });
        }
        self.ensure(len, ctx)?;
        self.charge(len, ctx)?;
        let start = self.pos;
        let mut buf = vec![0u8; to_usize(len, ctx)?];
        self.fill(&mut buf, ctx)?;
        String::from_utf8(buf).map_err(|e| GgufError::InvalidUtf8 {
            what: ctx.to_string(),
            offset: start + e.utf8_error().valid_up_to() as u64,
        })
    }

    /// Reads `count` fixed-size little-endian numbers in bulk.
    pub(super) fn numbers<T, const N: usize>(
        &mut self,
        count: u64,
        ctx: Ctx<'_>,
        conv: fn([u8; N]) -> T,
    ) -> Result<Vec<T>> {
        self.check_count(count, N as u64, ctx)?;
        self.charge_n(count, size_of::<T>(), ctx)?;
        let count = to_usize(count, ctx)?;
        let mut out = Vec::with_capacity(count);
        let per_chunk = CHUNK / N;
        let mut buf = vec![0u8; count.min(per_chunk) * N];
        let mut left = count;
        while left > 0 {
            let n = left.min(per_chunk);
            let chunk = &mut buf[..n * N];
            self.fill(chunk, ctx)?;
            for c in chunk.chunks_exact(N) {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                out.push(conv(a));
            }
            left -= n;
        }
        Ok(out)
    }

    pub(super) fn value(&mut self, ty: u32, ty_offset: u64, key: &str) -> Result<Value> {
        let ctx = Ctx::Value(key);
        Ok(match ty {
            code::U8 => Value::U8(u8::from_le_bytes(self.bytes(ctx)?)),
            code::I8 => Value::I8(i8::from_le_bytes(self.bytes(ctx)?)),
            code::U16 => Value::U16(u16::from_le_bytes(self.bytes(ctx)?)),
            code::I16 => Value::I16(i16::from_le_bytes(self.bytes(ctx)?)),
            code::U32 => Value::U32(u32::from_le_bytes(self.bytes(ctx)?)),
            code::I32 => Value::I32(i32::from_le_bytes(self.bytes(ctx)?)),
            code::U64 => Value::U64(u64::from_le_bytes(self.bytes(ctx)?)),
            code::I64 => Value::I64(i64::from_le_bytes(self.bytes(ctx)?)),
            code::F32 => Value::F32(f32::from_le_bytes(self.bytes(ctx)?)),
            code::F64 => Value::F64(f64::from_le_bytes(self.bytes(ctx)?)),
            code::BOOL => {
                let [b] = self.bytes(ctx)?;
                Value::Bool(self.bool_byte(b, key)?)
            }
            code::STRING => Value::String(self.string(ctx)?),
            code::ARRAY => Value::Array(self.array(key, 1)?),
            code => {
                return Err(GgufError::UnknownValueType {
                    key: key.to_string(),
                    code,
                    offset: ty_offset,
                })
            }
        })
    }

    /// Reads an array header and its elements; `depth` is 1 for a top-level array.
    pub(super) fn array(&mut self, key: &str, depth: u32) -> Result<Array> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(GgufError::ArrayTooDeep {
                key: key.to_string(),
                limit: MAX_ARRAY_DEPTH,
            });
        }
        let ctx = Ctx::Value(key);
        let ty_offset = self.pos;
        let ty = self.u32(ctx)?;
        let count = self.u64(ctx)?;
        Ok(match ty {
            code::U8 => Array::U8(self.numbers(count, ctx, u8::from_le_bytes)?),
            code::I8 => Array::I8(self.numbers(count, ctx, i8::from_le_bytes)?),
            code::U16 => Array::U16(self.numbers(count, ctx, u16::from_le_bytes)?),
            code::I16 => Array::I16(self.numbers(count, ctx, i16::from_le_bytes)?),
            code::U32 => Array::U32(self.numbers(count, ctx, u32::from_le_bytes)?),
            code::I32 => Array::I32(self.numbers(count, ctx, i32::from_le_bytes)?),
            code::U64 => Array::U64(self.numbers(count, ctx, u64::from_le_bytes)?),
            code::I64 => Array::I64(self.numbers(count, ctx, i64::from_le_bytes)?),
            code::F32 => Array::F32(self.numbers(count, ctx, f32::from_le_bytes)?),
            code::F64 => Array::F64(self.numbers(count, ctx, f64::from_le_bytes)?),
            code::BOOL => {
                let raw = self.numbers(count, ctx, u8::from_le_bytes)?;
                let start = self.pos - raw.len() as u64;
                let mut out = Vec::with_capacity(raw.len());
                for (i, b) in raw.into_iter().enumerate() {
                    match b {
                        0 => out.push(false),
                        1 => out.push(true),
                        byte => {
                            return Err(GgufError::InvalidBool {
                                key: key.to_string(),
                                byte,
                                offset: start + i as u64,
                            })
                        }
                    }
                }
                Array::Bool(out)
            }
            code::STRING => {
                self.check_count(count, 8, ctx)?;
                self.charge_n(count, size_of::<String>(), ctx)?;
                let mut out = Vec::with_capacity(to_usize(count, ctx)?);
                for i in 0..count {
                    out.push(self.string(Ctx::Elem(key, i))?);
                }
                Array::String(out)
            }
            code::ARRAY => {
                self.check_count(count, ARRAY_HEADER_BYTES, ctx)?;
                self.charge_n(count, size_of::<Array>(), ctx)?;
                let mut out = Vec::with_capacity(to_usize(count, ctx)?);
                for _ in 0..count {
                    out.push(self.array(key, depth + 1)?);
                }
                Array::Array(out)
            }
            code => {
                return Err(GgufError::UnknownValueType {
                    key: key.to_string(),
                    code,
                    offset: ty_offset,
                })
            }
        })
    }
}
