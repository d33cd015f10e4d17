//! The Claude client against a local server that speaks the Messages API wire format: JSON
//! answers, SSE streams (ping, content blocks, message_delta, message_stop, in-stream errors),
//! error bodies, and retry headers.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use llmgenie::claude::{
    ClaudeClient, ClaudeConfig, ClaudeError, ClaudeMessage, MessagesRequest, StreamEvent, Usage,
};
use serde_json::json;

use crate::util::fake_claude::{
    self, message_json, sse, stream_event_list, stream_events, Fake, Reply,
};

/// A client of the fake with short backoffs; the fake lives as long as the runtime.
fn fake(script: Vec<Reply>) -> (ClaudeClient, Fake, tokio::runtime::Runtime) {
    let (f, rt) = fake_claude::start(script);
    let client = ClaudeClient::new(ClaudeConfig {
        api_key: Some("test-key".into()),
        base_url: f.base_url(),
        timeout: Duration::from_secs(10),
        max_retries: 3,
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(100),
        retry_after_cap: Duration::from_secs(2),
        breaker_threshold: 3,
        breaker_cooldown: Duration::from_secs(60),
    })
    .unwrap();
    (client, f, rt)
}

fn request() -> MessagesRequest {
    MessagesRequest {
        model: "claude-sonnet-4-5".into(),
        max_tokens: 64,
        messages: vec![ClaudeMessage {
            role: "user".into(),
            content: "Hi".into(),
        }],
        system: Some("Be brief.".into()),
        temperature: Some(0.2),
        stop_sequences: vec!["END".into()],
        stream: false,
    }
}

/// Every item of a streamed request, errors included.
fn collect_stream(
    client: &ClaudeClient,
    rt: &tokio::runtime::Runtime,
) -> Vec<Result<StreamEvent, ClaudeError>> {
    rt.block_on(async {
        client
            .stream(&request())
            .await
            .unwrap()
            .collect::<Vec<_>>()
            .await
    })
}

#[test]
fn plain_request_sends_the_real_wire_format() {
    let (client, f, rt) = fake(vec![Reply::Json(message_json("Hello there"))]);
    let r = rt.block_on(client.create(&request())).unwrap();
    assert_eq!(r.text, "Hello there");
    assert_eq!(
        r.usage,
        Usage {
            input_tokens: 12,
            output_tokens: 5
        }
    );
    assert_eq!(r.stop_reason.as_deref(), Some("end_turn"));
    assert_eq!(r.attempts, 1);
    let seen = f.seen.lock().unwrap();
    let (headers, body) = &seen[0];
    assert_eq!(headers["x-api-key"], "test-key");
    assert_eq!(headers["anthropic-version"], "2023-06-01");
    assert_eq!(body["model"], "claude-sonnet-4-5");
    assert_eq!(body["max_tokens"], 64);
    assert_eq!(body["system"], "Be brief.");
    assert_eq!(body["stop_sequences"], json!(["END"]));
    assert_eq!(
        body["messages"][0],
        json!({"role": "user", "content": "Hi"})
    );
    assert!(body.get("stream").is_none());
}

#[test]
fn overloaded_and_rate_limited_are_retried_honouring_retry_after() {
    let (client, f, rt) = fake(vec![
        Reply::Error(529, vec![], "overloaded_error"),
        Reply::Error(429, vec![("retry-after-ms", "300")], "rate_limit_error"),
        Reply::Json(message_json("finally")),
    ]);
    let started = Instant::now();
    let r = rt.block_on(client.create(&request())).unwrap();
    assert_eq!(r.text, "finally");
    assert_eq!(r.attempts, 3);
    assert_eq!(f.calls.load(Ordering::SeqCst), 3);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "retry-after-ms was not honoured"
    );
}

