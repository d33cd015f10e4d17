//! Argument parsing and the subcommands. `anyhow` is used here, in the binary only.

mod chat_loop;
mod commands;
pub mod config_file;
mod router_cmds;
mod serve;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use llmgenie::model::{DeviceChoice, KvCacheType};
use llmgenie::sampler::SamplingParams;

pub use commands::dispatch;

#[derive(Parser, Debug)]
#[command(
    name = "llmgenie",
    version,
    about = "In-process GGUF inference engine with an Ollama/OpenAI-compatible API"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Print load time, token counts and speeds to stderr.
    #[arg(long, short, global = true)]
    pub verbose: bool,
    /// A TOML file of settings (keys named as the flags); flags and LLMGENIE_* variables win.
    #[arg(long, global = true, env = "LLMGENIE_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Log lines as `text` or `json` (one object per line); levels come from RUST_LOG.
    #[arg(
        long,
        global = true,
        env = "LLMGENIE_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate an answer to a prompt (chat template applied), or chat interactively without one.
    Run(RunArgs),
    /// Validate a GGUF file (or catalogue model) and print a summary of it.
    Inspect {
        /// A catalogue name or a path to a .gguf file.
        model: String,
    },
    /// Download a catalogue model from the Hugging Face hub and verify its checksum.
    Pull {
        name: String,
        #[arg(long, env = "LLMGENIE_MODELS")]
        models_dir: Option<PathBuf>,
    },
    /// List the catalogue and which models are downloaded.
    List {
        #[arg(long, env = "LLMGENIE_MODELS")]
        models_dir: Option<PathBuf>,
    },
    /// Measure prefill and decode speed, load time and peak memory.
    Bench(BenchArgs),
    /// Serve the OpenAI- and Ollama-compatible HTTP API.
    Serve(ServeArgs),
    /// Train a model of the router (`train classifier`).
    Train {
        #[command(subcommand)]
        what: TrainWhat,
    },
    /// Measure a model of the router on labelled data (`eval classifier --data FILE`).
    Eval {
        #[command(subcommand)]
        what: EvalWhat,
    },
    /// Print the task class of a prompt and the classifier's confidence, as JSON.
    Classify {
        text: String,
        /// Weights file (default: the weights built into this binary).
        #[arg(long)]
        weights: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum TrainWhat {
    /// Train the task classifier on labelled prompts and save its weights.
    Classifier {
        #[arg(long, default_value = "models/classifier/train.jsonl")]
        data: PathBuf,
        #[arg(long, default_value = "models/classifier/weights.bin")]
        out: PathBuf,
        #[arg(long, default_value_t = 12)]
        epochs: usize,
    },
}

#[derive(Subcommand, Debug)]
pub enum EvalWhat {
    /// Per-class precision and recall, the confusion matrix, and a closing JSON line.
    Classifier {
        #[arg(long, default_value = "models/classifier/heldout.jsonl")]
        data: PathBuf,
        /// Weights file (default: the weights built into this binary).
        #[arg(long)]
        weights: Option<PathBuf>,
    },
    /// Precision and recall of the validator's `escalate` against answers labelled not
    /// acceptable (lines `{"prompt", "answer", "acceptable"}`), and a closing JSON line.
    Validator {
        #[arg(long, default_value = "models/validator/labelled.jsonl")]
        data: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[arg(long, env = "LLMGENIE_HOST", default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, env = "LLMGENIE_PORT", default_value_t = 11435)]
    pub port: u16,
    /// Models to preload (catalogue names or .gguf paths, repeatable or comma-separated); the
    /// first answers requests that name no model. Default: smollm2-135m.
    #[arg(
        long = "model",
        visible_alias = "preload",
        short,
        env = "LLMGENIE_MODEL",
        value_delimiter = ','
    )]
    pub models: Vec<String>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Largest request body in bytes.
    #[arg(long, env = "LLMGENIE_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Requests running or queued per model before new ones get 429.
    #[arg(long, env = "LLMGENIE_MAX_PENDING", default_value_t = 32)]
    pub max_pending: usize,
    /// How long a model that was not preloaded stays resident after its last request
    /// ("5m", "1h", "30s", seconds, or negative for forever). Requests may override it.
    #[arg(long, env = "LLMGENIE_KEEP_ALIVE", default_value = "5m")]
    pub keep_alive: String,
    /// Most models resident at once (idle ones are evicted to make room).
    #[arg(long, env = "LLMGENIE_MAX_MODELS")]
    pub max_models: Option<usize>,
    /// Most bytes of model files resident at once, e.g. 8G or 512M.
    #[arg(long, env = "LLMGENIE_MAX_MEMORY")]
    pub max_memory: Option<String>,
    /// Seconds in-flight requests may run on after SIGINT/SIGTERM.
    #[arg(long, env = "LLMGENIE_SHUTDOWN_GRACE", default_value_t = 30)]
    pub shutdown_grace: u64,
    /// Require `Authorization: Bearer KEY` on every route but /health and GET /.
    #[arg(long, env = "LLMGENIE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Browser origins allowed to call the API (repeatable or comma-separated; `*` for any).
    #[arg(
        long = "cors-origin",
        env = "LLMGENIE_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
    /// What a request that names no model gets: `auto` (routed) or a local model name.
    /// Default: `[router] default_model`, else `auto`.
    #[arg(long, env = "LLMGENIE_DEFAULT_MODEL")]
    pub default_model: Option<String>,
    /// The Claude model of escalations (default: claude-sonnet-4-5).
    #[arg(long, env = "LLMGENIE_CLAUDE_MODEL")]
    pub claude_model: Option<String>,
    /// The Anthropic API's base URL (the key comes from ANTHROPIC_API_KEY only).
    #[arg(long, env = "LLMGENIE_CLAUDE_BASE_URL")]
    pub claude_base_url: Option<String>,
    /// Stream the local answers of `auto` requests as they are generated: no validation, so
    /// never an escalation mid-stream.
    #[arg(long, env = "LLMGENIE_STREAM_LOCAL_IMMEDIATELY")]
    pub stream_local_immediately: bool,
    /// Also serve `GET /metrics` on this address (e.g. 127.0.0.1:9464), without the API key.
    #[arg(long, env = "LLMGENIE_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Put the user's prompt text in the per-request log lines (off: prompts stay private).
    #[arg(long, env = "LLMGENIE_LOG_PROMPTS")]
    pub log_prompts: bool,
}

