//! `/metrics` counters move as they should for a local answer, an escalation, a 429 and a
//! cancelled stream. A test binary of its own: the metrics recorder is global to a process, so
//! here no other test's requests move the counters.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
#[path = "util/mod.rs"]
mod util;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use llmgenie::claude::ClaudeConfig;
use llmgenie::registry::{Budget, KeepAlive};
use llmgenie::router::policy::RouterConfig;
use llmgenie::server::routed::Routing;
use llmgenie::server::Limits;
use serde_json::json;

use util::counting_prompt;
use util::fake_claude::{self, message_json, Reply};
use util::http::{http, post, start_stream, TestServer};

fn scrape(addr: SocketAddr) -> String {
    let r = http(addr, "GET", "/metrics", b"");
    assert_eq!(r.status, 200);
    assert!(
        r.headers.contains("text/plain; version=0.0.4"),
        "{}",
        r.headers
    );
    r.body
}

/// The value of the series `name` whose labels include all of `labels` (0 when absent).
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, val)| rest.contains(&format!("{k}=\"{val}\""))))
            .then(|| v.parse::<f64>().ok())?
        })
        .sum()
}

struct Delta {
    before: String,
    after: String,
}

impl Delta {
    fn of(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        value(&self.after, name, labels) - value(&self.before, name, labels)
    }
}

fn measure(addr: SocketAddr, f: impl FnOnce()) -> Delta {
    let before = scrape(addr);
    f();
    Delta {
        before,
        after: scrape(addr),
    }
}

const MODEL: [(&str, &str); 1] = [("model", "smollm2-135m")];

