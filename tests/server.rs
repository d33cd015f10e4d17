//! The real server on 127.0.0.1:0 with the real SmolLM2 model, driven over HTTP.

use std::time::{Duration, Instant};

use llmgenie::engine::EngineStats;
use llmgenie::registry::{Budget, KeepAlive};
use llmgenie::server::Limits;
use serde_json::{json, Value};

use crate::util::http::{http, http_with, post, start_stream, TestServer};
use crate::util::{counting_prompt, model_path, reference, settled, SMOLLM2};

/// The code prompt, and llama.cpp's greedy answer to it up to its first near-tie.
fn code_prompt() -> (String, crate::util::Settled) {
    let r = reference("smollm2");
    let case = &r.chat[2];
    (
        case.messages[0].content.clone(),
        settled("smollm2", SMOLLM2, 2),
    )
}

#[test]
fn openai_chat_answers_like_the_engine_streamed_or_not() {
    let srv = TestServer::start(Limits::default());
    let (question, want) = code_prompt();
    let (expected, n) = (want.text, want.ids.len());
    let req = json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": question}],
                     "temperature": 0, "max_tokens": n});
    let r = post(srv.addr, "/v1/chat/completions", req.clone());
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["choices"][0]["message"]["content"], expected.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], n);
    assert_eq!(v["object"], "chat.completion");

    let mut streamed = req;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let r = post(srv.addr, "/v1/chat/completions", streamed);
    assert_eq!(r.status, 200);
    assert!(r.headers.to_ascii_lowercase().contains("text/event-stream"));
    let events: Vec<&str> = r
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, expected);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], n);
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "length"));
}

#[test]
fn openai_completions_logprobs_and_models() {
    let srv = TestServer::start(Limits::default());
    let r = post(
        srv.addr,
        "/v1/completions",
        json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "logprobs": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 4);
    assert!(content
        .iter()
        .all(|t| t["logprob"].as_f64().unwrap() <= 0.0));
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    let models = http(srv.addr, "GET", "/v1/models", b"").json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"smollm2-135m"), "{ids:?}");
    assert_eq!(
        http(srv.addr, "GET", "/v1/models/smollm2", b"").json()["id"],
        "smollm2-135m"
    );
    assert_eq!(http(srv.addr, "GET", "/v1/models/nope", b"").status, 404);
}

#[test]
fn ollama_generate_and_chat_stream_ndjson_with_durations() {
    let srv = TestServer::start(Limits::default());
    let r = post(
        srv.addr,
        "/api/generate",
        json!({"model": "smollm2-135m:latest", "prompt": "Hi", "options": {"temperature": 0, "num_predict": 6}}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let lines: Vec<Value> = r
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "length");
    assert_eq!(last["eval_count"], 6);
    for key in [
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_duration",
    ] {
        assert!(last[key].as_u64().is_some(), "{key} missing in {last}");
    }
    let streamed: String = lines
        .iter()
        .filter_map(|l| l["response"].as_str())
        .collect();

    let r = post(
        srv.addr,
        "/api/chat",
        json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "stream": false,
               "options": {"temperature": 0, "num_predict": 6}}),
    );
    let v = r.json();
    assert_eq!(v["done"], true);
    assert_eq!(v["message"]["role"], "assistant");
    // /api/generate without `raw` applies the same chat template as /api/chat.
    assert_eq!(v["message"]["content"].as_str().unwrap(), streamed);

    let ps = http(srv.addr, "GET", "/api/ps", b"").json();
    assert_eq!(ps["models"][0]["name"], "smollm2-135m:latest");
    let tags = http(srv.addr, "GET", "/api/tags", b"").json();
    assert!(tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == "smollm2-135m:latest"));
    assert!(http(srv.addr, "GET", "/api/version", b"").json()["version"].is_string());
    assert_eq!(http(srv.addr, "GET", "/", b"").body, "Ollama is running");
    assert_eq!(http(srv.addr, "GET", "/health", b"").status, 200);
    let show = post(srv.addr, "/api/show", json!({"model": "smollm2-135m"})).json();
    assert_eq!(show["model_info"]["general.architecture"], "llama");
}

