//! Header and metadata parsing: magic, version, counts, strings, values.

use super::super::value::code;
use super::super::{Array, GgmlType, GgufError, GgufFile, Limits, Value, MAX_ARRAY_DEPTH};
use super::builder::{encode_array, string, strs};
use super::{err, err_with, ok, Builder, T};

fn s(x: &str) -> Value {
    Value::String(x.into())
}

pub(super) fn one_tensor() -> Builder {
    Builder::new()
        .kv("general.architecture", s("llama"))
        .tensor(T::new("a", &[32, 2], GgmlType::F32))
}

#[test]
fn valid_file_round_trips_every_value_type() {
    let nested = Array::Array(vec![Array::U8(vec![1, 2]), Array::String(vec!["x".into()])]);
    let all = [
        ("u8", Value::U8(7)),
        ("i8", Value::I8(-7)),
        ("u16", Value::U16(700)),
        ("i16", Value::I16(-700)),
        ("u32", Value::U32(70_000)),
        ("i32", Value::I32(-70_000)),
        ("u64", Value::U64(1 << 40)),
        ("i64", Value::I64(-(1 << 40))),
        ("f32", Value::F32(1.5)),
        ("f64", Value::F64(-2.25)),
        ("bool", Value::Bool(true)),
        ("str", s("héllo")),
        ("arr_u8", Value::Array(Array::U8(vec![1, 2, 3]))),
        ("arr_i64", Value::Array(Array::I64(vec![-1, 1]))),
        ("arr_f64", Value::Array(Array::F64(vec![0.5]))),
        ("arr_bool", Value::Array(Array::Bool(vec![true, false]))),
        ("arr_str", strs(&["a", "", "c"])),
        ("arr_empty", Value::Array(Array::U16(vec![]))),
        ("nested", Value::Array(nested)),
    ];
    let mut b = one_tensor();
    for (k, v) in &all {
        b = b.kv(k, v.clone());
    }
    let f = ok(&b.build());
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 32);
    assert_eq!(f.metadata.len(), all.len() + 1);
    for ((k, v), (fk, fv)) in all.iter().zip(f.metadata.iter().skip(1)) {
        assert_eq!((*k, v), (fk.as_str(), fv));
        assert_eq!(f.get(k), Some(v));
    }
    assert_eq!(f.get_str("str").unwrap(), Some("héllo"));
    assert_eq!(f.get_u64("u64").unwrap(), Some(1 << 40));
    assert_eq!(f.get_u64("u8").unwrap(), Some(7));
    assert_eq!(f.get_f32("f64").unwrap(), Some(-2.25));
    assert_eq!(f.get_bool("bool").unwrap(), Some(true));
    assert_eq!(f.get_array("arr_u8").unwrap().map(Array::len), Some(3));
    assert_eq!(f.get_str("missing").unwrap(), None);
    assert_eq!(f.architecture().unwrap(), "llama");
    let t = f.tensor("a").unwrap();
    assert_eq!(
        (t.n_elements, t.n_bytes, t.offset),
        (64, 256, f.data_offset)
    );
    assert_eq!(f.data_offset % 32, 0);
    assert_eq!(f.file_size, f.data_offset + 256);
    assert_eq!(f.parameter_count(), 64);
}

#[test]
fn accessors_report_wrong_types() {
    let f = ok(&one_tensor()
        .kv("neg", Value::I32(-1))
        .kv("pos", Value::I32(5))
        .kv("n", Value::U32(1))
        .build());
    assert_eq!(f.get_u64("pos").unwrap(), Some(5));
    let e = f.get_u64("neg").unwrap_err().to_string();
    assert_eq!(
        e,
        "metadata key 'neg': expected non-negative integer, found i32 -1"
    );
    assert!(matches!(
        f.get_str("n"),
        Err(GgufError::WrongType {
            expected: "string",
            ..
        })
    ));
    assert!(f.get_f32("n").is_err());
    assert!(f.get_bool("n").is_err());
    assert!(f.get_array("n").is_err());
    assert!(f.get_u64("general.architecture").is_err());
    let no_arch = ok(&Builder::new().build());
    assert!(matches!(
        no_arch.architecture(),
        Err(GgufError::MissingKey(_))
    ));
}

