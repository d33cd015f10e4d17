//! A real server on 127.0.0.1:0 on its own runtime thread, and a minimal HTTP/1.1 client.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use candle_core::Device;
use llmgenie::catalog::Catalog;
use llmgenie::claude::ClaudeConfig;
use llmgenie::engine::EngineStats;
use llmgenie::registry::{Budget, KeepAlive, Registry};
use llmgenie::router::policy::RouterConfig;
use llmgenie::server::routed::Routing;
use llmgenie::server::{self, AppState, Limits};
use serde_json::Value;

use super::{model_path, root, GEMMA3, SMOLLM2};

/// The router with no Claude key: `auto` answers stay local.
pub fn offline_routing() -> Routing {
    let cfg = RouterConfig::default();
    let claude = ClaudeConfig {
        api_key: None,
        ..Routing::claude_config(&cfg)
    };
    Routing::new(cfg, claude).unwrap()
}

/// A server running on its own runtime thread; stopped when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    pub state: AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start(limits: Limits) -> Self {
        Self::with_policy(
            limits,
            KeepAlive::For(Duration::from_secs(300)),
            Budget::default(),
        )
    }

    /// Both test models are servable; the reaper runs every 50 ms.
    pub fn with_policy(limits: Limits, keep_alive: KeepAlive, budget: Budget) -> Self {
        Self::configured(limits, keep_alive, budget, |s| s)
    }

    pub fn configured(
        limits: Limits,
        keep_alive: KeepAlive,
        budget: Budget,
        configure: impl FnOnce(AppState) -> AppState,
    ) -> Self {
        let catalog = Catalog::load(&root().join("models")).unwrap();
        let registry =
            Registry::with_policy(catalog, Device::Cpu, "smollm2-135m", keep_alive, budget);
        registry.add_file("smollm2-135m", &model_path(SMOLLM2));
        registry.add_file("gemma3-270m", &model_path(GEMMA3));
        let state = configure(AppState::new(registry, limits, offline_routing()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let server_state = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                server_state
                    .registry
                    .spawn_reaper(Duration::from_millis(50));
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let shutdown = async move {
                    let _ = stopped.await;
                };
                server::serve_on(listener, server_state, shutdown)
                    .await
                    .unwrap();
            });
        });
        let addr = addr_rx.recv().unwrap();
        Self {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn resident(&self) -> Vec<String> {
        self.state
            .registry
            .resident()
            .into_iter()
            .map(|r| r.name)
            .collect()
    }

    /// Wait until the resident models are exactly `names`.
    pub fn wait_resident(&self, names: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.resident() != names {
            assert!(
                Instant::now() < deadline,
                "resident {:?}, expected {names:?}",
                self.resident()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn engine_stats<R>(&self, f: impl Fn(&EngineStats) -> R) -> R {
        let resident = self.state.registry.resident();
        f(resident[0].engine.stats())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One HTTP/1.1 request with `Connection: close`; reads the whole response (chunked bodies are
/// de-chunked).
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Reply {
    http_with(addr, method, path, body, "")
}

/// As [`http`], with extra header lines (each ending in `\r\n`).
pub fn http_with(addr: SocketAddr, method: &str, path: &str, body: &[u8], extra: &str) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (headers, rest) = text.split_once("\r\n\r\n").unwrap();
    let status = headers.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Reply {
        status,
        headers: headers.to_string(),
        body,
    }
}

pub fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// Start a streamed request, wait for its first bytes, and hand back the open connection
/// (dropping it is a client that leaves).
pub fn start_stream(addr: SocketAddr, path: &str, body: Value) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let body = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    s.read_exact(&mut first).unwrap();
    s
}

pub fn post(addr: SocketAddr, path: &str, body: Value) -> Reply {
    http(addr, "POST", path, body.to_string().as_bytes())
}

/// A free TCP port on 127.0.0.1 (free when asked; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Wait (up to a minute) until something accepts connections on `port`.
pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The built `llmgenie serve` on a free port with `extra` flags and `env`, its stderr to
/// `stderr`; returns the process and the port once it accepts connections.
pub fn spawn_serve(
    extra: &[&str],
    env: &[(&str, &str)],
    stderr: std::process::Stdio,
) -> (std::process::Child, u16) {
    let port = free_port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_llmgenie"))
        .args(["serve", "--port", &port.to_string()])
        .args(extra)
        .envs(env.iter().copied())
        .current_dir(root())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    wait_for_port(port);
    (child, port)
}
