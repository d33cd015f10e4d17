//! Shared helpers: the real test models and the llama.cpp reference vectors.

use std::path::PathBuf;

use serde::Deserialize;

pub mod fake_claude;
pub mod http;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A test model's path. The models are fetched by `scripts/fetch_models` (CI does this first);
/// a missing model is a test failure with instructions, never a silent skip.
pub fn model_path(file: &str) -> PathBuf {
    let dir = std::env::var_os("LLMGENIE_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models"));
    let p = dir.join(file);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch_models first",
        p.display()
    );
    p
}

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";

/// A prompt both test models answer at length whatever the float noise: a list to continue
/// ("101, 102, ..."), for tests that need a stream still running when they act. (An open
/// instruction such as "Count to one thousand" gets a short answer from SmolLM2 after small
/// numeric changes.)
pub fn counting_prompt() -> String {
    let numbers: Vec<String> = (1..=100).map(|i| i.to_string()).collect();
    format!(
        "Continue this list up to one thousand: {},",
        numbers.join(", ")
    )
}

#[derive(Debug, Deserialize)]
pub struct Reference {
    pub tokenize: Vec<TokenizeCase>,
    pub chat: Vec<ChatCase>,
}

#[derive(Debug, Deserialize)]
pub struct TokenizeCase {
    pub text: String,
    pub ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Deserialize)]
pub struct ChatCase {
    pub messages: Vec<ChatMessage>,
    pub rendered_prompt: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
}

/// The llama.cpp reference vectors in `tests/data` (a copy of the team's shared test data).
pub fn reference(name: &str) -> Reference {
    let dir = root().join("tests").join("data");
    let path = dir.join(format!("reference_{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad {}: {e}", path.display()))
}

/// llama.cpp's top logits at each step of each reference case's greedy path
/// (`tests/data/logits_NAME.json`): `[case][step]` = `(token, logit)`, best first.
pub fn llama_cpp_logits(name: &str) -> Vec<Vec<Vec<(u32, f32)>>> {
    #[derive(Deserialize)]
    struct Step {
        top: Vec<(u32, f32)>,
    }
    #[derive(Deserialize)]
    struct File {
        cases: Vec<Vec<Step>>,
    }
    let path = root().join(format!("tests/data/logits_{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let f: File =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad {}: {e}", path.display()));
    f.cases
        .into_iter()
        .map(|c| c.into_iter().map(|s| s.top).collect())
        .collect()
}

/// How far llama.cpp's chosen token must lead the next one for another engine's free-running
/// greedy answer to be expected to take it too. Engines add in different orders, and the 8-bit
/// rounding of activations amplifies that: logits here differ from llama.cpp's by about 0.1
/// (tests/reference.rs), so a lead of 0.06 (the code prompt's seventh token) is a coin toss.
pub const SETTLED_LEAD: f32 = 0.5;

/// Reference case `case`'s greedy answer up to its first near-tie: the tokens llama.cpp chose
/// by at least [`SETTLED_LEAD`], and their text (the model's own tokenizer decodes them).
pub struct Settled {
    pub ids: Vec<u32>,
    pub text: String,
}

pub fn settled(name: &str, file: &str, case: usize) -> Settled {
    let r = reference(name);
    let steps = &llama_cpp_logits(name)[case];
    let n = steps
        .iter()
        .take_while(|top| top.len() > 1 && top[0].1 - top[1].1 >= SETTLED_LEAD)
        .count();
    let ids = r.chat[case].greedy_ids[..n].to_vec();
    let gguf = llmgenie::gguf::GgufFile::open(&model_path(file)).unwrap();
    let tok = llmgenie::vocab::tokenizer_from_gguf(&gguf).unwrap();
    let text = tok.decode(&ids, false).unwrap();
    assert!(
        n >= 4,
        "case {case} of {name} is settled for {n} tokens only"
    );
    Settled { ids, text }
}