#[test]
fn counters_follow_local_answers_escalations_rejections_and_cancellations() {
    let (fake, _rt) = fake_claude::start(vec![Reply::Json(message_json("{\"name\": \"John\"}"))]);
    let cfg = RouterConfig {
        claude_base_url: fake.base_url(),
        claude_retries: 0,
        ..RouterConfig::default()
    };
    let claude = ClaudeConfig {
        api_key: Some("test-key".into()),
        ..Routing::claude_config(&cfg)
    };
    let routing = Routing::new(cfg, claude).unwrap();
    let limits = Limits {
        max_pending_per_model: 1,
        ..Limits::default()
    };
    let srv = TestServer::configured(
        limits,
        KeepAlive::For(Duration::from_secs(300)),
        Budget::default(),
        move |mut s| {
            s.routing = std::sync::Arc::new(routing);
            s
        },
    );
    let a = srv.addr;

    // A local answer.
    let mut usage = json!(null);
    let d = measure(a, || {
        let r = post(
            a,
            "/v1/chat/completions",
            json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}],
                   "max_tokens": 5, "temperature": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        usage = r.json()["usage"].clone();
    });
    let n = "llmgenie_generated_tokens_total";
    assert_eq!(
        d.of(n, &MODEL),
        usage["completion_tokens"].as_f64().unwrap()
    );
    let n = "llmgenie_prompt_tokens_total";
    assert_eq!(d.of(n, &MODEL), usage["prompt_tokens"].as_f64().unwrap());
    let finished = "llmgenie_sequences_finished_total";
    assert_eq!(d.of(finished, &[("reason", "length")]), 1.0);
    assert_eq!(d.of(finished, &[("reason", "stop")]), 0.0);
    let routed = "llmgenie_routed_requests_total";
    assert_eq!(
        d.of(routed, &[("task", "unclassified"), ("route", "local")]),
        1.0
    );
    let http_total = "llmgenie_http_requests_total";
    let chat_200 = [
        ("route", "/v1/chat/completions"),
        ("method", "POST"),
        ("status", "200"),
    ];
    assert_eq!(d.of(http_total, &chat_200), 1.0);
    assert_eq!(
        d.of("llmgenie_time_to_first_token_seconds_count", &MODEL),
        1.0
    );
    assert_eq!(
        d.of("llmgenie_inter_token_latency_seconds_count", &MODEL),
        4.0
    );
    assert!(d.of("llmgenie_ledger_saved_dollars", &[]) > 0.0);
    assert_eq!(value(&d.after, "llmgenie_models_resident", &[]), 1.0);
    assert!(value(&d.after, "llmgenie_model_resident_bytes", &MODEL) > 9e7);
    assert_eq!(
        value(&d.after, "llmgenie_model_loads_total", &[("outcome", "ok")]),
        1.0
    );

    // An escalation: the extraction cut off at 6 tokens is not JSON; Claude answers.
    let d = measure(a, || {
        let r = post(
            a,
            "/v1/chat/completions",
            json!({"model": "auto", "messages": [{"role": "user", "content": "Extract the name and age as JSON: John is 34 years old."}],
                   "max_tokens": 6, "temperature": 0}),
        );
        assert_eq!(r.json()["llmgenie"]["route"], "claude", "{}", r.body);
    });
    assert_eq!(
        d.of(routed, &[("task", "extract"), ("route", "claude")]),
        1.0
    );
    let verdicts = "llmgenie_validator_verdicts_total";
    assert_eq!(
        d.of(verdicts, &[("task", "extract"), ("verdict", "escalate")]),
        1.0
    );
    assert_eq!(
        d.of("llmgenie_escalations_total", &[("reason", "invalid_json")]),
        1.0
    );
    let attempts = "llmgenie_claude_attempts_total";
    assert_eq!(d.of(attempts, &[("outcome", "ok"), ("status", "200")]), 1.0);
    let spent = (12.0 * 3.0 + 5.0 * 15.0) / 1e6;
    assert!((d.of("llmgenie_ledger_spent_dollars", &[]) - spent).abs() < 1e-12);
    assert_eq!(value(&d.after, "llmgenie_claude_circuit_open", &[]), 0.0);

    // A 429 while a stream holds the only place, then the stream is abandoned.
    let stream = start_stream(
        a,
        "/api/generate",
        json!({"model": "smollm2-135m", "prompt": counting_prompt(), "raw": true, "stream": true,
               "options": {"num_predict": 2000}}),
    );
    let d = measure(a, || {
        let r = post(
            a,
            "/api/generate",
            json!({"model": "smollm2-135m", "prompt": "Hi", "stream": false}),
        );
        assert_eq!(r.status, 429, "{}", r.body);
    });
    let rejected = [
        ("route", "/api/generate"),
        ("method", "POST"),
        ("status", "429"),
    ];
    assert_eq!(d.of(http_total, &rejected), 1.0);
    assert_eq!(value(&d.after, "llmgenie_running_sequences", &MODEL), 1.0);
    let before = scrape(a);
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(20);
    let cancelled = [("model", "smollm2-135m"), ("reason", "cancelled")];
    // A scrape reads the running gauge before it renders the counters, so one scrape can catch
    // the sequence counted as cancelled and still running; wait until both settle.
    loop {
        let now = scrape(a);
        let counted = value(&now, finished, &cancelled) - value(&before, finished, &cancelled);
        let running = value(&now, "llmgenie_running_sequences", &MODEL);
        if counted == 1.0 && running == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cancelled sequences counted: {counted}, still running: {running}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The same conversation twice: the second starts from the first one's cache.
    let body = json!({"model": "smollm2-135m", "max_tokens": 3, "temperature": 0,
        "messages": [{"role": "user", "content": "Here is a list of fruits: apples, pears, plums, cherries, figs, dates, limes and kiwis. Which one is yellow?"}]});
    // (The first one may already reuse the default system prompt of an earlier request.)
    let first = post(a, "/v1/chat/completions", body.clone()).json();
    let first_cached = first["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_f64()
        .unwrap();
    let mut cached = 0.0;
    let d = measure(a, || {
        let again = post(a, "/v1/chat/completions", body.clone()).json();
        cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_f64()
            .unwrap();
        assert_eq!(
            again["choices"][0]["message"],
            first["choices"][0]["message"]
        );
    });
    assert!(cached > first_cached, "{cached} vs {first_cached}");
    assert_eq!(d.of("llmgenie_prefix_cache_hits_total", &MODEL), 1.0);
    assert_eq!(
        d.of("llmgenie_prefix_cache_reused_tokens_total", &MODEL),
        cached
    );

    // Ollama's unload request.
    let d = measure(a, || {
        let r = post(
            a,
            "/api/generate",
            json!({"model": "smollm2-135m", "keep_alive": 0}),
        );
        assert_eq!(r.json()["done_reason"], "unload", "{}", r.body);
    });
    let unloads = "llmgenie_model_unloads_total";
    assert_eq!(d.of(unloads, &[("reason", "request")]), 1.0);
    assert_eq!(value(&d.after, "llmgenie_models_resident", &[]), 0.0);
    assert_eq!(
        value(&d.after, "llmgenie_model_resident_bytes", &MODEL),
        0.0
    );
}