#[test]
fn client_errors_are_not_retried_and_retries_run_out() {
    let (client, f, rt) = fake(vec![Reply::Error(400, vec![], "invalid_request_error")]);
    let e = rt.block_on(client.create(&request())).unwrap_err();
    assert!(
        matches!(&e, ClaudeError::Api { status: 400, kind, .. } if kind == "invalid_request_error"),
        "{e}"
    );
    assert_eq!(f.calls.load(Ordering::SeqCst), 1);

    let (client, f, rt) = fake(vec![Reply::Error(500, vec![], "api_error")]);
    let e = rt.block_on(client.create(&request())).unwrap_err();
    assert!(matches!(e, ClaudeError::Api { status: 500, .. }));
    assert_eq!(f.calls.load(Ordering::SeqCst), 4, "1 attempt + 3 retries");
}

#[test]
fn no_key_and_no_server_are_clear_errors() {
    let client = ClaudeClient::new(ClaudeConfig {
        api_key: None,
        ..ClaudeConfig::default()
    })
    .unwrap();
    assert!(!client.enabled());
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert!(matches!(
        rt.block_on(client.create(&request())),
        Err(ClaudeError::NoApiKey)
    ));
    // Nothing listens on this port: a transport error after the retries.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = ClaudeClient::new(ClaudeConfig {
        api_key: Some("k".into()),
        base_url: format!("http://127.0.0.1:{port}"),
        max_retries: 1,
        backoff_base: Duration::from_millis(10),
        ..ClaudeConfig::default()
    })
    .unwrap();
    assert!(matches!(
        rt.block_on(client.create(&request())),
        Err(ClaudeError::Transport(_))
    ));
}

#[test]
fn streams_yield_text_then_usage() {
    let (client, f, rt) = fake(vec![Reply::Sse(stream_events(
        &["Hel", "lo", " world"],
        true,
    ))]);
    let events = collect_stream(&client, &rt);
    let mut text = String::new();
    let mut done = None;
    for e in events {
        match e.unwrap() {
            StreamEvent::Text(t) => text.push_str(&t),
            StreamEvent::Done { stop_reason, usage } => done = Some((stop_reason, usage)),
        }
    }
    assert_eq!(text, "Hello world");
    assert_eq!(
        done,
        Some((
            Some("end_turn".into()),
            Usage {
                input_tokens: 12,
                output_tokens: 7
            }
        ))
    );
    assert_eq!(f.seen.lock().unwrap()[0].1["stream"], true);
}

#[test]
fn a_stream_without_message_stop_or_with_an_error_event_fails() {
    let (client, _f, rt) = fake(vec![Reply::Sse(stream_events(&["partial"], false))]);
    let last = collect_stream(&client, &rt);
    assert!(
        matches!(last.last(), Some(Err(ClaudeError::Incomplete))),
        "{last:?}"
    );

    let mut text = stream_events(&["a"], false);
    text.push_str(&sse(&[(
        "error",
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    )]));
    let (client, _f, rt) = fake(vec![Reply::Sse(text)]);
    let last = collect_stream(&client, &rt);
    assert!(
        matches!(last.last(), Some(Err(ClaudeError::Stream { kind, .. })) if kind == "overloaded_error"),
        "{last:?}"
    );
}

#[test]
fn spend_limit_is_final_and_the_deadline_bounds_retries() {
    let (client, f, rt) = fake(vec![Reply::Error(429, vec![], "rate_limit_error")]);
    // The fake's message is "rate_limit_error happened": retried until the retries run out.
    assert!(rt.block_on(client.create(&request())).is_err());
    assert_eq!(f.calls.load(Ordering::SeqCst), 4);
    // A 429 that says the spend limit is reached is final: one call, no retry.
    let (client, f, rt) = fake(vec![
        Reply::ErrorWithMessage(
            429,
            "rate_limit_error",
            "You have reached your specified API usage limits. You will regain access on 2026-12-01.",
        ),
        Reply::Json(message_json("never reached")),
    ]);
    let e = rt.block_on(client.create(&request())).unwrap_err();
    assert!(matches!(e, ClaudeError::Api { status: 429, .. }), "{e}");
    assert!(!e.retryable());
    assert_eq!(f.calls(), 1);

    // retry-after of 2 s with 300 ms left: give up at once instead of sleeping past the deadline.
    let (client, f, rt) = fake(vec![Reply::Error(
        429,
        vec![("retry-after", "2")],
        "rate_limit_error",
    )]);
    let started = Instant::now();
    let deadline = started + Duration::from_millis(300);
    assert!(rt
        .block_on(client.create_until(&request(), deadline))
        .is_err());
    assert!(started.elapsed() < Duration::from_millis(1000));
    assert_eq!(f.calls.load(Ordering::SeqCst), 1);
}

