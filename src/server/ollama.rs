//! Ollama-compatible endpoints: `/api/generate`, `/api/chat` (NDJSON streams by default),
//! `/api/tags`, `/api/ps`, `/api/show`, `/api/version`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use futures_util::stream::{self, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, OllamaError};
use super::routed;
use super::run::{self, check_stop, Job, PromptInput, ValidGenerate};
use super::telemetry::{LogsItself, RequestId};
use super::{parse_json, rfc3339, rfc3339_at, AppState, Body};
use crate::chat::Message;
use crate::engine::{Event, Finished};
use crate::registry::KeepAlive;
use crate::sampler::SamplingParams;

/// `options` of a request; every field optional, defaults as Ollama's.
#[derive(Debug, Default, Deserialize)]
struct Options {
    temperature: Option<f32>,
    top_k: Option<i64>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<i64>,
    stop: Option<Vec<String>>,
    num_predict: Option<i64>,
    /// Accepted; the context is the model's own (see README).
    #[allow(dead_code)]
    num_ctx: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: String,
}

#[derive(Debug, Deserialize)]
struct GenerateRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    prompt: String,
    system: Option<String>,
    #[serde(default)]
    raw: bool,
    stream: Option<bool>,
    format: Option<Value>,
    #[serde(default)]
    options: Options,
    keep_alive: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    messages: Vec<ChatMessage>,
    stream: Option<bool>,
    format: Option<Value>,
    #[serde(default)]
    options: Options,
    keep_alive: Option<Value>,
}

fn int_range(name: &str, v: Option<i64>, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => Err(ApiError::invalid(
            name,
            format!("options.{name} must be between {lo} and {hi}, got {x}"),
        )),
        other => Ok(other),
    }
}

fn validate(
    model: String,
    prompt: PromptInput,
    o: Options,
    format: Option<Value>,
    keep_alive: Option<KeepAlive>,
) -> Result<ValidGenerate, ApiError> {
    // "json" constrains the answer to a JSON object; a JSON schema is not enforced yet.
    let json = match format {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f.is_empty() => false,
        Some(Value::String(f)) if f == "json" => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "format",
                format!(
                    "format must be \"json\" (JSON schemas are not supported yet), got {other}"
                ),
            ))
        }
    };
    let params =
        SamplingParams {
            temperature: o.temperature.unwrap_or(0.8),
            top_k: int_range("top_k", o.top_k, 0, 1_000_000)?.unwrap_or(40) as usize,
            top_p: o.top_p.unwrap_or(0.9),
            min_p: o.min_p.unwrap_or(0.0),
            repeat_penalty: o.repeat_penalty.unwrap_or(1.1),
            repeat_last_n: int_range("repeat_last_n", o.repeat_last_n, -1, 1 << 20)?
                .map_or(64, |n| if n < 0 { usize::MAX } else { n as usize }),
            presence_penalty: o.presence_penalty.unwrap_or(0.0),
            frequency_penalty: o.frequency_penalty.unwrap_or(0.0),
            seed: o.seed.and_then(|s| u64::try_from(s).ok()),
            top_logprobs: 0,
        };
    params
        .validate()
        .map_err(|m| ApiError::invalid("options", format!("options.{m}")))?;
    // num_predict: -1 (or absent) until the end, -2 until the context is full; both are bounded
    // by the context.
    let max_tokens = match int_range("num_predict", o.num_predict, -2, 1 << 30)? {
        None | Some(-1) | Some(-2) => None,
        Some(n) => Some(n.max(0) as usize),
    };
    Ok(ValidGenerate {
        model,
        prompt,
        params,
        max_tokens,
        stop: check_stop("options.stop", o.stop.unwrap_or_default())?,
        keep_alive,
        json,
    })
}

