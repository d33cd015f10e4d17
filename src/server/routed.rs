//! Routing requests: `auto` is classified and planned, local answers are validated before the
//! client sees them and escalated to Claude when they fail; `claude-*` goes to Claude directly;
//! any other model name is served locally as it is.
//!
//! Whatever happens, the request is answered: without an API key, with the circuit breaker
//! open or when Claude fails after its retries, the local answer is returned and marked (not
//! escalated, or degraded). One deadline covers local generation, validation and every Claude
//! attempt.

use std::time::Instant;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{json, Value};

use super::claude_answer::{claude_request, claude_stream, claude_whole};
use super::error::{ApiError, ErrorKind};
use super::run::{self, Completion, Job, PromptInput, ValidGenerate};
use super::AppState;
use crate::claude::{ClaudeClient, ClaudeConfig, ClaudeError};
use crate::engine::FinishReason;
use crate::observe::names;
use crate::router::classifier::{Classifier, ClassifierError};
use crate::router::ledger::Route;
use crate::router::policy::{PolicyError, RouterConfig, Target};
use crate::router::validator::{self, Expectations, Thresholds};

/// Errors of setting routing up.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Classifier(#[from] ClassifierError),
    #[error(transparent)]
    Claude(#[from] ClaudeError),
}

/// The router's parts, shared by every request.
pub struct Routing {
    pub config: RouterConfig,
    pub classifier: Classifier,
    pub claude: ClaudeClient,
    thresholds: Thresholds,
}

impl Routing {
    /// # Errors
    /// The config is invalid, the classifier weights cannot be read, or the HTTP client
    /// cannot be built.
    pub fn new(config: RouterConfig, claude: ClaudeConfig) -> Result<Self, RoutingError> {
        config.check()?;
        let classifier = match &config.classifier_weights {
            Some(p) => Classifier::load(p)?,
            None => Classifier::builtin()?,
        };
        Ok(Self {
            thresholds: config.validator.thresholds(),
            classifier,
            claude: ClaudeClient::new(claude)?,
            config,
        })
    }

    /// The Claude client settings of a config, with `ANTHROPIC_API_KEY` from the environment.
    pub fn claude_config(config: &RouterConfig) -> ClaudeConfig {
        ClaudeConfig {
            base_url: config.claude_base_url.clone(),
            max_retries: config.claude_retries,
            timeout: config.deadline(),
            ..ClaudeConfig::default()
        }
    }
}

/// What routing did with one request; it goes into headers, the response body and the ledger.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Where the answer the client gets came from.
    pub route: Route,
    pub task: Option<&'static str>,
    pub confidence: Option<f32>,
    /// The local answer was validated before it was returned.
    pub validated: bool,
    /// Why the request was (to be) sent to Claude: validator reasons, `class_route`,
    /// `low_classifier_confidence` or `requested`.
    pub reasons: Vec<String>,
    /// Why an escalation did not happen: `no_api_key`, `circuit_open`, `deadline`.
    pub not_escalated: Option<&'static str>,
    /// Claude failed, so the local answer was returned.
    pub degraded: bool,
    /// Claude's error, when it failed (never contains the key).
    pub claude_error: Option<String>,
}

impl Decision {
    /// A request that named a local model.
    pub fn local() -> Self {
        Self {
            route: Route::Local,
            task: None,
            confidence: None,
            validated: false,
            reasons: Vec::new(),
            not_escalated: None,
            degraded: false,
            claude_error: None,
        }
    }

    pub fn route_str(&self) -> &'static str {
        match self.route {
            Route::Local => "local",
            Route::Claude => "claude",
        }
    }

    /// The `llmgenie` object of a response body; `usd` is what the request saved (local) or
    /// spent (Claude).
    pub fn body(&self, usd: f64) -> Value {
        let (saved, spent) = match self.route {
            Route::Local => (usd, 0.0),
            Route::Claude => (0.0, usd),
        };
        json!({
            "route": self.route_str(),
            // Only routed (`auto`) requests are classified.
            "routed": self.task.is_some(),
            "task": self.task,
            "confidence": self.confidence,
            "validated": self.validated,
            "escalated": self.route == Route::Claude,
            "escalation_reason": (!self.reasons.is_empty()).then(|| self.reasons.join(",")),
            "not_escalated": self.not_escalated,
            "degraded": self.degraded,
            "claude_error": self.claude_error,
            "saved_usd": saved,
            "spent_usd": spent,
        })
    }

    /// `x-llmgenie-route`, `x-llmgenie-task`, `x-llmgenie-escalation-reason`, and
    /// `x-llmgenie-degraded` / `x-llmgenie-not-escalated` when they apply.
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        let mut put = |name: &'static str, value: &str| {
            if let Ok(v) = HeaderValue::from_str(value) {
                h.insert(HeaderName::from_static(name), v);
            }
        };
        put("x-llmgenie-route", self.route_str());
        if let Some(task) = self.task {
            put("x-llmgenie-task", task);
        }
        if !self.reasons.is_empty() {
            put("x-llmgenie-escalation-reason", &self.reasons.join(","));
        }
        if let Some(why) = self.not_escalated {
            put("x-llmgenie-not-escalated", why);
        }
        if self.degraded {
            put("x-llmgenie-degraded", "true");
        }
        h
    }
}

