//! Choosing the next token from logits.
//!
//! The chain follows llama.cpp's default order: penalties (repeat over the last N tokens,
//! presence, frequency), then top-k, top-p, min-p, temperature, and a draw from a seeded RNG.
//! Temperature 0 is greedy (the first highest logit after penalties).
//! Log-probabilities are those of the model's own distribution (raw logits, before penalties and
//! temperature), so they measure the model's confidence; the router relies on that.

use std::collections::HashMap;

use rand::distr::{Distribution, Uniform};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Sampling settings, validated by [`SamplingParams::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy. Default 0.8 (llama.cpp).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 disables. Default 40.
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p`; 1 disables. Default 0.95.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the best; 0 disables. Default 0.05.
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recently seen tokens; 1 disables.
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat, presence and frequency penalties look at. Default 64.
    pub repeat_last_n: usize,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Same seed, same output. `None` draws a seed from the OS.
    pub seed: Option<u64>,
    /// How many alternatives to report with each token's log-probability (0..=20).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with no penalties.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Check every field against its range; the message names the field.
    ///
    /// # Errors
    /// The first field out of range, e.g. `temperature must be between 0 and 2, got -1`.
    pub fn validate(&self) -> Result<(), String> {
        let range = |name: &str, v: f32, lo: f32, hi: f32| {
            if v.is_finite() && (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} must be between {lo} and {hi}, got {v}"))
            }
        };
        range("temperature", self.temperature, 0.0, 2.0)?;
        range("top_p", self.top_p, 0.0, 1.0)?;
        range("min_p", self.min_p, 0.0, 1.0)?;
        range("repeat_penalty", self.repeat_penalty, 0.0, 10.0)?;
        range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        if self.top_logprobs > 20 {
            return Err(format!(
                "top_logprobs must be between 0 and 20, got {}",
                self.top_logprobs
            ));
        }
        Ok(())
    }
}

/// The token chosen at one step, with the model's log-probability for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    /// The most likely alternatives (token, logprob), best first, when asked for.
    pub top: Vec<(u32, f32)>,
}