#[test]
fn bad_input_gets_clear_errors_in_each_api_shape() {
    let srv = TestServer::start(Limits {
        max_body_bytes: 64 << 10,
        ..Limits::default()
    });
    let a = srv.addr;
    let user = json!([{"role": "user", "content": "Hi"}]);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "/v1/chat/completions",
            b"{not json".to_vec(),
            400,
            "invalid request body",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": "x"}).to_string().into_bytes(),
            400,
            "invalid type",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": []}).to_string().into_bytes(),
            400,
            "messages must not be empty",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user, "temperature": -1})
                .to_string()
                .into_bytes(),
            400,
            "temperature must be between 0 and 2, got -1",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user, "n": 2}).to_string().into_bytes(),
            400,
            "only n = 1",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user, "max_tokens": -5})
                .to_string()
                .into_bytes(),
            400,
            "max_tokens must be between 0",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user, "stop": vec!["x"; 17]})
                .to_string()
                .into_bytes(),
            400,
            "at most 16",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "nope", "messages": user})
                .to_string()
                .into_bytes(),
            404,
            "available models: ",
        ),
        (
            "/v1/chat/completions",
            vec![b'{', 0xff, 0xfe, b'}'],
            400,
            "not valid UTF-8",
        ),
        (
            "/v1/chat/completions",
            vec![b' '; 100 << 10],
            413,
            "larger than the server's limit",
        ),
    ];
    for (path, body, status, needle) in cases {
        let r = http(a, "POST", path, &body);
        assert_eq!(r.status, status, "{path}: {}", r.body);
        let v = r.json();
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
        assert!(v["error"]["type"].is_string());
    }
    // Ollama's shape: {"error": "..."}.
    let r = post(
        a,
        "/api/chat",
        json!({"messages": user, "options": {"temperature": "hot"}}),
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("invalid type"));
    let r = post(a, "/api/generate", json!({"model": "nope", "prompt": "x"}));
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].as_str().unwrap().contains("not found"));
    // A prompt longer than the context (8192 tokens) is refused, not truncated.
    let long = "hello ".repeat(9000);
    let r = post(a, "/v1/completions", json!({"prompt": long}));
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("context"));
    // The server is still healthy after all of that.
    assert_eq!(http(a, "GET", "/health", b"").status, 200);
}

#[test]
fn full_model_gets_429_and_a_client_that_leaves_frees_its_place() {
    let srv = TestServer::start(Limits {
        max_pending_per_model: 1,
        ..Limits::default()
    });
    // A long streaming request that we abandon after its first bytes.
    let s = start_stream(
        srv.addr,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": counting_prompt()}],
               "max_tokens": 4000, "stream": true, "temperature": 0}),
    );
    // The model is at capacity: the next request is refused at once with Retry-After.
    let r = post(
        srv.addr,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.headers.to_ascii_lowercase().contains("retry-after: 1"));
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(30);
    while srv.engine_stats(|st| EngineStats::get(&st.cancelled)) == 0 {
        assert!(
            Instant::now() < deadline,
            "the abandoned stream was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(srv.engine_stats(|st| EngineStats::get(&st.generated_tokens)) < 1000);
    let r = post(
        srv.addr,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

fn quick(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Hi"}], "stream": false,
           "options": {"num_predict": 2}})
}

#[test]
fn keep_alive_expires_unloads_and_ollama_load_requests_work() {
    let srv = TestServer::with_policy(
        Limits::default(),
        KeepAlive::For(Duration::from_secs(300)),
        Budget::default(),
    );
    // A request's own keep_alive: resident for 1 s after it ends, then unloaded.
    let mut req = quick("smollm2-135m");
    req["keep_alive"] = json!("1s");
    assert_eq!(post(srv.addr, "/api/chat", req).status, 200);
    let ps = http(srv.addr, "GET", "/api/ps", b"").json();
    assert_eq!(ps["models"][0]["name"], "smollm2-135m:latest");
    assert!(ps["models"][0]["expires_at"]
        .as_str()
        .unwrap()
        .starts_with("20"));
    srv.wait_resident(&[]);
    // An empty prompt loads the model...
    let r = post(srv.addr, "/api/generate", json!({"model": "smollm2-135m"})).json();
    assert_eq!(r["done_reason"], "load");
    assert_eq!(srv.resident(), ["smollm2-135m"]);
    // ...and with keep_alive 0 unloads it at once.
    let r = post(
        srv.addr,
        "/api/generate",
        json!({"model": "smollm2-135m", "keep_alive": 0}),
    )
    .json();
    assert_eq!(r["done_reason"], "unload");
    assert!(srv.resident().is_empty());
    let bad = post(
        srv.addr,
        "/api/generate",
        json!({"model": "smollm2-135m", "keep_alive": "soon"}),
    );
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].as_str().unwrap().contains("keep_alive"));
}

