//! Which models are resident, and loading them once.
//!
//! A model is named by a catalogue name (or alias) or by the name a preloaded file was given.
//! The first request for a model that is not resident starts its load on a blocking thread;
//! requests that arrive while it loads wait for that one load and all get its result. A failed
//! load is reported to every waiter and leaves the other models serving.
//!
//! Shared state is a short `std::sync::Mutex` around a plain map: it is never held across an
//! `.await` (waiting happens on a `watch` channel taken out of the map).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use candle_core::Device;
use tokio::sync::watch;

use crate::catalog::{Catalog, CatalogError};
use crate::engine::Engine;

/// Errors of finding or loading a model.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("model '{name}' not found; available models: {available}")]
    NotFound { name: String, available: String },
    #[error("model '{name}' is not downloaded yet; run `llmgenie pull {name}`")]
    NotDownloaded { name: String },
    #[error("model '{name}' failed to load: {message}")]
    Load { name: String, message: String },
}

/// Outcome of a load, shared with every waiter.
type LoadResult = Option<Result<Arc<Engine>, RegistryError>>;

enum Slot {
    Loading(watch::Receiver<LoadResult>),
    Ready(Resident),
}

/// A model in memory.
struct Resident {
    engine: Arc<Engine>,
    loaded_at: SystemTime,
    last_used: Instant,
}

/// What `/api/ps` and `/v1/models` report about a resident model.
#[derive(Debug, Clone)]
pub struct ResidentInfo {
    pub name: String,
    pub engine: Arc<Engine>,
    pub loaded_at: SystemTime,
}

struct Inner {
    catalog: Catalog,
    device: Device,
    default_model: String,
    /// Files given by path (`--model path.gguf`), by the name they are served under.
    files: Mutex<HashMap<String, PathBuf>>,
    slots: Mutex<HashMap<String, Slot>>,
}

/// The resident models; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data; keep serving with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// `default_model` answers requests that name no model.
    pub fn new(catalog: Catalog, device: Device, default_model: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                catalog,
                device,
                default_model: default_model.to_string(),
                files: Mutex::new(HashMap::new()),
                slots: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn default_model(&self) -> &str {
        &self.inner.default_model
    }

    /// Serve the file at `path` under `name`.
    pub fn add_file(&self, name: &str, path: &Path) {
        lock(&self.inner.files).insert(name.to_string(), path.to_path_buf());
    }

    /// Every name a request may use: the catalogue's downloaded models and the added files.
    pub fn available(&self) -> Vec<(String, PathBuf)> {
        let mut out: Vec<(String, PathBuf)> = lock(&self.inner.files)
            .iter()
            .map(|(n, p)| (n.clone(), p.clone()))
            .collect();
        for e in &self.inner.catalog.models {
            let p = self.inner.catalog.path_of(e);
            if p.is_file() && !out.iter().any(|(n, _)| n == &e.name) {
                out.push((e.name.clone(), p));
            }
        }
        out.sort();
        out
    }

    /// Map a requested name (empty: the default; an Ollama-style `:latest` tag is ignored) to
    /// the canonical name and file.
    ///
    /// # Errors
    /// The name is unknown or its file is not downloaded.
    pub fn resolve(&self, requested: &str) -> Result<(String, PathBuf), RegistryError> {
        let requested = requested.trim();
        let requested = requested.strip_suffix(":latest").unwrap_or(requested);
        let name = if requested.is_empty() {
            self.inner.default_model.as_str()
        } else {
            requested
        };
        if let Some(p) = lock(&self.inner.files).get(name) {
            return Ok((name.to_string(), p.clone()));
        }
        let Some(entry) = self.inner.catalog.find(name) else {
            let available = self
                .available()
                .into_iter()
                .map(|(n, _)| n)
                .collect::<Vec<_>>()
                .join(", ");
            return Err(RegistryError::NotFound {
                name: name.to_string(),
                available,
            });
        };
        match self.inner.catalog.resolve(&entry.name) {
            Ok(found) => Ok(found),
            Err(CatalogError::NotDownloaded { name, .. }) => {
                Err(RegistryError::NotDownloaded { name })
            }
            Err(e) => Err(RegistryError::Load {
                name: entry.name.clone(),
                message: e.to_string(),
            }),
        }
    }

    /// The engine for `requested`, loading it first if needed.
    ///
    /// # Errors
    /// Unknown name, missing file, or a load failure (reported to every waiting request).
    pub async fn get(&self, requested: &str) -> Result<Arc<Engine>, RegistryError> {
        let (name, path) = self.resolve(requested)?;
        let mut rx = {
            let mut slots = lock(&self.inner.slots);
            match slots.get_mut(&name) {
                Some(Slot::Ready(r)) => {
                    r.last_used = Instant::now();
                    return Ok(r.engine.clone());
                }
                Some(Slot::Loading(rx)) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    slots.insert(name.clone(), Slot::Loading(rx.clone()));
                    self.spawn_load(name.clone(), path, tx);
                    rx
                }
            }
        };
        loop {
            if let Some(result) = rx.borrow_and_update().clone() {
                return result;
            }
            if rx.changed().await.is_err() {
                return Err(RegistryError::Load {
                    name,
                    message: "the loader stopped".into(),
                });
            }
        }
    }

    fn spawn_load(&self, name: String, path: PathBuf, tx: watch::Sender<LoadResult>) {
        let registry = self.clone();
        let device = self.inner.device.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let result = Engine::start(&name, &path, device)
                .map(Arc::new)
                .map_err(|e| RegistryError::Load {
                    name: name.clone(),
                    message: e.to_string(),
                });
            {
                let mut slots = lock(&registry.inner.slots);
                match &result {
                    Ok(engine) => {
                        tracing::info!(model = %name, load_s = started.elapsed().as_secs_f64(), "model loaded");
                        slots.insert(
                            name.clone(),
                            Slot::Ready(Resident {
                                engine: engine.clone(),
                                loaded_at: SystemTime::now(),
                                last_used: Instant::now(),
                            }),
                        );
                    }
                    Err(e) => {
                        tracing::error!(model = %name, error = %e, "model failed to load");
                        slots.remove(&name);
                    }
                }
            }
            // Waiters may all have gone; the model stays resident regardless.
            let _ = tx.send(Some(result));
        });
    }

    /// Models in memory now.
    pub fn resident(&self) -> Vec<ResidentInfo> {
        let slots = lock(&self.inner.slots);
        let mut out: Vec<ResidentInfo> = slots
            .iter()
            .filter_map(|(name, slot)| match slot {
                Slot::Ready(r) => Some(ResidentInfo {
                    name: name.clone(),
                    engine: r.engine.clone(),
                    loaded_at: r.loaded_at,
                }),
                Slot::Loading(_) => None,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Whether any model is still loading.
    pub fn loading(&self) -> bool {
        lock(&self.inner.slots)
            .values()
            .any(|s| matches!(s, Slot::Loading(_)))
    }

    /// Drop a resident model; its thread stops once in-flight requests release it.
    pub fn unload(&self, requested: &str) -> bool {
        let Ok((name, _)) = self.resolve(requested) else {
            return false;
        };
        let mut slots = lock(&self.inner.slots);
        matches!(slots.get(&name), Some(Slot::Ready(_))) && slots.remove(&name).is_some()
    }
}
