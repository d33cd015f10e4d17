//! Parser tests. Every rejection test builds a valid file, checks that it
//! parses, then mutates one thing and checks the specific error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod builder;
mod parser_tests;
mod real_files;
mod spec_tests;
mod tensor_tests;

use std::io::Cursor;

use super::{GgufError, GgufFile, Limits};

pub(super) use builder::{Builder, T};

/// Parses `bytes` with default limits.
pub(super) fn parse(bytes: &[u8]) -> Result<GgufFile, GgufError> {
    parse_with(bytes, &Limits::default())
}

pub(super) fn parse_with(bytes: &[u8], limits: &Limits) -> Result<GgufFile, GgufError> {
    GgufFile::read(&mut Cursor::new(bytes), limits)
}

/// Parses and panics with the error message on failure.
pub(super) fn ok(bytes: &[u8]) -> GgufFile {
    match parse(bytes) {
        Ok(f) => f,
        Err(e) => panic!("valid twin failed to parse: {e}"),
    }
}

/// Asserts failure, checks that the message is one line, returns the error.
pub(super) fn err(bytes: &[u8]) -> GgufError {
    err_with(bytes, &Limits::default())
}

pub(super) fn err_with(bytes: &[u8], limits: &Limits) -> GgufError {
    match parse_with(bytes, limits) {
        Ok(_) => panic!("mutated file parsed unexpectedly"),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "multi-line error: {msg}");
            println!("{msg}");
            e
        }
    }
}
