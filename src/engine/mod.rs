//! A resident model on its own named OS thread.
//!
//! The thread loads the weights, reports ready (or the load error) over a one-shot channel, and
//! then owns the weights and every sequence. Requests arrive over a channel; each request gets its
//! own event channel back (text pieces with token ids and log-probabilities, then one final event
//! with the finish reason, token counts and timings). When the receiver is dropped, the sequence
//! is freed before its next token. Active sequences advance in turn, one step each, so a long
//! answer does not block a short one; prompts are prefilled in chunks for the same reason.

pub mod prefix;
mod worker;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Device;
use tokio::sync::mpsc;

use crate::chat::ChatTemplate;
use crate::gguf::ModelSpec;
use crate::model::ModelError;
use crate::sampler::SamplingParams;
use crate::tokenizer::GgufTokenizer;

/// Errors of starting an engine or submitting work to it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error(transparent)]
    Chat(#[from] crate::chat::ChatError),
    #[error("the model thread could not be started: {0}")]
    Spawn(std::io::Error),
    #[error("the model thread has stopped")]
    Stopped,
    #[error("prompt has {prompt} tokens but the context holds {context}")]
    PromptTooLong { prompt: usize, context: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("{0}")]
    InvalidRequest(String),
}

/// One generation request, already tokenized and validated.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Stop after this many generated tokens (`None`: until the context is full).
    pub max_tokens: Option<usize>,
    /// Stop strings; never emitted.
    pub stop: Vec<String>,
    /// Constrain the output to one JSON object (see [`crate::json_mode`]).
    pub json: bool,
}

/// One generated token and the text it released.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub id: u32,
    /// Text released at this step; empty while a multi-byte character or a possible stop string
    /// is incomplete.
    pub text: String,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// The last event of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens taken from the prefix cache (not evaluated again).
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    /// Time from submission until the sequence started.
    pub queue_time: Duration,
    /// Time spent evaluating the prompt.
    pub prompt_time: Duration,
    /// Time spent generating tokens after the first.
    pub generation_time: Duration,
}

/// What a request's channel carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token(TokenEvent),
    Done(Finished),
    Error(String),
}

/// Static facts about a resident model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub path: PathBuf,
    pub spec: ModelSpec,
    pub file_size: u64,
    pub load_time: Duration,
    pub device: String,
}

/// Live counters the model thread keeps, readable from any thread (metrics, tests).
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Sequences being advanced now.
    pub active: AtomicUsize,
    /// Requests submitted and not yet finished (active ones included).
    pub pending: AtomicUsize,
    /// Sequences that ended normally.
    pub completed: AtomicU64,
    /// Sequences dropped because their receiver went away.
    pub cancelled: AtomicU64,
    /// Sequences that ended with an error.
    pub failed: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Requests that started from a cached prefix, and the prompt tokens they did not evaluate.
    pub prefix_hits: AtomicU64,
    pub prefix_tokens_reused: AtomicU64,
    /// Forward passes that advanced several sequences at once, and the tokens they produced.
    pub batched_steps: AtomicU64,
    pub batched_tokens: AtomicU64,
    /// Forward passes over prompt tokens (a prompt read in several chunks counts each).
    pub prompt_chunks: AtomicU64,
}

impl EngineStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

pub(crate) enum Command {
    Generate {
        request: GenerateRequest,
        events: mpsc::UnboundedSender<Event>,
        submitted: Instant,
    },
    Shutdown,
}

/// A handle to a resident model; dropping it stops the thread after the work in progress.
pub struct Engine {
    commands: std_mpsc::Sender<Command>,
    info: Arc<ModelInfo>,
    tokenizer: Arc<GgufTokenizer>,
    template: Arc<ChatTemplate>,
    stats: Arc<EngineStats>,
    thread: Option<JoinHandle<()>>,
}

/// What the worker reports once loading ends.
type Ready = Result<(ModelInfo, GgufTokenizer, ChatTemplate), EngineError>;

impl Engine {
    /// Start a thread that loads `path` onto `device`; returns once the model is ready.
    ///
    /// # Errors
    /// The file is malformed or unsupported, or the thread cannot start.
    pub fn start(name: &str, path: &Path, device: Device) -> Result<Self, EngineError> {
        let (tx, rx) = std_mpsc::channel::<Command>();
        let (ready_tx, ready_rx) = std_mpsc::channel::<Ready>();
        let thread_name = format!("llmgenie-model-{name}");
        let (name, path) = (name.to_string(), path.to_path_buf());
        let stats = Arc::new(EngineStats::default());
        let worker_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || worker::run(name, path, device, rx, ready_tx, worker_stats))
            .map_err(EngineError::Spawn)?;
        let (info, tokenizer, template) = match ready_rx.recv() {
            Ok(ready) => ready?,
            Err(_) => return Err(EngineError::Stopped),
        };
        Ok(Self {
            commands: tx,
            info: Arc::new(info),
            tokenizer: Arc::new(tokenizer),
            template: Arc::new(template),
            stats,
            thread: Some(thread),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &Arc<GgufTokenizer> {
        &self.tokenizer
    }

    pub fn template(&self) -> &Arc<ChatTemplate> {
        &self.template
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Queue a request; its events arrive on the returned channel.
    ///
    /// # Errors
    /// The prompt is empty or longer than the context, a sampling field is out of range, or the
    /// thread has stopped.
    pub fn submit(
        &self,
        request: GenerateRequest,
    ) -> Result<mpsc::UnboundedReceiver<Event>, EngineError> {
        let context = self.info.spec.context_length;
        if request.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if request.prompt.len() >= context {
            return Err(EngineError::PromptTooLong {
                prompt: request.prompt.len(),
                context,
            });
        }
        request
            .params
            .validate()
            .map_err(EngineError::InvalidRequest)?;
        let (events, rx) = mpsc::unbounded_channel();
        self.stats.pending.fetch_add(1, Ordering::Relaxed);
        self.commands
            .send(Command::Generate {
                request,
                events,
                submitted: Instant::now(),
            })
            .map_err(|_| {
                self.stats.pending.fetch_sub(1, Ordering::Relaxed);
                EngineError::Stopped
            })?;
        Ok(rx)
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.info.name)
            .finish_non_exhaustive()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // The thread may already be gone; then there is nothing to stop.
        if self.commands.send(Command::Shutdown).is_ok() {
            if let Some(t) = self.thread.take() {
                if t.join().is_err() {
                    tracing::error!(model = %self.info.name, "model thread panicked");
                }
            }
        }
    }
}
