//! A client for the Anthropic Messages API (`POST {base_url}/v1/messages`), plain and streamed.
//!
//! Retries 408, 409, 429, 500-599 and 529 responses, connection errors and timeouts with
//! exponential backoff and jitter (0.5 s doubling, capped), honouring `retry-after` /
//! `retry-after-ms` up to a cap; never a 429 that says a spend limit was reached. All attempts of
//! a request share one deadline. After `breaker_threshold` requests in a row fail, a circuit
//! breaker refuses calls for `breaker_cooldown`. A streamed request is retried only before its
//! first event; a stream that ends without `message_stop`, or carries an `error` event, is a
//! failure. The API key is sent only in its header; it is never logged or put in an error.

mod sse;

use std::time::Duration;

use futures_util::StreamExt;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use sse::{SseEvent, SseParser};

/// The API version header this client speaks.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Errors of a Claude request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClaudeError {
    #[error("no Anthropic API key is configured (set ANTHROPIC_API_KEY)")]
    NoApiKey,
    #[error("Claude API error {status} ({kind}): {message}")]
    Api {
        status: u16,
        kind: String,
        message: String,
    },
    #[error("cannot reach the Claude API: {0}")]
    Transport(String),
    #[error("the Claude stream ended without message_stop")]
    Incomplete,
    #[error("the Claude stream reported an error ({kind}): {message}")]
    Stream { kind: String, message: String },
    #[error("unexpected response from the Claude API: {0}")]
    Protocol(String),
    #[error("the Claude request ran out of time")]
    Deadline,
    #[error("Claude is not called for now: {0} requests in a row failed")]
    CircuitOpen(u32),
}

impl ClaudeError {
    /// Whether trying again may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Api {
                status, message, ..
            } => {
                let m = message.to_ascii_lowercase();
                let spend_limit =
                    *status == 429 && (m.contains("spend limit") || m.contains("usage limit"));
                !spend_limit
                    && (matches!(status, 408 | 409 | 429 | 529) || (500..600).contains(status))
            }
            Self::Transport(_) => true,
            _ => false,
        }
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClaudeConfig {
    /// Without a key, escalation is disabled.
    pub api_key: Option<String>,
    pub base_url: String,
    /// Whole-request timeout for plain requests; the connect timeout for streams.
    pub timeout: Duration,
    /// Attempts after the first.
    pub max_retries: u32,
    /// First backoff; doubles per attempt up to `backoff_cap`.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Longest `retry-after` honoured.
    pub retry_after_cap: Duration,
    /// Requests failing in a row that open the circuit breaker.
    pub breaker_threshold: u32,
    /// How long an open breaker refuses calls.
    pub breaker_cooldown: Duration,
}

impl Default for ClaudeConfig {
    fn default() -> Self {
        Self {
            api_key: std::env::var("ANTHROPIC_API_KEY")
                .ok()
                .filter(|k| !k.is_empty()),
            base_url: "https://api.anthropic.com".into(),
            timeout: Duration::from_secs(120),
            max_retries: 4,
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(8),
            retry_after_cap: Duration::from_secs(30),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(30),
        }
    }
}

/// Consecutive failures and, when open, until when calls are refused.
#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<std::time::Instant>,
}

/// One message of the conversation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClaudeMessage {
    pub role: String,
    pub content: String,
}

/// The request body of `POST /v1/messages`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MessagesRequest {
    pub model: String,
    pub max_tokens: u32,
    pub messages: Vec<ClaudeMessage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop_sequences: Vec<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
}

/// Token counts Claude reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
}

/// A whole answer.
#[derive(Debug, Clone, PartialEq)]
pub struct MessagesResponse {
    pub id: String,
    pub model: String,
    /// The text blocks, joined.
    pub text: String,
    pub stop_reason: Option<String>,
    pub usage: Usage,
    /// Attempts it took (1 = no retry).
    pub attempts: u32,
}