#[test]
fn the_circuit_breaker_opens_after_repeated_failures() {
    // A malformed request says nothing about Claude's health: it never opens the breaker.
    let (client, _f, rt) = fake(vec![Reply::Error(400, vec![], "invalid_request_error")]);
    for _ in 0..4 {
        assert!(rt.block_on(client.create(&request())).is_err());
    }
    assert!(!client.circuit_open());

    let (client, f, rt) = fake(vec![Reply::Error(401, vec![], "authentication_error")]);
    for _ in 0..3 {
        assert!(matches!(
            rt.block_on(client.create(&request())),
            Err(ClaudeError::Api { .. })
        ));
    }
    assert!(client.circuit_open());
    assert!(matches!(
        rt.block_on(client.create(&request())),
        Err(ClaudeError::CircuitOpen(3))
    ));
    assert_eq!(
        f.calls.load(Ordering::SeqCst),
        3,
        "an open breaker makes no call"
    );
}

#[test]
fn the_api_key_never_appears_in_errors() {
    let (client, _f, rt) = fake(vec![Reply::Error(401, vec![], "authentication_error")]);
    let e = rt.block_on(client.create(&request())).unwrap_err();
    assert!(!format!("{e} {e:?}").contains("test-key"));
}

#[test]
fn a_server_error_then_success_honours_retry_after_seconds() {
    let (client, f, rt) = fake(vec![
        Reply::Error(500, vec![("retry-after", "1")], "api_error"),
        Reply::Json(message_json("second time lucky")),
    ]);
    let started = Instant::now();
    let r = rt.block_on(client.create(&request())).unwrap();
    assert_eq!(r.text, "second time lucky");
    assert_eq!((r.attempts, f.calls()), (2, 2));
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(!client.circuit_open());
}

#[test]
fn a_stream_that_stalls_ends_at_the_deadline() {
    let events = stream_event_list(&["one ", "two ", "three ", "four"], true);
    // The opening events and the first text at once, then one event per 400 ms.
    let mut parts = vec![events[..4].concat()];
    parts.extend(events[4..].iter().cloned());
    let (client, _f, rt) = fake(vec![Reply::SlowSse(parts, Duration::from_millis(400))]);
    let started = Instant::now();
    let items: Vec<_> = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_millis(1500);
        client
            .stream_until(&request(), deadline)
            .await
            .unwrap()
            .collect()
            .await
    });
    assert!(started.elapsed() < Duration::from_millis(2500));
    assert!(
        matches!(items.last(), Some(Err(ClaudeError::Deadline))),
        "{items:?}"
    );
    // The events before the stall came through.
    assert!(items.iter().any(|i| matches!(i, Ok(StreamEvent::Text(_)))));
}

/// Everything logged at any level while `f` runs on this thread.
fn logged<R>(f: impl FnOnce() -> R) -> (R, String) {
    #[derive(Clone, Default)]
    struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let out = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || out.clone())
        .finish();
    let r = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).to_string();
    (r, text)
}

#[test]
fn the_api_key_is_never_logged() {
    let (client, f, rt) = fake(vec![
        Reply::Error(529, vec![], "overloaded_error"),
        Reply::Error(401, vec![], "authentication_error"),
    ]);
    let (result, logs) = logged(|| rt.block_on(client.create(&request())));
    assert!(result.is_err());
    assert_eq!(f.calls(), 2);
    assert!(logs.contains("retrying"), "the retry was logged: {logs}");
    assert!(!logs.contains("test-key"), "{logs}");
}
