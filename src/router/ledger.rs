//! The savings ledger: what each request would have cost on Claude against what it cost.
//!
//! A request answered locally saves what Claude would have charged for its tokens; an escalated
//! request spends what Claude charged. Totals are kept per route and per task class.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Claude's prices in US dollars per million tokens, with the date they were read.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Prices {
    pub model: String,
    pub input_per_million: f64,
    pub output_per_million: f64,
    /// When the prices were read from Anthropic's price list (they change).
    pub as_of: String,
}

impl Default for Prices {
    fn default() -> Self {
        // Claude Sonnet 4.5 list prices; configurable because they change.
        Self {
            model: "claude-sonnet-4-5".into(),
            input_per_million: 3.0,
            output_per_million: 15.0,
            as_of: "2026-11-29".into(),
        }
    }
}

impl Prices {
    /// Dollars for these token counts.
    pub fn cost(&self, input_tokens: u64, output_tokens: u64) -> f64 {
        (input_tokens as f64 * self.input_per_million
            + output_tokens as f64 * self.output_per_million)
            / 1e6
    }
}

/// Where a request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    Local,
    Claude,
}

/// Totals for one group of requests.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// What Claude would have charged for the requests answered locally.
    pub saved_usd: f64,
    /// What Claude charged for the escalated requests.
    pub spent_usd: f64,
}

impl Totals {
    fn add(&mut self, route: Route, input: u64, output: u64, usd: f64) {
        self.requests += 1;
        self.input_tokens += input;
        self.output_tokens += output;
        match route {
            Route::Local => self.saved_usd += usd,
            Route::Claude => self.spent_usd += usd,
        }
    }
}

/// Everything the ledger reports (`GET /v1/stats`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub total: Totals,
    pub by_route: BTreeMap<String, Totals>,
    pub by_task: BTreeMap<String, Totals>,
    /// Routed requests whose local answer was validated.
    pub validated: u64,
    /// Requests sent to Claude (directly or after validation): `by_route["claude"]`'s count,
    /// filled in by [`Ledger::report`].
    pub escalated: u64,
    /// Why requests were (to be) sent to Claude: validator reasons, `class_route`,
    /// `low_classifier_confidence`, `requested`; counted whether or not the escalation happened.
    pub escalation_reasons: BTreeMap<String, u64>,
    /// Escalations that did not happen, and why (`no_api_key`, `circuit_open`, `deadline`).
    pub not_escalated: BTreeMap<String, u64>,
    /// Requests answered locally because Claude failed.
    pub degraded: u64,
}

/// The routing facts of one request, for the counters.
#[derive(Debug, Clone, Default)]
pub struct Outcome<'a> {
    pub validated: bool,
    pub reasons: &'a [String],
    pub not_escalated: Option<&'a str>,
    pub degraded: bool,
}

/// The running ledger; a short lock around plain totals.
#[derive(Debug, Default)]
pub struct Ledger {
    prices: Prices,
    report: Mutex<Report>,
}

impl Ledger {
    pub fn new(prices: Prices) -> Self {
        Self {
            prices,
            report: Mutex::new(Report::default()),
        }
    }

    pub fn prices(&self) -> &Prices {
        &self.prices
    }

    /// Record one request; returns the dollars it saved (local) or spent (Claude).
    pub fn record(&self, route: Route, task: &str, input_tokens: u64, output_tokens: u64) -> f64 {
        let usd = self.prices.cost(input_tokens, output_tokens);
        let mut r = self.report.lock().unwrap_or_else(|e| e.into_inner());
        r.total.add(route, input_tokens, output_tokens, usd);
        let route_name = match route {
            Route::Local => "local",
            Route::Claude => "claude",
        };
        r.by_route.entry(route_name.into()).or_default().add(
            route,
            input_tokens,
            output_tokens,
            usd,
        );
        r.by_task
            .entry(task.into())
            .or_default()
            .add(route, input_tokens, output_tokens, usd);
        usd
    }

    /// Count what routing did with one request.
    pub fn note(&self, o: &Outcome<'_>) {
        let mut r = self.report.lock().unwrap_or_else(|e| e.into_inner());
        r.validated += u64::from(o.validated);
        r.degraded += u64::from(o.degraded);
        for reason in o.reasons {
            *r.escalation_reasons.entry(reason.clone()).or_default() += 1;
        }
        if let Some(why) = o.not_escalated {
            *r.not_escalated.entry(why.into()).or_default() += 1;
        }
    }

    pub fn report(&self) -> Report {
        let mut r = self
            .report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        r.escalated = r.by_route.get("claude").map_or(0, |t| t.requests);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_per_route_and_task() {
        let ledger = Ledger::new(Prices {
            model: "m".into(),
            input_per_million: 2.0,
            output_per_million: 10.0,
            as_of: "x".into(),
        });
        let saved = ledger.record(Route::Local, "qa", 1_000_000, 100_000);
        assert!((saved - 3.0).abs() < 1e-9);
        let spent = ledger.record(Route::Claude, "code", 500_000, 0);
        assert!((spent - 1.0).abs() < 1e-9);
        ledger.record(Route::Local, "qa", 0, 1_000_000);
        let r = ledger.report();
        assert_eq!(r.total.requests, 3);
        assert!((r.total.saved_usd - 13.0).abs() < 1e-9);
        assert!((r.total.spent_usd - 1.0).abs() < 1e-9);
        assert_eq!(r.by_task["qa"].requests, 2);
        assert_eq!(r.by_route["claude"].input_tokens, 500_000);
        assert!((r.by_route["local"].saved_usd - 13.0).abs() < 1e-9);
    }
}
