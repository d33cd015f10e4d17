//! The router's per-request costs: classifying a prompt, planning its route, and validating an
//! answer. `cargo bench --bench router`; the README quotes the medians.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use llmgenie::router::classifier::Classifier;
use llmgenie::router::policy::RouterConfig;
use llmgenie::router::validator::{validate, Expectations, Thresholds};

const SHORT: &str = "What is the capital of Australia?";

fn long_prompt() -> String {
    let code = "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * 2).collect();\n    println!(\"{:?}\", v);\n}\n";
    format!(
        "Why does this Rust program not compile? Explain the error and fix it.\n\n{}",
        code.repeat(20)
    )
}

fn bench(c: &mut Criterion) {
    let model = match Classifier::builtin() {
        Ok(m) => m,
        Err(e) => panic!("built-in weights: {e}"),
    };
    let long = long_prompt();
    c.bench_function("classify short prompt (33 B)", |b| {
        b.iter(|| model.classify(black_box(SHORT)))
    });
    c.bench_function(&format!("classify long prompt ({} B)", long.len()), |b| {
        b.iter(|| model.classify(black_box(&long)))
    });
    let policy = RouterConfig::default();
    c.bench_function("classify and plan short prompt", |b| {
        b.iter(|| policy.plan(&model.classify(black_box(SHORT))))
    });
    let answer = "Here is a function that adds two numbers:\n```python\ndef add(a, b):\n    return a + b\n```\nIt returns the sum of a and b. ".repeat(4);
    let logprobs = vec![-0.4f32; 200];
    let expect = Expectations::for_task("Write a Python function add(a, b).", "code", false);
    let t = Thresholds::default();
    c.bench_function("validate a 200-token answer", |b| {
        b.iter(|| validate(black_box(&answer), &logprobs, false, &expect, &t))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
