//! Routing end to end: the real server and the real SmolLM2 model, escalating to the fake
//! Anthropic server over HTTP.

use std::time::{Duration, Instant};

use llmgenie::claude::ClaudeConfig;
use llmgenie::registry::{Budget, KeepAlive};
use llmgenie::router::policy::RouterConfig;
use llmgenie::server::routed::Routing;
use llmgenie::server::Limits;
use serde_json::{json, Value};

use crate::util::fake_claude::{self, message_json, stream_events, Fake, Reply};
use crate::util::http::{http, post, Reply as HttpReply, TestServer};

/// A server whose router escalates to `fake` (one retry, short backoffs, breaker after 3).
fn routed_server(fake: &Fake, tweak: impl FnOnce(&mut RouterConfig)) -> TestServer {
    let mut cfg = RouterConfig {
        claude_base_url: fake.base_url(),
        claude_retries: 1,
        ..RouterConfig::default()
    };
    tweak(&mut cfg);
    let claude = ClaudeConfig {
        api_key: Some("test-key".into()),
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(50),
        breaker_threshold: 3,
        breaker_cooldown: Duration::from_secs(600),
        ..Routing::claude_config(&cfg)
    };
    let routing = Routing::new(cfg, claude).unwrap();
    TestServer::configured(
        Limits::default(),
        KeepAlive::For(Duration::from_secs(300)),
        Budget::default(),
        move |mut s| {
            s.routing = std::sync::Arc::new(routing);
            s
        },
    )
}

/// SmolLM2 answers this with JSON that parses (checked: greedy, 80 tokens).
const GOOD_EXTRACT: &str = "Extract the name and age as JSON: John is 34 years old.";

fn chat(prompt: &str, max_tokens: u32, stream: bool) -> Value {
    json!({"model": "auto", "messages": [{"role": "user", "content": prompt}],
           "temperature": 0, "max_tokens": max_tokens, "stream": stream})
}

/// An `auto` chat completion to the server.
fn ask(srv: &TestServer, prompt: &str, max_tokens: u32, stream: bool) -> HttpReply {
    post(
        srv.addr,
        "/v1/chat/completions",
        chat(prompt, max_tokens, stream),
    )
}

/// The `llmgenie` object of a stream (in its last chunk that has one).
fn stream_routing(objects: &[Value]) -> &Value {
    &objects
        .iter()
        .rev()
        .find(|o| o.get("llmgenie").is_some())
        .expect("a chunk with the llmgenie object")["llmgenie"]
}

fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    headers.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The data objects of an SSE body (without `[DONE]`).
fn sse_objects(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

fn streamed_text(objects: &[Value]) -> String {
    objects
        .iter()
        .filter_map(|o| o["choices"][0]["delta"]["content"].as_str())
        .collect()
}

#[test]
fn an_answer_the_validator_accepts_stays_local() {
    let (fake, _rt) = fake_claude::start(vec![Reply::Json(message_json("unused"))]);
    let srv = routed_server(&fake, |_| {});
    let r = ask(&srv, GOOD_EXTRACT, 80, false);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(header(&r.headers, "x-llmgenie-route"), Some("local"));
    assert_eq!(header(&r.headers, "x-llmgenie-task"), Some("extract"));
    assert_eq!(header(&r.headers, "x-llmgenie-escalation-reason"), None);
    let v = r.json();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.contains("John"), "{content}");
    assert_eq!(v["model"], "smollm2-135m");
    let routing = &v["llmgenie"];
    assert_eq!(routing["validated"], true);
    assert_eq!(routing["escalated"], false);
    assert!(routing["saved_usd"].as_f64().unwrap() > 0.0);
    assert_eq!(fake.calls(), 0, "nothing was sent to Claude");

    // Streamed: the validated answer is replayed token by token, the same text.
    let r = ask(&srv, GOOD_EXTRACT, 80, true);
    assert_eq!(header(&r.headers, "x-llmgenie-route"), Some("local"));
    let objects = sse_objects(&r.body);
    assert_eq!(streamed_text(&objects), content);
    assert!(objects.len() > 5, "replayed in pieces");
    assert_eq!(objects.last().unwrap()["llmgenie"]["route"], "local");
    assert_eq!(fake.calls(), 0);
}