#[test]
fn bad_magic() {
    ok(&Builder::new().build());
    let b = Builder {
        magic: *b"GGML",
        ..Builder::new()
    };
    assert!(matches!(err(&b.build()), GgufError::BadMagic { found } if &found == b"GGML"));
    assert!(matches!(err(b"GG"), GgufError::Truncated { .. }));
}

#[test]
fn version() {
    ok(&Builder {
        version: 2,
        ..Builder::new()
    }
    .build());
    for v in [0, 1, 4, 0x0300_0000] {
        let e = err(&Builder {
            version: v,
            ..Builder::new()
        }
        .build());
        assert!(matches!(e, GgufError::UnsupportedVersion(x) if x == v));
    }
}

#[test]
fn counts_against_file_size_and_limits() {
    let b = one_tensor();
    ok(&b.build());
    for (kc, tc) in [
        (Some(1 << 19), None),
        (None, Some(1 << 19)),
        (Some(1 << 20), Some(1 << 20)),
    ] {
        let bad = Builder {
            kv_count: kc,
            tensor_count: tc,
            ..b.clone()
        };
        assert!(matches!(
            err(&bad.build()),
            GgufError::CountExceedsFile { .. }
        ));
    }
    // Individually plausible, together too large for the file.
    let len = b.build().len() as u64;
    let bad = Builder {
        kv_count: Some(len / 13 - 1),
        tensor_count: Some(len / 32 - 1),
        ..b.clone()
    };
    assert!(matches!(
        err(&bad.build()),
        GgufError::CountExceedsFile { .. }
    ));
    let limits = Limits {
        max_tensors: 0,
        ..Limits::default()
    };
    let e = err_with(&b.build(), &limits);
    assert!(matches!(
        e,
        GgufError::LimitExceeded {
            limit_name: "max_tensors",
            ..
        }
    ));
    let limits = Limits {
        max_kv: 0,
        ..Limits::default()
    };
    let e = err_with(&b.build(), &limits);
    assert!(matches!(
        e,
        GgufError::LimitExceeded {
            limit_name: "max_kv",
            ..
        }
    ));
}

#[test]
fn string_length_beyond_file_or_limit() {
    let good = one_tensor().kv("k", s("abc"));
    ok(&good.build());
    let mut bytes = 1_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"abc");
    let bad = one_tensor().kv_raw("k", code::STRING, bytes);
    assert!(matches!(err(&bad.build()), GgufError::Truncated { what, .. } if what.contains("'k'")));

    let long = one_tensor().kv("k", s(&"x".repeat(100)));
    ok(&long.build());
    let limits = Limits {
        max_string_len: 99,
        ..Limits::default()
    };
    let e = err_with(&long.build(), &limits);
    assert!(matches!(
        e,
        GgufError::LimitExceeded {
            limit_name: "max_string_len",
            value: 100,
            ..
        }
    ));
}

#[test]
fn invalid_utf8_in_value_key_and_tensor_name() {
    ok(&one_tensor()
        .kv_raw("k", code::STRING, string(b"ok"))
        .build());
    let bad = one_tensor().kv_raw("k", code::STRING, string(b"o\xffk"));
    assert!(
        matches!(err(&bad.build()), GgufError::InvalidUtf8 { what, .. } if what.contains("'k'"))
    );

    let good_arr = Builder::new().kv("arr", strs(&["a", "b"])).build();
    ok(&good_arr);
    let mut bad_arr = good_arr.clone();
    let pos = bad_arr.len() - 1; // last byte is "b"
    bad_arr[pos] = 0xc3;
    assert!(
        matches!(err(&bad_arr), GgufError::InvalidUtf8 { what, .. } if what.contains("element 1"))
    );

    let mut bytes = one_tensor().build();
    let at = bytes.windows(4).position(|w| w == b"arch").unwrap();
    bytes[at] = 0x80;
    assert!(matches!(err(&bytes), GgufError::InvalidUtf8 { what, .. } if what.contains("key #0")));
}

#[test]
fn unknown_value_type() {
    ok(&one_tensor().kv_raw("k", code::U32, vec![0; 4]).build());
    let e = err(&one_tensor().kv_raw("k", 13, vec![0; 4]).build());
    assert!(matches!(e, GgufError::UnknownValueType { code: 13, key, .. } if key == "k"));
    let mut arr = 99u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&0u64.to_le_bytes());
    let e = err(&one_tensor().kv_raw("k", code::ARRAY, arr).build());
    assert!(matches!(e, GgufError::UnknownValueType { code: 99, .. }));
}

