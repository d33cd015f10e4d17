//! The GGUF header parser. Reads only the header (metadata and tensor
//! infos), never tensor data, and validates everything it reads; the
//! bounds-checked primitives live in `decode.rs`.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::mem::size_of;

use super::decode::{to_usize, Ctx, Parser, Result};
use super::error::GgufError;
use super::types::GgmlType;
use super::value::Value;
use super::{GgufFile, Limits, TensorInfo};

/// File magic, `GGUF`.
pub(crate) const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment used when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Smallest encoded key/value pair: key length, value type, one value byte.
const KV_MIN_BYTES: u64 = 8 + 4 + 1;
/// Smallest encoded tensor info: name length, n_dims, one dim, type, offset.
const TENSOR_INFO_MIN_BYTES: u64 = 8 + 4 + 8 + 4 + 8;
/// Approximate memory per hash-index entry, on top of the key bytes.
const INDEX_ENTRY_BYTES: u64 = (size_of::<String>() + 2 * size_of::<usize>()) as u64;

/// Validates `general.alignment` (must be a u32 power of two within the limit).
fn alignment(
    metadata: &[(String, Value)],
    index: &HashMap<String, usize>,
    limits: &Limits,
) -> Result<u64> {
    let Some(v) = index
        .get("general.alignment")
        .and_then(|&i| metadata.get(i))
    else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let a = match v.1 {
        Value::U32(a) => u64::from(a),
        ref other => {
            return Err(GgufError::BadAlignment(format!(
                "expected u32, found {}",
                other.type_name()
            )))
        }
    };
    if a == 0 {
        return Err(GgufError::BadAlignment("must not be 0".into()));
    }
    if !a.is_power_of_two() {
        return Err(GgufError::BadAlignment(format!(
            "{a} is not a power of two"
        )));
    }
    if a > limits.max_alignment {
        return Err(GgufError::BadAlignment(format!(
            "{a} exceeds max_alignment {}",
            limits.max_alignment
        )));
    }
    Ok(a)
}

/// Reads the rest of one tensor info (after its name) and validates its
/// shape, type and relative offset. `offset` is still relative on return.
fn tensor_info<R: Read + Seek>(
    p: &mut Parser<'_, R>,
    name: String,
    alignment: u64,
) -> Result<TensorInfo> {
    let bad = |reason: String| GgufError::BadTensor {
        tensor: name.clone(),
        reason,
    };
    let n_dims = p.u32(Ctx::Tensor(&name, "n_dims"))?;
    if n_dims == 0 || n_dims > p.limits.max_dims {
        return Err(bad(format!(
            "n_dims {n_dims} is outside 1..={} (max_dims)",
            p.limits.max_dims
        )));
    }
    p.check_count(u64::from(n_dims), 8, Ctx::Tensor(&name, "dims"))?;
    p.charge_n(
        u64::from(n_dims),
        size_of::<u64>(),
        Ctx::Tensor(&name, "dims"),
    )?;
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(p.u64(Ctx::Tensor(&name, "dims"))?);
    }
    let mut n_elements: u64 = 1;
    for (j, &d) in dims.iter().enumerate() {
        if d == 0 {
            return Err(bad(format!("dimension {j} is 0 (dims {dims:?})")));
        }
        if d > i64::MAX as u64 {
            return Err(bad(format!("dimension {j} = {d} exceeds i64::MAX")));
        }
        n_elements = n_elements
            .checked_mul(d)
            .ok_or_else(|| bad(format!("element count of dims {dims:?} overflows u64")))?;
    }
    let code = p.u32(Ctx::Tensor(&name, "ggml type"))?;
    let dtype = GgmlType::from_code(code).ok_or_else(|| GgufError::UnknownGgmlType {
        tensor: name.clone(),
        code,
    })?;
    let row = dims.first().copied().unwrap_or(0);
    if !row.is_multiple_of(dtype.block_size()) {
        return Err(bad(format!(
            "row length dims[0] = {row} is not a multiple of the {dtype} block size {}",
            dtype.block_size()
        )));
    }
    let n_bytes = dtype.bytes_for(n_elements).ok_or_else(|| {
        bad(format!(
            "byte size of {n_elements} {dtype} elements overflows u64"
        ))
    })?;
    let rel = p.u64(Ctx::Tensor(&name, "offset"))?;
    if !rel.is_multiple_of(alignment) {
        return Err(bad(format!(
            "data offset {rel} is not a multiple of alignment {alignment}"
        )));
    }
    Ok(TensorInfo {
        name,
        dtype,
        dims,
        offset: rel,
        n_elements,
        n_bytes,
    })
}

