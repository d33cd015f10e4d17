//! Which models are resident, and loading them once.
//!
//! A model is named by a catalogue name (or alias) or by the name a preloaded file was given.
//! The first request for a model that is not resident starts its load on a blocking thread;
//! requests that arrive while it loads wait for that one load and all get its result. A failed
//! load is reported to every waiter and leaves the other models serving.
//!
//! Residency replaces Ollama's keep-alive: each use of a model (a [`Lease`]) pushes its expiry to
//! `now + keep_alive` when the lease ends (a request's own `keep_alive`, else the model's
//! default: forever for preloaded models, the server's `--keep-alive` for the rest). A reaper task
//! unloads expired models that no request is using. A memory budget (`--max-models`,
//! `--max-memory`) is enforced before a load: idle models are evicted, soonest expiry first; a
//! model in use is never evicted, and when nothing can go the request gets a clear error.
//!
//! Shared state is a short `std::sync::Mutex` around a plain map: it is never held across an
//! `.await` (waiting happens on a `watch` channel taken out of the map).

use crate::observe::names;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

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
    #[error("cannot load model '{name}': {reason}; all resident models are in use, retry shortly")]
    NoRoom { name: String, reason: String },
}

/// How long a model stays resident after its last use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    Forever,
    /// `For(Duration::ZERO)` unloads the model as soon as no request uses it.
    For(Duration),
}

impl KeepAlive {
    /// Ollama's forms: a duration string (`"10m"`, `"1h30m"`, `"45s"`, `"500ms"`), a number of
    /// seconds, `0` (unload now), or anything negative (forever).
    ///
    /// # Errors
    /// Text that is none of these.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if let Ok(secs) = t.parse::<f64>() {
            return Self::from_seconds(secs).ok_or_else(|| format!("invalid keep_alive '{text}'"));
        }
        if t.starts_with('-') {
            return Ok(Self::Forever);
        }
        let mut total = 0f64;
        let mut rest = t;
        while !rest.is_empty() {
            let split = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(|| format!("keep_alive '{text}' needs a unit (ms, s, m, h)"))?;
            let (num, tail) = rest.split_at(split);
            let value: f64 = num
                .parse()
                .map_err(|_| format!("invalid keep_alive '{text}'"))?;
            let unit_len = tail
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(tail.len());
            let (unit, next) = tail.split_at(unit_len);
            total += value
                * match unit {
                    "ms" => 0.001,
                    "s" => 1.0,
                    "m" => 60.0,
                    "h" => 3600.0,
                    _ => return Err(format!("keep_alive '{text}' has unknown unit '{unit}'")),
                };
            rest = next;
        }
        Self::from_seconds(total).ok_or_else(|| format!("invalid keep_alive '{text}'"))
    }

    /// Negative: forever.
    pub fn from_seconds(secs: f64) -> Option<Self> {
        if secs.is_nan() {
            return None;
        }
        if secs < 0.0 {
            return Some(Self::Forever);
        }
        Duration::try_from_secs_f64(secs).ok().map(Self::For)
    }

    fn deadline(self, from: Instant) -> Option<Instant> {
        match self {
            Self::Forever => None,
            Self::For(d) => from.checked_add(d),
        }
    }
}

/// Limits on what may be resident at once; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default)]
pub struct Budget {
    pub max_models: Option<usize>,
    /// Bytes of model files resident (weights stay quantized, so this tracks memory closely).
    pub max_bytes: Option<u64>,
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
    /// When it may be unloaded once idle; `None`: never.
    expires: Option<Instant>,
    bytes: u64,
    /// The last request asked for it to be unloaded (`keep_alive: 0`).
    unload_requested: bool,
}

impl Resident {
    /// Requests hold clones of the engine; only the registry's own reference means idle.
    fn idle(&self) -> bool {
        Arc::strong_count(&self.engine) == 1
    }
}

/// What `/api/ps` and `/v1/models` report about a resident model.
#[derive(Debug, Clone)]
pub struct ResidentInfo {
    pub name: String,
    pub engine: Arc<Engine>,
    /// Wall-clock time of unloading once idle; `None`: never.
    pub expires_at: Option<SystemTime>,
}

