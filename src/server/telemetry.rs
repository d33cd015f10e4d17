//! The HTTP side of observability: request ids, per-request metrics and log lines, and
//! `GET /metrics` with the gauges that are read at scrape time.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::observe::names;

/// The request's id: the client's `x-request-id` when it sent a usable one, else a new one.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Put on a response whose request logs its own line when the answer is complete.
#[derive(Debug, Clone, Copy)]
pub struct LogsItself;

/// Route patterns, for labels that do not grow with the paths clients send.
const ROUTES: &[&str] = &[
    "/",
    "/health",
    "/metrics",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/stats",
    "/api/generate",
    "/api/chat",
    "/api/tags",
    "/api/ps",
    "/api/show",
    "/api/version",
];

/// The route pattern a path belongs to; `unmatched` for anything else.
pub fn route_label(path: &str) -> &'static str {
    if let Some(r) = ROUTES.iter().find(|r| **r == path) {
        return r;
    }
    if path.starts_with("/v1/models/") {
        return "/v1/models/{id}";
    }
    "unmatched"
}

fn request_id(req: &Request, state: &AppState) -> String {
    let given = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()));
    match given {
        Some(v) => v.to_string(),
        None => format!("req-{:x}-{}", state.boot_id, state.next_id()),
    }
}

/// Count, time and log every request; echo its `x-request-id`.
pub async fn track(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id(&req, &state);
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let route = route_label(&path);
    let in_flight = metrics::gauge!(names::HTTP_IN_FLIGHT);
    in_flight.increment(1.0);
    let mut resp = next.run(req).await;
    in_flight.decrement(1.0);
    let status = resp.status().as_u16();
    let elapsed = started.elapsed();
    metrics::counter!(names::HTTP_REQUESTS, "route" => route, "method" => method.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!(names::HTTP_DURATION, "route" => route, "method" => method.clone())
        .record(elapsed.as_secs_f64());
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    if resp.extensions().get::<LogsItself>().is_none() && route != "/metrics" && route != "/health"
    {
        tracing::info!(
            target: "llmgenie::request",
            request_id = %id,
            method = %method,
            route,
            status,
            total_ms = elapsed.as_secs_f64() * 1e3,
            "request"
        );
    }
    resp
}

/// Models whose gauges were set at an earlier scrape (zeroed once they are gone).
static REPORTED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Set the gauges that describe the present: resident models and their queues, the circuit
/// breaker, the ledger.
fn refresh_gauges(state: &AppState) {
    let resident = state.registry.resident();
    metrics::gauge!(names::MODELS_RESIDENT).set(resident.len() as f64);
    let mut now = BTreeSet::new();
    for r in &resident {
        let stats = r.engine.stats();
        let active = stats.active.load(Ordering::Relaxed);
        let pending = stats.pending.load(Ordering::Relaxed);
        let model = r.name.clone();
        metrics::gauge!(names::MODEL_BYTES, "model" => model.clone())
            .set(r.engine.info().file_size as f64);
        metrics::gauge!(names::RUNNING_SEQUENCES, "model" => model.clone()).set(active as f64);
        metrics::gauge!(names::QUEUE_DEPTH, "model" => model.clone())
            .set(pending.saturating_sub(active) as f64);
        now.insert(model);
    }
    let mut reported = REPORTED.lock().unwrap_or_else(|e| e.into_inner());
    for gone in reported.difference(&now) {
        for name in [
            names::MODEL_BYTES,
            names::RUNNING_SEQUENCES,
            names::QUEUE_DEPTH,
        ] {
            metrics::gauge!(name, "model" => gone.clone()).set(0.0);
        }
    }
    reported.extend(now);
    let open = state.routing.claude.circuit_open();
    metrics::gauge!(names::CLAUDE_CIRCUIT_OPEN).set(if open { 1.0 } else { 0.0 });
    let totals = state.ledger.report().total;
    metrics::gauge!(names::SAVED_DOLLARS).set(totals.saved_usd);
    metrics::gauge!(names::SPENT_DOLLARS).set(totals.spent_usd);
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let Some(m) = state.metrics.clone() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics are unavailable: another metrics recorder was installed first\n",
        )
            .into_response();
    };
    refresh_gauges(&state);
    let body = tokio::task::spawn_blocking(move || m.render())
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_route_patterns() {
        for path in [
            "/",
            "/v1/chat/completions",
            "/api/chat",
            "/metrics",
            "/v1/models",
        ] {
            assert_eq!(route_label(path), path);
        }
        assert_eq!(route_label("/v1/chat/completions/"), "unmatched");
        assert_eq!(route_label("/v1/models/smollm2-135m"), "/v1/models/{id}");
        assert_eq!(route_label("/etc/passwd"), "unmatched");
    }
}
