//! OpenAI-compatible endpoints: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

use std::convert::Infallible;

use axum::extract::{Path, State};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, OpenAiError};
use super::routed;
use super::run::{self, check_stop, Job, PromptInput, ValidGenerate};
use super::telemetry::{LogsItself, RequestId};
use super::{parse_json, AppState, Body};
use crate::chat::Message;
use crate::engine::{Event, Finished, TokenEvent};
use crate::sampler::SamplingParams;

/// A string or a list of strings (`stop`, `prompt`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// Message content: a string, or a list of parts of which the text parts are kept.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
}

/// Fields shared by chat and text completions.
#[derive(Debug, Deserialize)]
struct Common {
    #[serde(default)]
    model: String,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    n: Option<i64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    response_format: Option<ResponseFormat>,
    /// Extension (Ollama's semantics): how long the model stays resident afterwards.
    keep_alive: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<i64>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: OneOrMany,
    logprobs: Option<i64>,
    #[serde(flatten)]
    common: Common,
}

/// The request after validation.
struct Valid {
    generate: ValidGenerate,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
}

fn non_negative(name: &str, v: Option<i64>, max: i64) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if (0..=max).contains(&x) => Ok(Some(x as usize)),
        Some(x) => Err(ApiError::invalid(
            name,
            format!("{name} must be between 0 and {max}, got {x}"),
        )),
    }
}

fn validate_common(
    c: Common,
    prompt: PromptInput,
    top_logprobs: usize,
) -> Result<(ValidGenerate, bool, bool), ApiError> {
    if let Some(n) = c.n {
        if n != 1 {
            return Err(ApiError::invalid(
                "n",
                format!("only n = 1 is supported, got {n}"),
            ));
        }
    }
    let json = match c.response_format.as_ref().map(|f| f.kind.as_str()) {
        None | Some("text") => false,
        Some("json_object") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "response_format",
                format!("response_format type must be 'text' or 'json_object', got '{other}'"),
            ))
        }
    };
    let defaults = SamplingParams::default();
    let params = SamplingParams {
        temperature: c.temperature.unwrap_or(1.0),
        top_p: c.top_p.unwrap_or(1.0),
        top_k: non_negative("top_k", c.top_k, 1_000_000)?.unwrap_or(0),
        min_p: c.min_p.unwrap_or(0.0),
        repeat_penalty: c.repeat_penalty.unwrap_or(1.0),
        repeat_last_n: defaults.repeat_last_n,
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        seed: c.seed,
        top_logprobs,
    };
    params.validate().map_err(|m| {
        let field = m.split_whitespace().next().unwrap_or("").to_string();
        ApiError::invalid(&field, m)
    })?;
    let max_tokens = match c.max_completion_tokens {
        Some(v) => non_negative("max_completion_tokens", Some(v), 1 << 30)?,
        None => non_negative("max_tokens", c.max_tokens, 1 << 30)?,
    };
    let stop = check_stop("stop", c.stop.map(OneOrMany::into_vec).unwrap_or_default())?;
    let include_usage = c.stream_options.is_some_and(|o| o.include_usage);
    let keep_alive = run::parse_keep_alive(c.keep_alive.as_ref())?;
    Ok((
        ValidGenerate {
            model: c.model,
            prompt,
            params,
            max_tokens,
            stop,
            keep_alive,
            json,
        },
        c.stream,
        include_usage,
    ))
}

fn validate_chat(r: ChatRequest) -> Result<Valid, ApiError> {
    if r.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let mut messages = Vec::with_capacity(r.messages.len());
    for (i, m) in r.messages.into_iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "developer" | "user" | "assistant" | "tool"
        ) {
            return Err(ApiError::invalid(
                "messages",
                format!(
                    "messages[{i}].role must be system, user, assistant or tool, got '{}'",
                    m.role
                ),
            ));
        }
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => parts
                .into_iter()
                .filter(|p| p.kind == "text")
                .filter_map(|p| p.text)
                .collect::<Vec<_>>()
                .join("\n"),
        };
        let role = if m.role == "developer" {
            "system".to_string()
        } else {
            m.role
        };
        messages.push(Message { role, content });
    }
    let top = non_negative("top_logprobs", r.top_logprobs, 20)?.unwrap_or(0);
    let top = if r.logprobs { top } else { 0 };
    let (generate, stream, include_usage) =
        validate_common(r.common, PromptInput::Chat(messages), top)?;
    Ok(Valid {
        generate,
        stream,
        include_usage,
        logprobs: r.logprobs,
    })
}