/// A sampler with its own RNG; one per sequence.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch buffer reused across steps: (token, logit).
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            params,
            rng,
            candidates: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Choose the next token. `history` is every token of the sequence so far (prompt included).
    /// Returns `None` only for empty or all-NaN logits.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Option<Sampled> {
        // Copy the logits only when a penalty will change them.
        let penalised = self.has_penalties().then(|| {
            let mut adjusted = logits.to_vec();
            self.apply_penalties(&mut adjusted, history);
            adjusted
        });
        let adjusted = penalised.as_deref().unwrap_or(logits);
        let token = self.choose(adjusted)?;
        self.finish(logits, token)
    }

    /// As [`Sampler::sample`], among the tokens `allowed` accepts (a grammar, say). Candidates
    /// are offered best first and only as many as the sampling settings can use are collected,
    /// so a cheap check on a few hundred tokens usually decides. `None` when no token is allowed.
    pub fn sample_masked(
        &mut self,
        logits: &[f32],
        history: &[u32],
        allowed: &mut dyn FnMut(u32) -> bool,
    ) -> Option<Sampled> {
        let mut adjusted = logits.to_vec();
        if self.has_penalties() {
            self.apply_penalties(&mut adjusted, history);
        }
        let p = &self.params;
        let want = if p.temperature <= 0.0 {
            1
        } else if p.top_k > 0 {
            p.top_k
        } else {
            256
        };
        let mut order: Vec<u32> = (0..adjusted.len() as u32)
            .filter(|&i| !adjusted[i as usize].is_nan())
            .collect();
        let by_logit = |a: &u32, b: &u32| {
            adjusted[*b as usize]
                .total_cmp(&adjusted[*a as usize])
                .then(a.cmp(b))
        };
        // Look at the best 1024 first; fall back to the whole vocabulary when too few pass.
        let head = order.len().min(1024);
        if head < order.len() {
            order.select_nth_unstable_by(head - 1, by_logit);
        }
        order[..head].sort_unstable_by(by_logit);
        let mut kept: Vec<u32> = Vec::with_capacity(want);
        for &t in &order[..head] {
            if kept.len() == want {
                break;
            }
            if allowed(t) {
                kept.push(t);
            }
        }
        if kept.len() < want && head < order.len() {
            let mut rest = order[head..].to_vec();
            rest.sort_unstable_by(by_logit);
            for t in rest {
                if kept.len() == want {
                    break;
                }
                if allowed(t) {
                    kept.push(t);
                }
            }
        }
        if kept.is_empty() {
            return None;
        }
        let mut masked = vec![f32::NEG_INFINITY; adjusted.len()];
        for &t in &kept {
            masked[t as usize] = adjusted[t as usize];
        }
        let token = self.choose(&masked)?;
        self.finish(logits, token)
    }

    /// Greedy or a draw, on already penalised logits.
    fn choose(&mut self, adjusted: &[f32]) -> Option<u32> {
        if self.params.temperature <= 0.0 {
            argmax(adjusted)
        } else {
            self.draw(adjusted)
        }
    }

    /// The model's log-probabilities for the chosen token and the best alternatives.
    fn finish(&self, logits: &[f32], token: u32) -> Option<Sampled> {
        let (max, log_z) = log_normaliser(logits)?;
        let logprob = logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |l| l - max - log_z);
        let top = if self.params.top_logprobs > 0 {
            top_n(logits, self.params.top_logprobs)
                .into_iter()
                .map(|(t, l)| (t, l - max - log_z))
                .collect()
        } else {
            Vec::new()
        };
        Some(Sampled {
            token,
            logprob,
            top,
        })
    }

    fn has_penalties(&self) -> bool {
        let p = &self.params;
        p.repeat_last_n > 0
            && (p.repeat_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0)
    }

    fn apply_penalties(&self, logits: &mut [f32], history: &[u32]) {
        let p = &self.params;
        let no_repeat = p.repeat_penalty == 1.0;
        let recent = &history[history.len().saturating_sub(p.repeat_last_n)..];
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in recent {
            *counts.entry(t).or_default() += 1;
        }
        for (&t, &count) in &counts {
            let Some(l) = logits.get_mut(t as usize) else {
                continue;
            };
            if !no_repeat {
                *l = if *l > 0.0 {
                    *l / p.repeat_penalty
                } else {
                    *l * p.repeat_penalty
                };
            }
            *l -= count as f32 * p.frequency_penalty + p.presence_penalty;
        }
    }

    fn draw(&mut self, logits: &[f32]) -> Option<u32> {
        let p = &self.params;
        let c = &mut self.candidates;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan())
                .map(|(i, &l)| (i as u32, l)),
        );
        if c.is_empty() {
            return None;
        }
        let by_logit_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(by_logit_desc);
        // Probabilities at temperature 1 for the top-p and min-p cuts (llama.cpp order).
        let best = c[0].1;
        let mut probs: Vec<f32> = c.iter().map(|(_, l)| (l - best).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        let mut keep = c.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, pr) in probs.iter().enumerate() {
                acc += pr;
                if acc >= p.top_p {
                    keep = keep.min(i + 1);
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            let above = probs.iter().take_while(|&&x| x >= floor).count().max(1);
            keep = keep.min(above);
        }
        c.truncate(keep.max(1));
        let t = p.temperature;
        let weights: Vec<f32> = c.iter().map(|(_, l)| ((l - best) / t).exp()).collect();
        let total: f32 = weights.iter().sum();
        let u = Uniform::new(0.0f32, 1.0).ok()?.sample(&mut self.rng) * total;
        let mut acc = 0.0;
        for ((tok, _), w) in c.iter().zip(&weights) {
            acc += w;
            if u < acc {
                return Some(*tok);
            }
        }
        c.last().map(|(t, _)| *t)
    }
}

/// `(max, log(sum(exp(l - max))))` over the logits that are not NaN, in sixteen lanes with the
/// model's vectorised exponential (a vocabulary of 262,144 logits per token otherwise took
/// libm's `expf` one at a time).
fn log_normaliser(logits: &[f32]) -> Option<(f32, f32)> {
    let max = argmax(logits).and_then(|i| logits.get(i as usize).copied())?;
    if !max.is_finite() {
        return None;
    }
    let mut lanes = [0f32; 16];
    let chunks = logits.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &l) in lanes.iter_mut().zip(chunk) {
            let e = crate::model::fast_exp(l - max);
            *a += if l.is_nan() { 0.0 } else { e };
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for &l in rest.iter().filter(|l| !l.is_nan()) {
        sum += crate::model::fast_exp(l - max);
    }
    Some((max, sum.ln()))
}