struct Inner {
    catalog: Catalog,
    device: Device,
    default_model: String,
    default_keep_alive: KeepAlive,
    budget: Budget,
    /// Models that stay resident unless a request says otherwise (preloaded ones).
    pinned: Mutex<Vec<String>>,
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
        Self::with_policy(
            catalog,
            device,
            default_model,
            KeepAlive::For(Duration::from_secs(300)),
            Budget::default(),
        )
    }

    /// As [`Registry::new`], with the keep-alive of models that are not pinned and a budget.
    pub fn with_policy(
        catalog: Catalog,
        device: Device,
        default_model: &str,
        default_keep_alive: KeepAlive,
        budget: Budget,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                catalog,
                device,
                default_model: default_model.to_string(),
                default_keep_alive,
                budget,
                pinned: Mutex::new(Vec::new()),
                files: Mutex::new(HashMap::new()),
                slots: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Keep `name` resident unless a request's own keep-alive says otherwise (preloading).
    pub fn pin(&self, name: &str) {
        lock(&self.inner.pinned).push(name.to_string());
    }

    fn default_keep_alive(&self, name: &str) -> KeepAlive {
        if lock(&self.inner.pinned).iter().any(|p| p == name) {
            KeepAlive::Forever
        } else {
            self.inner.default_keep_alive
        }
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
        let mut evicted = Vec::new();
        let rx = {
            let mut slots = lock(&self.inner.slots);
            match slots.get_mut(&name) {
                Some(Slot::Ready(r)) => return Ok(r.engine.clone()),
                Some(Slot::Loading(rx)) => Ok(rx.clone()),
                None => {
                    let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
                    match self.make_room(&mut slots, &name, bytes, &mut evicted) {
                        Ok(()) => {
                            let (tx, rx) = watch::channel(None);
                            slots.insert(name.clone(), Slot::Loading(rx.clone()));
                            self.spawn_load(name.clone(), path, bytes, tx);
                            Ok(rx)
                        }
                        Err(e) => Err(e),
                    }
                }
            }
        };
        drop_engines(evicted);
        let mut rx = rx?;
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

    /// Evict idle models (soonest expiry first, pinned ones last) until a model of `bytes` fits
    /// the budget. Evicted engines are handed back to be dropped outside the lock.
    fn make_room(
        &self,
        slots: &mut HashMap<String, Slot>,
        name: &str,
        bytes: u64,
        evicted: &mut Vec<Arc<Engine>>,
    ) -> Result<(), RegistryError> {
        let budget = self.inner.budget;
        let fits = |slots: &HashMap<String, Slot>| {
            let count = slots.len() + 1;
            let used: u64 = slots
                .values()
                .map(|s| match s {
                    Slot::Ready(r) => r.bytes,
                    Slot::Loading(_) => 0,
                })
                .sum();
            budget.max_models.is_none_or(|m| count <= m)
                && budget.max_bytes.is_none_or(|m| used + bytes <= m)
        };
        while !fits(slots) {
            let victim = slots
                .iter()
                .filter_map(|(n, s)| match s {
                    Slot::Ready(r) if r.idle() => Some((n.clone(), r.expires)),
                    _ => None,
                })
                // Soonest expiry first; `None` (never expires) sorts last.
                .min_by_key(|(_, e)| (e.is_none(), *e))
                .map(|(n, _)| n);
            let Some(victim) = victim else {
                return Err(RegistryError::NoRoom {
                    name: name.to_string(),
                    reason: format!("the budget ({}) is full", describe_budget(&budget)),
                });
            };
            tracing::info!(model = %victim, reason = "eviction", "unloading model");
            metrics::counter!(names::MODEL_UNLOADS, "model" => victim.clone(), "reason" => "evicted")
                .increment(1);
            if let Some(Slot::Ready(r)) = slots.remove(&victim) {
                evicted.push(r.engine);
            }
        }
        Ok(())
    }

    fn spawn_load(&self, name: String, path: PathBuf, bytes: u64, tx: watch::Sender<LoadResult>) {
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
                        metrics::histogram!(names::MODEL_LOAD_DURATION, "model" => name.clone())
                            .record(started.elapsed().as_secs_f64());
                        metrics::counter!(names::MODEL_LOADS, "model" => name.clone(), "outcome" => "ok")
                            .increment(1);
                        let expires = registry.default_keep_alive(&name).deadline(Instant::now());
                        slots.insert(
                            name.clone(),
                            Slot::Ready(Resident {
                                engine: engine.clone(),
                                expires,
                                bytes,
                                unload_requested: false,
                            }),
                        );
                    }
                    Err(e) => {
                        tracing::error!(model = %name, error = %e, "model failed to load");
                        metrics::counter!(names::MODEL_LOADS, "model" => name.clone(), "outcome" => "error")
                            .increment(1);
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
                    expires_at: r
                        .expires
                        .map(|e| SystemTime::now() + e.saturating_duration_since(Instant::now())),
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

    /// A request's hold on a model: while it lives the model is in use; when it ends, the
    /// model's expiry becomes `now + keep_alive` (the request's own, else the model's default).
    ///
    /// # Errors
    /// As [`Registry::get`].
    pub async fn acquire(
        &self,
        requested: &str,
        keep_alive: Option<KeepAlive>,
    ) -> Result<Lease, RegistryError> {
        let (name, _) = self.resolve(requested)?;
        let engine = self.get(&name).await?;
        let keep_alive = keep_alive.unwrap_or_else(|| self.default_keep_alive(&name));
        Ok(Lease {
            registry: self.clone(),
            name,
            engine,
            keep_alive,
        })
    }

    fn release(&self, name: &str, keep_alive: KeepAlive) {
        if let Some(Slot::Ready(r)) = lock(&self.inner.slots).get_mut(name) {
            r.expires = keep_alive.deadline(Instant::now());
            r.unload_requested = keep_alive == KeepAlive::For(Duration::ZERO);
        }
    }

    /// Unload every idle model whose keep-alive has run out; returns their names.
    pub fn reap(&self) -> Vec<String> {
        let now = Instant::now();
        let mut gone = Vec::new();
        let mut engines = Vec::new();
        {
            let mut slots = lock(&self.inner.slots);
            let expired: Vec<String> = slots
                .iter()
                .filter_map(|(n, s)| match s {
                    Slot::Ready(r) if r.idle() && r.expires.is_some_and(|e| e <= now) => {
                        Some(n.clone())
                    }
                    _ => None,
                })
                .collect();
            for name in expired {
                if let Some(Slot::Ready(r)) = slots.remove(&name) {
                    let reason = if r.unload_requested {
                        "request"
                    } else {
                        "expired"
                    };
                    tracing::info!(model = %name, reason, "unloading model");
                    metrics::counter!(names::MODEL_UNLOADS, "model" => name.clone(), "reason" => reason)
                        .increment(1);
                    engines.push(r.engine);
                    gone.push(name);
                }
            }
        }
        drop_engines(engines);
        gone
    }

    /// Run [`Registry::reap`] in the background every `period` until the runtime stops.
    pub fn spawn_reaper(&self, period: Duration) -> tokio::task::JoinHandle<()> {
        let registry = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let r = registry.clone();
                // Dropping an engine joins its thread: keep that off the async workers.
                let _ = tokio::task::spawn_blocking(move || r.reap()).await;
            }
        })
    }
}