fn validate_completion(r: CompletionRequest) -> Result<Valid, ApiError> {
    let prompts = r.prompt.into_vec();
    if prompts.len() != 1 {
        return Err(ApiError::invalid(
            "prompt",
            format!("prompt must be one string, got {}", prompts.len()),
        ));
    }
    let prompt = prompts.into_iter().next().unwrap_or_default();
    let top = non_negative("logprobs", r.logprobs, 20)?;
    let (generate, stream, include_usage) =
        validate_common(r.common, PromptInput::Raw(prompt), top.unwrap_or(0))?;
    Ok(Valid {
        generate,
        stream,
        include_usage,
        logprobs: top.is_some(),
    })
}

fn usage(f: &Finished) -> Value {
    let (prompt, completion) = (f.prompt_tokens, f.generated_tokens);
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": f.cached_tokens}})
}

fn token_logprob(job: &Job, t: &TokenEvent) -> Value {
    // Claude's answers carry no token ids (and `logprobs` is off for them).
    let Some(engine) = &job.engine else {
        return Value::Null;
    };
    let tok = engine.tokenizer();
    let text = |id: u32| tok.token_text(id).unwrap_or("").to_string();
    json!({
        "token": text(t.id),
        "logprob": t.logprob,
        "bytes": text(t.id).into_bytes(),
        "top_logprobs": t.top.iter().map(|(id, lp)| json!({"token": text(*id), "logprob": lp, "bytes": text(*id).into_bytes()})).collect::<Vec<_>>(),
    })
}

fn timings(job: &Job, f: &Finished) -> Value {
    json!({
        "load_ms": job.load_time.as_secs_f64() * 1e3,
        "queue_ms": f.queue_time.as_secs_f64() * 1e3,
        "prompt_ms": f.prompt_time.as_secs_f64() * 1e3,
        "generation_ms": f.generation_time.as_secs_f64() * 1e3,
        "prompt_tokens_per_s": f.prompt_tokens as f64 / f.prompt_time.as_secs_f64().max(1e-9),
        "generation_tokens_per_s": f.generated_tokens.saturating_sub(1) as f64 / f.generation_time.as_secs_f64().max(1e-9),
    })
}

/// `POST /v1/chat/completions`
pub async fn chat_completions(
    State(state): State<AppState>,
    rid: Option<Extension<RequestId>>,
    body: Body,
) -> Result<Response, OpenAiError> {
    let valid = validate_chat(parse_json(&body)?)?;
    respond(state, valid, true, rid).await
}

/// `POST /v1/completions`
pub async fn completions(
    State(state): State<AppState>,
    rid: Option<Extension<RequestId>>,
    body: Body,
) -> Result<Response, OpenAiError> {
    let valid = validate_completion(parse_json(&body)?)?;
    respond(state, valid, false, rid).await
}