/// Which model and where it runs.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A catalogue name (see `llmgenie list`) or a path to a .gguf file. Default: smollm2-135m.
    #[arg(long, short, env = "LLMGENIE_MODEL", default_value = "")]
    pub model: String,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Where models come from and run; shared by the commands that load models.
#[derive(Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// cpu, cuda, metal or auto (the best this build has).
    #[arg(long, env = "LLMGENIE_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,
    /// CPU threads for compute (default: all cores).
    #[arg(long, env = "LLMGENIE_THREADS")]
    pub threads: Option<usize>,
    /// Where model files live (default: ./models).
    #[arg(long, env = "LLMGENIE_MODELS")]
    pub models_dir: Option<PathBuf>,
    /// How the KV cache stores keys and values on the CPU: f16 (half the memory, faster decode
    /// steps; as llama.cpp and Ollama store them) or f32.
    #[arg(long, env = "LLMGENIE_KV_CACHE_TYPE", default_value = "f16")]
    pub kv_cache_type: KvCacheType,
    /// Where CPU loads keep packed weights between runs, so that a model loads by mapping them
    /// instead of packing it again (about the model's size on disk, once per model file): a
    /// directory, or `off` (default: ~/.cache/llmgenie/packed).
    #[arg(long, env = "LLMGENIE_PACKED_CACHE")]
    pub packed_cache: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The prompt; without one, an interactive chat starts.
    pub prompt: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// A system message for the chat template.
    #[arg(long)]
    pub system: Option<String>,
    /// Send the prompt as it is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Sampling flags, named as in the OpenAI API.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Most tokens to generate (default: until the end of the answer or the context).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text appears (not printed). Repeatable.
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            top_logprobs: 0,
        }
    }
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Measure batched decoding instead: aggregate tokens/s with this many sequences decoded
    /// together, for each comma-separated count (e.g. 1,2,4,8).
    #[arg(long, value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also print where the CPU decode steps spent their time, phase by phase (projections,
    /// attention, norms, ...; summed over every step the command ran), to stderr.
    #[arg(long)]
    pub profile: bool,
}

/// Logs go to stderr; `RUST_LOG` overrides the level.
pub fn init_logging(verbose: bool, format: LogFormat, serving: bool) {
    // The server logs one line per request at info; other commands stay quiet unless -v.
    let default = if verbose || serving {
        "llmgenie=info"
    } else {
        "llmgenie=warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}
