//! `llmgenie bench --batch 1,2,4,8`: aggregate decode speed when several sequences advance
//! together in one batched forward step, as the server's engine runs concurrent requests.
//! The model's own numbers, without HTTP or scheduling (`scripts/bench_serving.py concurrency`
//! measures those through the server).

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::Device;
use serde::Serialize;

use super::{filler_prompt, median, prefill, BenchError};
use crate::model::{self, KvCache, ModelError};
use crate::sampler::argmax;
use crate::vocab;

/// One batch size's figures (medians over the runs).
#[derive(Debug, Clone, Serialize)]
pub struct BatchPoint {
    /// Sequences decoded together.
    pub sequences: usize,
    /// Tokens of all sequences per second.
    pub tokens_per_s: f64,
    /// One batched step (one token for every sequence), in milliseconds.
    pub step_ms: f64,
    /// `tokens_per_s` over the single sequence's.
    pub speedup: f64,
}

/// The batched-decode report.
#[derive(Debug, Clone, Serialize)]
pub struct BatchReport {
    pub model: String,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub runs: usize,
    pub threads: usize,
    pub points: Vec<BatchPoint>,
}

/// For each batch size: that many sequences, each prefilled with its own `prompt_tokens`-token
/// prompt (the filler text from a different offset), then `gen_tokens` batched greedy steps.
///
/// # Errors
/// The model does not load, a size is 0, or the prompt and generation do not fit its context.
pub fn run(
    path: &Path,
    name: &str,
    device: &Device,
    sizes: &[usize],
    cfg: &super::BenchConfig,
) -> Result<BatchReport, BenchError> {
    if cfg.runs == 0 {
        return Err(BenchError::NoRuns);
    }
    if sizes.contains(&0) {
        return Err(BenchError::EmptyBatch);
    }
    let loaded = model::load(path, device)?;
    cfg.fits(loaded.spec.context_length)?;
    let tokenizer = vocab::tokenizer_from_gguf(&loaded.file)?;
    let w = &loaded.weights;
    let mut points: Vec<BatchPoint> = Vec::new();
    for &size in sizes {
        let mut speeds = Vec::new();
        for _ in 0..cfg.runs {
            let mut caches: Vec<KvCache> = Vec::new();
            let mut next = Vec::new();
            for i in 0..size {
                let prompt = filler_prompt(&tokenizer, cfg.prompt_tokens, i)?;
                let mut cache = w.new_cache();
                cache.plan(cfg.prompt_tokens + cfg.gen_tokens);
                let logits = prefill(w, &prompt, &mut cache)?;
                next.push(argmax(&logits).unwrap_or(0));
                caches.push(cache);
            }
            let t = Instant::now();
            for _ in 0..cfg.gen_tokens {
                let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
                let logits = w
                    .forward_batch(&next, &mut refs)?
                    .to_vec2::<f32>()
                    .map_err(ModelError::from)?;
                next = logits.iter().map(|row| argmax(row).unwrap_or(0)).collect();
            }
            let secs = t.elapsed().max(Duration::from_nanos(1)).as_secs_f64();
            speeds.push((size * cfg.gen_tokens) as f64 / secs);
        }
        let tokens_per_s = median(speeds);
        let single = points
            .iter()
            .find(|p| p.sequences == 1)
            .map_or(tokens_per_s / size as f64, |p| p.tokens_per_s);
        points.push(BatchPoint {
            sequences: size,
            tokens_per_s,
            step_ms: 1000.0 * size as f64 / tokens_per_s.max(f64::MIN_POSITIVE),
            speedup: tokens_per_s / single.max(f64::MIN_POSITIVE),
        });
    }
    Ok(BatchReport {
        model: name.to_string(),
        prompt_tokens: cfg.prompt_tokens,
        gen_tokens: cfg.gen_tokens,
        runs: cfg.runs,
        threads: candle_core::utils::get_num_threads(),
        points,
    })
}