/// Index of the first maximum, ignoring NaN.
///
/// Two passes that vectorise (lane-wise maxima, then the first index holding the maximum)
/// instead of one branchy scan: a batched step of eight SmolLM2 sequences picks from
/// 8 x 49,152 logits.
pub(crate) fn argmax(logits: &[f32]) -> Option<u32> {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = logits.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &l) in lanes.iter_mut().zip(chunk) {
            // NaN compares false, so it never becomes a maximum.
            *m = if l > *m { l } else { *m };
        }
    }
    let max = lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
    logits.iter().position(|&l| l == max).map(|i| i as u32)
}

/// The `n` highest logits, best first.
fn top_n(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| !l.is_nan())
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if n < v.len() {
        v.select_nth_unstable_by(n - 1, cmp);
        v.truncate(n);
    }
    v.sort_unstable_by(cmp);
    v
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The normaliser over a vocabulary-sized row (NaN skipped, lengths off the lanes) agrees
    /// with an f64 computation.
    #[test]
    fn log_normaliser_matches_f64() {
        let mut rng = 99u64;
        for len in [3usize, 17, 49_153] {
            let mut xs: Vec<f32> = (0..len)
                .map(|_| {
                    rng = rng
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((rng >> 40) % 4000) as f32 / 100.0 - 20.0
                })
                .collect();
            xs[len / 2] = f32::NAN;
            let (max, log_z) = log_normaliser(&xs).unwrap();
            let m = xs
                .iter()
                .filter(|x| !x.is_nan())
                .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
            let z: f64 = xs
                .iter()
                .filter(|x| !x.is_nan())
                .map(|&x| (f64::from(x) - m).exp())
                .sum();
            assert_eq!(f64::from(max), m);
            assert!(
                (f64::from(log_z) - z.ln()).abs() < 1e-5,
                "{len}: {log_z} vs {}",
                z.ln()
            );
        }
        assert!(log_normaliser(&[f32::NAN, f32::NAN]).is_none());
        assert!(log_normaliser(&[f32::NEG_INFINITY]).is_none());
    }

    /// The first index of the largest value that is not NaN, against a plain scan: ties (the
    /// first wins), NaN anywhere, all minus infinity, only NaN, lengths off the 16 lanes.
    #[test]
    fn argmax_is_the_first_largest_ignoring_nan() {
        let plain = |xs: &[f32]| {
            let mut best: Option<(usize, f32)> = None;
            for (i, &x) in xs.iter().enumerate() {
                if !x.is_nan() && best.is_none_or(|(_, b)| x > b) {
                    best = Some((i, x));
                }
            }
            best.map(|(i, _)| i as u32)
        };
        let mut rng = 12345u64;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((rng >> 40) % 1000) as f32 / 100.0 - 5.0
        };
        let mut cases: Vec<Vec<f32>> = vec![
            vec![],
            vec![f32::NAN; 20],
            vec![f32::NEG_INFINITY; 33],
            vec![f32::NAN, f32::NEG_INFINITY, 1.0, 1.0, f32::NAN],
        ];
        for len in [1usize, 15, 16, 17, 100, 49_152] {
            let mut v: Vec<f32> = (0..len).map(|_| next()).collect();
            v[len / 2] = f32::NAN;
            cases.push(v);
        }
        let mut tie = vec![0.0f32; 40];
        tie[35] = 3.0;
        tie[3] = 3.0;
        cases.push(tie);
        for xs in &cases {
            assert_eq!(argmax(xs), plain(xs), "{:?}", &xs[..xs.len().min(8)]);
        }
        assert_eq!(argmax(&[f32::NAN, 2.0, f32::NAN]), Some(1));
    }

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(7),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_picks_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy());
        let out = s.sample(&[0.1, 3.0, 3.0, -1.0], &[]).unwrap();
        assert_eq!(out.token, 1);
    }

    #[test]
    fn logprob_is_log_softmax_of_raw_logits() {
        let mut s = Sampler::new(SamplingParams::greedy());
        let logits = [1.0f32, 2.0, 3.0];
        let out = s.sample(&logits, &[]).unwrap();
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((out.logprob - (3.0f32.exp() / z).ln()).abs() < 1e-5);
    }

    #[test]
    fn top_logprobs_are_sorted_and_sized() {
        let mut p = SamplingParams::greedy();
        p.top_logprobs = 2;
        let mut s = Sampler::new(p);
        let out = s.sample(&[0.5, 2.0, 1.0, -3.0], &[]).unwrap();
        let ids: Vec<u32> = out.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 2]);
        assert!(out.top[0].1 > out.top[1].1);
    }

    #[test]
    fn same_seed_same_tokens_different_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut p = params(1.5);
            p.top_k = 0;
            p.top_p = 1.0;
            p.min_p = 0.0;
            p.seed = Some(seed);
            let mut s = Sampler::new(p);
            (0..40)
                .map(|_| s.sample(&logits, &[]).unwrap().token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut p = params(2.0);
        p.top_k = 1;
        let mut s = Sampler::new(p);
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.0, 0.1, 5.0, 4.9], &[]).unwrap().token, 2);
        }
    }

    #[test]
    fn top_p_cuts_the_tail() {
        let mut p = params(1.0);
        p.top_k = 0;
        p.min_p = 0.0;
        p.top_p = 0.5;
        let mut s = Sampler::new(p);
        // token 0 holds ~0.88 of the mass: top-p 0.5 keeps only it.
        for _ in 0..20 {
            assert_eq!(s.sample(&[4.0, 2.0, 1.0, 0.0], &[]).unwrap().token, 0);
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let mut p = params(1.0);
        p.top_k = 0;
        p.top_p = 1.0;
        p.min_p = 0.5;
        let mut s = Sampler::new(p);
        for _ in 0..50 {
            let t = s.sample(&[3.0, 2.9, -5.0, -5.0], &[]).unwrap().token;
            assert!(t == 0 || t == 1);
        }
    }

    #[test]
    fn repeat_penalty_changes_the_greedy_choice() {
        let mut p = SamplingParams::greedy();
        p.repeat_penalty = 2.0;
        let mut s = Sampler::new(p);
        assert_eq!(s.sample(&[2.0, 1.5], &[0]).unwrap().token, 1);
        let mut plain = Sampler::new(SamplingParams::greedy());
        assert_eq!(plain.sample(&[2.0, 1.5], &[0]).unwrap().token, 0);
    }

    #[test]
    fn presence_and_frequency_penalties_subtract() {
        let mut p = SamplingParams::greedy();
        p.frequency_penalty = 0.4;
        let mut s = Sampler::new(p.clone());
        // token 0 seen twice: 2.0 - 0.8 = 1.2 < 1.5
        assert_eq!(s.sample(&[2.0, 1.5], &[0, 0]).unwrap().token, 1);
        p.frequency_penalty = 0.0;
        p.presence_penalty = 0.4;
        let mut s = Sampler::new(p);
        // presence counts once: 2.0 - 0.4 = 1.6 > 1.5
        assert_eq!(s.sample(&[2.0, 1.5], &[0, 0]).unwrap().token, 0);
    }

    #[test]
    fn masked_sampling_only_picks_allowed_tokens() {
        let logits = [5.0f32, 4.0, 3.0, 2.0, 1.0];
        let mut greedy = Sampler::new(SamplingParams::greedy());
        let out = greedy
            .sample_masked(&logits, &[], &mut |t| t % 2 == 1)
            .unwrap();
        assert_eq!(out.token, 1);
        // Log-probabilities stay those of the unconstrained model.
        let plain = Sampler::new(SamplingParams::greedy())
            .sample(&logits, &[])
            .unwrap();
        assert!(out.logprob < plain.logprob);
        let mut s = Sampler::new(params(1.5));
        for _ in 0..50 {
            let t = s
                .sample_masked(&logits, &[], &mut |t| t >= 3)
                .unwrap()
                .token;
            assert!(t >= 3);
        }
        assert!(greedy.sample_masked(&logits, &[], &mut |_| false).is_none());
    }

    #[test]
    fn nan_and_empty_logits_are_handled() {
        let mut s = Sampler::new(params(0.7));
        assert!(s.sample(&[], &[]).is_none());
        assert!(s.sample(&[f32::NAN, f32::NAN], &[]).is_none());
        assert_eq!(s.sample(&[f32::NAN, 1.0], &[]).unwrap().token, 1);
    }

    #[test]
    fn validation_names_the_field() {
        let mut p = SamplingParams {
            temperature: -1.0,
            ..SamplingParams::default()
        };
        assert_eq!(
            p.validate().unwrap_err(),
            "temperature must be between 0 and 2, got -1"
        );
        p.temperature = f32::NAN;
        assert!(p.validate().unwrap_err().starts_with("temperature"));
        p.temperature = 1.0;
        p.top_logprobs = 21;
        assert!(p.validate().unwrap_err().starts_with("top_logprobs"));
        assert!(SamplingParams::default().validate().is_ok());
    }
}
