//! What every endpoint shares: a validated generation request, its start (model lookup, prompt
//! rendering and tokenization off the async runtime, context and admission checks) and its
//! collection into one answer.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedReceiver;

use super::error::{ApiError, ErrorKind};
use super::routed::Decision;
use super::AppState;
use crate::chat::Message;
use crate::engine::{Engine, Event, FinishReason, Finished, GenerateRequest, TokenEvent};
use crate::observe::names;
use crate::registry::{KeepAlive, Lease};
use crate::router::ledger::{Ledger, Outcome, Route};
use crate::sampler::SamplingParams;

/// Most stop strings a request may give.
pub const MAX_STOP: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_LEN: usize = 256;

/// The prompt, before the model's template is known.
#[derive(Debug, Clone)]
pub enum PromptInput {
    /// Rendered with the model's chat template, ready for the assistant's turn.
    Chat(Vec<Message>),
    /// Tokenized as it is (special tokens parsed, BOS added where the model wants it).
    Raw(String),
}

/// A request every field of which has been checked.
#[derive(Debug, Clone)]
pub struct ValidGenerate {
    pub model: String,
    pub prompt: PromptInput,
    pub params: SamplingParams,
    /// `None`: until the answer ends or the context is full.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    /// How long the model stays resident after this request (`None`: the model's default).
    pub keep_alive: Option<KeepAlive>,
    /// Constrain the answer to one JSON object.
    pub json: bool,
}

/// Parse a `keep_alive` field: a duration string or a number of seconds.
///
/// # Errors
/// Any other value.
pub fn parse_keep_alive(v: Option<&serde_json::Value>) -> Result<Option<KeepAlive>, ApiError> {
    let bad = |m: String| ApiError::invalid("keep_alive", m);
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => n
            .as_f64()
            .and_then(KeepAlive::from_seconds)
            .map(Some)
            .ok_or_else(|| bad(format!("invalid keep_alive {n}"))),
        Some(serde_json::Value::String(s)) => KeepAlive::parse(s).map(Some).map_err(bad),
        Some(other) => Err(bad(format!(
            "keep_alive must be a duration like \"5m\" or a number of seconds, got {other}"
        ))),
    }
}

/// Check stop strings against the limits.
///
/// # Errors
/// Too many, or one too long.
pub fn check_stop(param: &str, stop: Vec<String>) -> Result<Vec<String>, ApiError> {
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid(
            param,
            format!(
                "{param} may hold at most {MAX_STOP} strings, got {}",
                stop.len()
            ),
        ));
    }
    if let Some(s) = stop.iter().find(|s| s.len() > MAX_STOP_LEN) {
        return Err(ApiError::invalid(
            param,
            format!(
                "each {param} string must be at most {MAX_STOP_LEN} bytes, got {}",
                s.len()
            ),
        ));
    }
    Ok(stop)
}

/// A generation in flight: local tokens, a replayed local answer, or Claude's text, all as
/// engine events.
pub struct Job {
    /// The model named in responses.
    pub model: String,
    ledger: Arc<Ledger>,
    /// The local engine (`None` for Claude's answers, which have no token ids).
    pub engine: Option<Arc<Engine>>,
    /// Holds the model in use until the job ends; then its keep-alive starts.
    _lease: Option<Lease>,
    pub events: UnboundedReceiver<Event>,
    pub prompt_tokens: usize,
    /// Time spent waiting for the model to load (zero when it was resident).
    pub load_time: Duration,
    pub started: Instant,
    /// What routing did with the request.
    pub decision: Decision,
    /// What this request saved or spent, once accounted.
    usd: Option<f64>,
    /// For the request's log line (empty: not logged here).
    pub request_id: String,
    /// The prompt text, when prompts are logged.
    pub log_prompt: Option<String>,
    /// How the request ended if no answer was completed: `cancelled` (the client left) or
    /// `error`.
    pub unfinished: &'static str,
}

