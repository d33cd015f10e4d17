//! The task classifier: multinomial logistic regression over hashed word and character n-grams.
//!
//! Features: lower-cased word unigrams and bigrams, and character 3- to 5-grams inside words
//! (with boundary marks), hashed (FNV-1a) into `BUCKETS` buckets; counts are L2-normalised.
//! Training is plain SGD with L2 regularisation over a labelled JSONL set; the weights are saved
//! as little-endian f32 (classes x buckets, then the biases). Classifying one prompt touches only
//! its own features, a few microseconds.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::jsonl::{self, JsonlError};

/// The classes, in the order of the weight rows.
pub const CLASSES: [&str; 8] = [
    "code",
    "summarize",
    "extract",
    "qa",
    "math",
    "creative",
    "translate",
    "chat",
];

/// Hash buckets per class (2^16: 2 MiB of weights for 8 classes).
pub const BUCKETS: usize = 1 << 16;

/// Errors of loading, training or evaluating.
#[derive(Debug, thiserror::Error)]
pub enum ClassifierError {
    #[error(transparent)]
    Data(#[from] JsonlError),
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("weights file {0} has the wrong size; retrain with `llmgenie train classifier`")]
    BadWeights(String),
}

/// One labelled prompt.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Example {
    pub prompt: String,
    pub task: String,
}

/// A prediction: the class and the model's probability for it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub task: &'static str,
    pub confidence: f32,
}

/// The trained model.
pub struct Classifier {
    /// `BUCKETS * CLASSES.len()` weights, bucket-major in memory (one feature's weights for all
    /// classes share a cache line); class-major in the file.
    weights: Vec<f32>,
    bias: [f32; CLASSES.len()],
    /// Softmax temperature fitted on held-out folds, so that confidences are calibrated.
    temperature: f32,
}

/// The weights shipped in `models/classifier/weights.bin`, built into the binary so that a
/// copied binary routes without the repository.
static BUILTIN: &[u8] = include_bytes!("../../models/classifier/weights.bin");

/// How much of a long prompt is read: its head and its tail (the instruction is usually at one
/// end of a pasted document), so that classifying costs the same for any length.
const HEAD_CHARS: usize = 1024;
const TAIL_CHARS: usize = 512;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

fn fnv_bytes(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// The hash state after a tag part (`w` words, `b` word pairs, `c` character n-grams).
fn seed(tag: &[u8]) -> u64 {
    (fnv_bytes(FNV_OFFSET, tag) ^ 0xff).wrapping_mul(FNV_PRIME)
}

/// The bucket of a hash that ends a part.
fn bucket(h: u64) -> usize {
    ((h ^ 0xff).wrapping_mul(FNV_PRIME) as usize) % BUCKETS
}

/// The part of a prompt that is classified.
fn excerpt(text: &str) -> std::borrow::Cow<'_, str> {
    let n = text.chars().count();
    if n <= HEAD_CHARS + TAIL_CHARS {
        return text.into();
    }
    let head: String = text.chars().take(HEAD_CHARS).collect();
    let tail: String = text.chars().skip(n - TAIL_CHARS).collect();
    format!("{head}\n{tail}").into()
}

