//! Labelled data files: one JSON object per line (blank lines skipped), with errors that name
//! the file and line.

use std::path::Path;

use serde::de::DeserializeOwned;

/// Errors of reading a JSONL file.
#[derive(Debug, thiserror::Error)]
pub enum JsonlError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Data {
        path: String,
        line: usize,
        message: String,
    },
}

/// Read every line of `path` as a `T`; `check` may refuse a parsed line with a message.
///
/// # Errors
/// The file cannot be read, a line does not parse, or `check` refuses it.
pub fn read<T: DeserializeOwned>(
    path: &Path,
    check: impl Fn(&T) -> Result<(), String>,
) -> Result<Vec<T>, JsonlError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| JsonlError::Io {
        path: p.clone(),
        source,
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let data = |message: String| JsonlError::Data {
                path: p.clone(),
                line: i + 1,
                message,
            };
            let item: T = serde_json::from_str(l).map_err(|e| data(e.to_string()))?;
            check(&item).map_err(data)?;
            Ok(item)
        })
        .collect()
}