#[test]
fn invalid_bool() {
    ok(&one_tensor().kv_raw("k", code::BOOL, vec![1]).build());
    assert!(matches!(
        err(&one_tensor().kv_raw("k", code::BOOL, vec![2]).build()),
        GgufError::InvalidBool { byte: 2, .. }
    ));
    let mut arr = code::BOOL.to_le_bytes().to_vec();
    arr.extend_from_slice(&2u64.to_le_bytes());
    arr.extend_from_slice(&[0, 7]);
    assert!(matches!(
        err(&one_tensor().kv_raw("k", code::ARRAY, arr).build()),
        GgufError::InvalidBool { byte: 7, .. }
    ));
}

fn nested(depth: u32) -> Value {
    let mut a = Array::U8(vec![1]);
    for _ in 1..depth {
        a = Array::Array(vec![a]);
    }
    Value::Array(a)
}

#[test]
fn nested_array_depth_limit() {
    ok(&one_tensor().kv("k", nested(MAX_ARRAY_DEPTH)).build());
    let e = err(&one_tensor().kv("k", nested(MAX_ARRAY_DEPTH + 1)).build());
    assert!(matches!(e, GgufError::ArrayTooDeep { .. }));
    // A hostile file nesting thousands deep must not overflow the stack.
    let mut raw = Vec::new();
    for _ in 0..10_000 {
        raw.extend_from_slice(&code::ARRAY.to_le_bytes());
        raw.extend_from_slice(&1u64.to_le_bytes());
    }
    assert!(matches!(
        err(&one_tensor().kv_raw("k", code::ARRAY, raw).build()),
        GgufError::ArrayTooDeep { .. }
    ));
}

#[test]
fn array_count_beyond_file() {
    let a = Array::U32(vec![1, 2, 3]);
    ok(&one_tensor().kv("k", Value::Array(a.clone())).build());
    for (ty, count) in [
        (code::U32, 1u64 << 40),
        (code::STRING, 1 << 30),
        (code::ARRAY, 1 << 30),
        (code::U8, u64::MAX),
    ] {
        let mut raw = ty.to_le_bytes().to_vec();
        raw.extend_from_slice(&count.to_le_bytes());
        raw.extend_from_slice(&[0; 12]);
        let e = err(&one_tensor().kv_raw("k", code::ARRAY, raw).build());
        assert!(matches!(e, GgufError::CountExceedsFile { count: c, .. } if c == count));
    }
    // Array exactly one element short of its count.
    let mut raw = encode_array(&a);
    raw[4] = 4;
    let e = err(&Builder::new().kv_raw("k", code::ARRAY, raw).build());
    assert!(matches!(e, GgufError::CountExceedsFile { .. }));
}

#[test]
fn metadata_budget() {
    let b = one_tensor().kv("big", Value::Array(Array::U8(vec![0; 100_000])));
    ok(&b.build());
    let limits = Limits {
        max_metadata_bytes: 50_000,
        ..Limits::default()
    };
    let e = err_with(&b.build(), &limits);
    assert!(
        matches!(e, GgufError::MetadataBudget { what, limit: 50_000, .. } if what.contains("'big'"))
    );
    // Strings count too.
    let b = one_tensor().kv("big", strs(&[&"y".repeat(60_000)]));
    ok(&b.build());
    assert!(matches!(
        err_with(&b.build(), &limits),
        GgufError::MetadataBudget { .. }
    ));
}

#[test]
fn duplicate_metadata_key() {
    ok(&one_tensor().kv("k", Value::U8(1)).build());
    let e = err(&one_tensor()
        .kv("k", Value::U8(1))
        .kv_dup("k", Value::U8(2))
        .build());
    assert!(matches!(e, GgufError::DuplicateKey(k) if k == "k"));
}

#[test]
fn open_reports_path() {
    let e = GgufFile::open(std::path::Path::new("/nonexistent/x.gguf")).unwrap_err();
    assert!(matches!(e, GgufError::Open { .. }));
    assert!(e
        .to_string()
        .starts_with("cannot open GGUF file '/nonexistent/x.gguf': "));
}