/// Sparse, L2-normalised feature vector of a prompt: (bucket, value), buckets unique.
pub fn features(text: &str) -> Vec<(usize, f32)> {
    let lower = excerpt(text).to_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    let mut raw: Vec<(usize, f32)> = Vec::with_capacity(words.len() * 16);
    let word_seed = seed(b"w");
    let pair_seed = seed(b"b");
    let char_seed = seed(b"c");
    let mut chars: Vec<char> = Vec::new();
    let mut buf = [0u8; 4];
    for (i, w) in words.iter().enumerate() {
        raw.push((bucket(fnv_bytes(word_seed, w.as_bytes())), 1.0));
        if let Some(next) = words.get(i + 1) {
            let h = fnv_bytes(pair_seed, w.as_bytes());
            let h = fnv_bytes((h ^ 0xff).wrapping_mul(FNV_PRIME), next.as_bytes());
            raw.push((bucket(h), 1.0));
        }
        chars.clear();
        chars.push('^');
        chars.extend(w.chars());
        chars.push('$');
        // Character 3- to 5-grams: one running hash per start, emitted at each length.
        for start in 0..chars.len() {
            let mut h = char_seed;
            for (len, c) in chars[start..].iter().take(5).enumerate() {
                h = fnv_bytes(h, c.encode_utf8(&mut buf).as_bytes());
                if len >= 2 {
                    raw.push((bucket(h), 0.5));
                }
            }
        }
    }
    raw.sort_unstable_by_key(|(k, _)| *k);
    let mut out: Vec<(usize, f32)> = Vec::with_capacity(raw.len());
    for (k, v) in raw {
        match out.last_mut() {
            Some((last, acc)) if *last == k => *acc += v,
            _ => out.push((k, v)),
        }
    }
    let norm = out.iter().map(|(_, v)| v * v).sum::<f32>().sqrt().max(1e-6);
    for (_, v) in &mut out {
        *v /= norm;
    }
    out
}

fn softmax(z: &mut [f32]) {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in z.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in z.iter_mut() {
        *v /= sum;
    }
}

/// Read a JSONL file of examples.
///
/// # Errors
/// The file cannot be read, a line is not an example, or a label is unknown.
pub fn read_examples(path: &Path) -> Result<Vec<Example>, ClassifierError> {
    Ok(jsonl::read(path, |ex: &Example| {
        if CLASSES.contains(&ex.task.as_str()) {
            Ok(())
        } else {
            Err(format!(
                "unknown task '{}'; classes: {}",
                ex.task,
                CLASSES.join(", ")
            ))
        }
    })?)
}

impl Classifier {
    fn logits(&self, feats: &[(usize, f32)]) -> [f32; CLASSES.len()] {
        const K: usize = CLASSES.len();
        let mut z = self.bias;
        for &(k, v) in feats {
            let w = &self.weights[k * K..(k + 1) * K];
            for (zc, wc) in z.iter_mut().zip(w) {
                *zc += wc * v;
            }
        }
        z
    }

    /// Uncalibrated probabilities (training uses these).
    fn scores(&self, feats: &[(usize, f32)]) -> [f32; CLASSES.len()] {
        let mut z = self.logits(feats);
        softmax(&mut z);
        z
    }

    /// Calibrated probabilities of each class, in `CLASSES` order.
    pub fn probabilities(&self, text: &str) -> [f32; CLASSES.len()] {
        let mut z = self.logits(&features(text));
        for v in &mut z {
            *v /= self.temperature;
        }
        softmax(&mut z);
        z
    }

    pub fn temperature(&self) -> f32 {
        self.temperature
    }

    /// The weights built into the binary.
    ///
    /// # Errors
    /// Never for a binary built from a consistent tree; kept fallible for the type.
    pub fn builtin() -> Result<Self, ClassifierError> {
        Self::from_bytes(BUILTIN, "built-in classifier weights")
    }

    pub fn classify(&self, text: &str) -> Prediction {
        let p = self.probabilities(text);
        let (best, conf) =
            p.iter()
                .enumerate()
                .fold((0, f32::MIN), |a, (i, &v)| if v > a.1 { (i, v) } else { a });
        Prediction {
            task: CLASSES[best],
            confidence: conf,
        }
    }

    /// Train on `examples` with `epochs` passes of SGD (shuffled with a fixed seed), then fit
    /// the softmax temperature on 5-fold out-of-fold predictions (temperature scaling), so that
    /// a confidence of 0.8 is right about 80% of the time on prompts the model did not see.
    pub fn train(examples: &[Example], epochs: usize) -> Self {
        let mut model = Self::train_raw(examples, epochs);
        model.temperature = Self::fit_temperature(examples, epochs);
        model
    }

