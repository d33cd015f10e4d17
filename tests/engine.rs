//! The resident-model thread: streaming events, stop conditions, seeds, cancellation.

use std::time::Duration;

use candle_core::Device;
use llmgenie::chat::Message;
use llmgenie::engine::{
    Engine, EngineError, EngineStats, Event, FinishReason, Finished, GenerateRequest,
};
use llmgenie::sampler::SamplingParams;

use crate::util::{counting_prompt, model_path, reference, settled, GEMMA3, SMOLLM2};

fn engine() -> Engine {
    Engine::start("smollm2-135m", &model_path(SMOLLM2), Device::Cpu).unwrap()
}

fn prompt(engine: &Engine, text: &str) -> Vec<u32> {
    let messages = vec![Message {
        role: "user".into(),
        content: text.into(),
    }];
    let rendered = engine.template().render(&messages, true).unwrap();
    engine.tokenizer().encode_prompt(&rendered).unwrap()
}

/// Collect a request's events: token ids, text, and the final event.
fn collect(engine: &Engine, request: GenerateRequest) -> (Vec<u32>, String, Finished) {
    let mut rx = engine.submit(request).unwrap();
    let (mut ids, mut text) = (Vec::new(), String::new());
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token(t) => {
                ids.push(t.id);
                text.push_str(&t.text);
                assert!(
                    t.logprob <= 0.0 && t.logprob.is_finite(),
                    "logprob {}",
                    t.logprob
                );
            }
            Event::Done(d) => return (ids, text, d),
            Event::Error(e) => panic!("generation failed: {e}"),
        }
    }
    panic!("channel closed without a final event");
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt,
        params: SamplingParams::greedy(),
        max_tokens: Some(max_tokens),
        stop: Vec::new(),
        json: false,
    }
}

#[test]
fn greedy_stream_reproduces_the_reference_and_its_text() {
    let e = engine();
    let r = reference("smollm2");
    // The code prompt's answer up to its first near-tie (where engines part by float noise).
    let case = &r.chat[2];
    let want = settled("smollm2", SMOLLM2, 2);
    let n = want.ids.len();
    let (ids, text, done) = collect(&e, greedy(case.prompt_ids.clone(), n));
    assert_eq!(ids, want.ids);
    assert_eq!(text, want.text);
    assert_eq!(done.prompt_tokens, case.prompt_ids.len());
    assert_eq!(done.generated_tokens, n);
    assert_eq!(done.reason, FinishReason::Length);
}

#[test]
fn max_tokens_and_stop_strings_end_generation() {
    let e = engine();
    let p = prompt(&e, "Write a Python function that adds two numbers.");
    let (ids, _, done) = collect(&e, greedy(p.clone(), 5));
    assert_eq!((ids.len(), done.reason), (5, FinishReason::Length));

    // The reference answer starts with "```python\ndef add_numbers": stop at "def".
    let mut req = greedy(p, 40);
    req.stop = vec!["def ".into()];
    let (_, text, done) = collect(&e, req);
    assert_eq!(done.reason, FinishReason::Stop);
    assert_eq!(text, "```python\n");
}

#[test]
fn same_seed_same_answer() {
    let e = engine();
    let p = prompt(&e, "Tell me a story about a cat.");
    let sampled = |seed| {
        let req = GenerateRequest {
            prompt: p.clone(),
            params: SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                ..SamplingParams::default()
            },
            max_tokens: Some(24),
            stop: Vec::new(),
            json: false,
        };
        collect(&e, req).0
    };
    let a = sampled(42);
    assert_eq!(a, sampled(42));
    assert_ne!(a, sampled(43));
}

#[test]
fn concurrent_requests_each_get_their_own_answer() {
    concurrent_answers_match_single_ones(&engine(), "smollm2");
}

