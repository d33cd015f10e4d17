//! JSON mode: a byte-level validator of JSON object prefixes, used to constrain decoding.
//!
//! At each step the engine offers candidate tokens (best first) to [`JsonPrefix::accepts`]; a
//! token is allowed only if the text so far plus its bytes is still the prefix of some valid JSON
//! object. Once the object closes, generation stops. The output of a JSON-mode request therefore
//! always parses, unless it is cut off by `max_tokens` (finish reason `length`), as with OpenAI.

/// Most whitespace bytes in a row outside strings; stops a model that only emits spaces.
const MAX_WHITESPACE_RUN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    Object,
    Array,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the top-level `{`.
    Start,
    /// A value is expected (after `:` or `,` in an array, or `[`).
    Value,
    /// Right after `[`: a value or `]`.
    ArrayFirst,
    /// Right after `{`: a key or `}`.
    ObjectFirst,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// Inside a string; `key` tells whether it is an object key.
    Str {
        key: bool,
        escape: bool,
        hex: u8,
    },
    Number(Num),
    /// Inside `true`, `false` or `null`: the bytes still expected.
    Literal(&'static [u8]),
    /// After a value inside a container: `,` or the closing bracket.
    After,
    /// The top-level object has closed.
    Done,
}

/// The state of a JSON object prefix; cheap to clone.
#[derive(Debug, Clone)]
pub struct JsonPrefix {
    stack: Vec<Container>,
    state: State,
    whitespace: usize,
}

impl Default for JsonPrefix {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonPrefix {
    pub fn new() -> Self {
        Self {
            stack: Vec::new(),
            state: State::Start,
            whitespace: 0,
        }
    }

    /// Whether the top-level object is complete.
    pub fn is_complete(&self) -> bool {
        self.state == State::Done
    }

    /// Whether appending `bytes` keeps a valid prefix (state unchanged either way).
    pub fn accepts(&self, bytes: &[u8]) -> bool {
        if bytes.is_empty() {
            return false;
        }
        let mut probe = self.clone();
        bytes.iter().all(|&b| probe.push(b))
    }

    /// Append bytes that [`JsonPrefix::accepts`] allowed.
    pub fn extend(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.push(b))
    }

    fn value_done(&mut self) {
        self.state = if self.stack.is_empty() {
            State::Done
        } else {
            State::After
        };
    }

    fn close(&mut self, kind: Container) -> bool {
        if self.stack.pop() != Some(kind) {
            return false;
        }
        self.value_done();
        true
    }

    /// Start a value with byte `b`.
    fn begin_value(&mut self, b: u8) -> bool {
        self.state = match b {
            b'{' => {
                self.stack.push(Container::Object);
                State::ObjectFirst
            }
            b'[' => {
                self.stack.push(Container::Array);
                State::ArrayFirst
            }
            b'"' => State::Str {
                key: false,
                escape: false,
                hex: 0,
            },
            b'-' => State::Number(Num::Minus),
            b'0' => State::Number(Num::Zero),
            b'1'..=b'9' => State::Number(Num::Int),
            b't' => State::Literal(b"rue"),
            b'f' => State::Literal(b"alse"),
            b'n' => State::Literal(b"ull"),
            _ => return false,
        };
        true
    }

