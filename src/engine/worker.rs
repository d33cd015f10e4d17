//! The model thread: loads the weights, then advances every active sequence in turn.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use tokio::sync::mpsc;

use super::prefix::PrefixCache;
use super::{
    Command, EngineError, EngineStats, Event, FinishReason, Finished, GenerateRequest, ModelInfo,
    Ready, TokenEvent,
};
use crate::chat::ChatTemplate;
use crate::json_mode::JsonPrefix;
use crate::model::{self, KvCache, Transformer};
use crate::sampler::Sampler;
use crate::stop::{StopMatcher, StopOutcome};
use crate::tokenizer::{GgufTokenizer, IncrementalDecoder};
use crate::vocab;

/// Prompt tokens evaluated per step when no other sequence is generating (so the attention
/// scores of one step stay small).
const PREFILL_CHUNK: usize = 512;

/// Prompt tokens evaluated per step while other sequences are generating:
/// `LLMGENIE_PREFILL_CHUNK` (default 64). Between two batched decode steps only one prompt
/// chunk runs, so a long prompt arriving delays each token of the streams already running by
/// one chunk's time, not by the whole prompt's. Measured with `scripts/bench_serving.py mixed`
/// (SmolLM2, two cores, a 1,380-token prompt arriving while four streams generate), the long
/// prompt's first token / the streams' median time between tokens: chunks of 32 7.3 s / 0.17 s,
/// 64 5.9 s / 0.27 s, 128 6.0 s / 0.51 s, 512 6.0 s / 1.46 s.
fn shared_prefill_chunk() -> usize {
    std::env::var("LLMGENIE_PREFILL_CHUNK")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(64)
        .min(PREFILL_CHUNK)
}

/// How many sequences advance together; further requests wait in the channel.
const MAX_ACTIVE: usize = 8;

/// Finished sequences' caches kept for reuse.
const PREFIX_ENTRIES: usize = 16;

/// Bytes of KV cache kept for reuse: `LLMGENIE_PREFIX_CACHE_MB` (default 256; 0 turns it off).
fn prefix_cache_bytes() -> usize {
    std::env::var("LLMGENIE_PREFIX_CACHE_MB")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(256)
        .saturating_mul(1 << 20)
}

pub(super) fn run(
    name: String,
    path: PathBuf,
    device: Device,
    commands: std_mpsc::Receiver<Command>,
    ready: std_mpsc::Sender<Ready>,
    stats: Arc<EngineStats>,
) {
    let started = Instant::now();
    let loaded = match load(&name, &path, &device, started) {
        Ok(l) => l,
        Err(e) => {
            // Nobody is waiting if the caller gave up; nothing else to do.
            let _ = ready.send(Err(e));
            return;
        }
    };
    let (weights, tokenizer, info, template) = loaded;
    if ready.send(Ok((info, tokenizer.clone(), template))).is_err() {
        return;
    }
    tracing::info!(model = %name, load_s = started.elapsed().as_secs_f64(), "model ready");
    let meters = Meters::new(&name);
    serve(&weights, &tokenizer, &commands, &stats, &meters);
}

/// This model's generation metrics, looked up once.
struct Meters {
    time_to_first_token: metrics::Histogram,
    inter_token: metrics::Histogram,
    queue_wait: metrics::Histogram,
    prompt_tokens: metrics::Counter,
    generated_tokens: metrics::Counter,
    prompt_rate: metrics::Histogram,
    decode_rate: metrics::Histogram,
    /// stop, length, cancelled, error.
    finished: [metrics::Counter; 4],
    prefix_hits: metrics::Counter,
    prefix_tokens: metrics::Counter,
}

