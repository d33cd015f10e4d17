//! The routing policy: which requests are routed, where each task class goes, and the settings
//! of escalation (`[router]` in the config file).
//!
//! A request whose model is `auto` (or that names no model while `default_model = "auto"`) is
//! routed: the classifier names its class, and the class's route says where it goes. `local`
//! (or a local model's name) means: answer locally, validate, escalate to Claude when the
//! validator objects. `claude` means: send it to Claude directly. When the classifier's
//! confidence is below `confidence_threshold`, the class's `cautious` route is used instead.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::classifier::{Prediction, CLASSES};
use super::ledger::Prices;
use super::validator::Thresholds;

/// Errors of a router configuration.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("[router.routes] names an unknown task class '{0}' (classes: {classes})", classes = CLASSES.join(", "))]
    UnknownClass(String),
    #[error("router setting {field}: {message}")]
    Invalid { field: String, message: String },
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A local model (`None`: the router's local model), validated, escalated when it fails.
    Local(Option<String>),
    /// Claude, directly.
    Claude,
}

impl Target {
    /// `claude`, `local`, or a local model's name.
    pub fn parse(text: &str) -> Self {
        match text.trim() {
            "claude" => Self::Claude,
            "local" | "" => Self::Local(None),
            model => Self::Local(Some(model.to_string())),
        }
    }
}

/// A class's route as written in the config.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClassRoute {
    /// `local`, `claude` or a local model name.
    pub route: String,
    /// Used instead when the classifier is unsure (default: `claude`).
    #[serde(default = "claude")]
    pub cautious: String,
}

fn claude() -> String {
    "claude".into()
}

/// Validator thresholds as written in the config; unset fields keep their defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidatorSettings {
    pub min_chars: Option<usize>,
    pub min_mean_logprob: Option<f32>,
    pub min_token_logprob: Option<f32>,
    pub repeat_ngram: Option<usize>,
    pub repeat_count: Option<usize>,
}

impl ValidatorSettings {
    pub fn thresholds(&self) -> Thresholds {
        let d = Thresholds::default();
        Thresholds {
            min_chars: self.min_chars.unwrap_or(d.min_chars),
            min_mean_logprob: self.min_mean_logprob.unwrap_or(d.min_mean_logprob),
            min_token_logprob: self.min_token_logprob.unwrap_or(d.min_token_logprob),
            repeat_ngram: self.repeat_ngram.unwrap_or(d.repeat_ngram),
            repeat_count: self.repeat_count.unwrap_or(d.repeat_count),
        }
    }
}

/// The `[router]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// What a request that names no model gets: `auto` (routed) or a local model name.
    pub default_model: String,
    /// The local model of `local` routes (default: the server's first model).
    pub local_model: Option<String>,
    /// The Claude model escalations and `claude` routes use.
    pub claude_model: String,
    /// Claude API base URL (the key comes from `ANTHROPIC_API_KEY` only).
    pub claude_base_url: String,
    /// Below this classifier confidence, the class's cautious route is used.
    pub confidence_threshold: f32,
    /// Stream local answers of routed requests as they are generated: no validation, never an
    /// escalation mid-stream.
    pub stream_local_immediately: bool,
    /// One deadline per routed request: local generation, validation and every Claude attempt.
    pub deadline_secs: f64,
    /// `max_tokens` sent to Claude when the request sets none.
    pub claude_max_tokens: u32,
    /// Claude attempts after the first.
    pub claude_retries: u32,
    /// Task classifier weights (default: the weights built into the binary).
    pub classifier_weights: Option<PathBuf>,
    /// Class name to route.
    pub routes: BTreeMap<String, ClassRoute>,
    pub validator: ValidatorSettings,
    /// Claude's prices, for the savings ledger.
    pub prices: Prices,
}

/// The default route of each class, from the local model's measured acceptance rate per class
/// on `models/validator/labelled.jsonl` (README, "Routing"): classes the 135M model mostly gets
/// right are answered locally and validated; the others go to Claude directly, since a local
/// attempt would almost always be escalated and only add latency.
pub const DEFAULT_ROUTES: [(&str, &str); 8] = [
    ("chat", "local"),
    ("qa", "local"),
    ("creative", "local"),
    ("summarize", "local"),
    ("extract", "local"),
    ("translate", "claude"),
    ("math", "claude"),
    ("code", "claude"),
];

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            default_model: "auto".into(),
            local_model: None,
            claude_model: Prices::default().model,
            claude_base_url: "https://api.anthropic.com".into(),
            confidence_threshold: 0.6,
            stream_local_immediately: false,
            deadline_secs: 120.0,
            claude_max_tokens: 1024,
            claude_retries: 4,
            classifier_weights: None,
            routes: BTreeMap::new(),
            validator: ValidatorSettings::default(),
            prices: Prices::default(),
        }
    }
}

