//! The quality validator: accept a local answer, or escalate it with the reasons why.
//!
//! Each check is cheap and explainable: empty or near-empty answers, answers cut off by the token
//! limit, repetition loops, unwarranted refusals, invalid JSON where JSON was asked, no code where
//! code was asked, low model confidence from the token log-probabilities, an answer in another
//! writing system than the question, extracted values that are not in the source text, and
//! simple arithmetic answered wrongly (recomputed from the question).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::checks;
use super::jsonl::{self, JsonlError};

/// Why an answer is escalated; `as_str` is the stable label used in headers and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Empty,
    Truncated,
    Repetition,
    Refusal,
    InvalidJson,
    Ungrounded,
    WrongArithmetic,
    NoCode,
    LowConfidence,
    WrongLanguage,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::Truncated => "truncated",
            Self::Repetition => "repetition",
            Self::Refusal => "refusal",
            Self::InvalidJson => "invalid_json",
            Self::Ungrounded => "ungrounded",
            Self::WrongArithmetic => "wrong_arithmetic",
            Self::NoCode => "no_code",
            Self::LowConfidence => "low_confidence",
            Self::WrongLanguage => "wrong_language",
        }
    }
}

/// The verdict on one answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// Empty: accept.
    pub reasons: Vec<Reason>,
    pub mean_logprob: Option<f32>,
    pub min_logprob: Option<f32>,
}

impl Verdict {
    pub fn accept(&self) -> bool {
        self.reasons.is_empty()
    }
}

/// What the validator knows about the request.
#[derive(Debug, Clone, Default)]
pub struct Expectations {
    /// The user's prompt (its last message).
    pub prompt: String,
    /// JSON was asked for (`format`, `response_format`, or the extract class).
    pub json: bool,
    /// Code was asked for (the code class).
    pub code: bool,
    /// Data was to be extracted from the prompt (the extract class): values must come from it.
    pub extract: bool,
    /// A math question: a simple arithmetic one is recomputed and checked.
    pub math: bool,
}

impl Expectations {
    /// What a request of this task class asks for: JSON for `extract` (or when a JSON format
    /// was requested), code for `code`.
    pub fn for_task(prompt: &str, task: &str, json_requested: bool) -> Self {
        Self {
            prompt: prompt.to_string(),
            json: json_requested || task == "extract",
            code: task == "code",
            extract: task == "extract",
            math: task == "math",
        }
    }
}

/// Thresholds; defaults measured on SmolLM2's answers (see README).
#[derive(Debug, Clone)]
pub struct Thresholds {
    /// Answers with fewer non-space characters are "empty".
    pub min_chars: usize,
    /// Escalate when the mean token log-probability is below this.
    pub min_mean_logprob: f32,
    /// Escalate when any token's log-probability is below this.
    pub min_token_logprob: f32,
    /// An n-gram of this many words repeated `repeat_count` times is a loop.
    pub repeat_ngram: usize,
    pub repeat_count: usize,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            min_chars: 2,
            min_mean_logprob: -1.0,
            min_token_logprob: -12.0,
            repeat_ngram: 4,
            repeat_count: 4,
        }
    }
}

/// Phrases of a refusal, lower-case.
const REFUSALS: &[&str] = &[
    "i can't help with",
    "i cannot help with",
    "i can't assist with",
    "i cannot assist with",
    "i'm sorry, but i can't",
    "i am sorry, but i cannot",
    "i'm not able to help",
    "i am unable to",
    "as an ai language model, i cannot",
    "i won't be able to",
];

