//! Answer checks that need the question: arithmetic the validator can redo itself, and values
//! an extraction must have taken from its source text.

use serde_json::Value;

/// The numbers in a text (`1,234.5` is one number; a leading minus is kept).
pub fn numbers(text: &str) -> Vec<f64> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_digit() {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_digit()
                    || ((chars[i] == '.' || chars[i] == ',')
                        && chars.get(i + 1).is_some_and(char::is_ascii_digit)))
            {
                i += 1;
            }
            let negative = start > 0
                && chars[start - 1] == '-'
                && (start < 2 || !chars[start - 2].is_alphanumeric());
            let digits: String = chars[start..i].iter().filter(|c| **c != ',').collect();
            if let Ok(v) = digits.parse::<f64>() {
                out.push(if negative { -v } else { v });
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Operators as written in questions, longest first.
const OPERATORS: &[(&str, char)] = &[
    ("multiplied by", '*'),
    ("divided by", '/'),
    ("times", '*'),
    ("plus", '+'),
    ("minus", '-'),
    ("% of", '%'),
    ("percent of", '%'),
    ("*", '*'),
    ("×", '*'),
    ("x", '*'),
    ("/", '/'),
    ("÷", '/'),
    ("+", '+'),
    ("-", '-'),
];

/// The value of the one simple arithmetic question in a prompt (`What is 17 * 23?`, `144
/// divided by 12`, `15% of 80`), or `None` when there is none, or more than one.
pub fn arithmetic(prompt: &str) -> Option<f64> {
    let lower = prompt.to_lowercase();
    let mut found: Option<f64> = None;
    let mut count = 0;
    let bytes = lower.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit()
            || (i > 0 && (bytes[i - 1].is_ascii_digit() || bytes[i - 1] == b'.'))
        {
            i += 1;
            continue;
        }
        let (a, after_a) = number_at(&lower, i)?;
        let rest = lower[after_a..].trim_start();
        let op = OPERATORS.iter().find(|(w, _)| rest.starts_with(w));
        if let Some((word, op)) = op {
            let rest2 = rest[word.len()..].trim_start();
            let offset = lower.len() - rest2.len();
            if rest2.as_bytes().first().is_some_and(u8::is_ascii_digit) {
                if let Some((b, end)) = number_at(&lower, offset) {
                    // 2024-05-10, 3/4/2025, 18:30-19:00: dates and times, not sums.
                    let tail = &bytes[end..];
                    let chained = tail.len() > 1
                        && matches!(tail[0], b'-' | b'/' | b':')
                        && tail[1].is_ascii_digit();
                    if chained {
                        i = end;
                        continue;
                    }
                    let v = match op {
                        '+' => a + b,
                        '-' => a - b,
                        '*' => a * b,
                        '/' if b != 0.0 => a / b,
                        '%' => a * b / 100.0,
                        _ => f64::NAN,
                    };
                    count += 1;
                    found = v.is_finite().then_some(v);
                    i = end;
                    continue;
                }
            }
        }
        i = after_a;
    }
    if count == 1 {
        found
    } else {
        None
    }
}

/// The number starting at byte `at` and the byte after it.
fn number_at(text: &str, at: usize) -> Option<(f64, usize)> {
    let bytes = text.as_bytes();
    let mut end = at;
    while end < bytes.len()
        && (bytes[end].is_ascii_digit()
            || (bytes[end] == b'.' && bytes.get(end + 1).is_some_and(u8::is_ascii_digit)))
    {
        end += 1;
    }
    text[at..end].parse().ok().map(|v| (v, end))
}

/// Whether `answer` states `value` (to 2 decimal places when it is not whole).
pub fn states(answer: &str, value: f64) -> bool {
    numbers(answer)
        .iter()
        .any(|n| (n - value).abs() < 1e-6 || (n - (value * 100.0).round() / 100.0).abs() < 1e-6)
}

/// Whether every string and number of an extracted JSON value occurs in the source text
/// (case-insensitive; numbers as any number of the text). Extraction copies, it does not invent.
pub fn grounded(value: &Value, source: &str) -> bool {
    let lower = source.to_lowercase();
    let source_numbers = numbers(source);
    fn walk(v: &Value, lower: &str, nums: &[f64]) -> bool {
        match v {
            Value::String(s) => {
                let s = s.trim().to_lowercase();
                s.is_empty() || lower.contains(&s) || {
                    // "$4.00" for "$4", "2018" for 2018: compare the numbers it holds.
                    let ns = numbers(&s);
                    !ns.is_empty() && ns.iter().all(|n| nums.iter().any(|m| (m - n).abs() < 1e-9))
                }
            }
            Value::Number(n) => n
                .as_f64()
                .is_some_and(|n| nums.iter().any(|m| (m - n).abs() < 1e-9)),
            Value::Array(items) => items.iter().all(|i| walk(i, lower, nums)),
            Value::Object(map) => map.values().all(|i| walk(i, lower, nums)),
            Value::Bool(_) | Value::Null => true,
        }
    }
    walk(value, &lower, &source_numbers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_questions_are_computed() {
        assert_eq!(arithmetic("What is 17 * 23?"), Some(391.0));
        assert_eq!(arithmetic("Compute 144 divided by 12."), Some(12.0));
        assert_eq!(arithmetic("What is 15% of 80?"), Some(12.0));
        assert_eq!(arithmetic("7.5 + 2.6 = ?"), Some(10.1));
        assert_eq!(arithmetic("What is 9 minus 12"), Some(-3.0));
        assert_eq!(arithmetic("Tom has 3 apples and buys 4 more."), None);
        assert_eq!(arithmetic("What is 2 + 3 and 4 * 5?"), None);
        assert_eq!(arithmetic("Divide 1 / 0"), None);
        assert_eq!(arithmetic("On 2024-05-10, what is 6 * 7?"), Some(42.0));
    }

    #[test]
    fn answers_state_numbers() {
        assert!(states("17 * 23 = 391.", 391.0));
        assert!(states("The answer is 1,234.", 1234.0));
        assert!(states("That makes 3.33", 10.0 / 3.0));
        assert!(!states("17 * 23 = 392", 391.0));
        assert_eq!(numbers("x = -3, y = 2.5"), vec![-3.0, 2.5]);
    }

    #[test]
    fn extractions_must_come_from_the_source() {
        let src = "Contact: David Lee, david.lee@mail.com, price $4, year 2018";
        let ok = serde_json::json!({"name": "David Lee", "email": "david.lee@mail.com", "price": "$4.00", "year": 2018});
        assert!(grounded(&ok, src));
        let bad = serde_json::json!({"name": "David Lee", "email": "john_lee@mail.com"});
        assert!(!grounded(&bad, src));
        assert!(!grounded(&serde_json::json!({"price": 100}), src));
    }
}