/// A request's hold on a resident model; see [`Registry::acquire`].
pub struct Lease {
    registry: Registry,
    pub name: String,
    pub engine: Arc<Engine>,
    keep_alive: KeepAlive,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.registry.release(&self.name, self.keep_alive);
    }
}

fn describe_budget(b: &Budget) -> String {
    let mut parts = Vec::new();
    if let Some(m) = b.max_models {
        parts.push(format!("at most {m} models"));
    }
    if let Some(m) = b.max_bytes {
        parts.push(format!("at most {m} bytes"));
    }
    parts.join(", ")
}

/// Engines are dropped (their threads joined) outside any lock.
fn drop_engines(engines: Vec<Arc<Engine>>) {
    drop(engines);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_parses_ollama_forms() {
        let secs = |s: u64| KeepAlive::For(Duration::from_secs(s));
        assert_eq!(KeepAlive::parse("5m").unwrap(), secs(300));
        assert_eq!(KeepAlive::parse("1h30m").unwrap(), secs(5400));
        assert_eq!(KeepAlive::parse("45s").unwrap(), secs(45));
        assert_eq!(
            KeepAlive::parse("500ms").unwrap(),
            KeepAlive::For(Duration::from_millis(500))
        );
        assert_eq!(KeepAlive::parse("0").unwrap(), secs(0));
        assert_eq!(KeepAlive::parse("120").unwrap(), secs(120));
        assert_eq!(KeepAlive::parse("-1").unwrap(), KeepAlive::Forever);
        assert_eq!(KeepAlive::parse("-5m").unwrap(), KeepAlive::Forever);
        assert!(KeepAlive::parse("soon").unwrap_err().contains("soon"));
        assert!(KeepAlive::parse("5x").unwrap_err().contains("unknown unit"));
        assert!(KeepAlive::parse("5").is_ok());
        assert!(KeepAlive::from_seconds(f64::NAN).is_none());
    }
}