#[test]
fn a_budget_of_one_model_evicts_the_idle_one_but_never_one_in_use() {
    let srv = TestServer::with_policy(
        Limits::default(),
        KeepAlive::Forever,
        Budget {
            max_models: Some(1),
            max_bytes: None,
        },
    );
    assert_eq!(
        post(srv.addr, "/api/chat", quick("smollm2-135m")).status,
        200
    );
    assert_eq!(srv.resident(), ["smollm2-135m"]);
    assert_eq!(
        post(srv.addr, "/api/chat", quick("gemma3-270m")).status,
        200
    );
    assert_eq!(
        srv.resident(),
        ["gemma3-270m"],
        "the idle model was evicted"
    );

    // While gemma3 streams a long answer it is in use: loading smollm2 cannot evict it.
    let s = start_stream(
        srv.addr,
        "/api/generate",
        json!({"model": "gemma3-270m", "prompt": counting_prompt(), "raw": true, "stream": true,
               "options": {"num_predict": 3000}}),
    );
    let r = post(srv.addr, "/api/chat", quick("smollm2-135m"));
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.json()["error"].as_str().unwrap().contains("in use"));
    drop(s);
    // Once the stream is gone the model is idle again and can make room.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = post(srv.addr, "/api/chat", quick("smollm2-135m"));
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gemma3 never became idle: {}",
            r.body
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(srv.resident(), ["smollm2-135m"]);
}

#[test]
fn api_key_and_cors_when_configured() {
    let srv = TestServer::configured(
        Limits::default(),
        KeepAlive::Forever,
        Budget::default(),
        |s| {
            s.with_api_key(Some("s3cret".into()))
                .with_cors_origins(vec!["http://app.example".into()])
        },
    );
    let a = srv.addr;
    let body = quick("smollm2-135m").to_string();
    // Open routes need no key.
    assert_eq!(http(a, "GET", "/health", b"").status, 200);
    assert_eq!(http(a, "GET", "/", b"").status, 200);
    // Everything else does, in each API's error shape.
    let r = http(a, "GET", "/v1/models", b"");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    let r = http(a, "POST", "/api/chat", body.as_bytes());
    assert_eq!(r.status, 401);
    assert!(r.json()["error"].as_str().unwrap().contains("API key"));
    let r = http_with(
        a,
        "POST",
        "/api/chat",
        body.as_bytes(),
        "Authorization: Bearer wrong\r\n",
    );
    assert_eq!(r.status, 401);
    let r = http_with(
        a,
        "POST",
        "/api/chat",
        body.as_bytes(),
        "Authorization: Bearer s3cret\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // CORS: the configured origin gets a preflight answer and tagged responses; others nothing.
    let pre = http_with(
        a,
        "OPTIONS",
        "/v1/chat/completions",
        b"",
        "Origin: http://app.example\r\n",
    );
    assert_eq!(pre.status, 204);
    let h = pre.headers.to_ascii_lowercase();
    assert!(
        h.contains("access-control-allow-origin: http://app.example"),
        "{h}"
    );
    assert!(
        h.contains("access-control-allow-headers: authorization"),
        "{h}"
    );
    let other = http_with(a, "GET", "/health", b"", "Origin: http://evil.example\r\n");
    assert!(!other
        .headers
        .to_ascii_lowercase()
        .contains("access-control-allow-origin"));
}

#[test]
fn json_mode_answers_always_parse() {
    let srv = TestServer::start(Limits::default());
    for seed in 0..4 {
        let r = post(
            srv.addr,
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Describe a cat as JSON with name and age."}],
                   "response_format": {"type": "json_object"}, "temperature": 1.0, "seed": seed,
                   "max_tokens": 200}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        let content = v["choices"][0]["message"]["content"].as_str().unwrap();
        if v["choices"][0]["finish_reason"] == "stop" {
            let parsed: Value =
                serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {content}"));
            assert!(parsed.is_object());
        }
    }
    let r = post(
        srv.addr,
        "/api/generate",
        json!({"model": "smollm2-135m", "prompt": "List three colors as JSON.", "format": "json",
               "stream": false, "options": {"temperature": 0, "num_predict": 200}}),
    );
    let v = r.json();
    assert_eq!(v["done_reason"], "stop", "{v}");
    let parsed: Value = serde_json::from_str(v["response"].as_str().unwrap()).unwrap();
    assert!(parsed.is_object());
    let bad = post(
        srv.addr,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}),
    );
    assert_eq!(bad.status, 400);
}