    fn push(&mut self, b: u8) -> bool {
        let in_string = matches!(self.state, State::Str { .. });
        if !in_string && matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            if matches!(self.state, State::Number(_)) && !self.end_number() {
                return false;
            }
            if matches!(self.state, State::Literal(_) | State::Done) {
                return false;
            }
            self.whitespace += 1;
            return self.whitespace <= MAX_WHITESPACE_RUN;
        }
        self.whitespace = 0;
        match self.state {
            State::Done => false,
            State::Start => {
                if b != b'{' {
                    return false;
                }
                self.stack.push(Container::Object);
                self.state = State::ObjectFirst;
                true
            }
            State::Value => self.begin_value(b),
            State::ArrayFirst => b == b']' && self.close(Container::Array) || self.begin_value(b),
            State::ObjectFirst | State::Key => {
                if b == b'}' && self.state == State::ObjectFirst {
                    return self.close(Container::Object);
                }
                if b != b'"' {
                    return false;
                }
                self.state = State::Str {
                    key: true,
                    escape: false,
                    hex: 0,
                };
                true
            }
            State::Colon => {
                if b != b':' {
                    return false;
                }
                self.state = State::Value;
                true
            }
            State::Str { key, escape, hex } => self.push_string(b, key, escape, hex),
            State::Number(n) => self.push_number(b, n),
            State::Literal(rest) => {
                if rest.first() != Some(&b) {
                    return false;
                }
                if rest.len() == 1 {
                    self.value_done();
                } else {
                    self.state = State::Literal(&rest[1..]);
                }
                true
            }
            State::After => match (b, self.stack.last()) {
                (b',', Some(Container::Object)) => {
                    self.state = State::Key;
                    true
                }
                (b',', Some(Container::Array)) => {
                    self.state = State::Value;
                    true
                }
                (b'}', _) => self.close(Container::Object),
                (b']', _) => self.close(Container::Array),
                _ => false,
            },
        }
    }

    fn push_string(&mut self, b: u8, key: bool, escape: bool, hex: u8) -> bool {
        if hex > 0 {
            if !b.is_ascii_hexdigit() {
                return false;
            }
            self.state = State::Str {
                key,
                escape: false,
                hex: hex - 1,
            };
            return true;
        }
        if escape {
            let hex = match b {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => 0,
                b'u' => 4,
                _ => return false,
            };
            self.state = State::Str {
                key,
                escape: false,
                hex,
            };
            return true;
        }
        match b {
            b'"' => {
                if key {
                    self.state = State::Colon;
                } else {
                    self.value_done();
                }
                true
            }
            b'\\' => {
                self.state = State::Str {
                    key,
                    escape: true,
                    hex: 0,
                };
                true
            }
            0x00..=0x1f => false,
            _ => true,
        }
    }

    /// A byte that cannot continue a number ends it (if the number is complete).
    fn end_number(&mut self) -> bool {
        match self.state {
            State::Number(Num::Zero | Num::Int | Num::Frac | Num::ExpDigits) => {
                self.value_done();
                true
            }
            _ => false,
        }
    }

    fn push_number(&mut self, b: u8, n: Num) -> bool {
        let next = match (n, b) {
            (Num::Minus, b'0') => Some(Num::Zero),
            (Num::Minus, b'1'..=b'9') => Some(Num::Int),
            (Num::Int, b'0'..=b'9') => Some(Num::Int),
            (Num::Zero | Num::Int, b'.') => Some(Num::Dot),
            (Num::Dot | Num::Frac, b'0'..=b'9') => Some(Num::Frac),
            (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Some(Num::Exp),
            (Num::Exp, b'+' | b'-') => Some(Num::ExpSign),
            (Num::Exp | Num::ExpSign | Num::ExpDigits, b'0'..=b'9') => Some(Num::ExpDigits),
            _ => None,
        };
        if let Some(n) = next {
            self.state = State::Number(n);
            return true;
        }
        // The number ended; the byte belongs to what follows it.
        self.end_number() && self.push(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_prefix(s: &str) -> bool {
        JsonPrefix::new().accepts(s.as_bytes())
    }

    fn complete(s: &str) -> bool {
        let mut p = JsonPrefix::new();
        p.extend(s.as_bytes()) && p.is_complete()
    }

    #[test]
    fn accepts_prefixes_of_objects() {
        for s in [
            "{",
            " {\"a\"",
            "{\"a\": 1",
            "{\"a\": [1, 2.5e-3, -0, \"x\\u00e9\", true, null",
            "{\"a\": {\"b\": {}}, \"c\": []",
            "{\"k\": \"line\\nbreak and unicode é\"",
        ] {
            assert!(valid_prefix(s), "{s}");
        }
    }

    #[test]
    fn rejects_what_cannot_become_json() {
        for s in [
            "[1]",
            "x",
            "{a",
            "{\"a\" 1",
            "{\"a\":}",
            "{\"a\": 01",
            "{\"a\": tru3",
            "{\"a\": 1,}",
            "{\"a\": [1,]",
            "{\"a\": \"\\x\"",
            "{\"a\": \"\u{1}\"",
            "{\"a\": 1]",
            "{}}",
            "{} x",
        ] {
            assert!(!complete(s) && !valid_prefix(s), "{s:?} was accepted");
        }
    }

    #[test]
    fn completes_exactly_at_the_closing_brace() {
        assert!(complete("{}"));
        assert!(complete("{\"a\": [1, {\"b\": false}], \"c\": -1.5E+2}"));
        assert!(!complete("{\"a\": 1"));
        let mut p = JsonPrefix::new();
        assert!(p.extend(b"{\"n\": 12"));
        assert!(p.extend(b"}"));
        assert!(p.is_complete());
        assert!(!p.accepts(b" "));
    }

    #[test]
    fn endless_whitespace_is_refused() {
        assert!(valid_prefix(&format!(
            "{{{}",
            " ".repeat(MAX_WHITESPACE_RUN)
        )));
        assert!(!valid_prefix(&format!(
            "{{{}",
            " ".repeat(MAX_WHITESPACE_RUN + 1)
        )));
    }

    #[test]
    fn everything_completed_parses_with_serde() {
        for s in [
            "{}",
            "{\"a\": [1, 2, {\"b\": null}]}",
            "{\"x\": \"\\\"q\\\"\", \"y\": 0.5e10}",
        ] {
            assert!(complete(s));
            assert!(serde_json::from_str::<serde_json::Value>(s).is_ok(), "{s}");
        }
    }
}