impl Drop for Job {
    /// A job dropped before its answer was complete: the client left, or it failed.
    fn drop(&mut self) {
        if self.usd.is_none() && !self.request_id.is_empty() {
            tracing::info!(
                target: "llmgenie::request",
                request_id = %self.request_id,
                model = %self.model,
                route = self.decision.route_str(),
                task = self.decision.task.unwrap_or("unclassified"),
                total_ms = self.started.elapsed().as_secs_f64() * 1e3,
                status = self.unfinished,
                prompt = self.log_prompt.as_deref(),
                "request"
            );
        }
    }
}

/// Find (or load) the model, render and tokenize the prompt, check it against the context and
/// the admission limit, and queue it.
///
/// # Errors
/// Unknown model (404), prompt too long for the context (422), too many requests (429), bad
/// sampling (400).
pub async fn start(state: &AppState, req: ValidGenerate) -> Result<Job, ApiError> {
    let started = Instant::now();
    let lease = state.registry.acquire(&req.model, req.keep_alive).await?;
    let model = lease.name.clone();
    let engine = lease.engine.clone();
    let load_time = started.elapsed();
    let prompt_engine = engine.clone();
    let prompt = req.prompt;
    let ids = tokio::task::spawn_blocking(move || -> Result<Vec<u32>, ApiError> {
        let text = match &prompt {
            PromptInput::Chat(messages) => prompt_engine
                .template()
                .render(messages, true)
                .map_err(|e| ApiError::new(ErrorKind::Unprocessable, e.to_string()))?,
            PromptInput::Raw(text) => text.clone(),
        };
        prompt_engine
            .tokenizer()
            .encode_prompt(&text)
            .map_err(|e| ApiError::new(ErrorKind::Unprocessable, e.to_string()))
    })
    .await
    .map_err(|_| ApiError::new(ErrorKind::Internal, "tokenization failed"))??;
    if engine.stats().pending.load(Ordering::Relaxed) >= state.limits.max_pending_per_model {
        return Err(ApiError::new(
            ErrorKind::Busy,
            format!(
                "model '{model}' has {} requests running or queued; retry shortly",
                state.limits.max_pending_per_model
            ),
        ));
    }
    // max_tokens beyond what the context leaves is clamped to it (documented in README); a
    // prompt that leaves no room is refused by `Engine::submit` (422).
    let room = engine.info().spec.context_length.saturating_sub(ids.len());
    let max_tokens = Some(req.max_tokens.map_or(room, |m| m.min(room)));
    let prompt_tokens = ids.len();
    let events = engine.submit(GenerateRequest {
        prompt: ids,
        params: req.params,
        max_tokens,
        stop: req.stop,
        json: req.json,
    })?;
    Ok(Job {
        model,
        ledger: state.ledger.clone(),
        engine: Some(engine),
        _lease: Some(lease),
        events,
        prompt_tokens,
        load_time,
        started,
        decision: Decision::local(),
        usd: None,
        request_id: String::new(),
        log_prompt: None,
        unfinished: "cancelled",
    })
}

impl Job {
    /// A job whose events come from elsewhere (a replay, or Claude).
    pub fn from_events(
        state: &AppState,
        model: String,
        events: UnboundedReceiver<Event>,
        decision: Decision,
        started: Instant,
    ) -> Self {
        Self {
            model,
            ledger: state.ledger.clone(),
            engine: None,
            _lease: None,
            events,
            prompt_tokens: 0,
            load_time: Duration::ZERO,
            started,
            decision,
            usd: None,
            request_id: String::new(),
            log_prompt: None,
            unfinished: "cancelled",
        }
    }

    /// Log this request's line when its answer completes (or is abandoned).
    pub fn log_as(&mut self, id: &str, prompt: Option<String>) {
        self.request_id = id.to_string();
        self.log_prompt = prompt;
    }