/// One batched decode step against single-token steps from the same caches. SmolLM2's Q4_1
/// matmuls compute each row the same way for one row or several: exact. So do all of Gemma's
/// where the packed kernel runs (its k-quants included); elsewhere its k-quant matmuls take
/// candle's multi-row kernels, which round differently (as llama.cpp's results also depend on
/// the batch size): the same best token, logits within a small margin.
#[test]
fn a_batched_step_computes_what_single_steps_compute() {
    use llmgenie::model::{self, KvCache};
    let gemma = if model::packed_kernel() { 0.0 } else { 1.5 };
    for (file, name, tolerance) in [(SMOLLM2, "smollm2", 0.0f32), (GEMMA3, "gemma3", gemma)] {
        let loaded = model::load(&model_path(file), &Device::Cpu).unwrap();
        let w = &loaded.weights;
        let r = reference(name);
        let argmax = |v: &[f32]| {
            v.iter()
                .enumerate()
                .fold((0, f32::MIN), |a, (i, &x)| if x > a.1 { (i, x) } else { a })
                .0
        };
        let (mut caches, mut tokens, mut single) = (Vec::new(), Vec::new(), Vec::new());
        for case in &r.chat[..3] {
            let mut cache = w.new_cache();
            let logits: Vec<f32> = w
                .forward(&case.prompt_ids, &mut cache)
                .unwrap()
                .to_vec1()
                .unwrap();
            let next = argmax(&logits) as u32;
            let mut alone = cache.copy_prefix(cache.len()).unwrap();
            single.push(
                w.forward(&[next], &mut alone)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
            tokens.push(next);
            caches.push(cache);
        }
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        let batched = w.forward_batch(&tokens, &mut refs).unwrap();
        for (row, want) in single.iter().enumerate() {
            let got: Vec<f32> = batched.get(row).unwrap().to_vec1().unwrap();
            let diff = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff <= tolerance, "{name} row {row}: {diff}");
            assert_eq!(argmax(&got), argmax(want), "{name} row {row}");
        }
        assert!(caches
            .iter()
            .zip(&r.chat)
            .all(|(c, case)| c.len() == case.prompt_ids.len() + 1));
    }
}

/// The reference prompts one at a time, then all at once (decoded in batched steps): each
/// greedy answer must be the same token for token.
fn concurrent_answers_match_single_ones(e: &Engine, name: &str) {
    // (SmolLM2: batched rows are computed exactly as single ones; see the test below.)
    let r = reference(name);
    let alone: Vec<Vec<u32>> = r.chat[..3]
        .iter()
        .map(|c| collect(e, greedy(c.prompt_ids.clone(), 12)).0)
        .collect();
    // All three at once: decoded together; each must get exactly its own answer.
    let receivers: Vec<_> = r.chat[..3]
        .iter()
        .map(|c| e.submit(greedy(c.prompt_ids.clone(), 12)).unwrap())
        .collect();
    for (mut rx, expected) in receivers.into_iter().zip(&alone) {
        let mut ids = Vec::new();
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                Event::Token(t) => ids.push(t.id),
                Event::Done(_) => break,
                Event::Error(err) => panic!("{err}"),
            }
        }
        assert_eq!(&ids, expected, "batched sequences must not mix");
    }
    assert_ne!(alone[0], alone[1]);
    assert!(
        EngineStats::get(&e.stats().batched_steps) > 0,
        "no batched step ran"
    );
}

/// A prompt that arrives while another sequence is generating is read a small chunk per step,
/// between that sequence's steps: it takes several passes, and the running stream keeps
/// getting tokens until the new prompt's answer begins (read in one pass, the running stream
/// would get one or two).
#[test]
fn a_prompt_arriving_during_generation_is_read_between_steps() {
    let e = engine();
    // A stream that goes on for hundreds of tokens.
    let mut running = e
        .submit(greedy(prompt(&e, &counting_prompt()), 1000))
        .unwrap();
    assert!(matches!(running.blocking_recv(), Some(Event::Token(_))));
    let chunks_before = EngineStats::get(&e.stats().prompt_chunks);
    let long = prompt(
        &e,
        &"The weather was mild and the market was busy that morning. ".repeat(40),
    );
    let n = long.len();
    assert!(n > 400, "{n} prompt tokens");
    let (ids, _, done) = collect(&e, greedy(long, 1));
    assert_eq!((ids.len(), done.prompt_tokens), (1, n));
    // Chunks of 64 (the default), the last one taking a short tail with it.
    let chunks = EngineStats::get(&e.stats().prompt_chunks) - chunks_before;
    assert!(chunks >= (n / 64) as u64, "{n} tokens in {chunks} passes");
    let mut meanwhile = 0;
    while let Ok(ev) = running.try_recv() {
        if matches!(ev, Event::Token(_)) {
            meanwhile += 1;
        }
    }
    assert!(
        meanwhile as u64 >= chunks - 1,
        "{meanwhile} tokens while the prompt took {chunks} passes"
    );
}