    /// The temperature minimising the negative log-likelihood of out-of-fold predictions.
    fn fit_temperature(examples: &[Example], epochs: usize) -> f32 {
        const FOLDS: usize = 5;
        if examples.len() < FOLDS * CLASSES.len() {
            return 1.0;
        }
        let mut held: Vec<([f32; CLASSES.len()], usize)> = Vec::new();
        for fold in 0..FOLDS {
            let train: Vec<Example> = examples
                .iter()
                .enumerate()
                .filter(|(i, _)| i % FOLDS != fold)
                .map(|(_, e)| e.clone())
                .collect();
            let m = Self::train_raw(&train, epochs);
            for e in examples.iter().skip(fold).step_by(FOLDS) {
                if let Some(y) = CLASSES.iter().position(|c| *c == e.task) {
                    held.push((m.logits(&features(&e.prompt)), y));
                }
            }
        }
        let nll = |t: f32| -> f64 {
            held.iter()
                .map(|(z, y)| {
                    let mut p = z.map(|v| v / t);
                    softmax(&mut p);
                    -f64::from(p[*y].max(1e-12)).ln()
                })
                .sum()
        };
        (1..=80)
            .map(|i| i as f32 * 0.05)
            .min_by(|a, b| nll(*a).total_cmp(&nll(*b)))
            .unwrap_or(1.0)
    }

    fn train_raw(examples: &[Example], epochs: usize) -> Self {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let data: Vec<(Vec<(usize, f32)>, usize)> = examples
            .iter()
            .filter_map(|e| {
                let y = CLASSES.iter().position(|c| *c == e.task)?;
                Some((features(&e.prompt), y))
            })
            .collect();
        let mut model = Self {
            weights: vec![0.0; CLASSES.len() * BUCKETS],
            bias: [0.0; CLASSES.len()],
            temperature: 1.0,
        };
        let mut order: Vec<usize> = (0..data.len()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let l2 = 1e-5f32;
        for epoch in 0..epochs {
            order.shuffle(&mut rng);
            let lr = 0.5 / (1.0 + epoch as f32 * 0.2);
            for &i in &order {
                let (x, y) = &data[i];
                let p = model.scores(x);
                for (c, pc) in p.iter().enumerate() {
                    let g = pc - if c == *y { 1.0 } else { 0.0 };
                    model.bias[c] -= lr * g;
                    for &(k, v) in x {
                        let w = &mut model.weights[k * CLASSES.len() + c];
                        *w -= lr * (g * v + l2 * *w);
                    }
                }
            }
        }
        model
    }

    /// Save as little-endian f32: the weights, the biases, then the temperature.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn save(&self, path: &Path) -> Result<(), ClassifierError> {
        let mut bytes = Vec::with_capacity((self.weights.len() + CLASSES.len() + 1) * 4);
        let class_major = (0..CLASSES.len())
            .flat_map(|c| (0..BUCKETS).map(move |k| k * CLASSES.len() + c))
            .map(|i| &self.weights[i]);
        for v in class_major
            .chain(self.bias.iter())
            .chain(std::iter::once(&self.temperature))
        {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        std::fs::write(path, bytes).map_err(|source| ClassifierError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Load weights saved by [`Classifier::save`].
    ///
    /// # Errors
    /// The file cannot be read or has the wrong size.
    pub fn load(path: &Path) -> Result<Self, ClassifierError> {
        let p = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| ClassifierError::Io {
            path: p.clone(),
            source,
        })?;
        Self::from_bytes(&bytes, &p)
    }

    /// Parse saved weights; a file without a temperature (older format) gets 1.
    ///
    /// # Errors
    /// The bytes have the wrong size or the temperature is not positive.
    pub fn from_bytes(bytes: &[u8], name: &str) -> Result<Self, ClassifierError> {
        let n = CLASSES.len() * BUCKETS;
        let floats: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let temperature = match floats.len() {
            len if len == n + CLASSES.len() && bytes.len().is_multiple_of(4) => 1.0,
            len if len == n + CLASSES.len() + 1 && bytes.len().is_multiple_of(4) => floats[len - 1],
            _ => return Err(ClassifierError::BadWeights(name.into())),
        };
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(ClassifierError::BadWeights(name.into()));
        }
        let mut bias = [0.0; CLASSES.len()];
        bias.copy_from_slice(&floats[n..n + CLASSES.len()]);
        Ok(Self {
            weights: (0..n)
                .map(|i| floats[(i % CLASSES.len()) * BUCKETS + i / CLASSES.len()])
                .collect(),
            bias,
            temperature,
        })
    }
}

/// Per-class precision and recall, the confusion matrix and the accuracy on labelled examples.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub n: usize,
    pub accuracy: f64,
    /// `confusion[true][predicted]`, in `CLASSES` order.
    pub confusion: Vec<Vec<usize>>,
    pub precision: Vec<f64>,
    pub recall: Vec<f64>,
    /// Expected calibration error over 10 confidence bins: the mean gap, weighted by bin size,
    /// between the confidence and the accuracy of the predictions in the bin.
    pub calibration_error: f64,
    /// Per bin of confidence (`[0.0, 0.1)`, ...): predictions, mean confidence, accuracy.
    pub reliability: Vec<(usize, f64, f64)>,
}