    /// Replace the events with a replay of a finished answer, keeping the engine (for token
    /// texts) but releasing the model.
    pub fn replay(mut self, done: &Completion, decision: Decision) -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for t in &done.tokens {
            let _ = tx.send(Event::Token(t.clone()));
        }
        let _ = tx.send(Event::Done(done.finished.clone()));
        self.events = rx;
        self._lease = None;
        self.decision = decision;
        self
    }

    /// Enter a finished answer in the ledger (once): served locally, it saved what Claude would
    /// have charged for its tokens; answered by Claude, it spent what Claude charged. Returns
    /// the routing object of the response body.
    pub fn account(&mut self, f: &Finished) -> serde_json::Value {
        let d = &self.decision;
        let usd = *self.usd.get_or_insert_with(|| {
            let route = match d.route {
                Route::Local => "local",
                Route::Claude => "claude",
            };
            let task = d.task.unwrap_or("unclassified");
            metrics::counter!(names::ROUTED_REQUESTS, "task" => task, "route" => route)
                .increment(1);
            for reason in &d.reasons {
                metrics::counter!(names::ESCALATIONS, "reason" => reason.clone()).increment(1);
            }
            self.ledger.note(&Outcome {
                validated: d.validated,
                reasons: &d.reasons,
                not_escalated: d.not_escalated,
                degraded: d.degraded,
            });
            self.ledger.record(
                d.route,
                d.task.unwrap_or("unclassified"),
                f.prompt_tokens as u64,
                f.generated_tokens as u64,
            )
        });
        if !self.request_id.is_empty() {
            let ttft = self.load_time + f.queue_time + f.prompt_time;
            let reasons = d.reasons.join(",");
            tracing::info!(
                target: "llmgenie::request",
                request_id = %self.request_id,
                model = %self.model,
                route = d.route_str(),
                task = d.task.unwrap_or("unclassified"),
                escalation_reason = %reasons,
                degraded = d.degraded,
                prompt_tokens = f.prompt_tokens,
                generated_tokens = f.generated_tokens,
                ttft_ms = ttft.as_secs_f64() * 1e3,
                total_ms = self.started.elapsed().as_secs_f64() * 1e3,
                finish_reason = f.reason.as_str(),
                status = 200,
                prompt = self.log_prompt.as_deref(),
                "request"
            );
        }
        d.body(usd)
    }
}

/// A whole answer.
#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    pub tokens: Vec<TokenEvent>,
    pub finished: Finished,
}

/// Wait for the whole answer.
///
/// # Errors
/// The generation failed or the model thread stopped.
pub async fn collect(job: &mut Job) -> Result<Completion, ApiError> {
    collect_until(job, None).await.map(|(done, _)| done)
}

/// Wait for the whole answer, or until `deadline`: then the generation is stopped and the part
/// generated so far is returned, ended by the token limit, with `true`.
///
/// # Errors
/// The generation failed or the model thread stopped.
pub async fn collect_until(
    job: &mut Job,
    deadline: Option<Instant>,
) -> Result<(Completion, bool), ApiError> {
    let mut text = String::new();
    let mut tokens: Vec<TokenEvent> = Vec::new();
    loop {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), job.events.recv()).await {
                Ok(next) => next,
                Err(_) => {
                    // Closing the receiver stops the generation before its next token.
                    job.events.close();
                    let finished = Finished {
                        reason: FinishReason::Length,
                        prompt_tokens: job.prompt_tokens,
                        cached_tokens: 0,
                        generated_tokens: tokens.len(),
                        queue_time: Duration::ZERO,
                        prompt_time: Duration::ZERO,
                        generation_time: job.started.elapsed(),
                    };
                    let done = Completion {
                        text,
                        tokens,
                        finished,
                    };
                    return Ok((done, true));
                }
            },
            None => job.events.recv().await,
        };
        match next {
            Some(Event::Token(t)) => {
                text.push_str(&t.text);
                tokens.push(t);
            }
            Some(Event::Done(finished)) => {
                let done = Completion {
                    text,
                    tokens,
                    finished,
                };
                return Ok((done, false));
            }
            Some(Event::Error(e)) => {
                job.unfinished = "error";
                tracing::error!(error = %e, "generation failed");
                return Err(ApiError::new(ErrorKind::Internal, "generation failed"));
            }
            None => {
                job.unfinished = "error";
                return Err(ApiError::new(
                    ErrorKind::Unavailable,
                    "the model stopped before the answer was complete",
                ));
            }
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
