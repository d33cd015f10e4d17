//! Downloading catalogue models from the Hugging Face hub, with a progress bar and a checksum.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::catalog::{Catalog, Entry};

/// Errors of fetching and verifying a model file.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error("unknown model '{0}'; `llmgenie list` shows the catalogue")]
    Unknown(String),
    #[error("download of {repo}/{file} failed: {message}; check the network (HF_ENDPOINT, HF_TOKEN) or fetch it with `scripts/fetch_models {name}`")]
    Download {
        name: String,
        repo: String,
        file: String,
        message: String,
    },
    #[error("{path} has sha256 {actual}, expected {expected}; delete it and pull again")]
    Checksum {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PullError + '_ {
    move |source| PullError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Lower-case hex sha256 of a file, read in 1 MiB blocks.
///
/// # Errors
/// The file cannot be read.
pub fn sha256_file(path: &Path) -> Result<String, PullError> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Check `path` against the entry's checksum, when the catalogue knows it.
///
/// # Errors
/// The checksum differs or the file cannot be read.
pub fn verify(entry: &Entry, path: &Path) -> Result<(), PullError> {
    let Some(expected) = &entry.sha256 else {
        return Ok(());
    };
    let actual = sha256_file(path)?;
    if &actual != expected {
        return Err(PullError::Checksum {
            path: path.display().to_string(),
            expected: expected.clone(),
            actual,
        });
    }
    Ok(())
}

/// Make sure the named model is in the models directory: verify it if present, else download it
/// from the hub (with a progress bar on stderr) and verify it. Returns the file's path.
///
/// # Errors
/// Unknown name, download failure, or a checksum mismatch (the bad file is removed).
pub fn pull(catalog: &Catalog, name: &str, progress: bool) -> Result<PathBuf, PullError> {
    let entry = catalog
        .find(name)
        .ok_or_else(|| PullError::Unknown(name.to_string()))?;
    let target = catalog.path_of(entry);
    if target.is_file() {
        verify(entry, &target)?;
        return Ok(target);
    }
    std::fs::create_dir_all(catalog.dir()).map_err(io(catalog.dir()))?;
    let fail = |message: String| PullError::Download {
        name: entry.name.clone(),
        repo: entry.repo.clone(),
        file: entry.file.clone(),
        message,
    };
    let cache = catalog.dir().join(".cache");
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(progress)
        .with_cache_dir(cache)
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let cached = api
        .model(entry.repo.clone())
        .get(&entry.file)
        .map_err(|e| fail(e.to_string()))?;
    let partial = target.with_extension("gguf.tmp");
    std::fs::copy(&cached, &partial).map_err(io(&partial))?;
    if let Err(e) = verify(entry, &partial) {
        // A corrupt download must not be mistaken for the model later.
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, &target).map_err(io(&target))?;
    // The cache copy is no longer needed; keep only the verified file.
    let _ = std::fs::remove_file(&cached);
    Ok(target)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_present_file_with_the_wrong_checksum_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::load(dir.path()).unwrap();
        let entry = cat.find("smollm2-135m").unwrap().clone();
        std::fs::write(cat.path_of(&entry), b"not a model").unwrap();
        let e = pull(&cat, "smollm2-135m", false).unwrap_err().to_string();
        assert!(e.contains("expected b179c952"), "{e}");
        let e = pull(&cat, "no-such-model", false).unwrap_err().to_string();
        assert!(e.contains("unknown model"), "{e}");
    }
}
