//! The quality validator: accept a local answer, or escalate it with the reasons why.
//!
//! Each check is cheap and explainable: empty or near-empty answers, answers cut off by the token
//! limit, repetition loops, unwarranted refusals, invalid JSON where JSON was asked, no code where
//! code was asked, low model confidence from the token log-probabilities, and an answer in another
//! writing system than the question.

use serde::Serialize;

/// Why an answer is escalated; `as_str` is the stable label used in headers and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Empty,
    Truncated,
    Repetition,
    Refusal,
    InvalidJson,
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
            min_mean_logprob: -2.5,
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
    if expect.json && !is_json(trimmed) {
        reasons.push(Reason::InvalidJson);
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
    if !trimmed.is_empty() && script(&expect.prompt) != script(trimmed) {
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

/// The answer parses as JSON, alone or in one fenced block.
fn is_json(text: &str) -> bool {
    let body = fenced(text).unwrap_or(text);
    serde_json::from_str::<serde_json::Value>(body.trim()).is_ok()
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
    fn reasons_have_stable_labels() {
        assert_eq!(Reason::InvalidJson.as_str(), "invalid_json");
        assert_eq!(
            serde_json::to_string(&Reason::NoCode).unwrap_or_default(),
            "\"no_code\""
        );
    }
}