impl Meters {
    fn new(model: &str) -> Self {
        use crate::observe::names as n;
        let m = model.to_string();
        let finished = |reason: &'static str| metrics::counter!(n::SEQUENCES_FINISHED, "model" => m.clone(), "reason" => reason);
        Self {
            time_to_first_token: metrics::histogram!(n::TIME_TO_FIRST_TOKEN, "model" => m.clone()),
            inter_token: metrics::histogram!(n::INTER_TOKEN_LATENCY, "model" => m.clone()),
            queue_wait: metrics::histogram!(n::QUEUE_WAIT, "model" => m.clone()),
            prompt_tokens: metrics::counter!(n::PROMPT_TOKENS, "model" => m.clone()),
            generated_tokens: metrics::counter!(n::GENERATED_TOKENS, "model" => m.clone()),
            prompt_rate: metrics::histogram!(n::PROMPT_TOKENS_PER_SECOND, "model" => m.clone()),
            decode_rate: metrics::histogram!(n::DECODE_TOKENS_PER_SECOND, "model" => m.clone()),
            prefix_hits: metrics::counter!(n::PREFIX_CACHE_HITS, "model" => m.clone()),
            prefix_tokens: metrics::counter!(n::PREFIX_CACHE_REUSED_TOKENS, "model" => m.clone()),
            finished: [
                finished("stop"),
                finished("length"),
                finished("cancelled"),
                finished("error"),
            ],
        }
    }

    /// A sequence ended: its counts, speeds and reason.
    fn ended(&self, seq: &Sequence<'_>, outcome: &Step) {
        let prompt = seq
            .evaluated
            .min(seq.request.prompt.len())
            .saturating_sub(seq.reused);
        self.prompt_tokens.increment(prompt as u64);
        self.generated_tokens.increment(seq.generated as u64);
        if let Some(first) = seq.first_token {
            let prompt_s = first.duration_since(seq.started).as_secs_f64();
            if prompt_s > 0.0 {
                self.prompt_rate.record(prompt as f64 / prompt_s);
            }
            let decode_s = first.elapsed().as_secs_f64();
            if seq.generated > 1 && decode_s > 0.0 {
                self.decode_rate
                    .record((seq.generated - 1) as f64 / decode_s);
            }
        }
        let i = match outcome {
            Step::Finished(FinishReason::Stop) | Step::Continue => 0,
            Step::Finished(FinishReason::Length) => 1,
            Step::Cancelled => 2,
            Step::Failed => 3,
        };
        self.finished[i].increment(1);
    }
}

type Loaded = (Transformer, GgufTokenizer, ModelInfo, ChatTemplate);

fn load(name: &str, path: &Path, device: &Device, started: Instant) -> Result<Loaded, EngineError> {
    let loaded = model::load(path, device)?;
    let tokenizer = vocab::tokenizer_from_gguf(&loaded.file)?;
    let template = vocab::template_from_gguf(&loaded.file, &tokenizer)?;
    let info = ModelInfo {
        name: name.to_string(),
        path: path.to_path_buf(),
        spec: loaded.spec,
        file_size: loaded.file.file_size,
        load_time: started.elapsed(),
        device: format!("{device:?}"),
    };
    Ok((loaded.weights, tokenizer, info, template))
}

/// One request in flight.
struct Sequence<'t> {
    events: mpsc::UnboundedSender<Event>,
    request: GenerateRequest,
    cache: KvCache,
    sampler: Sampler,
    decoder: IncrementalDecoder<'t>,
    stops: StopMatcher,
    /// The JSON object so far, in JSON mode.
    json: Option<JsonPrefix>,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    /// Tokens already in the cache.
    evaluated: usize,
    generated: usize,
    /// Prompt tokens taken from the prefix cache.
    reused: usize,
    queue_time: Duration,
    started: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    /// The closing event, held until the sequence's counters and cache are recorded, so that a
    /// client who has the whole answer also sees it in the metrics and the prefix cache.
    done: Option<Finished>,
}

enum Step {
    Continue,
    Finished(FinishReason),
    Cancelled,
    Failed,
}

