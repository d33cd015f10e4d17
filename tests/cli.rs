//! The `llmgenie` binary as a user runs it.

use std::process::{Command, Output};

use crate::util::http::{self, start_stream};
use crate::util::{model_path, reference, root, settled, SMOLLM2};

fn llmgenie(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llmgenie"))
        .args(args)
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// One short `llmgenie bench` run on SmolLM2: a `prompt`-token prompt, `gen` tokens, and
/// `extra` flags.
fn quick_bench(prompt: &str, gen: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "bench",
        "--model",
        "smollm2",
        "--prompt-tokens",
        prompt,
        "--gen-tokens",
        gen,
        "--runs",
        "1",
    ];
    args.extend_from_slice(extra);
    llmgenie(&args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn run_prints_only_the_greedy_answer_on_stdout() {
    let path = model_path(SMOLLM2);
    let r = reference("smollm2");
    // The code prompt, up to its first near-tie: our free-running greedy answer is llama.cpp's.
    let case = &r.chat[2];
    let want = settled("smollm2", SMOLLM2, 2);
    let out = llmgenie(&[
        "run",
        "--model",
        path.to_str().unwrap(),
        "--temperature",
        "0",
        "--max-tokens",
        &want.ids.len().to_string(),
        &case.messages[0].content,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{}\n", want.text));
}

#[test]
fn run_verbose_reports_speed_on_stderr() {
    let out = llmgenie(&[
        "run",
        "-v",
        "--model",
        "smollm2",
        "--temperature",
        "0",
        "--max-tokens",
        "4",
        "--raw",
        "Hello",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("tokens/s") && err.contains("loaded smollm2-135m"),
        "{err}"
    );
    assert!(!stdout(&out).contains("tokens/s"));
}

#[test]
fn inspect_summarises_a_real_model() {
    let out = llmgenie(&["inspect", "smollm2-135m"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out).to_lowercase();
    for needle in ["llama", "49152", "q4_1", "chat template"] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}

#[test]
fn malformed_files_get_one_line_and_exit_status_1() {
    let dir = tempfile::tempdir().unwrap();
    // Truncated real model: the header promises tensors past the end of the file.
    let real = std::fs::read(model_path(SMOLLM2)).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated.gguf", real[..2 << 20].to_vec()),
        ("empty.gguf", Vec::new()),
        ("notgguf.gguf", b"this is not a model file at all".to_vec()),
    ];
    for (name, bytes) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        for cmd in ["inspect", "run"] {
            let args: Vec<&str> = match cmd {
                "inspect" => vec!["inspect", p.to_str().unwrap()],
                _ => vec!["run", "--model", p.to_str().unwrap(), "hi"],
            };
            let out = llmgenie(&args);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(1), "{cmd} {name}: {err}");
            assert_eq!(err.trim_end().lines().count(), 1, "{cmd} {name}: {err}");
            assert!(
                err.starts_with("error: ") && !err.contains("panicked"),
                "{err}"
            );
        }
    }
}

#[test]
fn unknown_model_lists_the_catalogue() {
    let out = llmgenie(&["run", "--model", "no-such-model", "hi"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("unknown model 'no-such-model'") && err.contains("smollm2-135m"),
        "{err}"
    );
}

#[test]
fn list_shows_the_catalogue() {
    let out = llmgenie(&["list"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains("smollm2-135m")
            && text.contains("gemma3-270m")
            && text.contains("mistral-7b")
    );
}

#[test]
fn bench_json_has_the_documented_keys() {
    let out = quick_bench("16", "4", &["--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    for key in [
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "load_s",
        "peak_rss_bytes",
    ] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {v}");
    }
}

/// `--profile` prints each phase of the decode steps with its share of their time: every phase
/// that runs in a step is there with some time, and the shares (the rest included) add up to
/// the whole. The JSON on stdout stays parseable.
#[test]
fn bench_profile_breaks_decode_steps_into_phases() {
    let out = quick_bench("8", "6", &["--batch", "2", "--json", "--profile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let _: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let err = stderr(&out);
    // Lines are "  NAME   SECONDS s  SHARE%", the name padded with spaces (it has single
    // spaces only).
    let share = |name: &str| -> f64 {
        let line = err
            .lines()
            .find(|l| l.trim_start().split("  ").next() == Some(name))
            .unwrap_or_else(|| panic!("no {name:?} in {err}"));
        line.trim_end()
            .trim_end_matches('%')
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no share in {line:?}"))
    };
    let phases = [
        "norms and residuals",
        "Q/K/V projections",
        "rope and KV stores",
        "attention",
        "attention output projection",
        "gate/up projections and activation",
        "down projection",
        "vocabulary projection",
    ];
    let mut total = share("the rest");
    for name in phases {
        let s = share(name);
        assert!(s > 0.0, "{name}: {s}% in {err}");
        total += s;
    }
    assert!(
        (total - 100.0).abs() < 1.0,
        "shares add up to {total} in {err}"
    );
}

#[test]
fn bench_batch_reports_each_batch_size() {
    let out = quick_bench("8", "3", &["--batch", "1,3", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let points = v["points"].as_array().unwrap();
    let sizes: Vec<u64> = points
        .iter()
        .map(|p| p["sequences"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [1, 3]);
    assert_eq!(points[0]["speedup"].as_f64(), Some(1.0));
    for p in points {
        for key in ["tokens_per_s", "step_ms", "speedup"] {
            assert!(p[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {p}");
        }
    }
    // A batch of no sequences is refused with a message, not a crash.
    let out = llmgenie(&["bench", "--model", "smollm2", "--batch", "0"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("at least 1"), "{}", stderr(&out));
}

#[test]
fn config_file_feeds_flags_and_rejects_unknown_keys_and_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty-models");
    std::fs::create_dir(&empty).unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!("models_dir = {:?}\n", empty.to_str().unwrap()),
    )
    .unwrap();
    // The file's models_dir has nothing downloaded.
    let out = llmgenie(&["list", "--config", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains("downloaded"), "{}", stdout(&out));
    // A flag beats the file.
    let models = root().join("models");
    let out = llmgenie(&[
        "list",
        "--config",
        good.to_str().unwrap(),
        "--models-dir",
        models.to_str().unwrap(),
    ]);
    assert!(stdout(&out).contains("downloaded"), "{}", stdout(&out));
    for (name, text, needle) in [
        ("typo.toml", "prot = 1\n", "unknown key 'prot'"),
        ("secret.toml", "api_key = \"x\"\n", "LLMGENIE_API_KEY"),
        ("broken.toml", "port = \n", "not valid TOML"),
        (
            "class.toml",
            "[router.routes.poetry]\nroute = \"local\"\n",
            "unknown task class 'poetry'",
        ),
        (
            "field.toml",
            "[router]\nconfidence = 0.3\n",
            "unknown field",
        ),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        let out = llmgenie(&["serve", "--config", p.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        assert!(stderr(&out).contains(needle), "{name}: {}", stderr(&out));
    }
}

/// `llmgenie serve` on a free port with extra flags, its stderr discarded.
fn spawn_serve(extra: &[&str]) -> (std::process::Child, u16) {
    http::spawn_serve(extra, &[], std::process::Stdio::null())
}

fn sigterm(child: &std::process::Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn serve_finishes_in_flight_streams_on_sigterm_then_exits() {
    use std::io::Read;
    // A generous grace period: the point is that the stream is finished, however loaded the
    // machine is.
    let (mut child, port) = spawn_serve(&["--model", "smollm2-135m", "--shutdown-grace", "300"]);
    let mut s = start_stream(
        ([127, 0, 0, 1], port).into(),
        "/v1/chat/completions",
        serde_json::json!({"model": "smollm2-135m", "max_tokens": 60, "temperature": 0, "stream": true,
            "messages": [{"role": "user", "content": "Write a long story about a dragon who learns to paint."}]}),
    );
    sigterm(&child);
    // The stream already accepted runs to its end.
    let mut rest = String::new();
    s.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("data: [DONE]"), "stream cut short: {rest}");
    assert!(
        rest.contains(r#""finish_reason":"length""#),
        "the answer ended early: {rest}"
    );
    let code = child.wait().unwrap();
    assert!(code.success(), "exit status {code:?}");
}

#[test]
fn serve_stops_after_the_grace_period_even_with_a_stream_running() {
    let (mut child, port) = spawn_serve(&["--shutdown-grace", "1"]);
    let _s = start_stream(
        ([127, 0, 0, 1], port).into(),
        "/v1/chat/completions",
        serde_json::json!({"model": "smollm2-135m", "max_tokens": 5000, "stream": true,
            "messages": [{"role": "user", "content": "Write a long story."}]}),
    );
    let signalled = std::time::Instant::now();
    sigterm(&child);
    let code = child.wait().unwrap();
    let waited = signalled.elapsed();
    assert!(code.success(), "exit status {code:?}");
    assert!(
        waited < std::time::Duration::from_secs(40),
        "took {waited:?} to stop"
    );
}

#[test]
fn the_shipped_classifier_is_accurate_on_held_out_prompts_and_retrains_identically() {
    let last_json = |o: &Output| -> serde_json::Value {
        serde_json::from_str(stdout(o).trim().lines().last().unwrap()).unwrap()
    };
    let out = llmgenie(&["eval", "classifier"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shipped = last_json(&out);
    assert_eq!(shipped["n"], 400);
    assert!(shipped["accuracy"].as_f64().unwrap() >= 0.88, "{shipped}");
    // Training is deterministic: the same data gives the same held-out accuracy.
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("w.bin");
    let out = llmgenie(&["train", "classifier", "--out", w.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let again = last_json(&llmgenie(&[
        "eval",
        "classifier",
        "--weights",
        w.to_str().unwrap(),
    ]));
    assert_eq!(again["accuracy"], shipped["accuracy"]);
    assert_eq!(
        std::fs::read(&w).unwrap(),
        std::fs::read(root().join("models/classifier/weights.bin")).unwrap(),
        "the shipped weights are what the shipped data trains"
    );
    // Temperature scaling keeps the confidences honest on prompts never seen.
    assert!(
        shipped["calibration_error"].as_f64().unwrap() < 0.08,
        "{shipped}"
    );
    let out = llmgenie(&["classify", "Translate 'thank you' into Japanese"]);
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["task"], "translate");
    assert!(v["confidence"].as_f64().unwrap() > 0.5);
    let out = llmgenie(&["eval", "classifier", "--data", "Cargo.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("Cargo.toml:1"), "{}", stderr(&out));
}

#[test]
fn the_validator_is_measured_on_the_local_models_labelled_answers() {
    let out = llmgenie(&["eval", "validator"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let last: serde_json::Value =
        serde_json::from_str(text.trim().lines().last().unwrap()).unwrap();
    assert_eq!(last["n"], 240);
    assert!(last["precision"].as_f64().unwrap() >= 0.7, "{last}");
    assert!(last["recall"].as_f64().unwrap() >= 0.55, "{last}");
    for reason in [
        "invalid_json",
        "truncated",
        "wrong_arithmetic",
        "ungrounded",
    ] {
        assert!(text.contains(reason), "{reason} never fired:\n{text}");
    }
    let out = llmgenie(&["eval", "validator", "--data", "Cargo.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("Cargo.toml:1"), "{}", stderr(&out));
}
