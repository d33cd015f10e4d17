//! Loading real and damaged files through the whole stack.

use candle_core::Device;
use llmgenie::engine::Engine;
use llmgenie::model;

use crate::util::{model_path, GEMMA3, SMOLLM2};

#[test]
fn both_test_models_load_with_their_specs() {
    let s = model::load(&model_path(SMOLLM2), &Device::Cpu).unwrap();
    assert_eq!(s.spec.architecture.to_string(), "llama");
    assert_eq!(s.spec.block_count, 30);
    let g = model::load(&model_path(GEMMA3), &Device::Cpu).unwrap();
    assert_eq!(g.spec.architecture.to_string(), "gemma3");
    assert!(g.spec.sliding_window.is_some());
}

#[test]
fn a_damaged_file_is_an_error_for_the_engine_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(model_path(SMOLLM2)).unwrap();
    bytes.truncate(bytes.len() - 1000);
    let p = dir.path().join("cut.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let err = Engine::start("cut", &p, Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("exceeds file size") || err.contains("past the end"),
        "{err}"
    );
}
