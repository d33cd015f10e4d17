//! A fake Anthropic Messages API on 127.0.0.1: a real HTTP server that speaks the wire format
//! (JSON answers, SSE streams with ping, content blocks, message_delta, message_stop and
//! in-stream errors, error bodies and retry headers), scripted per test.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};

/// What the fake does for each successive request (the last one repeats).
#[derive(Clone)]
pub enum Reply {
    Json(Value),
    /// Status, extra headers, error type.
    Error(u16, Vec<(&'static str, &'static str)>, &'static str),
    /// Status, error type and the error's message.
    ErrorWithMessage(u16, &'static str, &'static str),
    /// Raw SSE text, sent at once.
    Sse(String),
    /// SSE text in pieces with a pause before each.
    SlowSse(Vec<String>, Duration),
}

#[derive(Clone)]
pub struct Fake {
    script: Arc<Vec<Reply>>,
    pub calls: Arc<AtomicUsize>,
    /// Headers and body of every request.
    pub seen: Arc<Mutex<Vec<(HeaderMap, Value)>>>,
    pub addr: SocketAddr,
}

impl Fake {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn messages(
    axum::extract::State(f): axum::extract::State<Fake>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let n = f.calls.fetch_add(1, Ordering::SeqCst);
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    f.seen.lock().unwrap().push((headers, v));
    let reply = f.script.get(n).or(f.script.last()).cloned().unwrap();
    match reply {
        Reply::Json(v) => axum::Json(v).into_response(),
        Reply::Error(status, headers, kind) => {
            let mut resp = (
                StatusCode::from_u16(status).unwrap(),
                axum::Json(json!({"type": "error", "error": {"type": kind, "message": format!("{kind} happened")}})),
            )
                .into_response();
            for (k, v) in headers {
                resp.headers_mut().insert(k, v.parse().unwrap());
            }
            resp
        }
        Reply::ErrorWithMessage(status, kind, message) => (
            StatusCode::from_u16(status).unwrap(),
            axum::Json(json!({"type": "error", "error": {"type": kind, "message": message}})),
        )
            .into_response(),
        Reply::Sse(text) => ([("content-type", "text/event-stream")], text).into_response(),
        Reply::SlowSse(parts, gap) => {
            let body = futures_util::stream::unfold(parts.into_iter(), move |mut it| async move {
                let part = it.next()?;
                tokio::time::sleep(gap).await;
                Some((Ok::<_, std::convert::Infallible>(part), it))
            });
            (
                [("content-type", "text/event-stream")],
                axum::body::Body::from_stream(body),
            )
                .into_response()
        }
    }
}

/// Start the fake on a runtime of its own (kept alive by the returned value).
pub fn start(script: Vec<Reply>) -> (Fake, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let f = Fake {
        script: Arc::new(script),
        calls: Arc::new(AtomicUsize::new(0)),
        seen: Arc::new(Mutex::new(Vec::new())),
        addr: listener.local_addr().unwrap(),
    };
    let app = Router::new()
        .route("/v1/messages", post(messages))
        .with_state(f.clone());
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (f, rt)
}

/// A whole answer.
pub fn message_json(text: &str) -> Value {
    json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
           "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": null,
           "usage": {"input_tokens": 12, "output_tokens": 5}})
}

pub fn sse(events: &[(&str, Value)]) -> String {
    events
        .iter()
        .map(|(e, d)| format!("event: {e}\ndata: {d}\n\n"))
        .collect()
}

/// The events of a streamed answer, one SSE event per element; `message_stop` last when `stop`.
pub fn stream_event_list(text_parts: &[&str], stop: bool) -> Vec<String> {
    let mut ev = vec![
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
            "model": "claude-sonnet-4-5", "content": [], "stop_reason": null, "usage": {"input_tokens": 12, "output_tokens": 1}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ("ping", json!({"type": "ping"})),
    ];
    for t in text_parts {
        ev.push(("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}})));
    }
    ev.push((
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    ev.push(("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 7}})));
    if stop {
        ev.push(("message_stop", json!({"type": "message_stop"})));
    }
    ev.iter().map(|e| sse(std::slice::from_ref(e))).collect()
}

/// A streamed answer as one SSE text.
pub fn stream_events(text_parts: &[&str], stop: bool) -> String {
    stream_event_list(text_parts, stop).concat()
}