/// Judge an answer. `logprobs` are the generated tokens' log-probabilities; `truncated` says the
/// token limit ended it.
pub fn validate(
    answer: &str,
    logprobs: &[f32],
    truncated: bool,
    expect: &Expectations,
    t: &Thresholds,
) -> Verdict {
    let mut reasons = Vec::new();
    let trimmed = answer.trim();
    if trimmed.chars().filter(|c| !c.is_whitespace()).count() < t.min_chars {
        reasons.push(Reason::Empty);
    }
    if truncated {
        reasons.push(Reason::Truncated);
    }
    if repeats(trimmed, t.repeat_ngram, t.repeat_count) {
        reasons.push(Reason::Repetition);
    }
    let lower = trimmed.to_lowercase();
    if REFUSALS.iter().any(|r| lower.contains(r)) {
        reasons.push(Reason::Refusal);
    }
    match json_value(trimmed) {
        None if expect.json => reasons.push(Reason::InvalidJson),
        Some(v) if expect.extract && !checks::grounded(&v, &expect.prompt) => {
            reasons.push(Reason::Ungrounded);
        }
        _ => {}
    }
    if expect.math {
        if let Some(v) = checks::arithmetic(&expect.prompt) {
            if !checks::states(trimmed, v) {
                reasons.push(Reason::WrongArithmetic);
            }
        }
    }
    if expect.code && !looks_like_code(trimmed) {
        reasons.push(Reason::NoCode);
    }
    let (mean, min) = if logprobs.is_empty() {
        (None, None)
    } else {
        let mean = logprobs.iter().sum::<f32>() / logprobs.len() as f32;
        let min = logprobs.iter().copied().fold(f32::INFINITY, f32::min);
        (Some(mean), Some(min))
    };
    if mean.is_some_and(|m| m < t.min_mean_logprob) || min.is_some_and(|m| m < t.min_token_logprob)
    {
        reasons.push(Reason::LowConfidence);
    }
    let answer_script = script(trimmed);
    if answer_script != "none" && script(&expect.prompt) != answer_script {
        reasons.push(Reason::WrongLanguage);
    }
    reasons.dedup();
    Verdict {
        reasons,
        mean_logprob: mean,
        min_logprob: min,
    }
}

/// An n-gram of `n` words occurring `count` or more times, or one line repeated `count` times.
fn repeats(text: &str, n: usize, count: usize) -> bool {
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut seen: std::collections::HashMap<&[&str], usize> = std::collections::HashMap::new();
    if n > 0 && words.len() >= n {
        for w in words.windows(n) {
            let c = seen.entry(w).or_default();
            *c += 1;
            if *c >= count {
                return true;
            }
        }
    }
    let mut lines: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for l in text.lines().map(str::trim).filter(|l| l.len() > 3) {
        let c = lines.entry(l).or_default();
        *c += 1;
        if *c >= count {
            return true;
        }
    }
    false
}

/// The answer as JSON, alone or in one fenced block.
fn json_value(text: &str) -> Option<serde_json::Value> {
    let body = fenced(text).unwrap_or(text);
    serde_json::from_str(body.trim()).ok()
}

/// The content of the first ``` fence, if any.
fn fenced(text: &str) -> Option<&str> {
    let start = text.find("```")?;
    let after = &text[start + 3..];
    let body_start = after.find('\n')? + 1;
    let body = &after[body_start..];
    let end = body.find("```")?;
    Some(&body[..end])
}

/// A fenced block, or several lines with code punctuation and keywords.
fn looks_like_code(text: &str) -> bool {
    if fenced(text).is_some() {
        return true;
    }
    let markers = [
        "def ",
        "return ",
        "fn ",
        "function ",
        "class ",
        "import ",
        "#include",
        "public ",
        "let ",
        "const ",
        "=>",
        "();",
        "{\n",
        "};",
        "print(",
        "console.log",
        "SELECT ",
    ];
    let hits = markers.iter().filter(|m| text.contains(*m)).count();
    hits >= 2
}