#[test]
fn a_failing_local_answer_is_escalated_streamed_or_not_and_the_ledger_adds_up() {
    let claude_json = "{\"name\": \"John\", \"age\": 34}";
    let (fake, _rt) = fake_claude::start(vec![
        Reply::Json(message_json(claude_json)),
        Reply::Sse(stream_events(&["{\"name\": ", "\"John\"}"], true)),
        Reply::Json(message_json("{\"ok\": true}")),
    ]);
    let srv = routed_server(&fake, |_| {});
    // Six tokens cannot hold the JSON: cut off, and not parseable.
    let r = ask(&srv, GOOD_EXTRACT, 6, false);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(header(&r.headers, "x-llmgenie-route"), Some("claude"));
    let reasons = header(&r.headers, "x-llmgenie-escalation-reason").unwrap();
    assert!(reasons.contains("invalid_json"), "{reasons}");
    let v = r.json();
    assert_eq!(v["choices"][0]["message"]["content"], claude_json);
    assert_eq!(v["model"], "claude-sonnet-4-5");
    assert_eq!(v["usage"]["prompt_tokens"], 12);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["llmgenie"]["escalated"], true);
    let spent_plain = v["llmgenie"]["spent_usd"].as_f64().unwrap();
    assert!((spent_plain - (12.0 * 3.0 + 5.0 * 15.0) / 1e6).abs() < 1e-12);
    {
        let seen = fake.seen.lock().unwrap();
        let (headers, body) = &seen[0];
        assert_eq!(headers["x-api-key"], "test-key");
        assert_eq!(body["messages"][0]["content"], GOOD_EXTRACT);
        assert_eq!(body["max_tokens"], 6);
        assert!(body["system"].as_str().unwrap().contains("JSON"));
    }

    // Streamed: Claude's stream is passed through.
    let r = ask(&srv, GOOD_EXTRACT, 6, true);
    assert_eq!(header(&r.headers, "x-llmgenie-route"), Some("claude"));
    let objects = sse_objects(&r.body);
    assert_eq!(streamed_text(&objects), "{\"name\": \"John\"}");
    assert_eq!(stream_routing(&objects)["route"], "claude");
    assert_eq!(fake.seen.lock().unwrap()[1].1["stream"], true);

    // Ollama's shape too.
    let r = post(
        srv.addr,
        "/api/chat",
        json!({"model": "auto", "messages": [{"role": "user", "content": GOOD_EXTRACT}],
               "stream": false, "options": {"temperature": 0, "num_predict": 6}}),
    );
    assert_eq!(header(&r.headers, "x-llmgenie-route"), Some("claude"));
    let v = r.json();
    assert_eq!(v["message"]["content"], "{\"ok\": true}");
    assert_eq!(v["llmgenie"]["escalated"], true);
    assert_eq!(fake.calls(), 3);

    // A greeting the model handles stays local: one local, three Claude answers in the ledger.
    let r = ask(&srv, GOOD_EXTRACT, 80, false);
    assert_eq!(header(&r.headers, "x-llmgenie-route"), Some("local"));
    let saved = r.json()["llmgenie"]["saved_usd"].as_f64().unwrap();
    let stats = http(srv.addr, "GET", "/v1/stats", b"").json();
    let t = &stats["totals"];
    assert_eq!(t["total"]["requests"], 4);
    assert_eq!(t["by_route"]["claude"]["requests"], 3);
    assert_eq!(t["by_route"]["local"]["requests"], 1);
    assert_eq!(t["by_task"]["extract"]["requests"], 4);
    assert_eq!(t["escalated"], 3);
    assert_eq!(t["validated"], 4);
    assert!(t["escalation_reasons"]["invalid_json"].as_u64().unwrap() >= 3);
    let spent = t["total"]["spent_usd"].as_f64().unwrap();
    // 12 in + 5 out, 12 in + 7 out (the stream's usage), 12 in + 5 out.
    let expected = (36.0 * 3.0 + 17.0 * 15.0) / 1e6;
    assert!((spent - expected).abs() < 1e-12, "{spent} vs {expected}");
    assert!((t["total"]["saved_usd"].as_f64().unwrap() - saved).abs() < 1e-12);
}