/// The closing object of a request, with Ollama's durations in nanoseconds.
fn final_fields(job: &Job, f: &Finished) -> Value {
    let ns = |d: std::time::Duration| d.as_nanos() as u64;
    json!({
        "done": true,
        "done_reason": f.reason.as_str(),
        "total_duration": ns(job.started.elapsed()),
        "load_duration": ns(job.load_time),
        "prompt_eval_count": f.prompt_tokens,
        "prompt_eval_duration": ns(f.prompt_time),
        "eval_count": f.generated_tokens,
        "eval_duration": ns(f.generation_time),
    })
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// An empty request loads the model (or, with `keep_alive: 0`, unloads it) and answers with an
/// empty, finished response, as Ollama does.
async fn load_only(
    state: &AppState,
    model: &str,
    keep_alive: Option<KeepAlive>,
    chat: bool,
) -> Result<Response, OllamaError> {
    let unload = keep_alive == Some(KeepAlive::For(std::time::Duration::ZERO));
    // Loading `auto` (or a Claude model) loads the router's local model.
    let model = routed::local_name(state, model);
    let lease = state.registry.acquire(&model, keep_alive).await?;
    let name = lease.name.clone();
    drop(lease);
    if unload {
        let registry = state.registry.clone();
        let target = name.clone();
        // Unloading joins the model's thread: off the async workers. A model still in use (a
        // request in flight, or a moment's reference from a metrics scrape) is unloaded once
        // it is idle: wait briefly for that, then leave it to the background reaper.
        let _ = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while !registry.reap().contains(&target)
                && registry.resident().iter().any(|r| r.name == target)
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        })
        .await;
    }
    let reason = if unload { "unload" } else { "load" };
    let mut body =
        json!({"model": name, "created_at": rfc3339(), "done": true, "done_reason": reason});
    if chat {
        body["message"] = json!({"role": "assistant", "content": ""});
    } else {
        body["response"] = json!("");
    }
    Ok(Json(body).into_response())
}

/// `POST /api/generate`
pub async fn generate(
    State(state): State<AppState>,
    rid: Option<Extension<RequestId>>,
    body: Body,
) -> Result<Response, OllamaError> {
    let r: GenerateRequest = parse_json(&body)?;
    let keep_alive = run::parse_keep_alive(r.keep_alive.as_ref())?;
    if r.prompt.is_empty() && r.system.is_none() {
        return load_only(&state, &r.model, keep_alive, false).await;
    }
    let prompt = if r.raw {
        PromptInput::Raw(r.prompt)
    } else {
        let mut messages = Vec::new();
        if let Some(system) = r.system {
            messages.push(Message {
                role: "system".into(),
                content: system,
            });
        }
        messages.push(Message {
            role: "user".into(),
            content: r.prompt,
        });
        PromptInput::Chat(messages)
    };
    let valid = validate(r.model, prompt, r.options, r.format, keep_alive)?;
    respond(state, valid, r.stream.unwrap_or(true), false, rid).await
}

/// `POST /api/chat`
pub async fn chat(
    State(state): State<AppState>,
    rid: Option<Extension<RequestId>>,
    body: Body,
) -> Result<Response, OllamaError> {
    let r: ChatRequest = parse_json(&body)?;
    let keep_alive = run::parse_keep_alive(r.keep_alive.as_ref())?;
    if r.messages.is_empty() {
        return load_only(&state, &r.model, keep_alive, true).await;
    }
    let mut messages = Vec::with_capacity(r.messages.len());
    for (i, m) in r.messages.into_iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
            return Err(ApiError::invalid(
                "messages",
                format!(
                    "messages[{i}].role must be system, user, assistant or tool, got '{}'",
                    m.role
                ),
            )
            .into());
        }
        messages.push(Message {
            role: m.role,
            content: m.content,
        });
    }
    let valid = validate(
        r.model,
        PromptInput::Chat(messages),
        r.options,
        r.format,
        keep_alive,
    )?;
    respond(state, valid, r.stream.unwrap_or(true), true, rid).await
}

fn piece(model: &str, text: &str, chat: bool) -> Value {
    if chat {
        json!({"model": model, "created_at": rfc3339(), "message": {"role": "assistant", "content": text}, "done": false})
    } else {
        json!({"model": model, "created_at": rfc3339(), "response": text, "done": false})
    }
}