fn serve(
    weights: &Transformer,
    tokenizer: &GgufTokenizer,
    commands: &std_mpsc::Receiver<Command>,
    stats: &EngineStats,
    meters: &Meters,
) {
    let mut active: Vec<Sequence<'_>> = Vec::new();
    let mut prefixes = PrefixCache::new(PREFIX_ENTRIES, prefix_cache_bytes());
    // `LLMGENIE_BATCH=0` advances sequences one at a time (for comparisons).
    let batching = std::env::var("LLMGENIE_BATCH").map_or(true, |v| v.trim() != "0");
    let shared_chunk = shared_prefill_chunk();
    // Each token's text, built on the first JSON-mode request.
    let mut vocab: Option<Vec<Box<[u8]>>> = None;
    loop {
        // Block when idle; otherwise take what has arrived without waiting.
        while active.len() < MAX_ACTIVE {
            let cmd = if active.is_empty() {
                match commands.recv() {
                    Ok(c) => c,
                    Err(_) => return,
                }
            } else {
                match commands.try_recv() {
                    Ok(c) => c,
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => return,
                }
            };
            match cmd {
                Command::Shutdown => return,
                Command::Generate {
                    request,
                    events,
                    submitted,
                } => {
                    if request.json && vocab.is_none() {
                        vocab = Some(token_bytes(tokenizer));
                    }
                    meters.queue_wait.record(submitted.elapsed().as_secs_f64());
                    let (mut cache, evaluated) = match prefixes.take(&request.prompt) {
                        Some(hit) => {
                            stats.prefix_hits.fetch_add(1, Ordering::Relaxed);
                            stats
                                .prefix_tokens_reused
                                .fetch_add(hit.reused as u64, Ordering::Relaxed);
                            meters.prefix_hits.increment(1);
                            meters.prefix_tokens.increment(hit.reused as u64);
                            (hit.cache, hit.reused)
                        }
                        None => (weights.new_cache(), 0),
                    };
                    if let Some(m) = request.max_tokens {
                        let context = weights.config().context_length;
                        cache.plan(request.prompt.len().saturating_add(m).min(context));
                    }
                    active.push(Sequence {
                        cache,
                        sampler: Sampler::new(request.params.clone()),
                        decoder: tokenizer.decoder(),
                        stops: StopMatcher::new(&request.stop),
                        json: request.json.then(JsonPrefix::new),
                        tokens: request.prompt.clone(),
                        evaluated,
                        reused: evaluated,
                        generated: 0,
                        queue_time: submitted.elapsed(),
                        started: Instant::now(),
                        first_token: None,
                        last_token: None,
                        done: None,
                        events,
                        request,
                    });
                }
            }
        }
        stats.active.store(active.len(), Ordering::Relaxed);
        // Sequences generating tokens advance together in one batched step.
        let batch: Vec<usize> = (0..active.len())
            .filter(|&i| !active[i].events.is_closed() && decoding(&active[i]))
            .collect();
        let cx = Ctx {
            weights,
            tokenizer,
            vocab: vocab.as_deref(),
            meters,
        };
        let mut batched: Vec<Option<Step>> = (0..active.len()).map(|_| None).collect();
        if batching && batch.len() >= 2 {
            stats.batched_steps.fetch_add(1, Ordering::Relaxed);
            stats
                .batched_tokens
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            let steps = step_batch(cx, &mut active, &batch);
            for (&i, step) in batch.iter().zip(steps) {
                batched[i] = Some(step);
            }
        }
        // While sequences are generating, prompts advance one small chunk per step, and only
        // the oldest waiting prompt does (the others keep their place in line).
        let generating = active.iter().any(|s| decoding(s));
        let mut prompt_turn_taken = false;
        let mut batched = batched.into_iter();
        active.retain_mut(|seq| {
            let done_in_batch = batched.next().flatten();
            let outcome = if let Some(step) = done_in_batch {
                step
            } else if seq.events.is_closed() {
                Step::Cancelled
            } else {
                let chunk = if decoding(seq) || !generating {
                    PREFILL_CHUNK
                } else if prompt_turn_taken {
                    // A prompt waiting for its turn keeps its place.
                    return true;
                } else {
                    prompt_turn_taken = true;
                    shared_chunk
                };
                if seq.evaluated < seq.request.prompt.len() {
                    stats.prompt_chunks.fetch_add(1, Ordering::Relaxed);
                }
                step(cx, seq, chunk).unwrap_or_else(|e| fail(seq, &e))
            };
            let counter = match outcome {
                Step::Continue => return true,
                Step::Finished(_) => &stats.completed,
                Step::Cancelled => {
                    tracing::debug!("client went away; sequence dropped");
                    &stats.cancelled
                }
                Step::Failed => &stats.failed,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            meters.ended(seq, &outcome);
            if !matches!(outcome, Step::Failed) {
                // Keep what was evaluated for a request that continues this one.
                let cache = std::mem::replace(&mut seq.cache, weights.new_cache());
                let held = cache.len().min(seq.tokens.len());
                prefixes.insert(seq.tokens[..held].to_vec(), cache);
            }
            stats.prompt_tokens.fetch_add(
                seq.evaluated
                    .min(seq.request.prompt.len())
                    .saturating_sub(seq.reused) as u64,
                Ordering::Relaxed,
            );
            stats
                .generated_tokens
                .fetch_add(seq.generated as u64, Ordering::Relaxed);
            stats.pending.fetch_sub(1, Ordering::Relaxed);
            if let Some(done) = seq.done.take() {
                // The client may be gone already; the sequence is finished regardless.
                let _ = seq.events.send(Event::Done(done));
            }
            false
        });
        stats.active.store(active.len(), Ordering::Relaxed);
    }
}

/// What a step needs besides the sequence: the model, its tokenizer, every token's bytes (for
/// JSON mode, once built) and the metrics.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    weights: &'a Transformer,
    tokenizer: &'a GgufTokenizer,
    vocab: Option<&'a [Box<[u8]>]>,
    meters: &'a Meters,
}

