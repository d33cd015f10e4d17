//! Integration tests: the real models, the real binary, the llama.cpp reference vectors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

mod claude;
mod cli;
mod clients;
mod engine;
mod loader;
mod monitoring;
mod pack_cache;
mod reference;
mod routing;
mod server;
