//! Tensor infos and layout: names, alignment, shapes, types, offsets,
//! bounds and overlap; truncation and corruption of the whole header.

use super::super::{GgmlType, GgufError, Limits, Value};
use super::builder::llama;
use super::parser_tests::one_tensor;
use super::{err, err_with, ok, parse, parse_with, Builder, T};

#[test]
fn duplicate_tensor_name() {
    let b = one_tensor().tensor(T::new("b", &[32], GgmlType::F32));
    ok(&b.build());
    let e = err(&one_tensor()
        .tensor(T::new("a", &[32], GgmlType::F32))
        .build());
    assert!(matches!(e, GgufError::DuplicateTensor(n) if n == "a"));
}

#[test]
fn alignment_rules() {
    let good = Builder {
        alignment: 64,
        ..one_tensor().tensor(T::new("b", &[3], GgmlType::F32))
    }
    .kv("general.alignment", Value::U32(64));
    let f = ok(&good.build());
    assert_eq!(f.alignment, 64);
    assert_eq!(f.data_offset % 64, 0);
    assert_eq!(f.tensors[1].offset % 64, 0);
    for v in [
        Value::U32(0),
        Value::U32(48),
        Value::U64(64),
        Value::U32(1 << 20),
    ] {
        let e = err(&good.clone().kv("general.alignment", v).build());
        assert!(matches!(e, GgufError::BadAlignment(_)));
    }
    let limits = Limits {
        max_alignment: 32,
        ..Limits::default()
    };
    assert!(
        matches!(err_with(&good.build(), &limits), GgufError::BadAlignment(m) if m.contains("max_alignment 32"))
    );
}

#[test]
fn n_dims_range() {
    let four = one_tensor().tensor(T::new("b", &[32, 1, 1, 2], GgmlType::F32));
    ok(&four.build());
    let five = one_tensor().tensor(T::new("b", &[32, 1, 1, 1, 2], GgmlType::F32));
    assert!(
        matches!(err(&five.build()), GgufError::BadTensor { tensor, reason } if tensor == "b" && reason.contains("n_dims 5"))
    );
    let zero = one_tensor().map_tensor("a", |t| {
        t.dims.clear();
        t.n_dims = Some(0);
    });
    assert!(
        matches!(err(&zero.build()), GgufError::BadTensor { reason, .. } if reason.contains("n_dims 0"))
    );
}

#[test]
fn zero_or_overflowing_dimension() {
    let zero = one_tensor().map_tensor("a", |t| t.dims = vec![32, 0]);
    assert!(
        matches!(err(&zero.build()), GgufError::BadTensor { reason, .. } if reason.contains("dimension 1 is 0"))
    );
    let big = one_tensor().map_tensor("a", |t| t.dims = vec![1 << 32, 1 << 32]);
    assert!(
        matches!(err(&big.build()), GgufError::BadTensor { reason, .. } if reason.contains("overflows"))
    );
    let huge = one_tensor().map_tensor("a", |t| t.dims = vec![u64::MAX]);
    assert!(
        matches!(err(&huge.build()), GgufError::BadTensor { reason, .. } if reason.contains("i64::MAX"))
    );
    // Element count fits but the byte size overflows.
    let bytes = one_tensor().map_tensor("a", |t| t.dims = vec![1 << 31, 1 << 31, 1 << 1]);
    assert!(
        matches!(err(&bytes.build()), GgufError::BadTensor { reason, .. } if reason.contains("overflows"))
    );
}

#[test]
fn row_length_must_be_block_multiple() {
    ok(&Builder::new()
        .tensor(T::new("q", &[256, 2], GgmlType::Q4_K))
        .build());
    let bad = Builder::new().tensor(T::new("q", &[128, 4], GgmlType::Q4_K));
    assert!(
        matches!(err(&bad.build()), GgufError::BadTensor { reason, .. } if reason.contains("block size 256"))
    );
}

#[test]
fn unknown_ggml_type() {
    for code in [4, 5, 31, 36, 40, u32::MAX] {
        let b = one_tensor().map_tensor("a", |t| t.ty = code);
        assert!(matches!(err(&b.build()), GgufError::UnknownGgmlType { code: c, .. } if c == code));
    }
}

