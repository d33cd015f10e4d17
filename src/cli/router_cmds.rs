//! `train classifier`, `eval classifier`, `eval validator`, `classify`.

use std::path::Path;

use anyhow::Result;
use llmgenie::router::classifier::{evaluate, read_examples, Classifier, CLASSES};
use llmgenie::router::validator;

use super::{EvalWhat, TrainWhat};

fn load(weights: Option<&Path>) -> Result<Classifier> {
    Ok(match weights {
        Some(p) => Classifier::load(p)?,
        None => Classifier::builtin()?,
    })
}

pub fn train(what: TrainWhat) -> Result<()> {
    let TrainWhat::Classifier { data, out, epochs } = what;
    let examples = read_examples(&data)?;
    let started = std::time::Instant::now();
    let model = Classifier::train(&examples, epochs);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    model.save(&out)?;
    eprintln!(
        "trained on {} prompts in {:.2}s (calibrated temperature {:.2}); weights in {}",
        examples.len(),
        started.elapsed().as_secs_f64(),
        model.temperature(),
        out.display()
    );
    Ok(())
}

pub fn eval(what: EvalWhat) -> Result<()> {
    match what {
        EvalWhat::Classifier { data, weights } => eval_classifier(&data, weights.as_deref()),
        EvalWhat::Validator { data } => eval_validator(&data),
    }
}

fn eval_classifier(data: &Path, weights: Option<&Path>) -> Result<()> {
    let model = load(weights)?;
    let examples = read_examples(data)?;
    let e = evaluate(&model, &examples);
    println!("{:<10} {:>9} {:>9}", "class", "precision", "recall");
    for (i, c) in CLASSES.iter().enumerate() {
        println!("{c:<10} {:>9.3} {:>9.3}", e.precision[i], e.recall[i]);
    }
    println!("\nconfusion (rows: true class, columns: predicted, in the order above)");
    for (i, row) in e.confusion.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(|n| format!("{n:>4}")).collect();
        println!("{:<10} {}", CLASSES[i], cells.join(""));
    }
    println!("\ncalibration (confidence bin: predictions, mean confidence, accuracy)");
    for (i, (n, conf, acc)) in e.reliability.iter().enumerate().filter(|(_, b)| b.0 > 0) {
        println!(
            "[{:.1}, {:.1}) {n:>5} {conf:>8.3} {acc:>8.3}",
            i as f64 / 10.0,
            (i + 1) as f64 / 10.0
        );
    }
    println!(
        "{}",
        serde_json::json!({"accuracy": e.accuracy, "n": e.n, "calibration_error": e.calibration_error,
            "precision": e.precision, "recall": e.recall})
    );
    Ok(())
}

fn eval_validator(data: &Path) -> Result<()> {
    let classifier = Classifier::builtin()?;
    let lines = validator::read_labelled(data)?;
    let e = validator::evaluate(&lines, &|p: &str| classifier.classify(p).task);
    println!("{:<16} {:>6}", "reason", "fired");
    for (reason, n) in &e.fired {
        println!("{reason:<16} {n:>6}");
    }
    println!(
        "\n{:<10} {:>4} {:>11} {:>10} {:>15}",
        "class", "n", "acceptable", "escalated", "kept and good"
    );
    for (task, [tp, fp, fn_, tn]) in &e.by_task {
        let n = tp + fp + fn_ + tn;
        let kept = fn_ + tn;
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        println!(
            "{task:<10} {n:>4} {:>11.2} {:>10.2} {:>15.2}",
            ratio(fp + tn, n),
            ratio(tp + fp, n),
            ratio(*tn, kept)
        );
    }
    println!(
        "\nescalate: {} true positives, {} false positives, {} false negatives, {} true negatives",
        e.tp, e.fp, e.fn_, e.tn
    );
    println!(
        "{}",
        serde_json::json!({"precision": e.precision, "recall": e.recall, "n": e.n,
            "accuracy": e.accuracy, "unacceptable": e.tp + e.fn_})
    );
    Ok(())
}

pub fn classify(text: &str, weights: Option<&Path>) -> Result<()> {
    let model = load(weights)?;
    let p = model.classify(text);
    println!(
        "{}",
        serde_json::json!({"task": p.task, "confidence": p.confidence})
    );
    Ok(())
}