/// What a stream yields.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Text(String),
    /// The last event: the stop reason and the usage.
    Done {
        stop_reason: Option<String>,
        usage: Usage,
    },
}

pub struct ClaudeClient {
    http: reqwest::Client,
    cfg: ClaudeConfig,
    /// A short lock around two fields, never held across an `.await`.
    breaker: std::sync::Mutex<Breaker>,
}

impl ClaudeClient {
    /// # Errors
    /// The HTTP client cannot be built.
    pub fn new(cfg: ClaudeConfig) -> Result<Self, ClaudeError> {
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.timeout)
            .build()
            .map_err(|e| ClaudeError::Transport(e.to_string()))?;
        Ok(Self {
            http,
            cfg,
            breaker: std::sync::Mutex::new(Breaker::default()),
        })
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the breaker is open now.
    pub fn circuit_open(&self) -> bool {
        self.breaker()
            .open_until
            .is_some_and(|t| t > std::time::Instant::now())
    }

    fn record(&self, ok: bool) {
        let mut b = self.breaker();
        if ok {
            *b = Breaker::default();
            return;
        }
        b.failures += 1;
        if b.failures >= self.cfg.breaker_threshold {
            b.open_until = Some(std::time::Instant::now() + self.cfg.breaker_cooldown);
            tracing::warn!(failures = b.failures, "Claude circuit breaker open");
        }
    }

