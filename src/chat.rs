//! Chat templates: turning a list of messages into the prompt text a model was trained on.
//!
//! A GGUF file usually carries its Hugging Face chat template (`tokenizer.chat_template`, Jinja).
//! It is rendered with `minijinja` as *untrusted code*: every render runs under an instruction
//! budget (fuel) and an output-size cap, errors name the template line, and the environment is
//! set up like `transformers` renders templates (`trim_blocks`, `lstrip_blocks`, the variables
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, the function
//! `raise_exception`, `strftime_now`, and the common Python string/dict methods such as
//! `.strip()`, `.startswith()`, `.split()`, `.items()`).
//!
//! Files without a template get a built-in one chosen from the architecture and the special
//! tokens ([`BuiltinTemplate::guess`]), e.g. the Gemma turn format for `gemma3`.

use std::fmt;
use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::ValueKind;
use minijinja::{context, Environment, Error as JinjaError, ErrorKind, State, Value};
use serde::{Deserialize, Serialize};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` (or whatever the template understands).
    pub role: String,
    /// The message text.
    pub content: String,
}

impl Message {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Errors from compiling or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template does not compile.
    #[error("invalid chat template: {0}")]
    Syntax(String),
    /// The template failed while rendering (undefined function, type error, ...).
    #[error("chat template failed to render: {0}")]
    Render(String),
    /// The template called `raise_exception(message)`.
    #[error("chat template rejected the conversation: {0}")]
    Raised(String),
    /// The template used up its instruction budget (a runaway loop).
    #[error("chat template exceeded its budget of {0} instructions")]
    OutOfFuel(u64),
    /// The rendered prompt grew past the output cap.
    #[error("rendered chat prompt exceeds the limit of {0} bytes")]
    OutputTooLarge(usize),
}

/// Built-in templates for files that carry none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinTemplate {
    /// `<|im_start|>{role}\n{content}<|im_end|>\n`.
    ChatMl,
    /// `<bos><start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n`; the system message
    /// is folded into the first user turn.
    Gemma,
    /// `<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} </s>`.
    Llama2,
    /// `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>`.
    Llama3,
    /// `<s>[INST] {system}\n\n{user} [/INST] {assistant}</s>` (no `<<SYS>>` block).
    Mistral,
}

impl BuiltinTemplate {
    /// Short name, as used in [`ChatTemplate::source`].
    pub fn name(self) -> &'static str {
        match self {
            Self::ChatMl => "chatml",
            Self::Gemma => "gemma",
            Self::Llama2 => "llama2",
            Self::Llama3 => "llama3",
            Self::Mistral => "mistral",
        }
    }

    /// Picks a template from the GGUF architecture and the BOS/EOS token texts; ChatML when
    /// nothing points elsewhere.
    pub fn guess(architecture: &str, bos: Option<&str>, eos: Option<&str>) -> Self {
        let arch = architecture.to_ascii_lowercase();
        let has = |t: &str| bos == Some(t) || eos == Some(t);
        if arch.starts_with("gemma") || has("<start_of_turn>") || has("<end_of_turn>") {
            Self::Gemma
        } else if has("<|im_start|>") || has("<|im_end|>") {
            Self::ChatMl
        } else if has("<|begin_of_text|>") || has("<|eot_id|>") || has("<|end_of_text|>") {
            Self::Llama3
        } else if arch.starts_with("mistral") || arch.starts_with("mixtral") {
            Self::Mistral
        } else if arch == "llama" && bos == Some("<s>") {
            Self::Llama2
        } else {
            Self::ChatMl
        }
    }
}

const TEMPLATE_NAME: &str = "chat_template";
const RAISE_PREFIX: &str = "raise_exception: ";
/// Default instruction budget per render.
pub const DEFAULT_FUEL: u64 = 5_000_000;
/// Default output cap, on top of four times the size of the messages.
pub const DEFAULT_OUTPUT_BASE: usize = 1 << 20;

enum Engine {
    Jinja(Box<Environment<'static>>),
    Builtin(BuiltinTemplate),
}

/// A chat template: the GGUF's own Jinja template or a built-in one.
pub struct ChatTemplate {
    engine: Engine,
    source: String,
    bos: String,
    eos: String,
    fuel: u64,
    output_base: usize,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// `template`: the GGUF's `tokenizer.chat_template` if present (compiled now, so syntax
    /// errors surface here); otherwise a built-in picked by [`BuiltinTemplate::guess`].
    pub fn new(
        template: Option<&str>,
        architecture: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, ChatError> {
        match template.filter(|t| !t.trim().is_empty()) {
            Some(source) => Self::from_jinja(source, bos_token, eos_token),
            None => Ok(Self::builtin(
                BuiltinTemplate::guess(architecture, bos_token, eos_token),
                bos_token,
                eos_token,
            )),
        }
    }

    /// Compiles a Jinja chat template.
    pub fn from_jinja(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(DEFAULT_FUEL));
        env.set_recursion_limit(100);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.set_unknown_method_callback(python_method);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| ChatError::Syntax(describe(&e)))?;
        Ok(Self {
            engine: Engine::Jinja(Box::new(env)),
            source: "gguf".to_string(),
            bos: bos_token.unwrap_or_default().to_string(),
            eos: eos_token.unwrap_or_default().to_string(),
            fuel: DEFAULT_FUEL,
            output_base: DEFAULT_OUTPUT_BASE,
        })
    }

    /// A built-in template.
    pub fn builtin(
        kind: BuiltinTemplate,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Self {
        Self {
            engine: Engine::Builtin(kind),
            source: format!("builtin:{}", kind.name()),
            bos: bos_token.unwrap_or_default().to_string(),
            eos: eos_token.unwrap_or_default().to_string(),
            fuel: DEFAULT_FUEL,
            output_base: DEFAULT_OUTPUT_BASE,
        }
    }

    /// Changes the limits: `fuel` instructions per render, and an output cap of
    /// `output_base` bytes plus four times the size of the messages.
    pub fn with_limits(mut self, fuel: u64, output_base: usize) -> Self {
        if let Engine::Jinja(env) = &mut self.engine {
            env.set_fuel(Some(fuel));
        }
        self.fuel = fuel;
        self.output_base = output_base;
        self
    }

    /// Where the template came from: `"gguf"` or `"builtin:<name>"`.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the conversation; `add_generation_prompt` appends the opening of the
    /// assistant's turn.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let input: usize = messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .sum();
        let limit = self.output_base.saturating_add(input.saturating_mul(4));
        let out = match &self.engine {
            Engine::Builtin(kind) => {
                render_builtin(*kind, messages, add_generation_prompt, &self.bos, &self.eos)
            }
            Engine::Jinja(env) => {
                let template = env
                    .get_template(TEMPLATE_NAME)
                    .map_err(|e| ChatError::Syntax(describe(&e)))?;
                let ctx = context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => &self.bos,
                    eos_token => &self.eos,
                };
                let mut writer = LimitedWriter {
                    buf: Vec::new(),
                    limit,
                    exceeded: false,
                };
                if let Err(e) = template.render_captured_to(ctx, &mut writer) {
                    return Err(if writer.exceeded {
                        ChatError::OutputTooLarge(limit)
                    } else {
                        self.map_render_error(&e)
                    });
                }
                String::from_utf8(writer.buf)
                    .map_err(|e| ChatError::Render(format!("output is not UTF-8: {e}")))?
            }
        };
        if out.len() > limit {
            return Err(ChatError::OutputTooLarge(limit));
        }
        Ok(out)
    }

    fn map_render_error(&self, e: &JinjaError) -> ChatError {
        match (e.kind(), e.detail()) {
            (ErrorKind::OutOfFuel, _) => ChatError::OutOfFuel(self.fuel),
            (ErrorKind::InvalidOperation, Some(d)) if d.starts_with(RAISE_PREFIX) => {
                ChatError::Raised(d[RAISE_PREFIX.len()..].to_string())
            }
            _ => ChatError::Render(describe(e)),
        }
    }
}

/// The error, its template location and its causes on one line.
fn describe(e: &JinjaError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Collects output, refusing to grow past `limit`.
struct LimitedWriter {
    buf: Vec<u8>,
    limit: usize,
    exceeded: bool,
}

impl io::Write for LimitedWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.limit {
            self.exceeded = true;
            return Err(io::Error::other("chat template output limit reached"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn raise_exception(message: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(
        ErrorKind::InvalidOperation,
        format!("{RAISE_PREFIX}{message}"),
    ))
}

/// `strftime_now(format)` (UTC), supporting `%Y %y %m %d %e %H %I %M %S %p %b %B %a %A %j %%`.
fn strftime_now(format: String) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    strftime(&format, secs)
}

fn strftime(format: &str, secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
    ];
    let days = (secs / 86_400) as i64;
    let (hour, minute, second) = ((secs % 86_400) / 3600, (secs % 3600) / 60, secs % 60);
    let (year, month, day) = crate::civil::from_days(days);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let before = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334][(month - 1) as usize];
    let yday = before + day + i64::from(leap && month > 2);
    let weekday = (days + 4).rem_euclid(7) as usize;
    let month_name = MONTHS[(month - 1) as usize];
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('I') => out.push_str(&format!("{hour12:02}")),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Python methods that Hugging Face templates call on strings and dicts.
fn python_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, JinjaError> {
    let str_arg = |i: usize| args.get(i).and_then(Value::as_str);
    if let Some(s) = value.as_str() {
        let strip_set = |c: char| match str_arg(0) {
            Some(set) => set.contains(c),
            None => c.is_whitespace(),
        };
        let affix = |test: &dyn Fn(&str) -> bool| -> bool {
            match args.first() {
                Some(a) if a.kind() == ValueKind::Seq => a
                    .try_iter()
                    .map(|mut it| it.any(|v| v.as_str().is_some_and(test)))
                    .unwrap_or(false),
                Some(a) => a.as_str().is_some_and(test),
                None => false,
            }
        };
        return Ok(match method {
            "strip" => Value::from(s.trim_matches(strip_set)),
            "lstrip" => Value::from(s.trim_start_matches(strip_set)),
            "rstrip" => Value::from(s.trim_end_matches(strip_set)),
            "startswith" => Value::from(affix(&|p| s.starts_with(p))),
            "endswith" => Value::from(affix(&|p| s.ends_with(p))),
            "upper" => Value::from(s.to_uppercase()),
            "lower" => Value::from(s.to_lowercase()),
            "title" | "capitalize" => Value::from(title_case(s, method == "title")),
            "replace" => match (str_arg(0), str_arg(1)) {
                (Some(old), Some(new)) => Value::from(s.replace(old, new)),
                _ => {
                    return Err(JinjaError::new(
                        ErrorKind::MissingArgument,
                        "replace(old, new)",
                    ))
                }
            },
            "split" => {
                let max = args
                    .get(1)
                    .and_then(|v| i64::try_from(v.clone()).ok())
                    .filter(|&m| m >= 0);
                let parts: Vec<Value> = match (str_arg(0), max) {
                    (Some(sep), Some(m)) => {
                        s.splitn(m as usize + 1, sep).map(Value::from).collect()
                    }
                    (Some(sep), None) => s.split(sep).map(Value::from).collect(),
                    (None, _) => s.split_whitespace().map(Value::from).collect(),
                };
                Value::from(parts)
            }
            "find" => Value::from(
                str_arg(0)
                    .and_then(|p| s.find(p))
                    .map(|b| s[..b].chars().count() as i64)
                    .unwrap_or(-1),
            ),
            "count" => Value::from(str_arg(0).map(|p| s.matches(p).count()).unwrap_or(0)),
            "join" => {
                let items: Vec<String> = match args.first().map(Value::try_iter) {
                    Some(Ok(it)) => it.map(|v| v.to_string()).collect(),
                    _ => Vec::new(),
                };
                Value::from(items.join(s))
            }
            _ => return Err(JinjaError::from(ErrorKind::UnknownMethod)),
        });
    }
    if value.kind() == ValueKind::Map {
        return match method {
            "items" => state.apply_filter("items", std::slice::from_ref(value)),
            "keys" => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => {
                let mut out = Vec::new();
                for key in value.try_iter()? {
                    out.push(value.get_item(&key)?);
                }
                Ok(Value::from(out))
            }
            "get" => {
                let item = match args.first() {
                    Some(key) => value.get_item(key)?,
                    None => Value::UNDEFINED,
                };
                Ok(if item.is_undefined() {
                    args.get(1).cloned().unwrap_or(Value::from(()))
                } else {
                    item
                })
            }
            _ => Err(JinjaError::from(ErrorKind::UnknownMethod)),
        };
    }
    Err(JinjaError::from(ErrorKind::UnknownMethod))
}

fn title_case(s: &str, every_word: bool) -> String {
    let mut out = String::with_capacity(s.len());
    let mut start = true;
    for c in s.chars() {
        if start {
            out.extend(c.to_uppercase());
        } else {
            out.extend(c.to_lowercase());
        }
        start = if every_word {
            !c.is_alphanumeric()
        } else {
            false
        };
    }
    out
}

fn render_builtin(
    kind: BuiltinTemplate,
    messages: &[Message],
    add_generation_prompt: bool,
    bos: &str,
    eos: &str,
) -> String {
    let mut out = String::new();
    match kind {
        BuiltinTemplate::ChatMl => {
            for m in messages {
                out.push_str(&format!(
                    "<|im_start|>{}\n{}<|im_end|>\n",
                    m.role, m.content
                ));
            }
            if add_generation_prompt {
                out.push_str("<|im_start|>assistant\n");
            }
        }
        BuiltinTemplate::Gemma => {
            out.push_str(bos);
            let mut system = String::new();
            for m in messages {
                if m.role == "system" {
                    if !system.is_empty() {
                        system.push_str("\n\n");
                    }
                    system.push_str(m.content.trim());
                    continue;
                }
                let role = if m.role == "assistant" {
                    "model"
                } else {
                    m.role.as_str()
                };
                out.push_str(&format!("<start_of_turn>{role}\n"));
                if !system.is_empty() && role != "model" {
                    out.push_str(&system);
                    out.push_str("\n\n");
                    system.clear();
                }
                out.push_str(m.content.trim());
                out.push_str("<end_of_turn>\n");
            }
            if !system.is_empty() {
                out.push_str(&format!("<start_of_turn>user\n{system}<end_of_turn>\n"));
            }
            if add_generation_prompt {
                out.push_str("<start_of_turn>model\n");
            }
        }
        BuiltinTemplate::Llama3 => {
            out.push_str(bos);
            for m in messages {
                out.push_str(&format!(
                    "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>",
                    m.role,
                    m.content.trim()
                ));
            }
            if add_generation_prompt {
                out.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
            }
        }
        BuiltinTemplate::Llama2 | BuiltinTemplate::Mistral => {
            let mistral = kind == BuiltinTemplate::Mistral;
            let mut system: Option<String> = None;
            if mistral {
                out.push_str(bos);
            }
            for m in messages {
                match m.role.as_str() {
                    "system" => system = Some(m.content.trim().to_string()),
                    "assistant" => {
                        out.push(' ');
                        out.push_str(m.content.trim());
                        out.push_str(if mistral { "" } else { " " });
                        out.push_str(eos);
                    }
                    _ => {
                        if !mistral {
                            out.push_str(bos);
                        }
                        out.push_str("[INST] ");
                        match system.take() {
                            Some(sys) if mistral => out.push_str(&format!("{sys}\n\n")),
                            Some(sys) => out.push_str(&format!("<<SYS>>\n{sys}\n<</SYS>>\n\n")),
                            None => {}
                        }
                        out.push_str(m.content.trim());
                        out.push_str(" [/INST]");
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn msgs(v: &[(&str, &str)]) -> Vec<Message> {
        v.iter().map(|(r, c)| Message::new(*r, *c)).collect()
    }

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn gguf_template_renders() {
        let t = ChatTemplate::new(Some(CHATML), "llama", Some("<s>"), Some("</s>")).unwrap();
        assert_eq!(t.source(), "gguf");
        let out = t.render(&msgs(&[("user", "Hi")]), true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&msgs(&[("user", "Hi")]), false).unwrap();
        assert_eq!(out, "<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn gemma_builtin_folds_system() {
        let t = ChatTemplate::new(None, "gemma3", Some("<bos>"), Some("<eos>")).unwrap();
        assert_eq!(t.source(), "builtin:gemma");
        let m = msgs(&[
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello!"),
            ("user", "Bye"),
        ]);
        assert_eq!(
            t.render(&m, true).unwrap(),
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn other_builtins() {
        let m = msgs(&[
            ("system", "S"),
            ("user", "U"),
            ("assistant", "A"),
            ("user", "V"),
        ]);
        let r = |k, bos, eos| {
            ChatTemplate::builtin(k, Some(bos), Some(eos))
                .render(&m, true)
                .unwrap()
        };
        assert_eq!(
            r(BuiltinTemplate::ChatMl, "", ""),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nV<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            r(BuiltinTemplate::Llama2, "<s>", "</s>"),
            "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST] A </s><s>[INST] V [/INST]"
        );
        assert_eq!(
            r(BuiltinTemplate::Mistral, "<s>", "</s>"),
            "<s>[INST] S\n\nU [/INST] A</s>[INST] V [/INST]"
        );
        assert_eq!(
            r(BuiltinTemplate::Llama3, "<|begin_of_text|>", "<|eot_id|>"),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nV<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn guesses() {
        use BuiltinTemplate::*;
        assert_eq!(
            BuiltinTemplate::guess("gemma3", Some("<bos>"), Some("<eos>")),
            Gemma
        );
        assert_eq!(
            BuiltinTemplate::guess("llama", Some("<|im_start|>"), Some("<|im_end|>")),
            ChatMl
        );
        assert_eq!(
            BuiltinTemplate::guess("llama", Some("<|begin_of_text|>"), Some("<|eot_id|>")),
            Llama3
        );
        assert_eq!(
            BuiltinTemplate::guess("llama", Some("<s>"), Some("</s>")),
            Llama2
        );
        assert_eq!(
            BuiltinTemplate::guess("mistral", Some("<s>"), Some("</s>")),
            Mistral
        );
        assert_eq!(BuiltinTemplate::guess("qwen2", None, None), ChatMl);
        // an empty template counts as none
        assert_eq!(
            ChatTemplate::new(Some("  "), "gemma", None, None)
                .unwrap()
                .source(),
            "builtin:gemma"
        );
    }

    #[test]
    fn errors_are_clear() {
        let err = ChatTemplate::new(Some("{% for x in %}"), "llama", None, None).unwrap_err();
        assert!(matches!(err, ChatError::Syntax(_)), "{err}");
        let t = ChatTemplate::from_jinja(
            "{{ raise_exception('only user and assistant roles') }}",
            None,
            None,
        )
        .unwrap();
        let err = t.render(&[], true).unwrap_err();
        assert!(
            matches!(&err, ChatError::Raised(m) if m == "only user and assistant roles"),
            "{err}"
        );
        let t = ChatTemplate::from_jinja("{{ nope(1) }}", None, None).unwrap();
        let err = t.render(&[], true).unwrap_err();
        assert!(
            matches!(&err, ChatError::Render(m) if m.contains("nope")),
            "{err}"
        );
    }

    #[test]
    fn fuel_and_output_limits() {
        let looping =
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}";
        let t = ChatTemplate::from_jinja(looping, None, None)
            .unwrap()
            .with_limits(100_000, 1 << 20);
        assert!(matches!(
            t.render(&[], true),
            Err(ChatError::OutOfFuel(100_000))
        ));
        let big = "{% for a in range(100000) %}xxxxxxxxxxxxxxxxxxxx{% endfor %}";
        let t = ChatTemplate::from_jinja(big, None, None)
            .unwrap()
            .with_limits(10_000_000, 1000);
        assert!(matches!(
            t.render(&[], true),
            Err(ChatError::OutputTooLarge(1000))
        ));
    }

    #[test]
    fn python_methods_and_variables() {
        let src = "{{ bos_token }}{% for m in messages %}{{ m.content.strip() | upper }}|{{ m['role'].startswith(('us', 'x')) }}|{{ m.content.split(',') | length }}|{{ ' x '.rstrip() }}|{{ {'a': 1}.get('b', 7) }}{% for k, v in {'k': 'v'}.items() %}{{ k }}={{ v }}{% endfor %}{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::from_jinja(src, Some("<s>"), Some("</s>")).unwrap();
        let out = t.render(&msgs(&[("user", "  a,b  ")]), true).unwrap();
        assert_eq!(out, "<s>A,B|True|2| x|7k=v</s>");
        let t = ChatTemplate::from_jinja("{{ strftime_now('%Y') | length }}", None, None).unwrap();
        assert_eq!(t.render(&[], true).unwrap(), "4");
    }

    #[test]
    fn strftime_formats() {
        // 2024-07-26 13:05:09 UTC, a Friday
        assert_eq!(
            strftime("%d %b %Y %H:%M:%S %a %j %%", 1_722_000_309),
            "26 Jul 2024 13:25:09 Fri 208 %"
        );
        assert_eq!(strftime("%Y-%m-%d %A", 0), "1970-01-01 Thursday");
    }
}