/// The dominant writing system of a text (letters only): a coarse language check that needs no
/// model, good enough to catch an answer in English to a question in Japanese or Russian.
fn script(text: &str) -> &'static str {
    let mut counts = [0usize; 6];
    for c in text.chars().filter(|c| c.is_alphabetic()) {
        let i = match c as u32 {
            0x0000..=0x024F => 0,                                     // Latin
            0x0370..=0x03FF => 1,                                     // Greek
            0x0400..=0x04FF => 2,                                     // Cyrillic
            0x0590..=0x06FF => 3,                                     // Hebrew, Arabic
            0x3040..=0x30FF | 0x4E00..=0x9FFF | 0xAC00..=0xD7AF => 4, // CJK, kana, Hangul
            _ => 5,
        };
        counts[i] += 1;
    }
    let names = ["latin", "greek", "cyrillic", "rtl", "cjk", "other"];
    match counts.iter().enumerate().max_by_key(|(_, n)| **n) {
        Some((i, n)) if *n > 0 => names[i],
        _ => "none",
    }
}

/// One labelled answer: `{"prompt", "answer", "acceptable"}`, with what else is known about how
/// it was produced.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Labelled {
    pub prompt: String,
    pub answer: String,
    pub acceptable: bool,
    /// The task class (default: the classifier's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// JSON was requested with a format field.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub json: bool,
    /// The answer's token log-probabilities, when recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<f32>,
    /// The token limit cut the answer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// Read a JSONL file of labelled answers.
///
/// # Errors
/// The file cannot be read or a line is not a labelled answer.
pub fn read_labelled(path: &Path) -> Result<Vec<Labelled>, JsonlError> {
    jsonl::read(path, |_: &Labelled| Ok(()))
}

/// How well `escalate` finds the unacceptable answers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Evaluation {
    pub n: usize,
    /// Escalated and not acceptable.
    pub tp: usize,
    /// Escalated but acceptable.
    pub fp: usize,
    /// Accepted but not acceptable.
    pub fn_: usize,
    pub tn: usize,
    pub precision: f64,
    pub recall: f64,
    pub accuracy: f64,
    /// How often each reason fired.
    pub fired: BTreeMap<&'static str, usize>,
    /// Per task class: `[tp, fp, fn, tn]`.
    pub by_task: BTreeMap<String, [usize; 4]>,
}

