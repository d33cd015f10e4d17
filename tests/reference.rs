//! Correctness against llama.cpp: tokenization, chat rendering and greedy decoding, on both
//! test models (reference vectors in tests/data, made with llama.cpp through llama-cpp-python).

use candle_core::Device;
use llmgenie::chat::Message;
use llmgenie::model;
use llmgenie::vocab;

use crate::util::{model_path, reference, GEMMA3, SMOLLM2};

fn messages(case: &crate::util::ChatCase) -> Vec<Message> {
    case.messages
        .iter()
        .map(|m| Message {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect()
}

fn check_tokenizer(file: &str, name: &str) {
    let gguf = llmgenie::gguf::GgufFile::open(&model_path(file)).unwrap();
    let tok = vocab::tokenizer_from_gguf(&gguf).unwrap();
    let template = vocab::template_from_gguf(&gguf, &tok).unwrap();
    let r = reference(name);
    for case in &r.tokenize {
        let ids = tok.encode(&case.text, false).unwrap();
        assert_eq!(ids, case.ids, "{name}: tokenizing {:?}", case.text);
        assert_eq!(tok.decode(&ids, false).unwrap(), case.text, "{name}: round trip");
    }
    for case in &r.chat {
        let rendered = template.render(&messages(case), true).unwrap();
        assert_eq!(rendered, case.rendered_prompt, "{name}: rendering");
        let ids = tok.encode_prompt(&rendered).unwrap();
        assert_eq!(ids, case.prompt_ids, "{name}: prompt ids of {rendered:?}");
    }
}

#[test]
fn smollm2_tokenizer_and_template_match_llama_cpp() {
    check_tokenizer(SMOLLM2, "smollm2");
}

#[test]
fn gemma3_tokenizer_and_template_match_llama_cpp() {
    check_tokenizer(GEMMA3, "gemma3");
}

/// Teacher-forced comparison: feed the reference tokens one by one and require that each is our
/// greedy choice, or, where two logits are nearly tied, that the reference token's logit is
/// within `tie` of our best. Also runs free greedy decoding and reports where it parts.
fn check_greedy(file: &str, name: &str, tie: f32) {
    let loaded = model::load(&model_path(file), &Device::Cpu).unwrap();
    let r = reference(name);
    let mut near_ties = 0;
    for (ci, case) in r.chat.iter().enumerate() {
        let mut cache = loaded.weights.new_cache();
        let mut logits: Vec<f32> = loaded
            .weights
            .forward(&case.prompt_ids, &mut cache)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (step, &want) in case.greedy_ids.iter().enumerate() {
            let (best, best_logit) = logits
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |acc, (i, &l)| if l > acc.1 { (i, l) } else { acc });
            if best as u32 != want {
                let gap = best_logit - logits[want as usize];
                assert!(
                    gap <= tie,
                    "{name} case {ci} step {step}: llama.cpp chose {want}, we chose {best} (logit gap {gap:.4} > {tie})"
                );
                near_ties += 1;
            }
            logits = loaded.weights.forward(&[want], &mut cache).unwrap().to_vec1().unwrap();
        }
    }
    // Near-ties are allowed but must stay rare.
    let total: usize = r.chat.iter().map(|c| c.greedy_ids.len()).sum();
    assert!(near_ties * 20 <= total, "{name}: {near_ties} near-ties in {total} steps");
}

#[test]
fn smollm2_greedy_matches_llama_cpp() {
    check_greedy(SMOLLM2, "smollm2", 0.05);
}

#[test]
fn gemma3_greedy_matches_llama_cpp() {
    check_greedy(GEMMA3, "gemma3", 0.05);
}