#[test]
fn a_model_that_fails_to_load_reports_it_and_others_keep_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(model_path(SMOLLM2)).unwrap();
    bytes.truncate(bytes.len() / 2);
    let broken = dir.path().join("broken.gguf");
    std::fs::write(&broken, bytes).unwrap();
    let srv = TestServer::configured(
        Limits::default(),
        KeepAlive::Forever,
        Budget::default(),
        |s| {
            s.registry.add_file("broken", &broken);
            s
        },
    );
    // Several requests at once all get the load error.
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let a = srv.addr;
            std::thread::spawn(move || post(a, "/api/chat", quick("broken")))
        })
        .collect();
    for h in handles {
        let r = h.join().unwrap();
        assert_eq!(r.status, 500, "{}", r.body);
        let msg = r.json()["error"].as_str().unwrap().to_string();
        assert!(
            msg.contains("failed to load") && msg.contains("exceeds file size"),
            "{msg}"
        );
    }
    assert_eq!(
        post(srv.addr, "/api/chat", quick("smollm2-135m")).status,
        200
    );
    assert_eq!(srv.resident(), ["smollm2-135m"]);
}

#[test]
fn the_ledger_counts_what_local_answers_saved() {
    let srv = TestServer::start(Limits::default());
    let r1 = post(
        srv.addr,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}),
    )
    .json();
    let r2 = post(
        srv.addr,
        "/api/generate",
        json!({"model": "smollm2-135m", "prompt": "Hi", "options": {"num_predict": 3}}),
    );
    let last: Value = serde_json::from_str(r2.body.lines().last().unwrap()).unwrap();
    let stats = http(srv.addr, "GET", "/v1/stats", b"").json();
    let total = &stats["totals"]["total"];
    assert_eq!(total["requests"], 2);
    let input = r1["usage"]["prompt_tokens"].as_u64().unwrap()
        + last["prompt_eval_count"].as_u64().unwrap();
    let output =
        r1["usage"]["completion_tokens"].as_u64().unwrap() + last["eval_count"].as_u64().unwrap();
    assert_eq!(total["input_tokens"], input);
    assert_eq!(total["output_tokens"], output);
    let prices = &stats["prices"];
    let expected = (input as f64 * prices["input_per_million"].as_f64().unwrap()
        + output as f64 * prices["output_per_million"].as_f64().unwrap())
        / 1e6;
    assert!((total["saved_usd"].as_f64().unwrap() - expected).abs() < 1e-12);
    assert_eq!(total["spent_usd"], 0.0);
}
