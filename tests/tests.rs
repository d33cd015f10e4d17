//! Integration tests: the real models, the real binary, the llama.cpp reference vectors.

mod util;

mod cli;
mod engine;
mod loader;
mod reference;
