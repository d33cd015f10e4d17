//! Where the CPU decode steps spend their time, phase by phase: `llmgenie bench --profile`.
//!
//! Off unless [`enable`]d: then each phase of [`super::Transformer`]'s decode step adds its
//! wall time to a counter (two clock reads per phase and layer, about a microsecond per
//! step of SmolLM2's 30 layers). Counters are process-wide and summed over all steps.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A phase of a decode step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Norms and residual adds.
    Norms,
    /// The Q, K and V projections (activations quantized, biases and Q/K norms included).
    Qkv,
    /// Rotating queries and keys and storing keys and values in the caches.
    RopeAndStore,
    /// Attention over each sequence's cache.
    Attention,
    /// The attention output projection.
    AttnOutput,
    /// The gate and up projections and the gated activation between them (one dispatch).
    GateUp,
    /// The down projection.
    Down,
    /// The final norm and the vocabulary projection.
    Vocabulary,
    /// The whole step (what the phases leave is the embedding lookup, rope tables and the like).
    Step,
}

const PHASES: [Phase; 9] = [
    Phase::Norms,
    Phase::Qkv,
    Phase::RopeAndStore,
    Phase::Attention,
    Phase::AttnOutput,
    Phase::GateUp,
    Phase::Down,
    Phase::Vocabulary,
    Phase::Step,
];

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Self::Norms => "norms and residuals",
            Self::Qkv => "Q/K/V projections",
            Self::RopeAndStore => "rope and KV stores",
            Self::Attention => "attention",
            Self::AttnOutput => "attention output projection",
            Self::GateUp => "gate/up projections and activation",
            Self::Down => "down projection",
            Self::Vocabulary => "vocabulary projection",
            Self::Step => "whole step",
        }
    }
}

static ON: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; PHASES.len()] = [const { AtomicU64::new(0) }; PHASES.len()];

/// Start counting (from zero).
pub fn enable() {
    for n in &NANOS {
        n.store(0, Ordering::Relaxed);
    }
    ON.store(true, Ordering::Relaxed);
}

/// Time spent so far in each phase, [`Phase::Step`] last.
pub fn totals() -> Vec<(Phase, Duration)> {
    PHASES
        .iter()
        .zip(&NANOS)
        .map(|(&p, n)| (p, Duration::from_nanos(n.load(Ordering::Relaxed))))
        .collect()
}

/// `f()`, its time added to `phase` when counting.
#[inline]
pub(super) fn time<T>(phase: Phase, f: impl FnOnce() -> T) -> T {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    let start = Instant::now();
    let out = f();
    let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    NANOS[phase as usize].fetch_add(nanos, Ordering::Relaxed);
    out
}