pub fn evaluate(model: &Classifier, examples: &[Example]) -> Evaluation {
    let k = CLASSES.len();
    let mut confusion = vec![vec![0usize; k]; k];
    // Per bin: count, summed confidence, correct.
    let mut bins = [(0usize, 0f64, 0usize); 10];
    for e in examples {
        let Some(t) = CLASSES.iter().position(|c| *c == e.task) else {
            continue;
        };
        let p = model.classify(&e.prompt);
        let pi = CLASSES.iter().position(|c| *c == p.task).unwrap_or(0);
        confusion[t][pi] += 1;
        let b = &mut bins[((p.confidence * 10.0) as usize).min(9)];
        b.0 += 1;
        b.1 += f64::from(p.confidence);
        b.2 += usize::from(t == pi);
    }
    let n: usize = confusion.iter().flatten().sum();
    let correct: usize = (0..k).map(|i| confusion[i][i]).sum();
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Evaluation {
        n,
        accuracy: ratio(correct, n),
        precision: (0..k)
            .map(|j| ratio(confusion[j][j], (0..k).map(|i| confusion[i][j]).sum()))
            .collect(),
        recall: (0..k)
            .map(|i| ratio(confusion[i][i], confusion[i].iter().sum()))
            .collect(),
        confusion,
        calibration_error: bins
            .iter()
            .filter(|b| b.0 > 0)
            .map(|b| (b.1 / b.0 as f64 - ratio(b.2, b.0)).abs() * ratio(b.0, n))
            .sum(),
        reliability: bins
            .iter()
            .map(|b| {
                let mean = if b.0 == 0 { 0.0 } else { b.1 / b.0 as f64 };
                (b.0, mean, ratio(b.2, b.0))
            })
            .collect(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ex(p: &str, t: &str) -> Example {
        Example {
            prompt: p.into(),
            task: t.into(),
        }
    }

    #[test]
    fn features_are_normalised_and_deterministic() {
        let f = features("Write a Python function");
        let norm: f32 = f.iter().map(|(_, v)| v * v).sum();
        assert!((norm - 1.0).abs() < 1e-4);
        assert_eq!(f, features("write a python FUNCTION"));
        assert!(features("").is_empty());
    }

    #[test]
    fn learns_a_toy_problem_and_round_trips_its_weights() {
        let data = vec![
            ex("write a python function to sort", "code"),
            ex("fix this rust compile error", "code"),
            ex("what is 12 times 7", "math"),
            ex("solve 3x + 5 = 20", "math"),
            ex("hello how are you", "chat"),
            ex("thanks a lot!", "chat"),
        ];
        let m = Classifier::train(&data, 20);
        assert_eq!(m.classify("write a function in python").task, "code");
        assert_eq!(m.classify("what is 8 times 9").task, "math");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.bin");
        m.save(&p).unwrap();
        let back = Classifier::load(&p).unwrap();
        assert_eq!(
            back.classify("hello there").task,
            m.classify("hello there").task
        );
        std::fs::write(&p, b"short").unwrap();
        assert!(matches!(
            Classifier::load(&p),
            Err(ClassifierError::BadWeights(_))
        ));
        let e = evaluate(&m, &data);
        assert_eq!(e.n, 6);
        assert!(e.accuracy > 0.99);
    }
}
