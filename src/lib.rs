//! # llmgenie
//!
//! An inference engine that lives inside the process: quantized GGUF models loaded with candle
//! and held resident, behind (later) an Ollama- and OpenAI-compatible API that sends only what the
//! local model cannot answer well to Claude.
//!
//! # Layout
//! - [`gguf`]: validates a GGUF file's header and metadata before anything trusts it, and turns
//!   the metadata into a typed [`gguf::ModelSpec`].
//! - [`tokenizer`]: a `tokenizers::Tokenizer` built from the GGUF vocabulary (byte-level BPE and
//!   SentencePiece), matching llama.cpp token for token; incremental decoding for streams.
//! - [`chat`]: the GGUF's Jinja chat template rendered as untrusted code, or a built-in one.
//! - [`vocab`]: glue from a GGUF file to the tokenizer and the template.
//! - [`model`]: the forward pass (llama family, Gemma 3, Qwen 2/3) over quantized weights, the
//!   per-sequence KV cache, and device selection.
//! - [`sampler`]: temperature, top-k/p, min-p, penalties, seeds, log-probabilities.
//! - [`stop`]: stop strings matched across token boundaries.
//! - [`json_mode`]: a JSON object prefix validator that constrains decoding in JSON mode.
//! - [`engine`]: a resident model on its own named thread; requests in, events out.
//! - [`catalog`]: named models (`models/catalog.toml`) and `--model` resolution.
//! - [`pull`]: downloads from the Hugging Face hub with checksums.
//! - [`bench`]: prefill/decode speed, load time and peak memory.
//! - [`claude`]: an Anthropic Messages API client (plain and SSE streams, retries with backoff).
//! - [`router`]: the quality validator and the savings ledger (routing is in progress).
//! - [`registry`]: which models are resident; one load per model, shared by waiting requests.
//! - [`server`]: the axum HTTP API (OpenAI and Ollama routes, health).

pub mod bench;
pub mod catalog;
pub mod chat;
pub mod civil;
pub mod claude;
pub mod engine;
pub mod gguf;
pub mod json_mode;
pub mod model;
pub mod observe;
pub mod pull;
pub mod registry;
pub mod router;
pub mod sampler;
pub mod server;
pub mod stop;
pub mod tokenizer;
pub mod vocab;