/// The text the classifier and the validator look at: the last user message, or the raw prompt.
pub fn user_text(prompt: &PromptInput) -> String {
    match prompt {
        PromptInput::Raw(t) => t.clone(),
        PromptInput::Chat(messages) => messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.clone())
            .unwrap_or_default(),
    }
}

/// What a request's model name asks for.
enum Wanted {
    /// `auto`: classify and route.
    Auto,
    /// A Claude model (`claude` means the configured one).
    Claude(String),
    /// A local model (empty: the registry's default).
    Local(String),
}

/// Read a model name (Ollama's `:latest` ignored; none means `default_model`).
fn wanted(config: &RouterConfig, model: &str) -> Wanted {
    let m = model.trim();
    let m = m.strip_suffix(":latest").unwrap_or(m);
    let m = if m.is_empty() {
        config.default_model.as_str()
    } else {
        m
    };
    match m {
        "auto" => Wanted::Auto,
        "claude" => Wanted::Claude(config.claude_model.clone()),
        c if c.starts_with("claude-") => Wanted::Claude(c.to_string()),
        local => Wanted::Local(local.to_string()),
    }
}

/// Whether a request's model name asks for the router (`auto`).
pub fn is_auto(state: &AppState, model: &str) -> bool {
    matches!(wanted(&state.routing.config, model), Wanted::Auto)
}

/// The local model a request's model name stands for: the router's local model for `auto`
/// and Claude's names, the name itself otherwise.
pub fn local_name(state: &AppState, model: &str) -> String {
    let config = &state.routing.config;
    match wanted(config, model) {
        Wanted::Local(m) => m,
        Wanted::Auto | Wanted::Claude(_) => config.local_model.clone().unwrap_or_default(),
    }
}

/// Answer a request as its model name says: `auto`, `claude-*`, or a local model.
///
/// # Errors
/// As [`run::start`]; a `claude-*` model without an API key (503).
pub async fn answer(
    state: &AppState,
    mut req: ValidGenerate,
    stream: bool,
) -> Result<Job, ApiError> {
    let routing = state.routing.clone();
    match wanted(&routing.config, &req.model) {
        Wanted::Auto => auto(state, req, stream).await,
        Wanted::Claude(model) => {
            if !routing.claude.enabled() {
                return Err(ApiError::new(
                    ErrorKind::Unavailable,
                    format!("model '{model}' needs Claude, and no Anthropic API key is configured (set ANTHROPIC_API_KEY)"),
                ));
            }
            let decision = Decision {
                reasons: vec!["requested".into()],
                ..Decision::local()
            };
            let deadline = Instant::now() + routing.config.deadline();
            to_claude(state, req, &model, decision, deadline, stream, None).await
        }
        Wanted::Local(model) => {
            req.model = model;
            run::start(state, req).await
        }
    }
}