    /// Whether a key is configured (without one, nothing is sent).
    pub fn enabled(&self) -> bool {
        self.cfg.api_key.is_some()
    }

    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(d) = retry_after {
            return d.min(self.cfg.retry_after_cap);
        }
        let exp = self
            .cfg
            .backoff_base
            .saturating_mul(1u32 << attempt.min(16));
        let capped = exp.min(self.cfg.backoff_cap);
        // Full jitter on the upper half: between 50% and 100% of the backoff.
        let factor = rand::rng().random_range(0.5..=1.0);
        capped.mul_f64(factor)
    }

    /// Send the request, retrying as the module describes, within `deadline`; returns the
    /// response of the attempt that succeeded and how many attempts it took.
    async fn send(
        &self,
        body: &MessagesRequest,
        deadline: std::time::Instant,
    ) -> Result<(reqwest::Response, u32), ClaudeError> {
        let key = self.cfg.api_key.as_deref().ok_or(ClaudeError::NoApiKey)?;
        if self.circuit_open() {
            return Err(ClaudeError::CircuitOpen(self.breaker().failures));
        }
        let result = self.send_with_retries(key, body, deadline).await;
        // A request Claude found malformed says nothing about Claude's health.
        let request_fault = matches!(
            &result,
            Err(ClaudeError::Api {
                status: 400 | 404 | 413,
                ..
            })
        );
        if !request_fault {
            self.record(result.is_ok());
        }
        result
    }

    async fn send_with_retries(
        &self,
        key: &str,
        body: &MessagesRequest,
        deadline: std::time::Instant,
    ) -> Result<(reqwest::Response, u32), ClaudeError> {
        let url = format!("{}/v1/messages", self.cfg.base_url.trim_end_matches('/'));
        let mut attempt = 0;
        loop {
            let mut req = self
                .http
                .post(&url)
                .header("x-api-key", key)
                .header("anthropic-version", ANTHROPIC_VERSION)
                .json(body);
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(ClaudeError::Deadline);
            }
            if !body.stream {
                req = req.timeout(self.cfg.timeout.min(left));
            }
            let (err, retry_after) = match req.send().await {
                Ok(resp) if resp.status().is_success() => {
                    attempted("ok", resp.status().as_str());
                    return Ok((resp, attempt + 1));
                }
                Ok(resp) => {
                    let retry_after = retry_after(resp.headers());
                    (api_error(resp).await, retry_after)
                }
                Err(e) => (ClaudeError::Transport(e.to_string()), None),
            };
            let status = match &err {
                ClaudeError::Api { status, .. } => status.to_string(),
                _ => "transport".to_string(),
            };
            if !err.retryable() || attempt >= self.cfg.max_retries {
                attempted("failed", &status);
                return Err(err);
            }
            let wait = self.backoff(attempt, retry_after);
            if std::time::Instant::now() + wait >= deadline {
                attempted("failed", &status);
                return Err(err);
            }
            attempted("retried", &status);
            tracing::warn!(error = %err, attempt = attempt + 1, wait_ms = wait.as_millis() as u64, "Claude request failed; retrying");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// One whole answer.
    ///
    /// # Errors
    /// No key, a non-retryable error, retries exhausted, or a malformed response.
    pub async fn create(&self, request: &MessagesRequest) -> Result<MessagesResponse, ClaudeError> {
        self.create_until(request, std::time::Instant::now() + self.cfg.timeout)
            .await
    }

    /// As [`ClaudeClient::create`], with every attempt and wait inside `deadline`.
    ///
    /// # Errors
    /// As [`ClaudeClient::create`], or [`ClaudeError::Deadline`].
    pub async fn create_until(
        &self,
        request: &MessagesRequest,
        deadline: std::time::Instant,
    ) -> Result<MessagesResponse, ClaudeError> {
        let mut body = request.clone();
        body.stream = false;
        let (resp, attempts) = self.send(&body, deadline).await?;
        let v: Value = resp
            .json()
            .await
            .map_err(|e| ClaudeError::Protocol(e.to_string()))?;
        let text = v["content"]
            .as_array()
            .ok_or_else(|| ClaudeError::Protocol("no content array".into()))?
            .iter()
            .filter(|b| b["type"] == "text")
            .filter_map(|b| b["text"].as_str())
            .collect::<String>();
        Ok(MessagesResponse {
            id: v["id"].as_str().unwrap_or_default().to_string(),
            model: v["model"].as_str().unwrap_or_default().to_string(),
            text,
            stop_reason: v["stop_reason"].as_str().map(str::to_string),
            usage: serde_json::from_value(v["usage"].clone()).unwrap_or_default(),
            attempts,
        })
    }

    /// A streamed answer: text pieces, then `Done`. The stream yields an error (and ends) on an
    /// in-stream `error` event or when the connection ends before `message_stop`.
    ///
    /// # Errors
    /// As [`ClaudeClient::create`], before the stream starts.
    pub async fn stream(
        &self,
        request: &MessagesRequest,
    ) -> Result<impl futures_util::Stream<Item = Result<StreamEvent, ClaudeError>>, ClaudeError>
    {
        self.stream_until(request, std::time::Instant::now() + self.cfg.timeout)
            .await
    }

    /// As [`ClaudeClient::stream`], with every attempt, wait and chunk inside `deadline`: a
    /// stream that stalls past it yields [`ClaudeError::Deadline`] and ends.
    ///
    /// # Errors
    /// As [`ClaudeClient::create_until`], before the stream starts.
    pub async fn stream_until(
        &self,
        request: &MessagesRequest,
        deadline: std::time::Instant,
    ) -> Result<impl futures_util::Stream<Item = Result<StreamEvent, ClaudeError>>, ClaudeError>
    {
        let mut body = request.clone();
        body.stream = true;
        let (resp, _) = self.send(&body, deadline).await?;
        let bytes = resp.bytes_stream();
        let state = StreamState {
            bytes: Box::pin(bytes),
            parser: SseParser::default(),
            pending: std::collections::VecDeque::new(),
            usage: Usage::default(),
            stop_reason: None,
            finished: false,
        };
        Ok(futures_util::stream::unfold(
            state,
            move |mut st| async move {
                loop {
                    if st.finished {
                        return None;
                    }
                    if let Some(ev) = st.pending.pop_front() {
                        match st.handle(ev) {
                            Ok(Some(out)) => return Some((Ok(out), st)),
                            Ok(None) => continue,
                            Err(e) => {
                                st.finished = true;
                                return Some((Err(e), st));
                            }
                        }
                    }
                    let next = tokio::time::timeout_at(deadline.into(), st.bytes.next()).await;
                    let Ok(next) = next else {
                        st.finished = true;
                        return Some((Err(ClaudeError::Deadline), st));
                    };
                    match next {
                        Some(Ok(chunk)) => {
                            let evs = st.parser.push(&chunk);
                            st.pending.extend(evs);
                        }
                        Some(Err(e)) => {
                            st.finished = true;
                            return Some((Err(ClaudeError::Transport(e.to_string())), st));
                        }
                        None => {
                            st.finished = true;
                            return Some((Err(ClaudeError::Incomplete), st));
                        }
                    }
                }
            },
        ))
    }
}

type ByteStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Send>,
>;

struct StreamState {
    bytes: ByteStream,
    parser: SseParser,
    pending: std::collections::VecDeque<SseEvent>,
    usage: Usage,
    stop_reason: Option<String>,
    finished: bool,
}

impl StreamState {
    /// Turn one SSE event into what the caller sees, if anything.
    fn handle(&mut self, ev: SseEvent) -> Result<Option<StreamEvent>, ClaudeError> {
        let v: Value = serde_json::from_str(&ev.data)
            .map_err(|e| ClaudeError::Protocol(format!("bad {} event: {e}", ev.event)))?;
        let kind = v["type"].as_str().unwrap_or(ev.event.as_str()).to_string();
        match kind.as_str() {
            "message_start" => {
                if let Ok(u) = serde_json::from_value::<Usage>(v["message"]["usage"].clone()) {
                    self.usage.input_tokens = u.input_tokens;
                }
                Ok(None)
            }
            "content_block_delta" => Ok(v["delta"]["text"]
                .as_str()
                .filter(|_| v["delta"]["type"] == "text_delta")
                .map(|t| StreamEvent::Text(t.to_string()))),
            "message_delta" => {
                if let Some(r) = v["delta"]["stop_reason"].as_str() {
                    self.stop_reason = Some(r.to_string());
                }
                if let Some(o) = v["usage"]["output_tokens"].as_u64() {
                    self.usage.output_tokens = o;
                }
                Ok(None)
            }
            "message_stop" => {
                self.finished = true;
                Ok(Some(StreamEvent::Done {
                    stop_reason: self.stop_reason.clone(),
                    usage: self.usage,
                }))
            }
            "error" => Err(ClaudeError::Stream {
                kind: v["error"]["type"].as_str().unwrap_or("error").to_string(),
                message: v["error"]["message"].as_str().unwrap_or("").to_string(),
            }),
            // ping, content_block_start, content_block_stop, and future event types.
            _ => Ok(None),
        }
    }
}

/// Count one attempt: `ok`, `retried` or `failed`, with its HTTP status (or `transport`).
fn attempted(outcome: &'static str, status: &str) {
    metrics::counter!(crate::observe::names::CLAUDE_ATTEMPTS, "outcome" => outcome, "status" => status.to_string())
        .increment(1);
}

/// `retry-after-ms` (milliseconds) or `retry-after` (seconds).
fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    if let Some(ms) = get("retry-after-ms") {
        return Duration::try_from_secs_f64(ms / 1000.0).ok();
    }
    get("retry-after").and_then(|s| Duration::try_from_secs_f64(s).ok())
}

/// An error response's `{"type": "error", "error": {"type", "message"}}`.
async fn api_error(resp: reqwest::Response) -> ClaudeError {
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    ClaudeError::Api {
        status,
        kind: v["error"]["type"].as_str().unwrap_or("unknown").to_string(),
        message: v["error"]["message"].as_str().unwrap_or("").to_string(),
    }
}
