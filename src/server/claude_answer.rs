//! Claude's side of a routed request: the request in the Messages API's shape, and Claude's
//! answer (whole or streamed) as engine events, so that the API handlers serve it like a local
//! one.

use std::time::Instant;

use futures_util::StreamExt;
use tokio::sync::mpsc::UnboundedSender;

use super::run::{PromptInput, ValidGenerate};
use crate::claude::{ClaudeClient, ClaudeError, ClaudeMessage, MessagesRequest, StreamEvent};
use crate::engine::{Event, FinishReason, Finished, TokenEvent};

pub type Events = tokio::sync::mpsc::UnboundedReceiver<Event>;

fn text_event(text: String) -> Event {
    Event::Token(TokenEvent {
        id: 0,
        text,
        logprob: 0.0,
        top: Vec::new(),
    })
}

fn finished(
    stop_reason: Option<&str>,
    usage: crate::claude::Usage,
    started: Instant,
    first: Option<Instant>,
) -> Finished {
    let first = first.unwrap_or_else(Instant::now);
    Finished {
        reason: if stop_reason == Some("max_tokens") {
            FinishReason::Length
        } else {
            FinishReason::Stop
        },
        prompt_tokens: usage.input_tokens as usize,
        cached_tokens: 0,
        generated_tokens: usage.output_tokens as usize,
        queue_time: std::time::Duration::ZERO,
        prompt_time: first.saturating_duration_since(started),
        generation_time: first.elapsed(),
    }
}

/// A whole Claude answer as events.
pub async fn claude_whole(
    client: &ClaudeClient,
    body: &MessagesRequest,
    deadline: Instant,
    started: Instant,
) -> Result<Events, ClaudeError> {
    let resp = client.create_until(body, deadline).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let _ = tx.send(text_event(resp.text));
    let _ = tx.send(Event::Done(finished(
        resp.stop_reason.as_deref(),
        resp.usage,
        started,
        Some(Instant::now()),
    )));
    Ok(rx)
}

/// Claude's stream passed through as events. The first event is awaited here, so that a stream
/// that fails before saying anything still falls back to the local answer; a failure after
/// that ends the stream with an error event.
pub async fn claude_stream(
    client: &ClaudeClient,
    body: &MessagesRequest,
    deadline: Instant,
    started: Instant,
) -> Result<Events, ClaudeError> {
    let mut s = Box::pin(client.stream_until(body, deadline).await?);
    let first = match s.next().await {
        Some(Ok(ev)) => ev,
        Some(Err(e)) => return Err(e),
        None => return Err(ClaudeError::Incomplete),
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let first_at = Instant::now();
    let forward = move |tx: &UnboundedSender<Event>, ev: StreamEvent| -> bool {
        let event = match ev {
            StreamEvent::Text(t) => text_event(t),
            StreamEvent::Done { stop_reason, usage } => Event::Done(finished(
                stop_reason.as_deref(),
                usage,
                started,
                Some(first_at),
            )),
        };
        tx.send(event).is_ok()
    };
    if forward(&tx, first) {
        tokio::spawn(async move {
            while let Some(item) = s.next().await {
                let ok = match item {
                    Ok(ev) => forward(&tx, ev),
                    Err(e) => {
                        tracing::warn!(error = %e, "Claude stream failed mid-answer");
                        let _ = tx.send(Event::Error(format!("Claude stream failed: {e}")));
                        false
                    }
                };
                // The client left: dropping the stream closes Claude's connection.
                if !ok {
                    break;
                }
            }
        });
    }
    Ok(rx)
}

/// The request in the Messages API's shape: system messages joined into `system`, turns of the
/// same role merged (the API wants them alternating, starting with the user), empty ones dropped.
pub fn claude_request(req: &ValidGenerate, model: &str, default_max: u32) -> MessagesRequest {
    let mut system: Vec<String> = Vec::new();
    let mut messages: Vec<ClaudeMessage> = Vec::new();
    let turns: Vec<(String, String)> = match &req.prompt {
        PromptInput::Raw(t) => vec![("user".into(), t.clone())],
        PromptInput::Chat(ms) => ms
            .iter()
            .map(|m| (m.role.clone(), m.content.clone()))
            .collect(),
    };
    for (role, content) in turns {
        if content.trim().is_empty() {
            continue;
        }
        let role = match role.as_str() {
            "system" => {
                system.push(content);
                continue;
            }
            "assistant" => "assistant",
            _ => "user",
        };
        match messages.last_mut() {
            Some(last) if last.role == role => {
                last.content.push_str("\n\n");
                last.content.push_str(&content);
            }
            _ => messages.push(ClaudeMessage {
                role: role.into(),
                content,
            }),
        }
    }
    if messages.first().is_none_or(|m| m.role != "user") {
        let opening = if messages.is_empty() {
            system.pop().unwrap_or_else(|| "Hello.".into())
        } else {
            "(The conversation so far follows.)".into()
        };
        messages.insert(
            0,
            ClaudeMessage {
                role: "user".into(),
                content: opening,
            },
        );
    }
    if req.json {
        system.push("Answer with a single JSON object and nothing else.".into());
    }
    let max_tokens = req
        .max_tokens
        .map_or(default_max, |m| u32::try_from(m).unwrap_or(u32::MAX))
        .max(1);
    MessagesRequest {
        model: model.to_string(),
        max_tokens,
        messages,
        system: (!system.is_empty()).then(|| system.join("\n\n")),
        temperature: Some(req.params.temperature.clamp(0.0, 1.0)),
        stop_sequences: req
            .stop
            .iter()
            .filter(|s| !s.trim().is_empty())
            .cloned()
            .collect(),
        stream: false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::chat::Message;
    use crate::sampler::SamplingParams;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    fn req(prompt: PromptInput) -> ValidGenerate {
        ValidGenerate {
            model: "auto".into(),
            prompt,
            params: SamplingParams {
                temperature: 1.7,
                ..SamplingParams::default()
            },
            max_tokens: None,
            stop: vec!["END".into(), " ".into()],
            keep_alive: None,
            json: true,
        }
    }

    #[test]
    fn chats_become_alternating_messages_with_a_system_prompt() {
        let r = claude_request(
            &req(PromptInput::Chat(vec![
                msg("system", "Be brief."),
                msg("user", "Hi"),
                msg("user", "Name a colour"),
                msg("assistant", ""),
                msg("tool", "blue"),
            ])),
            "claude-x",
            300,
        );
        assert_eq!(r.model, "claude-x");
        assert_eq!(r.max_tokens, 300);
        assert_eq!(r.temperature, Some(1.0));
        assert_eq!(r.stop_sequences, vec!["END".to_string()]);
        assert_eq!(r.messages.len(), 1);
        assert_eq!(r.messages[0].content, "Hi\n\nName a colour\n\nblue");
        let system = r.system.unwrap();
        assert!(system.starts_with("Be brief.") && system.contains("JSON"));

        let r = claude_request(
            &req(PromptInput::Chat(vec![msg("assistant", "Hello!")])),
            "c",
            5,
        );
        assert_eq!(r.messages[0].role, "user");
        assert_eq!(r.messages[1].role, "assistant");
    }
}