/// Classify, plan, and carry the plan out.
async fn auto(state: &AppState, mut req: ValidGenerate, stream: bool) -> Result<Job, ApiError> {
    let routing = state.routing.clone();
    let started = Instant::now();
    let deadline = started + routing.config.deadline();
    let text = user_text(&req.prompt);
    let plan = routing.config.plan(&routing.classifier.classify(&text));
    let mut decision = Decision {
        task: Some(plan.task),
        confidence: Some(plan.confidence),
        ..Decision::local()
    };
    let claude_model = routing.config.claude_model.clone();
    let local_model = match &plan.target {
        Target::Claude => {
            let why = if plan.cautious {
                "low_classifier_confidence"
            } else {
                "class_route"
            };
            decision.reasons.push(why.into());
            return to_claude(state, req, &claude_model, decision, deadline, stream, None).await;
        }
        Target::Local(m) => m.clone().or_else(|| routing.config.local_model.clone()),
    };
    req.model = local_model.unwrap_or_default();
    let json_requested = req.json;
    let mut job = match run::start(state, req.clone()).await {
        Ok(job) => job,
        // What the local model cannot take (too long for its context, too busy, not loadable)
        // Claude may: send it there when it can be reached.
        Err(e)
            if local_cannot(&e) && routing.claude.enabled() && !routing.claude.circuit_open() =>
        {
            let why = match e.kind {
                ErrorKind::Unprocessable => "local_context",
                ErrorKind::Busy => "local_busy",
                _ => "local_unavailable",
            };
            decision.reasons.push(why.into());
            return to_claude(state, req, &claude_model, decision, deadline, stream, None).await;
        }
        Err(e) => return Err(e),
    };
    if stream && routing.config.stream_local_immediately {
        job.decision = decision;
        return Ok(job);
    }
    let (done, timed_out) = run::collect_until(&mut job, Some(deadline)).await?;
    let expect = Expectations::for_task(&text, plan.task, json_requested);
    let verdict = validator::validate(
        &done.text,
        &done.tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        done.finished.reason == FinishReason::Length,
        &expect,
        &routing.thresholds,
    );
    decision.validated = true;
    let verdict_name = if verdict.accept() {
        "accept"
    } else {
        "escalate"
    };
    metrics::counter!(names::VALIDATOR_VERDICTS, "task" => plan.task, "verdict" => verdict_name)
        .increment(1);
    if verdict.accept() {
        return Ok(job.replay(&done, decision));
    }
    decision.reasons = verdict
        .reasons
        .iter()
        .map(|r| r.as_str().to_string())
        .collect();
    if timed_out {
        decision.not_escalated = Some("deadline");
        return Ok(job.replay(&done, decision));
    }
    to_claude(
        state,
        req,
        &claude_model,
        decision,
        deadline,
        stream,
        Some((job, done)),
    )
    .await
}

/// A local failure that is about the local model's limits, not about the request.
fn local_cannot(e: &ApiError) -> bool {
    matches!(
        e.kind,
        ErrorKind::Unprocessable | ErrorKind::Busy | ErrorKind::Unavailable
    )
}

/// Send the request to Claude; when that is not possible or fails, answer locally (with the
/// local answer already made, if any) and say why.
async fn to_claude(
    state: &AppState,
    req: ValidGenerate,
    claude_model: &str,
    mut decision: Decision,
    deadline: Instant,
    stream: bool,
    local: Option<(Job, Completion)>,
) -> Result<Job, ApiError> {
    let routing = state.routing.clone();
    let client = &routing.claude;
    let skip = if !client.enabled() {
        Some("no_api_key")
    } else if client.circuit_open() {
        Some("circuit_open")
    } else {
        None
    };
    if let Some(why) = skip {
        decision.not_escalated = Some(why);
        return local_answer(state, req, decision, local).await;
    }
    // The validator expects JSON from the extract class: ask Claude for it too.
    let mut asked = req.clone();
    asked.json |= decision.task == Some("extract");
    let body = claude_request(&asked, claude_model, routing.config.claude_max_tokens);
    let started = Instant::now();
    let result = if stream {
        claude_stream(client, &body, deadline, started).await
    } else {
        claude_whole(client, &body, deadline, started).await
    };
    match result {
        Ok(events) => {
            decision.route = Route::Claude;
            Ok(Job::from_events(
                state,
                claude_model.to_string(),
                events,
                decision,
                started,
            ))
        }
        Err(e) => {
            tracing::warn!(error = %e, "Claude failed; answering locally (degraded)");
            decision.degraded = true;
            decision.claude_error = Some(e.to_string());
            local_answer(state, req, decision, local).await
        }
    }
}

/// The local answer: the one already generated, or a new one (not validated: there is nothing
/// left to escalate to).
async fn local_answer(
    state: &AppState,
    mut req: ValidGenerate,
    decision: Decision,
    local: Option<(Job, Completion)>,
) -> Result<Job, ApiError> {
    if let Some((job, done)) = local {
        return Ok(job.replay(&done, decision));
    }
    req.model = local_name(state, &req.model);
    let mut job = run::start(state, req).await?;
    job.decision = decision;
    Ok(job)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn decisions_render_headers_and_a_body_object() {
        let d = Decision {
            task: Some("extract"),
            confidence: Some(0.9),
            validated: true,
            reasons: vec!["invalid_json".into(), "truncated".into()],
            route: Route::Claude,
            ..Decision::local()
        };
        let h = d.headers();
        assert_eq!(h["x-llmgenie-route"], "claude");
        assert_eq!(h["x-llmgenie-task"], "extract");
        assert_eq!(h["x-llmgenie-escalation-reason"], "invalid_json,truncated");
        let b = d.body(0.25);
        assert_eq!(b["escalated"], true);
        assert_eq!(b["spent_usd"], 0.25);
        assert_eq!(b["saved_usd"], 0.0);
        assert!(Decision::local().headers().get("x-llmgenie-task").is_none());
    }
}