/// What the policy decided for one classified request.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub task: &'static str,
    pub confidence: f32,
    pub target: Target,
    /// The classifier was unsure, so the cautious route was taken.
    pub cautious: bool,
}

impl RouterConfig {
    /// Check the settings; unknown classes and out-of-range numbers are errors.
    ///
    /// # Errors
    /// The first problem found.
    pub fn check(&self) -> Result<(), PolicyError> {
        if let Some(c) = self.routes.keys().find(|c| !CLASSES.contains(&c.as_str())) {
            return Err(PolicyError::UnknownClass(c.clone()));
        }
        let invalid = |field: &str, message: &str| {
            Err(PolicyError::Invalid {
                field: field.into(),
                message: message.into(),
            })
        };
        if !(0.0..=1.0).contains(&self.confidence_threshold) {
            return invalid("confidence_threshold", "must be between 0 and 1");
        }
        if !(self.deadline_secs > 0.0 && self.deadline_secs <= 86_400.0) {
            return invalid("deadline_secs", "must be between 0 and 86400 seconds");
        }
        if self.claude_max_tokens == 0 {
            return invalid("claude_max_tokens", "must be at least 1");
        }
        if !self.claude_model.starts_with("claude") {
            return invalid("claude_model", "must be a Claude model name (claude-...)");
        }
        Ok(())
    }

    /// The route of a class, from the config or the defaults.
    pub fn route_of(&self, task: &str) -> ClassRoute {
        if let Some(r) = self.routes.get(task) {
            return r.clone();
        }
        let route = DEFAULT_ROUTES
            .iter()
            .find(|(c, _)| *c == task)
            .map_or("local", |(_, r)| *r);
        ClassRoute {
            route: route.into(),
            cautious: claude(),
        }
    }

    /// Decide where a classified request goes.
    pub fn plan(&self, p: &Prediction) -> Plan {
        let r = self.route_of(p.task);
        let cautious = p.confidence < self.confidence_threshold;
        let target = Target::parse(if cautious { &r.cautious } else { &r.route });
        Plan {
            task: p.task,
            confidence: p.confidence,
            target,
            cautious,
        }
    }

    pub fn deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.deadline_secs)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pred(task: &'static str, confidence: f32) -> Prediction {
        Prediction { task, confidence }
    }

    #[test]
    fn classes_follow_their_routes_and_the_threshold() {
        let cfg = RouterConfig::default();
        assert_eq!(cfg.plan(&pred("chat", 0.9)).target, Target::Local(None));
        assert_eq!(cfg.plan(&pred("code", 0.9)).target, Target::Claude);
        let unsure = cfg.plan(&pred("chat", 0.2));
        assert!(unsure.cautious);
        assert_eq!(unsure.target, Target::Claude);
    }

    #[test]
    fn config_overrides_and_checks() {
        let cfg: RouterConfig = toml::from_str(
            r#"
            confidence_threshold = 0.3
            [routes.code]
            route = "qwen2.5-1.5b"
            cautious = "local"
            "#,
        )
        .unwrap();
        cfg.check().unwrap();
        assert_eq!(
            cfg.plan(&pred("code", 0.9)).target,
            Target::Local(Some("qwen2.5-1.5b".into()))
        );
        assert_eq!(cfg.plan(&pred("code", 0.1)).target, Target::Local(None));
        let bad: RouterConfig = toml::from_str("[routes.poetry]\nroute = \"local\"").unwrap();
        assert!(matches!(bad.check(), Err(PolicyError::UnknownClass(c)) if c == "poetry"));
        assert!(toml::from_str::<RouterConfig>("confidence = 0.3").is_err());
        let bad: RouterConfig = toml::from_str("confidence_threshold = 1.5").unwrap();
        assert!(bad.check().is_err());
    }
}