async fn respond(
    state: AppState,
    valid: ValidGenerate,
    stream: bool,
    chat: bool,
    rid: Option<Extension<RequestId>>,
) -> Result<Response, OllamaError> {
    let prompt = state.log_prompts.then(|| routed::user_text(&valid.prompt));
    let mut job = routed::answer(&state, valid, stream).await?;
    if let Some(Extension(RequestId(id))) = &rid {
        job.log_as(id, prompt);
    }
    let headers = job.decision.headers();
    if !stream {
        let done = run::collect(&mut job).await?;
        let routing = job.account(&done.finished);
        let mut body = merge(
            piece(&job.model, &done.text, chat),
            final_fields(&job, &done.finished),
        );
        body["llmgenie"] = routing;
        return Ok((headers, Extension(LogsItself), Json(body)).into_response());
    }
    // One JSON object per line. Dropping the body (the client left) drops the receiver, which
    // stops the generation.
    let lines = stream::unfold((job, false), move |(mut job, finished)| async move {
        if finished {
            return None;
        }
        let (value, end) = match job.events.recv().await {
            Some(Event::Token(t)) if t.text.is_empty() => (None, false),
            Some(Event::Token(t)) => (Some(piece(&job.model, &t.text, chat)), false),
            Some(Event::Done(f)) => {
                let routing = job.account(&f);
                let mut last = merge(piece(&job.model, "", chat), final_fields(&job, &f));
                last["llmgenie"] = routing;
                (Some(last), true)
            }
            Some(Event::Error(e)) => {
                job.unfinished = "error";
                tracing::error!(error = %e, "generation failed mid-stream");
                (Some(json!({"error": "generation failed"})), true)
            }
            None => return None,
        };
        Some((value, (job, end)))
    })
    .filter_map(|v| async move { v })
    .map(|v| Ok::<_, std::convert::Infallible>(Bytes::from(format!("{v}\n"))));
    Ok((
        headers,
        Extension(LogsItself),
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}

fn details(state: &AppState, name: &str) -> Value {
    let spec = state
        .registry
        .resident()
        .into_iter()
        .find(|r| r.name == name)
        .map(|r| r.engine.info().spec.clone());
    json!({
        "format": "gguf",
        "family": spec.as_ref().map(|s| s.architecture.to_string()),
        "families": spec.as_ref().map(|s| vec![s.architecture.to_string()]),
        "parameter_size": "",
        "quantization_level": "",
        "parent_model": "",
    })
}

/// `GET /api/tags`: the models that can be used.
pub async fn tags(State(state): State<AppState>) -> Json<Value> {
    let mut models: Vec<Value> = state
        .registry
        .available()
        .into_iter()
        .map(|(name, path)| {
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            json!({
                "name": format!("{name}:latest"),
                "model": format!("{name}:latest"),
                "modified_at": rfc3339(),
                "size": size,
                "digest": "",
                "details": details(&state, &name),
            })
        })
        .collect();
    // The router: classified per request, answered locally or by Claude.
    models.push(json!({
        "name": "auto:latest",
        "model": "auto:latest",
        "modified_at": rfc3339(),
        "size": 0,
        "digest": "",
        "details": {"format": "router", "family": "llmgenie", "families": ["llmgenie"],
                    "parameter_size": "", "quantization_level": "", "parent_model": ""},
    }));
    Json(json!({"models": models}))
}

/// `GET /api/ps`: the models in memory.
pub async fn ps(State(state): State<AppState>) -> Json<Value> {
    let models: Vec<Value> = state
        .registry
        .resident()
        .into_iter()
        .map(|r| {
            json!({
                "name": format!("{}:latest", r.name),
                "model": format!("{}:latest", r.name),
                "size": r.engine.info().file_size,
                "digest": "",
                "details": details(&state, &r.name),
                // Ollama reports a far-future time for models kept forever.
                "expires_at": r.expires_at.map_or_else(|| "2318-01-01T00:00:00Z".to_string(), rfc3339_at),
                "size_vram": 0,
            })
        })
        .collect();
    Json(json!({"models": models}))
}

#[derive(Debug, Deserialize)]
struct ShowRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    name: String,
}

/// `POST /api/show`: what a model is.
pub async fn show(State(state): State<AppState>, body: Body) -> Result<Json<Value>, OllamaError> {
    let r: ShowRequest = parse_json(&body)?;
    let requested = if r.model.is_empty() { r.name } else { r.model };
    let routed = routed::is_auto(&state, &requested);
    // `auto` is the router: it shows the local model it answers with.
    let (name, path) = state
        .registry
        .resolve(&routed::local_name(&state, &requested))?;
    let file = crate::gguf::GgufFile::open(&path)
        .map_err(|e| ApiError::new(super::error::ErrorKind::Internal, e.to_string()))?;
    let summary = crate::gguf::summarize(&file)
        .map_err(|e| ApiError::new(super::error::ErrorKind::Internal, e.to_string()))?;
    Ok(Json(json!({
        "modelfile": format!("FROM {}", path.display()),
        "parameters": "",
        "template": file.get_str("tokenizer.chat_template").ok().flatten().unwrap_or(""),
        "details": merge(details(&state, &name), json!({"family": summary.architecture})),
        "model_info": {
            "general.architecture": summary.architecture,
            "general.parameter_count": file.parameter_count(),
            "general.file_type": file.get_u64("general.file_type").ok().flatten(),
        },
        "capabilities": ["completion"],
        "router": routed.then(|| json!({
            "local_model": name,
            "claude_model": state.routing.config.claude_model,
            "escalation": state.routing.claude.enabled(),
        })),
    })))
}

/// `GET /api/version`
pub async fn version() -> Json<Value> {
    Json(json!({"version": env!("CARGO_PKG_VERSION")}))
}
