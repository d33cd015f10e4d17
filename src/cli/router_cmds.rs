//! `train classifier`, `eval classifier`, `classify`.

use std::path::Path;

use anyhow::Result;
use llmgenie::router::classifier::{evaluate, read_examples, Classifier, CLASSES};

use super::{EvalWhat, TrainWhat};

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
        "trained on {} prompts in {:.2}s; weights in {}",
        examples.len(),
        started.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}

pub fn eval(what: EvalWhat) -> Result<()> {
    let EvalWhat::Classifier { data, weights } = what;
    let model = Classifier::load(&weights)?;
    let examples = read_examples(&data)?;
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
    println!(
        "{}",
        serde_json::json!({"accuracy": e.accuracy, "n": e.n, "precision": e.precision, "recall": e.recall})
    );
    Ok(())
}

pub fn classify(text: &str, weights: &Path) -> Result<()> {
    let model = Classifier::load(weights)?;
    let p = model.classify(text);
    println!(
        "{}",
        serde_json::json!({"task": p.task, "confidence": p.confidence})
    );
    Ok(())
}
