//! Metrics (Prometheus text format through `metrics-exporter-prometheus`) and the names they go
//! by. The recorder is global to the process: [`install`] sets it up once and every later call
//! returns the same handle, so several servers in one process (tests) share one set of series.

pub mod names;

use std::sync::OnceLock;

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use names::{Kind, ALL};

/// Errors of installing the recorder.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("cannot set up the metrics recorder: {0}")]
    Recorder(String),
}

/// The process's metrics: the exporter's handle and the process collector.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
}

static INSTALLED: OnceLock<Result<Metrics, String>> = OnceLock::new();

fn unit_of(name: &str) -> Option<Unit> {
    if name.ends_with("_seconds") {
        Some(Unit::Seconds)
    } else if name.ends_with("_bytes") {
        Some(Unit::Bytes)
    } else {
        None
    }
}

fn build() -> Result<Metrics, ObserveError> {
    let err = |e: metrics_exporter_prometheus::BuildError| ObserveError::Recorder(e.to_string());
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in [
        (names::HTTP_DURATION, names::LATENCY_BUCKETS),
        (names::TIME_TO_FIRST_TOKEN, names::LATENCY_BUCKETS),
        (names::QUEUE_WAIT, names::LATENCY_BUCKETS),
        (names::INTER_TOKEN_LATENCY, names::TOKEN_BUCKETS),
        (names::PROMPT_TOKENS_PER_SECOND, names::RATE_BUCKETS),
        (names::DECODE_TOKENS_PER_SECOND, names::RATE_BUCKETS),
        (names::MODEL_LOAD_DURATION, names::LOAD_BUCKETS),
    ] {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
            .map_err(err)?;
    }
    let handle = builder.install_recorder().map_err(err)?;
    for m in ALL {
        let unit = unit_of(m.name);
        match (m.kind, unit) {
            (Kind::Counter, _) => metrics::describe_counter!(m.name, m.help),
            (Kind::Gauge, Some(u)) => metrics::describe_gauge!(m.name, u, m.help),
            (Kind::Gauge, None) => metrics::describe_gauge!(m.name, m.help),
            (Kind::Histogram, Some(u)) => metrics::describe_histogram!(m.name, u, m.help),
            (Kind::Histogram, None) => metrics::describe_histogram!(m.name, m.help),
        }
    }
    let process = metrics_process::Collector::default();
    process.describe();
    metrics::gauge!(names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(Metrics { handle, process })
}

/// Set up the global recorder (once per process) and return the metrics.
///
/// # Errors
/// Another recorder was installed first by something else.
pub fn install() -> Result<Metrics, ObserveError> {
    INSTALLED
        .get_or_init(|| build().map_err(|e| e.to_string()))
        .clone()
        .map_err(ObserveError::Recorder)
}

impl Metrics {
    /// The text exposition of every series, after refreshing the process metrics.
    pub fn render(&self) -> String {
        self.process.collect();
        self.handle.run_upkeep();
        self.handle.render()
    }
}

#[cfg(test)]
mod tests {
    use super::names::ALL;

    #[test]
    fn names_follow_prometheus_rules_and_the_readme_lists_them_all() {
        let readme = include_str!("../../README.md");
        for m in ALL {
            assert!(m.name.starts_with("llmgenie_"), "{}", m.name);
            assert!(
                m.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                m.name
            );
            let counter = m.kind == super::Kind::Counter;
            assert_eq!(counter, m.name.ends_with("_total"), "{}", m.name);
            let row = format!("| `{}` | {} |", m.name, m.kind.as_str());
            assert!(readme.contains(&row), "README.md lacks the row {row}");
        }
    }
}
