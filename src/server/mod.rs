//! The HTTP API: OpenAI- and Ollama-compatible routes over the [`Registry`].
//!
//! Handlers parse bodies themselves (`parse_json`) so that malformed JSON, wrong types and
//! invalid UTF-8 get the error shape each API's clients expect, then validate into
//! [`run::ValidGenerate`]; everything after that trusts the type.

mod claude_answer;
pub mod error;
mod guard;
mod ollama;
mod openai;
pub mod routed;
pub mod run;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::registry::Registry;
use crate::router::ledger::Ledger;
use error::{ApiError, ErrorKind};
use routed::Routing;

/// Request limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Requests running or queued per model before new ones get 429.
    pub max_pending_per_model: usize,
    /// How long in-flight requests may run on after a shutdown signal.
    pub shutdown_grace: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 << 20,
            max_pending_per_model: 32,
            shutdown_grace: std::time::Duration::from_secs(30),
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    pub limits: Limits,
    /// Set while shutting down: `/health` answers 503.
    pub draining: Arc<AtomicBool>,
    /// When set, every route but `/health` and `GET /` needs `Authorization: Bearer KEY`.
    pub api_key: Option<Arc<str>>,
    /// Origins allowed to call from a browser (`*` for any); empty: CORS off.
    pub cors_origins: Arc<[String]>,
    /// What the answers served here would have cost on Claude, and what Claude cost.
    pub ledger: Arc<Ledger>,
    /// The classifier, the policy and the Claude client.
    pub routing: Arc<Routing>,
    /// The process's metrics (`None` when another recorder was installed first).
    pub metrics: Option<crate::observe::Metrics>,
    /// Put the user's prompt text in the per-request log lines.
    pub log_prompts: bool,
    /// Distinguishes this process's request ids from another's.
    boot_id: u64,
    ids: Arc<AtomicU64>,
}

impl AppState {
    pub fn new(registry: Registry, limits: Limits, routing: Routing) -> Self {
        Self {
            registry,
            limits,
            draining: Arc::new(AtomicBool::new(false)),
            api_key: None,
            cors_origins: Arc::from(Vec::new()),
            ledger: Arc::new(Ledger::new(routing.config.prices.clone())),
            routing: Arc::new(routing),
            metrics: crate::observe::install()
                .map_err(|e| tracing::warn!(error = %e, "metrics disabled"))
                .ok(),
            log_prompts: false,
            boot_id: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() & 0xff_ffff),
            ids: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Log the user's prompt text with each request (off by default).
    #[must_use]
    pub fn with_prompt_logging(mut self, on: bool) -> Self {
        self.log_prompts = on;
        self
    }

    /// Require this API key (`None`: open).
    #[must_use]
    pub fn with_api_key(mut self, key: Option<String>) -> Self {
        self.api_key = key.filter(|k| !k.is_empty()).map(Arc::from);
        self
    }

    /// Allow these browser origins (default: none).
    #[must_use]
    pub fn with_cors_origins(mut self, origins: Vec<String>) -> Self {
        self.cors_origins = Arc::from(origins);
        self
    }

    /// A process-unique number for response ids.
    pub fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }
}

/// A request body as the handlers receive it: the bytes, or why they could not be read.
pub type Body = Result<Bytes, axum::extract::rejection::BytesRejection>;

/// Parse a JSON body into `T`, with a message that names the problem.
///
/// # Errors
/// A body over the size limit (413), invalid UTF-8 or JSON, or a field of the wrong type (400).
pub fn parse_json<T: DeserializeOwned>(body: &Body) -> Result<T, ApiError> {
    let body = body.as_ref().map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorKind::TooLarge,
                "request body is larger than the server's limit (--max-body-bytes)",
            )
        } else {
            ApiError::new(
                ErrorKind::Invalid,
                format!("cannot read the request body: {e}"),
            )
        }
    })?;
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::new(
            ErrorKind::Invalid,
            format!("request body is not valid UTF-8: {e}"),
        )
    })?;
    serde_json::from_str(text)
        .map_err(|e| ApiError::new(ErrorKind::Invalid, format!("invalid request body: {e}")))
}

/// The current UTC time as RFC 3339 (`2026-11-29T16:10:20.123Z`).
pub fn rfc3339() -> String {
    rfc3339_at(std::time::SystemTime::now())
}

/// A UTC time as RFC 3339.
pub fn rfc3339_at(t: std::time::SystemTime) -> String {
    let now = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = crate::civil::from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_millis()
    )
}

async fn health(State(state): State<AppState>) -> impl IntoResponse {
    if state.draining.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        );
    }
    if state.registry.loading() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        );
    }
    let models: Vec<String> = state
        .registry
        .resident()
        .into_iter()
        .map(|r| r.name)
        .collect();
    (
        StatusCode::OK,
        Json(json!({"status": "ok", "models": models})),
    )
}

/// `GET /v1/stats`: the savings ledger.
async fn stats(State(state): State<AppState>) -> Json<serde_json::Value> {
    let r = &state.routing;
    Json(json!({
        "prices": state.ledger.prices(),
        "totals": state.ledger.report(),
        "claude": {
            "model": r.config.claude_model,
            "enabled": r.claude.enabled(),
            "circuit_open": r.claude.circuit_open(),
        },
    }))
}

/// Ollama clients probe `GET /` for this text.
async fn root() -> &'static str {
    "Ollama is running"
}

/// Only `GET /metrics`, for `--metrics-addr` (no API key: bind it where only Prometheus reaches).
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(telemetry::metrics))
        .with_state(state)
}

async fn unknown_route() -> error::OpenAiError {
    error::OpenAiError(ApiError::new(ErrorKind::NotFound, "no such route"))
}

/// All routes.
pub fn router(state: AppState) -> Router {
    let limit = state.limits.max_body_bytes;
    Router::new()
        .route("/", get(root).head(root))
        .route("/health", get(health))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{id}", get(openai::get_model))
        .route("/v1/stats", get(stats))
        .route("/metrics", get(telemetry::metrics))
        .route("/api/generate", post(ollama::generate))
        .route("/api/chat", post(ollama::chat))
        .route("/api/tags", get(ollama::tags))
        .route("/api/ps", get(ollama::ps))
        .route("/api/show", post(ollama::show))
        .route("/api/version", get(ollama::version))
        .fallback(unknown_route)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::require_key,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::cors,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            telemetry::track,
        ))
        .with_state(state)
}

/// Bind `addr` and serve until `shutdown` resolves; then stop accepting and let in-flight
/// requests finish.
///
/// # Errors
/// The address cannot be bound.
pub async fn serve(
    state: AppState,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_on(listener, state, shutdown).await
}

/// Serve on a bound listener (tests bind port 0 and read the port first).
///
/// # Errors
/// Accepting connections fails.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "listening");
    let draining = state.draining.clone();
    let grace = state.limits.shutdown_grace;
    let signalled = Arc::new(tokio::sync::Notify::new());
    let notify = signalled.clone();
    let app = router(state);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        draining.store(true, Ordering::Relaxed);
        notify.notify_one();
        tracing::info!(
            grace_s = grace.as_secs_f64(),
            "shutting down: finishing in-flight requests"
        );
    });
    // In-flight requests get `grace` to finish after the signal; then the server stops anyway.
    tokio::select! {
        result = server => result,
        _ = async {
            signalled.notified().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("shutdown grace period over: abandoning unfinished requests");
            Ok(())
        }
    }
}