async fn respond(
    state: AppState,
    valid: Valid,
    chat: bool,
    rid: Option<Extension<RequestId>>,
) -> Result<Response, OpenAiError> {
    let prompt = state
        .log_prompts
        .then(|| routed::user_text(&valid.generate.prompt));
    let mut job = routed::answer(&state, valid.generate, valid.stream).await?;
    if let Some(Extension(RequestId(id))) = &rid {
        job.log_as(id, prompt);
    }
    let headers = job.decision.headers();
    let logprobs = valid.logprobs && job.engine.is_some();
    let id = format!(
        "{}-{}",
        if chat { "chatcmpl" } else { "cmpl" },
        state.next_id()
    );
    let created = run::unix_now();
    if valid.stream {
        let stream = sse_stream(job, id, created, chat, valid.include_usage, logprobs);
        return Ok((headers, Extension(LogsItself), Sse::new(stream)).into_response());
    }
    let done = run::collect(&mut job).await?;
    let f = &done.finished;
    let routing = job.account(f);
    let logprobs = logprobs.then(|| {
        json!({"content": done.tokens.iter().map(|t| token_logprob(&job, t)).collect::<Vec<_>>()})
    });
    let choice = if chat {
        json!({"index": 0, "message": {"role": "assistant", "content": done.text}, "logprobs": logprobs, "finish_reason": f.reason.as_str()})
    } else {
        json!({"index": 0, "text": done.text, "logprobs": logprobs, "finish_reason": f.reason.as_str()})
    };
    let body = json!({
        "id": id,
        "object": if chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": job.model,
        "choices": [choice],
        "usage": usage(f),
        "timings": timings(&job, f),
        "llmgenie": routing,
    });
    Ok((headers, Extension(LogsItself), Json(body)).into_response())
}

/// The SSE events of a streamed completion, ending in `data: [DONE]`. Dropping the stream (the
/// client left) drops the event receiver, which stops the generation.
fn sse_stream(
    job: Job,
    id: String,
    created: u64,
    chat: bool,
    include_usage: bool,
    logprobs: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |model: &str, delta: Value, finish: Option<&str>, lp: Option<Value>| {
        let choice = if chat {
            json!({"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")), "logprobs": lp, "finish_reason": finish})
        };
        json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
    };
    let first = chat.then(|| {
        chunk(
            &job.model,
            json!({"role": "assistant", "content": ""}),
            None,
            None,
        )
    });
    let state = (job, false);
    let body = stream::unfold(state, move |(mut job, finished)| {
        let chunk = chunk.clone();
        async move {
            if finished {
                return None;
            }
            let item: Vec<Value> = match job.events.recv().await {
                Some(Event::Token(t)) => {
                    let lp = logprobs.then(|| json!({"content": [token_logprob(&job, &t)]}));
                    vec![chunk(&job.model, json!({"content": t.text}), None, lp)]
                }
                Some(Event::Done(f)) => {
                    let routing = job.account(&f);
                    let mut last = chunk(&job.model, json!({}), Some(f.reason.as_str()), None);
                    last["llmgenie"] = routing;
                    let mut out = vec![last];
                    if include_usage {
                        let mut u = chunk(&job.model, json!({}), None, None);
                        u["choices"] = json!([]);
                        u["usage"] = usage(&f);
                        out.push(u);
                    }
                    return Some((out, (job, true)));
                }
                Some(Event::Error(e)) => {
                    job.unfinished = "error";
                    tracing::error!(error = %e, "generation failed mid-stream");
                    return Some((
                        vec![
                            json!({"error": {"message": "generation failed", "type": "server_error"}}),
                        ],
                        (job, true),
                    ));
                }
                None => return None,
            };
            Some((item, (job, false)))
        }
    });
    let head = stream::iter(first.into_iter().map(|v| vec![v]));
    head.chain(body)
        .flat_map(|values| {
            stream::iter(
                values
                    .into_iter()
                    .map(|v| Ok(SseEvent::default().data(v.to_string()))),
            )
        })
        .chain(stream::once(async {
            Ok(SseEvent::default().data("[DONE]"))
        }))
}

fn model_object(name: &str, created: u64) -> Value {
    json!({"id": name, "object": "model", "created": created, "owned_by": "llmgenie"})
}

/// `GET /v1/models`: every model a request may name.
pub async fn list_models(State(state): State<AppState>) -> Json<Value> {
    let created = run::unix_now();
    let mut data: Vec<Value> = state
        .registry
        .available()
        .iter()
        .map(|(name, _)| model_object(name, created))
        .collect();
    data.push(model_object("auto", created));
    Json(json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}`
pub async fn get_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, OpenAiError> {
    if id == "auto" {
        return Ok(Json(model_object("auto", run::unix_now())));
    }
    let (name, _) = state.registry.resolve(&id)?;
    Ok(Json(model_object(&name, run::unix_now())))
}