#[test]
fn classes_routed_to_claude_skip_the_local_model_and_claude_names_pass_through() {
    let (fake, _rt) = fake_claude::start(vec![Reply::Json(message_json("def f(): pass"))]);
    let srv = routed_server(&fake, |_| {});
    let r = ask(
        &srv,
        "Write a Python function that returns the n-th Fibonacci number.",
        100,
        false,
    );
    assert_eq!(header(&r.headers, "x-llmgenie-task"), Some("code"));
    assert_eq!(header(&r.headers, "x-llmgenie-route"), Some("claude"));
    assert_eq!(
        header(&r.headers, "x-llmgenie-escalation-reason"),
        Some("class_route")
    );
    let v = r.json();
    assert_eq!(v["llmgenie"]["validated"], false);
    assert_eq!(v["choices"][0]["message"]["content"], "def f(): pass");
    assert!(
        srv.resident().is_empty(),
        "the local model was not even loaded"
    );

    let r = post(
        srv.addr,
        "/v1/chat/completions",
        json!({"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["model"], "claude-haiku-4-5");
    assert_eq!(
        header(&r.headers, "x-llmgenie-escalation-reason"),
        Some("requested")
    );
    assert_eq!(fake.seen.lock().unwrap()[1].1["model"], "claude-haiku-4-5");
    // The default max_tokens for Claude applies when the request sets none.
    assert_eq!(fake.seen.lock().unwrap()[1].1["max_tokens"], 1024);
}

#[test]
fn when_claude_fails_the_local_answer_is_returned_degraded_then_the_breaker_opens() {
    let (fake, _rt) = fake_claude::start(vec![Reply::Error(500, vec![], "api_error")]);
    let srv = routed_server(&fake, |_| {});
    let started = Instant::now();
    for i in 0..3 {
        let r = ask(&srv, GOOD_EXTRACT, 6, false);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(header(&r.headers, "x-llmgenie-route"), Some("local"));
        assert_eq!(header(&r.headers, "x-llmgenie-degraded"), Some("true"));
        let v = r.json();
        assert_eq!(v["model"], "smollm2-135m");
        assert!(!v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty());
        let routing = &v["llmgenie"];
        assert_eq!(routing["degraded"], true);
        assert!(routing["claude_error"].as_str().unwrap().contains("500"));
        assert!(!r.body.contains("test-key"));
        assert_eq!(fake.calls(), 2 * (i + 1), "one attempt and one retry each");
    }
    assert!(started.elapsed() < Duration::from_secs(60));
    // Three failed requests opened the breaker: no call, the local answer, marked.
    let r = ask(&srv, GOOD_EXTRACT, 6, true);
    assert_eq!(r.status, 200);
    assert_eq!(
        header(&r.headers, "x-llmgenie-not-escalated"),
        Some("circuit_open")
    );
    assert!(!streamed_text(&sse_objects(&r.body)).is_empty());
    assert_eq!(fake.calls(), 6);
    let stats = http(srv.addr, "GET", "/v1/stats", b"").json();
    assert_eq!(stats["totals"]["degraded"], 3);
    assert_eq!(stats["totals"]["not_escalated"]["circuit_open"], 1);
    assert_eq!(stats["claude"]["circuit_open"], true);
}

#[test]
fn the_deadline_bounds_escalation_and_streams_can_skip_validation() {
    // Claude asks to wait 30 s: past the 5 s deadline, so the request ends degraded at once.
    let (fake, _rt) = fake_claude::start(vec![Reply::Error(
        529,
        vec![("retry-after", "30")],
        "overloaded_error",
    )]);
    let srv = routed_server(&fake, |c| c.deadline_secs = 5.0);
    let started = Instant::now();
    let r = ask(&srv, GOOD_EXTRACT, 6, false);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["llmgenie"]["degraded"], true);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(fake.calls(), 1);

    let (fake, _rt2) = fake_claude::start(vec![Reply::Json(message_json("unused"))]);
    let srv = routed_server(&fake, |c| c.stream_local_immediately = true);
    let r = ask(&srv, GOOD_EXTRACT, 6, true);
    assert_eq!(header(&r.headers, "x-llmgenie-route"), Some("local"));
    let objects = sse_objects(&r.body);
    assert_eq!(stream_routing(&objects)["validated"], false);
    assert_eq!(fake.calls(), 0, "never escalated mid-stream");
}

#[test]
fn without_a_key_claude_models_are_refused_and_auto_stays_local() {
    let srv = TestServer::start(Limits::default());
    let r = post(
        srv.addr,
        "/v1/chat/completions",
        json!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("ANTHROPIC_API_KEY"), "{}", r.body);
    let r = ask(&srv, GOOD_EXTRACT, 6, false);
    assert_eq!(r.status, 200);
    assert_eq!(
        header(&r.headers, "x-llmgenie-not-escalated"),
        Some("no_api_key")
    );
    let show = post(srv.addr, "/api/show", json!({"model": "auto:latest"}));
    assert_eq!(show.status, 200, "{}", show.body);
    let show = show.json();
    assert_eq!(show["router"]["local_model"], "smollm2-135m");
    assert_eq!(show["router"]["escalation"], false);
    let models = http(srv.addr, "GET", "/v1/models", b"").json();
    assert!(models["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "auto"));
}

#[test]
fn a_claude_stream_that_fails_before_its_text_degrades_and_after_it_ends_in_an_error() {
    let opening_only = fake_claude::stream_event_list(&[], false)[..1].concat();
    let mut failing = fake_claude::stream_event_list(&["Half an ans"], false)[..4].concat();
    failing.push_str(&fake_claude::sse(&[(
        "error",
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    )]));
    let (fake, _rt) = fake_claude::start(vec![Reply::Sse(opening_only), Reply::Sse(failing)]);
    let srv = routed_server(&fake, |c| c.claude_retries = 0);
    // Cut before any text: nothing reached the client yet, so the local answer is streamed.
    let r = ask(&srv, GOOD_EXTRACT, 6, true);
    assert_eq!(header(&r.headers, "x-llmgenie-route"), Some("local"));
    assert_eq!(header(&r.headers, "x-llmgenie-degraded"), Some("true"));
    let objects = sse_objects(&r.body);
    assert!(!streamed_text(&objects).is_empty());
    // An error after text: the text already sent stands, and the stream ends with an error.
    let r = ask(&srv, GOOD_EXTRACT, 6, true);
    assert_eq!(header(&r.headers, "x-llmgenie-route"), Some("claude"));
    let objects = sse_objects(&r.body);
    assert_eq!(streamed_text(&objects), "Half an ans");
    assert!(
        objects.last().unwrap().get("error").is_some(),
        "{objects:?}"
    );
    assert!(r.body.trim_end().ends_with("data: [DONE]"));
}

#[test]
fn a_prompt_too_long_for_the_local_model_goes_to_claude() {
    let (fake, _rt) = fake_claude::start(vec![Reply::Json(message_json("A long read."))]);
    let srv = routed_server(&fake, |_| {});
    // About 9,000 tokens: more than SmolLM2's 8,192-token context.
    let prompt = format!(
        "Summarize this: {}",
        "the quick brown fox jumps. ".repeat(1800)
    );
    let r = ask(&srv, &prompt, 50, false);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(header(&r.headers, "x-llmgenie-route"), Some("claude"));
    assert_eq!(
        header(&r.headers, "x-llmgenie-escalation-reason"),
        Some("local_context")
    );
    assert_eq!(r.json()["choices"][0]["message"]["content"], "A long read.");
    // Pinned to the local model, the same prompt is refused with a clear error.
    let mut pinned = chat(&prompt, 50, false);
    pinned["model"] = json!("smollm2-135m");
    let r = post(srv.addr, "/v1/chat/completions", pinned);
    assert_eq!(r.status, 422, "{}", r.body);
}
