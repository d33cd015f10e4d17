//! The shipped monitoring against the real tools: promtool checks the rules, their unit tests and
//! a real scrape; a real Prometheus scrapes a running `llmgenie serve` and answers queries about
//! it. Also the per-request log lines. Needs `prometheus` and `promtool` on PATH (Debian's
//! `prometheus` package; `.ci/run` installs it).

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::http::{free_port, http, http_with, post, spawn_serve, wait_for_port};
use crate::util::root;

fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not on PATH: install Debian's prometheus package (apt-get install prometheus)"
    );
    Command::new(name)
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `llmgenie serve` with `extra` flags and `env`, its stderr going to `log`; killed when dropped.
fn serve(extra: &[&str], log: &Path, env: &[(&str, &str)]) -> (Killed, u16) {
    let (child, port) = spawn_serve(extra, env, std::fs::File::create(log).unwrap().into());
    (Killed(child), port)
}

fn addr(port: u16) -> std::net::SocketAddr {
    ([127, 0, 0, 1], port).into()
}

/// One short answer; returns its generated-token count.
fn ask(port: u16) -> f64 {
    let r = post(
        addr(port),
        "/v1/chat/completions",
        json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Say hello"}],
               "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["usage"]["completion_tokens"]
        .as_f64()
        .unwrap_or_default()
}

#[test]
fn shipped_rules_pass_promtool_and_their_unit_tests() {
    let dir = root().join("scripts/monitoring");
    let out = run_ok(
        tool("promtool")
            .args(["check", "rules"])
            .arg(dir.join("alerts.yml")),
    );
    assert!(out.contains("SUCCESS"), "{out}");
    run_ok(
        tool("promtool")
            .args(["test", "rules"])
            .arg(dir.join("alerts_test.yml")),
    );
    run_ok(
        tool("promtool")
            .args(["check", "config"])
            .arg(dir.join("prometheus.yml")),
    );
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("grafana-dashboard.json")).unwrap())
            .unwrap();
    assert!(dashboard["panels"].as_array().unwrap().len() >= 10);
}

#[test]
fn a_real_prometheus_scrapes_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let (_server, port) = serve(&[], &tmp.path().join("serve.log"), &[]);
    let generated = ask(port) + ask(port);
    assert!(generated > 0.0);
    // The scrape is clean by promtool's rules.
    let scrape = http(addr(port), "GET", "/metrics", b"").body;
    let mut check = tool("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    let problems = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && problems.trim().is_empty(),
        "{problems}"
    );

    let prom_port = free_port();
    let config = tmp.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: llmgenie\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let prometheus = tool("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            tmp.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tmp.path().join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    let _prometheus = Killed(prometheus);
    wait_for_port(prom_port);
    let query = |q: &str| -> Value {
        let r = http(
            addr(prom_port),
            "GET",
            &format!("/api/v1/query?query={q}"),
            b"",
        );
        serde_json::from_str(&r.body).unwrap_or(Value::Null)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = query("up%7Bjob%3D%22llmgenie%22%7D");
        let tokens = query("sum(llmgenie_generated_tokens_total)");
        let value = |v: &Value| -> f64 {
            v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0.0)
        };
        // The engine counts a sequence's tokens just after its last event, so a scrape may see
        // the first answer's tokens before the second's: wait for both.
        if value(&up) == 1.0 && value(&tokens) >= generated {
            assert_eq!(value(&tokens), generated, "the two answers' tokens");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw the target up with tokens: {up} {tokens}\n{}",
            std::fs::read_to_string(tmp.path().join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn each_request_logs_one_json_line_without_prompts_or_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("serve.log");
    let secret = [("ANTHROPIC_API_KEY", "sk-ant-never-logged")];
    let (server, port) = serve(&["--log-format", "json"], &log, &secret);
    let r = http_with(
        addr(port),
        "POST",
        "/v1/chat/completions",
        json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Say hello"}],
               "max_tokens": 4})
        .to_string()
        .as_bytes(),
        "X-Request-Id: trace-42\r\n",
    );
    assert!(r
        .headers
        .to_ascii_lowercase()
        .contains("x-request-id: trace-42"));
    let r = post(
        addr(port),
        "/v1/chat/completions",
        json!({"model": "nope", "messages": []}),
    );
    assert_eq!(r.status, 400);
    let generated_id = r
        .headers
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap()
        .trim()
        .to_string();
    drop(server);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let requests: Vec<&Value> = lines.iter().filter(|l| l["message"] == "request").collect();
    let answered = requests
        .iter()
        .find(|l| l["request_id"] == "trace-42")
        .unwrap();
    assert_eq!(answered["model"], "smollm2-135m");
    assert_eq!(answered["route"], "local");
    assert_eq!(answered["status"], 200);
    assert_eq!(answered["generated_tokens"], 4);
    assert!(answered["ttft_ms"].as_f64().unwrap() > 0.0);
    assert!(answered["total_ms"].as_f64().unwrap() >= answered["ttft_ms"].as_f64().unwrap());
    let rejected = requests
        .iter()
        .find(|l| l["request_id"] == generated_id.as_str())
        .unwrap();
    assert_eq!(rejected["status"], 400);
    assert_eq!(requests.len(), 2, "one line per request: {requests:?}");
    assert!(!text.contains("Say hello"), "prompt text logged by default");
    assert!(!text.contains("sk-ant-never-logged"));

    let (server, port) = serve(&["--log-format", "json", "--log-prompts"], &log, &[]);
    ask(port);
    drop(server);
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("\"prompt\":\"Say hello\""));
}