#[test]
fn dropping_the_receiver_frees_the_sequence() {
    let e = engine();
    let p = prompt(&e, "Count from one to one thousand.");
    let mut rx = e.submit(greedy(p.clone(), 2000)).unwrap();
    // Take one token, then walk away.
    assert!(matches!(rx.blocking_recv(), Some(Event::Token(_))));
    drop(rx);
    // The thread notices before its next token and frees the sequence.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while EngineStats::get(&e.stats().cancelled) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "sequence was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(EngineStats::get(&e.stats().generated_tokens) < 100);
    assert_eq!(
        e.stats().pending.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let (ids, _, _) = collect(&e, greedy(p, 3));
    assert_eq!(ids.len(), 3);
    // Counters are updated right after the final event is sent.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while EngineStats::get(&e.stats().completed) != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "completed count never reached 1"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(EngineStats::get(&e.stats().cancelled), 1);
}

#[test]
fn bad_requests_are_rejected_before_queueing() {
    let e = engine();
    assert!(matches!(
        e.submit(greedy(Vec::new(), 1)),
        Err(EngineError::EmptyPrompt)
    ));
    let context = e.info().spec.context_length;
    let err = e.submit(greedy(vec![1; context + 5], 1)).unwrap_err();
    assert!(matches!(err, EngineError::PromptTooLong { .. }), "{err}");
    let mut req = greedy(vec![1, 2], 1);
    req.params.temperature = -1.0;
    let err = e.submit(req).unwrap_err().to_string();
    assert!(
        err.contains("temperature must be between 0 and 2, got -1"),
        "{err}"
    );
}

#[test]
fn the_prefix_cache_serves_repeats_and_continued_chats_with_the_same_answers() {
    let e = engine();
    let r = reference("smollm2");
    let hits = |e: &Engine| EngineStats::get(&e.stats().prefix_hits);
    // The same prompt twice: the second run reuses all but its last 16 tokens, same answer.
    let case = &r.chat[2];
    let want = settled("smollm2", SMOLLM2, 2).ids;
    for round in 0..2 {
        let (ids, _, done) = collect(&e, greedy(case.prompt_ids.clone(), want.len()));
        assert_eq!(ids, want, "round {round}");
        let expected_cached = if round == 0 {
            0
        } else {
            case.prompt_ids.len() - llmgenie::model::DENSE_MIN_ROWS
        };
        assert_eq!(done.cached_tokens, expected_cached);
    }
    assert_eq!(hits(&e), 1);

    // A chat that goes on: the second turn starts from the first turn's cache.
    let first = vec![Message {
        role: "user".into(),
        content: "Name three primary colours.".into(),
    }];
    let render = |e: &Engine, m: &[Message]| {
        let text = e.template().render(m, true).unwrap();
        e.tokenizer().encode_prompt(&text).unwrap()
    };
    // (It shares the template's default system prompt with the case above: a partial hit.)
    let (_, answer, done) = collect(&e, greedy(render(&e, &first), 24));
    assert!(done.cached_tokens >= 16);
    let mut second = first.clone();
    second.push(Message {
        role: "assistant".into(),
        content: answer,
    });
    second.push(Message {
        role: "user".into(),
        content: "Which one is the colour of the sky?".into(),
    });
    let prompt = render(&e, &second);
    let before = hits(&e);
    let (warm, _, done) = collect(&e, greedy(prompt.clone(), 16));
    assert_eq!(hits(&e), before + 1);
    assert!(
        done.cached_tokens > prompt.len() / 2,
        "{} of {} reused",
        done.cached_tokens,
        prompt.len()
    );
    // The same second turn on a fresh engine, evaluated from scratch.
    let cold_engine = engine();
    let (cold, _, done) = collect(&cold_engine, greedy(prompt, 16));
    assert_eq!(done.cached_tokens, 0);
    assert_eq!(warm, cold);
}
