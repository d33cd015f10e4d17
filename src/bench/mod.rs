//! `llmgenie bench`: prefill and decode speed, load time and peak memory, as medians of runs.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::Device;
use serde::Serialize;

use crate::model::{self, ModelError};
use crate::sampler::{Sampler, SamplingParams};
use crate::tokenizer::GgufTokenizer as Tokenizer;
use crate::vocab;

pub mod batch;

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error("prompt of {prompt} + {gen} generated tokens exceeds the context of {context}")]
    TooLong {
        prompt: usize,
        gen: usize,
        context: usize,
    },
    #[error("runs must be at least 1")]
    NoRuns,
    #[error("each batch size must be at least 1")]
    EmptyBatch,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub runs: usize,
}

impl BenchConfig {
    /// The prompt and the generated tokens fit a context of `context` positions.
    fn fits(&self, context: usize) -> Result<(), BenchError> {
        if self.prompt_tokens + self.gen_tokens > context || self.prompt_tokens == 0 {
            return Err(BenchError::TooLong {
                prompt: self.prompt_tokens,
                gen: self.gen_tokens,
                context,
            });
        }
        Ok(())
    }
}

/// Evaluate `prompt` into `cache` in 512-token chunks (as the engine does when nothing else
/// runs); returns the last position's logits.
fn prefill(
    weights: &crate::model::Transformer,
    prompt: &[u32],
    cache: &mut crate::model::KvCache,
) -> Result<Vec<f32>, BenchError> {
    let mut logits = Vec::new();
    for chunk in prompt.chunks(512) {
        logits = weights
            .forward(chunk, cache)?
            .to_vec1::<f32>()
            .map_err(ModelError::from)?;
    }
    Ok(logits)
}

/// Medians over the runs.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub runs: usize,
    pub threads: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub load_s: f64,
    pub peak_rss_bytes: u64,
}

/// Text repeated to build a prompt of an exact token count.
const FILLER: &str =
    "The history of computing is a story of people who wanted to calculate faster. \
Early machines used gears and levers; later ones used relays, vacuum tubes and transistors. \
Each generation made the previous one look slow, and each brought new questions about what \
a machine should do, who should program it, and how its answers could be trusted. ";

/// Peak resident set size of this process (`VmHWM`), or 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A prompt of exactly `tokens` tokens of filler text, starting `offset` tokens into it (so
/// that several prompts differ).
fn filler_prompt(
    tokenizer: &Tokenizer,
    tokens: usize,
    offset: usize,
) -> Result<Vec<u32>, BenchError> {
    let filler = tokenizer.encode(FILLER, false)?;
    let mut prompt = Vec::with_capacity(tokens + offset);
    while prompt.len() < tokens + offset {
        prompt.extend_from_slice(&filler);
    }
    prompt.drain(..offset);
    prompt.truncate(tokens);
    Ok(prompt)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Load the model once per run (for the load time), prefill a prompt of exactly
/// `prompt_tokens` tokens, then decode `gen_tokens` tokens greedily (EOS ignored).
///
/// # Errors
/// The model does not load, or the prompt and generation do not fit its context.
pub fn run(
    path: &Path,
    name: &str,
    device: &Device,
    cfg: &BenchConfig,
) -> Result<BenchReport, BenchError> {
    if cfg.runs == 0 {
        return Err(BenchError::NoRuns);
    }
    let (mut prefill_speeds, mut decode, mut load) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cfg.runs {
        let t0 = Instant::now();
        let loaded = model::load(path, device)?;
        load.push(t0.elapsed().as_secs_f64());
        // A packed-weight cache the first run writes serves the later ones.
        model::wait_for_pack_caches();
        cfg.fits(loaded.spec.context_length)?;
        let tokenizer = vocab::tokenizer_from_gguf(&loaded.file)?;
        let prompt = filler_prompt(&tokenizer, cfg.prompt_tokens, 0)?;
        let weights = &loaded.weights;
        let mut cache = weights.new_cache();
        cache.plan(cfg.prompt_tokens + cfg.gen_tokens);
        let t1 = Instant::now();
        let mut logits = prefill(weights, &prompt, &mut cache)?;
        prefill_speeds.push(cfg.prompt_tokens as f64 / t1.elapsed().as_secs_f64());
        let mut sampler = Sampler::new(SamplingParams::greedy());
        let mut history = prompt.clone();
        let t2 = Instant::now();
        for _ in 0..cfg.gen_tokens {
            let next = sampler.sample(&logits, &history).map_or(0, |s| s.token);
            history.push(next);
            logits = weights
                .forward(&[next], &mut cache)?
                .to_vec1::<f32>()
                .map_err(ModelError::from)?;
        }
        let secs = t2.elapsed().max(Duration::from_nanos(1)).as_secs_f64();
        decode.push(cfg.gen_tokens as f64 / secs);
    }
    Ok(BenchReport {
        model: name.to_string(),
        prompt_tokens: cfg.prompt_tokens,
        gen_tokens: cfg.gen_tokens,
        runs: cfg.runs,
        threads: candle_core::utils::get_num_threads(),
        prefill_tokens_per_s: median(prefill_speeds),
        decode_tokens_per_s: median(decode),
        load_s: median(load),
        peak_rss_bytes: peak_rss_bytes(),
    })
}
