//! The model catalogue (`models/catalog.toml`) and resolution of `--model` arguments.
//!
//! `--model` takes a catalogue name (or alias) or a path to any `.gguf` file. Catalogue files
//! live in the models directory: `$LLMGENIE_MODELS`, else `./models`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The catalogue shipped with the source, used when the models directory has none.
const BUILTIN: &str = include_str!("../models/catalog.toml");

/// Errors of reading the catalogue and resolving names.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot parse model catalogue {path}: {message}")]
    Parse { path: String, message: String },
    #[error("unknown model '{name}'; known models: {known}; or pass a path to a .gguf file")]
    Unknown { name: String, known: String },
    #[error("model '{name}' is not downloaded yet ({path} is missing); run `llmgenie pull {name}` or `scripts/fetch_models {name}`")]
    NotDownloaded { name: String, path: String },
    #[error("model file {0} does not exist")]
    MissingFile(String),
}

/// One named model.
#[derive(Debug, Clone, Deserialize)]
pub struct Entry {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub description: String,
    /// Hugging Face repository holding the file.
    pub repo: String,
    pub file: String,
    /// Lower-case hex sha256 of the file, where known.
    pub sha256: Option<String>,
    pub size: Option<u64>,
    /// PyPI packages that carry the file (a fallback source for `scripts/fetch_models`).
    #[serde(default)]
    pub pypi: Vec<String>,
    #[serde(default)]
    pub pypi_files: Vec<String>,
}

/// The whole catalogue.
#[derive(Debug, Clone, Deserialize)]
pub struct Catalog {
    pub default: String,
    #[serde(rename = "model")]
    pub models: Vec<Entry>,
    #[serde(skip)]
    dir: PathBuf,
}

/// Where model files live: `$LLMGENIE_MODELS` or `./models`.
pub fn models_dir() -> PathBuf {
    std::env::var_os("LLMGENIE_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models"))
}

impl Catalog {
    /// The catalogue in `dir/catalog.toml` if present, else the built-in one; files resolve in `dir`.
    ///
    /// # Errors
    /// The catalogue file exists but does not parse.
    pub fn load(dir: &Path) -> Result<Self, CatalogError> {
        let path = dir.join("catalog.toml");
        let (text, origin) = match std::fs::read_to_string(&path) {
            Ok(t) => (t, path.display().to_string()),
            Err(_) => (BUILTIN.to_string(), "built-in catalogue".to_string()),
        };
        Self::parse(&text, &origin, dir)
    }

    /// Parse catalogue text.
    ///
    /// # Errors
    /// The text is not a valid catalogue.
    pub fn parse(text: &str, origin: &str, dir: &Path) -> Result<Self, CatalogError> {
        let mut cat: Catalog = toml::from_str(text).map_err(|e| CatalogError::Parse {
            path: origin.to_string(),
            message: e.to_string().replace('\n', " "),
        })?;
        cat.dir = dir.to_path_buf();
        Ok(cat)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry whose name or alias is `name` (case-insensitive).
    pub fn find(&self, name: &str) -> Option<&Entry> {
        let n = name.to_ascii_lowercase();
        self.models
            .iter()
            .find(|e| e.name == n || e.aliases.iter().any(|a| a.to_ascii_lowercase() == n))
    }

    /// Where an entry's file lives (or will live).
    pub fn path_of(&self, entry: &Entry) -> PathBuf {
        self.dir.join(&entry.file)
    }

    fn known(&self) -> String {
        self.models
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Resolve a `--model` argument (empty: the default) to a name and an existing file.
    ///
    /// # Errors
    /// An unknown name, a catalogue model that is not downloaded, or a missing file.
    pub fn resolve(&self, arg: &str) -> Result<(String, PathBuf), CatalogError> {
        let arg = if arg.is_empty() {
            self.default.as_str()
        } else {
            arg
        };
        if let Some(entry) = self.find(arg) {
            let path = self.path_of(entry);
            if path.is_file() {
                return Ok((entry.name.clone(), path));
            }
            return Err(CatalogError::NotDownloaded {
                name: entry.name.clone(),
                path: path.display().to_string(),
            });
        }
        let path = PathBuf::from(arg);
        let looks_like_path = arg.ends_with(".gguf") || arg.contains('/') || arg.contains('\\');
        if looks_like_path {
            if path.is_file() {
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| arg.to_string());
                return Ok((name, path));
            }
            return Err(CatalogError::MissingFile(arg.to_string()));
        }
        Err(CatalogError::Unknown {
            name: arg.to_string(),
            known: self.known(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalogue_parses_and_has_the_test_models() {
        let cat = Catalog::parse(BUILTIN, "builtin", Path::new("models")).unwrap();
        assert_eq!(cat.default, "smollm2-135m");
        for name in [
            "smollm2-135m",
            "gemma3-270m",
            "qwen2.5-0.5b",
            "mistral-7b",
            "codellama-7b",
        ] {
            assert!(cat.find(name).is_some(), "{name} missing");
        }
        assert_eq!(cat.find("SmolLM2").unwrap().name, "smollm2-135m");
        for e in &cat.models {
            if let Some(h) = &e.sha256 {
                assert_eq!(h.len(), 64, "{}", e.name);
            }
            assert_eq!(e.pypi.len(), e.pypi_files.len(), "{}", e.name);
        }
    }

    #[test]
    fn resolve_reports_unknown_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::parse(BUILTIN, "builtin", dir.path()).unwrap();
        let e = cat.resolve("nope").unwrap_err().to_string();
        assert!(
            e.contains("unknown model 'nope'") && e.contains("smollm2-135m"),
            "{e}"
        );
        let e = cat.resolve("").unwrap_err().to_string();
        assert!(e.contains("llmgenie pull smollm2-135m"), "{e}");
        let e = cat.resolve("missing.gguf").unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        let file = dir.path().join("SmolLM2-135M-Instruct.Q4_1.gguf");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(cat.resolve("smollm2").unwrap().1, file);
        let other = dir.path().join("mine.gguf");
        std::fs::write(&other, b"x").unwrap();
        let (name, path) = cat.resolve(other.to_str().unwrap()).unwrap();
        assert_eq!((name.as_str(), path), ("mine", other));
    }

    #[test]
    fn bad_catalogue_is_a_clear_error() {
        let e = Catalog::parse("default = 3", "x.toml", Path::new(".")).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("cannot parse model catalogue x.toml"));
    }
}