/// Every token's text as bytes; special tokens are empty (so JSON mode never picks them).
fn token_bytes(tokenizer: &GgufTokenizer) -> Vec<Box<[u8]>> {
    (0..tokenizer.vocab_size() as u32)
        .map(|id| {
            tokenizer
                .decode(&[id], true)
                .map(|s| s.into_bytes().into_boxed_slice())
                .unwrap_or_default()
        })
        .collect()
}

/// Advance one sequence by one prompt chunk (at most `chunk` tokens) or one generated token.
fn step(cx: Ctx<'_>, seq: &mut Sequence<'_>, chunk: usize) -> Result<Step, EngineError> {
    let prompt_len = seq.request.prompt.len();
    let end = if seq.evaluated < prompt_len {
        // A tail shorter than the dense path's minimum joins this chunk instead of taking a
        // step of its own.
        let end = seq.evaluated + chunk;
        if end + model::DENSE_MIN_ROWS > prompt_len {
            prompt_len
        } else {
            end
        }
    } else {
        seq.tokens.len()
    };
    let logits = cx
        .weights
        .forward(&seq.tokens[seq.evaluated..end], &mut seq.cache)?;
    seq.evaluated = end;
    if seq.evaluated < prompt_len {
        return Ok(Step::Continue);
    }
    let logits: Vec<f32> = logits.to_vec1().map_err(model::ModelError::from)?;
    emit(cx, seq, &logits)
}

/// Whether a sequence's next step is one generated token (it can join a batched step).
fn decoding(seq: &Sequence<'_>) -> bool {
    seq.evaluated >= seq.request.prompt.len() && seq.evaluated + 1 == seq.tokens.len()
}

/// Advance the decoding sequences `which` (indices into `active`) by one token in one batched
/// forward pass; returns each one's outcome, in the order of `which`.
fn step_batch(cx: Ctx<'_>, active: &mut [Sequence<'_>], which: &[usize]) -> Vec<Step> {
    let tokens: Vec<u32> = which
        .iter()
        .map(|&i| active[i].tokens[active[i].evaluated])
        .collect();
    let logits = {
        let mut caches: Vec<&mut KvCache> = active
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| which.contains(i))
            .map(|(_, s)| &mut s.cache)
            .collect();
        cx.weights.forward_batch(&tokens, &mut caches)
    };
    let logits = match logits {
        Ok(l) => l,
        Err(e) => return which.iter().map(|&i| fail(&mut active[i], &e)).collect(),
    };
    which
        .iter()
        .enumerate()
        .map(|(row, &i)| {
            let seq = &mut active[i];
            seq.evaluated += 1;
            let row = logits
                .get(row)
                .and_then(|r| r.to_vec1::<f32>())
                .map_err(|e| EngineError::from(model::ModelError::from(e)));
            match row.and_then(|l| emit(cx, seq, &l)) {
                Ok(step) => step,
                Err(e) => fail(seq, &e),
            }
        })
        .collect()
}