/// Judge every labelled answer with the default thresholds; `classify` names a prompt's task
/// when the line does not.
pub fn evaluate(lines: &[Labelled], classify: &dyn Fn(&str) -> &'static str) -> Evaluation {
    let t = Thresholds::default();
    let mut e = Evaluation::default();
    for l in lines {
        let task = l.task.clone().unwrap_or_else(|| classify(&l.prompt).into());
        let expect = Expectations::for_task(&l.prompt, &task, l.json);
        let v = validate(&l.answer, &l.logprobs, l.truncated, &expect, &t);
        for r in &v.reasons {
            *e.fired.entry(r.as_str()).or_default() += 1;
        }
        let cell = match (!v.accept(), l.acceptable) {
            (true, false) => 0,
            (true, true) => 1,
            (false, false) => 2,
            (false, true) => 3,
        };
        e.by_task.entry(task).or_default()[cell] += 1;
    }
    for c in e.by_task.values() {
        e.tp += c[0];
        e.fp += c[1];
        e.fn_ += c[2];
        e.tn += c[3];
    }
    e.n = lines.len();
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    e.precision = ratio(e.tp, e.tp + e.fp);
    e.recall = ratio(e.tp, e.tp + e.fn_);
    e.accuracy = ratio(e.tp + e.tn, e.n);
    e
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn judge(answer: &str, expect: Expectations) -> Vec<Reason> {
        validate(answer, &[], false, &expect, &Thresholds::default()).reasons
    }

    fn prompt(p: &str) -> Expectations {
        Expectations {
            prompt: p.into(),
            ..Expectations::default()
        }
    }

    #[test]
    fn a_good_answer_is_accepted() {
        let v = validate(
            "Paris is the capital of France.",
            &[-0.1, -0.3, -0.05],
            false,
            &prompt("Capital of France?"),
            &Thresholds::default(),
        );
        assert!(v.accept(), "{v:?}");
        assert!((v.mean_logprob.unwrap() + 0.15).abs() < 1e-6);
    }

    #[test]
    fn each_failure_has_its_reason() {
        assert_eq!(judge("  ", prompt("Hi")), vec![Reason::Empty]);
        let looped = "the cat sat down. ".repeat(6);
        assert!(judge(&looped, prompt("story")).contains(&Reason::Repetition));
        assert!(judge(
            "I'm sorry, but I can't help with that.",
            prompt("Add 2 and 2")
        )
        .contains(&Reason::Refusal));
        let json = Expectations {
            json: true,
            ..prompt("Extract the name as JSON")
        };
        assert!(judge("{\"name\": \"Bob\"", json.clone()).contains(&Reason::InvalidJson));
        assert!(judge("```json\n{\"name\": \"Bob\"}\n```", json).is_empty());
        let extract =
            Expectations::for_task("Bob Smith is 30. Extract name and age.", "extract", false);
        assert!(judge("{\"name\": \"Bob Smith\", \"age\": 30}", extract.clone()).is_empty());
        assert_eq!(
            judge("{\"name\": \"Bob Jones\", \"age\": 30}", extract),
            vec![Reason::Ungrounded]
        );
        let math = Expectations::for_task("What is 17 * 23?", "math", false);
        assert!(judge("17 * 23 = 391", math.clone()).is_empty());
        assert_eq!(judge("17 * 23 = 392", math), vec![Reason::WrongArithmetic]);
        let code = Expectations {
            code: true,
            ..prompt("Write a function")
        };
        assert!(
            judge("You could add the numbers together.", code.clone()).contains(&Reason::NoCode)
        );
        assert!(judge("```python\ndef add(a, b):\n    return a + b\n```", code).is_empty());
        assert!(
            judge("Hello, how are you?", prompt("日本の首都はどこですか？"))
                .contains(&Reason::WrongLanguage)
        );
        assert!(judge("東京です。", prompt("日本の首都はどこですか？")).is_empty());
        let v = validate(
            "Paris.",
            &[-0.1, -15.0],
            false,
            &prompt("Capital?"),
            &Thresholds::default(),
        );
        assert_eq!(v.reasons, vec![Reason::LowConfidence]);
        let v = validate(
            "Paris.",
            &[-3.0, -3.0],
            true,
            &prompt("Capital?"),
            &Thresholds::default(),
        );
        assert_eq!(v.reasons, vec![Reason::Truncated, Reason::LowConfidence]);
    }

    #[test]
    fn evaluation_counts_against_the_labels() {
        let line = |answer: &str, acceptable: bool| Labelled {
            prompt: "Extract the name as JSON: Bob is 3.".into(),
            answer: answer.into(),
            acceptable,
            task: Some("extract".into()),
            json: false,
            logprobs: vec![],
            truncated: false,
        };
        let lines = vec![
            line("{\"name\": \"Bob\"}", true),
            line("The name is Bob", false),
            line("{\"name\": \"Alice\"}", false),
            line("not json", true),
        ];
        let e = evaluate(&lines, &|_| "qa");
        // "Alice" is not in the prompt: ungrounded, caught; "not json" is a false alarm.
        assert_eq!((e.tp, e.fp, e.fn_, e.tn), (2, 1, 0, 1));
        assert!((e.precision - 2.0 / 3.0).abs() < 1e-9 && (e.recall - 1.0).abs() < 1e-9);
        assert_eq!(e.fired["invalid_json"], 2);
        assert_eq!(e.fired["ungrounded"], 1);
        assert_eq!(e.by_task["extract"], [2, 1, 0, 1]);
    }

    #[test]
    fn reasons_have_stable_labels() {
        assert_eq!(Reason::InvalidJson.as_str(), "invalid_json");
        assert_eq!(
            serde_json::to_string(&Reason::NoCode).unwrap_or_default(),
            "\"no_code\""
        );
    }
}
