//! The official `openai` and `ollama` Python clients, unchanged but for the base URL, against the
//! real `llmgenie serve` binary. `.ci/run` installs them into `.venv`
//! (`python3 -m venv .venv && .venv/bin/pip install openai ollama`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{model_path, root, SMOLLM2};

fn python() -> String {
    if let Ok(p) = std::env::var("LLMGENIE_PYTHON") {
        return p;
    }
    let venv = root().join(".venv/bin/python");
    if venv.is_file() {
        return venv.display().to_string();
    }
    "python3".into()
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}

#[test]
fn official_openai_and_ollama_clients_work_unchanged() {
    let py = python();
    let probe = Command::new(&py)
        .args(["-c", "import openai, ollama"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {py}: {e}"));
    assert!(
        probe.status.success(),
        "the openai and ollama Python packages are missing for {py}: run \
         `python3 -m venv .venv && .venv/bin/pip install openai ollama` (as .ci/run does)"
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let model = model_path(SMOLLM2);
    let _server = Server(
        Command::new(env!("CARGO_BIN_EXE_llmgenie"))
            .args([
                "serve",
                "--port",
                &port.to_string(),
                "--model",
                model.to_str().unwrap(),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !healthy(port) {
        assert!(Instant::now() < deadline, "server did not become healthy");
        std::thread::sleep(Duration::from_millis(100));
    }
    let name = model.file_stem().unwrap().to_str().unwrap().to_string();
    let out = Command::new(&py)
        .arg(root().join("tests/python/clients.py"))
        .args([format!("http://127.0.0.1:{port}"), name])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("10 passed, 0 failed"), "{text}");
}