/// End a sequence on an error; the client may have left, the sequence ends either way.
fn fail(seq: &mut Sequence<'_>, e: &dyn std::fmt::Display) -> Step {
    tracing::warn!(error = %e, "generation failed");
    let _ = seq.events.send(Event::Error(e.to_string()));
    Step::Failed
}

/// Sample the next token from `logits`, send it, and say whether the sequence goes on.
fn emit(cx: Ctx<'_>, seq: &mut Sequence<'_>, logits: &[f32]) -> Result<Step, EngineError> {
    let Ctx {
        weights,
        tokenizer,
        vocab,
        meters,
    } = cx;
    let sampled = match (&seq.json, vocab) {
        (Some(json), Some(vocab)) => {
            let mut allowed = |id: u32| vocab.get(id as usize).is_some_and(|b| json.accepts(b));
            seq.sampler.sample_masked(logits, &seq.tokens, &mut allowed)
        }
        _ => seq.sampler.sample(logits, &seq.tokens),
    }
    .ok_or_else(|| EngineError::InvalidRequest("no token can continue the answer".into()))?;
    let now = Instant::now();
    match seq.last_token {
        None => {
            seq.first_token = Some(now);
            meters
                .time_to_first_token
                .record((seq.queue_time + now.duration_since(seq.started)).as_secs_f64());
        }
        Some(last) => meters
            .inter_token
            .record(now.duration_since(last).as_secs_f64()),
    }
    seq.last_token = Some(now);
    if tokenizer.stop_ids().contains(&sampled.token) {
        return finish(seq, FinishReason::Stop);
    }
    seq.generated += 1;
    seq.tokens.push(sampled.token);
    let piece = seq.decoder.step(sampled.token)?.unwrap_or_default();
    let (text, stopped) = match seq.stops.push(&piece) {
        StopOutcome::Emit(t) => (t, false),
        StopOutcome::Stop(t) => (t, true),
    };
    let event = Event::Token(TokenEvent {
        id: sampled.token,
        text,
        logprob: sampled.logprob,
        top: sampled.top,
    });
    if seq.events.send(event).is_err() {
        return Ok(Step::Cancelled);
    }
    if let (Some(json), Some(vocab)) = (&mut seq.json, vocab) {
        if let Some(b) = vocab.get(sampled.token as usize) {
            json.extend(b);
        }
        if json.is_complete() {
            return finish(seq, FinishReason::Stop);
        }
    }
    if stopped {
        return finish(seq, FinishReason::Stop);
    }
    let context = weights.config().context_length;
    let limit_hit = seq.request.max_tokens.is_some_and(|m| seq.generated >= m);
    if limit_hit || seq.tokens.len() >= context {
        return finish(seq, FinishReason::Length);
    }
    Ok(Step::Continue)
}

fn finish(seq: &mut Sequence<'_>, reason: FinishReason) -> Result<Step, EngineError> {
    let rest = seq.stops.flush();
    if !rest.is_empty() {
        // Text held back for a stop string that never came is part of the answer.
        let _ = seq.events.send(Event::Token(TokenEvent {
            id: seq.tokens.last().copied().unwrap_or_default(),
            text: rest,
            logprob: 0.0,
            top: Vec::new(),
        }));
    }
    let first = seq.first_token.unwrap_or_else(Instant::now);
    let done = Finished {
        reason,
        prompt_tokens: seq.request.prompt.len(),
        cached_tokens: seq.reused,
        generated_tokens: seq.generated,
        queue_time: seq.queue_time,
        prompt_time: first.duration_since(seq.started),
        generation_time: first.elapsed(),
    };
    // Sent once the sequence's counters and cache are recorded (see `serve`).
    seq.done = Some(done);
    Ok(Step::Finished(reason))
}