/// Makes tensor offsets absolute and checks bounds and pairwise overlap.
fn place_tensors(tensors: &mut [TensorInfo], data_offset: u64, file_size: u64) -> Result<()> {
    for t in tensors.iter_mut() {
        let abs = data_offset.checked_add(t.offset);
        let end = abs.and_then(|a| a.checked_add(t.n_bytes));
        match (abs, end) {
            (Some(abs), Some(end)) if end <= file_size => t.offset = abs,
            _ => {
                return Err(GgufError::BadTensor {
                    tensor: t.name.clone(),
                    reason: format!(
                        "offset {} + size {} exceeds file size {file_size}",
                        data_offset.saturating_add(t.offset),
                        t.n_bytes
                    ),
                })
            }
        }
    }

    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| tensors[i].offset);
    for w in order.windows(2) {
        let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
        // Cannot overflow: checked against file_size above.
        let a_end = a.offset.saturating_add(a.n_bytes);
        if b.offset < a_end {
            return Err(GgufError::OverlappingTensors {
                first: a.name.clone(),
                first_end: a_end,
                second: b.name.clone(),
                second_offset: b.offset,
            });
        }
    }
    Ok(())
}

/// Parses and validates a GGUF header from `r`. See [`GgufFile::read`].
pub(super) fn parse<R: Read + Seek>(r: &mut R, limits: &Limits) -> Result<GgufFile> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| GgufError::Io {
            context: what,
            source,
        }
    };
    let file_size = r
        .seek(SeekFrom::End(0))
        .map_err(io("seeking to end of file"))?;
    r.seek(SeekFrom::Start(0))
        .map_err(io("seeking to start of file"))?;
    let mut p = Parser {
        r,
        pos: 0,
        file_size,
        limits,
        budget_used: 0,
    };

    let magic: [u8; 4] = p.bytes(Ctx::Header("magic"))?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = p.u32(Ctx::Header("version"))?;
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let tensor_count = p.u64(Ctx::Header("tensor count"))?;
    let kv_count = p.u64(Ctx::Header("metadata kv count"))?;
    for (what, count, limit_name, limit) in [
        (
            "tensor count",
            tensor_count,
            "max_tensors",
            limits.max_tensors,
        ),
        ("metadata kv count", kv_count, "max_kv", limits.max_kv),
    ] {
        if count > limit {
            return Err(GgufError::LimitExceeded {
                what: what.into(),
                value: count,
                limit_name,
                limit,
            });
        }
    }
    p.check_count(kv_count, KV_MIN_BYTES, Ctx::Header("metadata kv count"))?;
    p.check_count(
        tensor_count,
        TENSOR_INFO_MIN_BYTES,
        Ctx::Header("tensor count"),
    )?;
    // Both fit individually (so neither product overflows); now together.
    let header_min = kv_count
        .saturating_mul(KV_MIN_BYTES)
        .saturating_add(tensor_count.saturating_mul(TENSOR_INFO_MIN_BYTES));
    p.check_count(1, header_min, Ctx::Header("metadata and tensor infos"))?;

    let kv_entry = size_of::<(String, Value)>() as u64 + INDEX_ENTRY_BYTES;
    p.charge_n(
        kv_count,
        kv_entry as usize,
        Ctx::Header("metadata kv count"),
    )?;
    let tensor_entry = size_of::<TensorInfo>() as u64 + INDEX_ENTRY_BYTES;
    p.charge_n(
        tensor_count,
        tensor_entry as usize,
        Ctx::Header("tensor count"),
    )?;

    let mut metadata = Vec::with_capacity(to_usize(kv_count, Ctx::Header("metadata kv count"))?);
    let mut index = HashMap::with_capacity(metadata.capacity());
    for i in 0..kv_count {
        let key = p.string(Ctx::Key(i))?;
        p.charge(key.len() as u64, Ctx::Key(i))?; // the index holds a copy
        if index.contains_key(&key) {
            return Err(GgufError::DuplicateKey(key));
        }
        let ty_offset = p.pos;
        let ty = p.u32(Ctx::Value(&key))?;
        let value = p.value(ty, ty_offset, &key)?;
        index.insert(key.clone(), metadata.len());
        metadata.push((key, value));
    }
    let alignment = alignment(&metadata, &index, limits)?;

    let mut tensors: Vec<TensorInfo> =
        Vec::with_capacity(to_usize(tensor_count, Ctx::Header("tensor count"))?);
    let mut tensor_index = HashMap::with_capacity(tensors.capacity());
    for i in 0..tensor_count {
        let name = p.string(Ctx::TensorName(i))?;
        p.charge(name.len() as u64, Ctx::TensorName(i))?;
        if tensor_index.contains_key(&name) {
            return Err(GgufError::DuplicateTensor(name));
        }
        let info = tensor_info(&mut p, name, alignment)?;
        tensor_index.insert(info.name.clone(), tensors.len());
        tensors.push(info);
    }

    let data_offset = p.pos.checked_next_multiple_of(alignment).ok_or_else(|| {
        GgufError::BadAlignment(format!("data section offset overflows after {}", p.pos))
    })?;
    place_tensors(&mut tensors, data_offset, file_size)?;

    Ok(GgufFile {
        version,
        alignment,
        metadata,
        index,
        tensors,
        tensor_index,
        data_offset,
        file_size,
    })
}
