//! Every metric's name, kind, help text and histogram buckets: the one list that the recorder
//! describes, the README documents, and the alert rules and dashboard use.

/// A metric's type in the Prometheus sense.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

pub const HTTP_REQUESTS: &str = "llmgenie_http_requests_total";
pub const HTTP_DURATION: &str = "llmgenie_http_request_duration_seconds";
pub const HTTP_IN_FLIGHT: &str = "llmgenie_http_requests_in_flight";

pub const TIME_TO_FIRST_TOKEN: &str = "llmgenie_time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY: &str = "llmgenie_inter_token_latency_seconds";
pub const QUEUE_WAIT: &str = "llmgenie_queue_wait_seconds";
pub const PROMPT_TOKENS: &str = "llmgenie_prompt_tokens_total";
pub const GENERATED_TOKENS: &str = "llmgenie_generated_tokens_total";
pub const PROMPT_TOKENS_PER_SECOND: &str = "llmgenie_prompt_tokens_per_second";
pub const DECODE_TOKENS_PER_SECOND: &str = "llmgenie_decode_tokens_per_second";
pub const QUEUE_DEPTH: &str = "llmgenie_queue_depth";
pub const RUNNING_SEQUENCES: &str = "llmgenie_running_sequences";
pub const SEQUENCES_FINISHED: &str = "llmgenie_sequences_finished_total";
pub const PREFIX_CACHE_HITS: &str = "llmgenie_prefix_cache_hits_total";
pub const PREFIX_CACHE_REUSED_TOKENS: &str = "llmgenie_prefix_cache_reused_tokens_total";

pub const MODELS_RESIDENT: &str = "llmgenie_models_resident";
pub const MODEL_BYTES: &str = "llmgenie_model_resident_bytes";
pub const MODEL_LOADS: &str = "llmgenie_model_loads_total";
pub const MODEL_UNLOADS: &str = "llmgenie_model_unloads_total";
pub const MODEL_LOAD_DURATION: &str = "llmgenie_model_load_duration_seconds";

pub const ROUTED_REQUESTS: &str = "llmgenie_routed_requests_total";
pub const ESCALATIONS: &str = "llmgenie_escalations_total";
pub const VALIDATOR_VERDICTS: &str = "llmgenie_validator_verdicts_total";
pub const CLAUDE_ATTEMPTS: &str = "llmgenie_claude_attempts_total";
pub const CLAUDE_CIRCUIT_OPEN: &str = "llmgenie_claude_circuit_open";
pub const SAVED_DOLLARS: &str = "llmgenie_ledger_saved_dollars";
pub const SPENT_DOLLARS: &str = "llmgenie_ledger_spent_dollars";

pub const BUILD_INFO: &str = "llmgenie_build_info";

/// Seconds, for request and first-token latency: 5 ms to 2 min.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Seconds between tokens: 1 ms to 2 s.
pub const TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0,
];
/// Tokens per second: 1 to 20,000.
pub const RATE_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 20.0, 35.0, 50.0, 75.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 20000.0,
];
/// Seconds to load a model: 50 ms to 10 min.
pub const LOAD_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
];

/// One metric: name, kind, labels, help.
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn m(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind,
        labels,
        help,
    }
}

use Kind::{Counter, Gauge, Histogram};

/// Every metric llmgenie exports (besides the `process_*` ones of the process collector).
pub const ALL: &[Metric] = &[
    m(HTTP_REQUESTS, Counter, &["route", "method", "status"], "HTTP requests by route pattern, method and status code."),
    m(HTTP_DURATION, Histogram, &["route", "method"], "Time until the response head was ready (streams go on after it)."),
    m(HTTP_IN_FLIGHT, Gauge, &[], "HTTP requests being handled now."),
    m(TIME_TO_FIRST_TOKEN, Histogram, &["model"], "Time from submission to the first generated token, queueing and prompt included."),
    m(INTER_TOKEN_LATENCY, Histogram, &["model"], "Time between consecutive generated tokens."),
    m(QUEUE_WAIT, Histogram, &["model"], "Time a request waited for a free sequence slot."),
    m(PROMPT_TOKENS, Counter, &["model"], "Prompt tokens evaluated."),
    m(GENERATED_TOKENS, Counter, &["model"], "Tokens generated."),
    m(PROMPT_TOKENS_PER_SECOND, Histogram, &["model"], "Prompt evaluation speed per request."),
    m(DECODE_TOKENS_PER_SECOND, Histogram, &["model"], "Generation speed per request, after the first token."),
    m(QUEUE_DEPTH, Gauge, &["model"], "Requests waiting for a sequence slot."),
    m(RUNNING_SEQUENCES, Gauge, &["model"], "Sequences being generated."),
    m(SEQUENCES_FINISHED, Counter, &["model", "reason"], "Finished sequences by reason: stop, length, cancelled, error."),
    m(PREFIX_CACHE_HITS, Counter, &["model"], "Requests that started from a cached prompt prefix."),
    m(PREFIX_CACHE_REUSED_TOKENS, Counter, &["model"], "Prompt tokens taken from the prefix cache instead of evaluated."),
    m(MODELS_RESIDENT, Gauge, &[], "Models loaded and resident."),
    m(MODEL_BYTES, Gauge, &["model"], "Bytes of model file held per resident model."),
    m(MODEL_LOADS, Counter, &["model", "outcome"], "Model loads by outcome: ok, error."),
    m(MODEL_UNLOADS, Counter, &["model", "reason"], "Model unloads by reason: expired (keep-alive), evicted (memory budget), request (keep_alive 0)."),
    m(MODEL_LOAD_DURATION, Histogram, &["model"], "Time to load a model."),
    m(ROUTED_REQUESTS, Counter, &["task", "route"], "Answered requests by task class (unclassified when a model was named) and route: local, claude."),
    m(ESCALATIONS, Counter, &["reason"], "Reasons requests were sent (or meant to be sent) to Claude."),
    m(VALIDATOR_VERDICTS, Counter, &["task", "verdict"], "Validator verdicts on local answers: accept, escalate."),
    m(CLAUDE_ATTEMPTS, Counter, &["outcome", "status"], "Claude API attempts: ok, retried or failed, with the HTTP status (transport: no response)."),
    m(CLAUDE_CIRCUIT_OPEN, Gauge, &[], "1 while the Claude circuit breaker refuses calls."),
    m(SAVED_DOLLARS, Gauge, &[], "Cumulative US dollars Claude would have charged for the answers served locally."),
    m(SPENT_DOLLARS, Gauge, &[], "Cumulative US dollars spent on Claude."),
    m(BUILD_INFO, Gauge, &["version"], "Always 1; the version label says which build runs."),
];