#[test]
fn misaligned_offset() {
    let b = one_tensor().tensor(T::new("b", &[8], GgmlType::F32));
    ok(&b.build());
    let bad = b.map_tensor("b", |t| t.offset = Some(256 + 4));
    assert!(
        matches!(err(&bad.build()), GgufError::BadTensor { reason, .. } if reason.contains("alignment 32"))
    );
}

#[test]
fn offset_plus_size_past_end() {
    let bytes = one_tensor().build();
    ok(&bytes);
    let e = err(&bytes[..bytes.len() - 1]);
    let msg = e.to_string();
    assert!(
        msg.contains("tensor 'a': offset") && msg.contains("exceeds file size"),
        "{msg}"
    );
    let far = one_tensor().map_tensor("a", |t| t.offset = Some(u64::MAX - 31));
    assert!(matches!(err(&far.build()), GgufError::BadTensor { .. }));
}

#[test]
fn overlapping_tensors() {
    let b = one_tensor().tensor(T::new("b", &[32], GgmlType::F32));
    ok(&b.build());
    let bad = b.map_tensor("b", |t| t.offset = Some(224));
    let e = err(&bad.build());
    assert!(
        matches!(e, GgufError::OverlappingTensors { first, second, .. } if first == "a" && second == "b")
    );
    let same = one_tensor()
        .tensor(T::new("b", &[32], GgmlType::F32))
        .map_tensor("b", |t| t.offset = Some(0));
    assert!(matches!(
        err(&same.build()),
        GgufError::OverlappingTensors { .. }
    ));
}

#[test]
fn truncated_anywhere() {
    let (bytes, header_len) = llama().build_with_header_len();
    ok(&bytes);
    for cut in 0..bytes.len() {
        let e = parse(&bytes[..cut])
            .err()
            .unwrap_or_else(|| panic!("prefix {cut} parsed"));
        if cut < header_len {
            let ok = matches!(
                e,
                GgufError::Truncated { .. } | GgufError::CountExceedsFile { .. }
            );
            assert!(ok, "cut {cut}: {e}");
        } else {
            assert!(matches!(e, GgufError::BadTensor { .. }), "cut {cut}: {e}");
        }
    }
}

/// Cheap deterministic fuzzing: flipped bytes must never panic.
#[test]
fn random_corruption_never_panics() {
    let (bytes, header_len) = llama().build_with_header_len();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let limits = Limits {
        max_metadata_bytes: 1 << 20,
        ..Limits::default()
    };
    for _ in 0..3000 {
        let mut b = bytes.clone();
        for _ in 0..1 + next() % 4 {
            let i = (next() % header_len as u64) as usize;
            b[i] = next() as u8;
        }
        if let Err(e) = parse_with(&b, &limits) {
            let msg = e.to_string();
            assert!(!msg.contains('\n') && msg.len() < 1000, "{msg}");
        }
    }
}

#[test]
fn ggml_type_table() {
    let t = |c| GgmlType::from_code(c).unwrap();
    assert_eq!(
        (t(0).name(), t(0).block_size(), t(0).type_size()),
        ("F32", 1, 4)
    );
    assert_eq!(t(12), GgmlType::Q4_K);
    assert_eq!(
        (GgmlType::Q4_K.block_size(), GgmlType::Q4_K.type_size()),
        (256, 144)
    );
    assert_eq!(
        (GgmlType::Q6_K.type_size(), GgmlType::Q8_0.type_size()),
        (210, 34)
    );
    assert_eq!(
        (GgmlType::MXFP4.block_size(), GgmlType::MXFP4.type_size()),
        (32, 17)
    );
    assert_eq!(GgmlType::ALL.len(), 32);
    for (i, a) in GgmlType::ALL.iter().enumerate() {
        assert!(GgmlType::ALL[..i]
            .iter()
            .all(|b| b.code() != a.code() && b.name() != a.name()));
        assert_eq!(GgmlType::from_code(a.code()), Some(*a));
        assert_eq!(a.is_quantized(), a.block_size() > 1, "{a}");
    }
    assert_eq!(GgmlType::Q4_0.to_string(), "Q4_0");
    assert_eq!(GgmlType::Q4_0.bytes_for(64), Some(36));
    assert_eq!(GgmlType::Q4_0.bytes_for(33), None);
}

#[test]
fn default_limits() {
    let l = Limits::default();
    assert_eq!(
        (l.max_dims, l.max_string_len, l.max_alignment),
        (4, 16 << 20, 1 << 16)
    );
}
