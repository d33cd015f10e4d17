//! Decode steps on the CPU: one new token for each of several sequences, on plain buffers.
//!
//! Through candle a decode step is some twenty operations per layer (norms, reshapes, copies,
//! rotations, adds), each allocating its output, wrapping it in a tensor and locking storage.
//! With one token per sequence each of them does little work, so together they were a third
//! of a step's time, all on the main thread while the workers waited. Here the small operations
//! are loops over the step's rows, and the large ones (projections, attention, the gated
//! activation) are the same kernels the candle path calls, on the same values: every result is
//! bit for bit the candle path's (the norms and rotations below repeat candle's arithmetic in
//! candle's order), which the greedy tests check.

use candle_core::{DType, Tensor};

use super::cache::KvCache;
use super::decode_attn;
use super::linear::Linear;
use super::phases::{time, Phase};
use super::transformer::{visible, Layer, RopeStyle, Transformer};
use super::ModelError;

/// A layer's norm weights and biases as host values.
pub(super) struct HostParams {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    post_attn_norm: Option<Vec<f32>>,
    post_ffn_norm: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
}

fn host(t: &Tensor) -> Result<Vec<f32>, ModelError> {
    Ok(super::f32_values(t)?)
}

fn host_opt(t: &Option<Tensor>) -> Result<Option<Vec<f32>>, ModelError> {
    t.as_ref().map(host).transpose()
}

impl HostParams {
    /// The layer's small tensors, copied.
    ///
    /// # Errors
    /// A candle failure reading them.
    pub(super) fn new(layer: &Layer) -> Result<Self, ModelError> {
        Ok(Self {
            attn_norm: host(&layer.attn_norm)?,
            ffn_norm: host(&layer.ffn_norm)?,
            post_attn_norm: host_opt(&layer.post_attn_norm)?,
            post_ffn_norm: host_opt(&layer.post_ffn_norm)?,
            q_norm: host_opt(&layer.q_norm)?,
            k_norm: host_opt(&layer.k_norm)?,
            bq: host_opt(&layer.bq)?,
            bk: host_opt(&layer.bk)?,
            bv: host_opt(&layer.bv)?,
        })
    }
}

/// RMS norm of each row of `x` (rows as wide as `w`), as candle's `rms_norm` computes it: the
/// sum of squares added in order, `x / sqrt(mean + eps) * w`.
fn rms_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let n = w.len().max(1);
    let mut out = vec![0f32; x.len()];
    for (src, dst) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let sum2 = src.iter().map(|&v| v * v).sum::<f32>();
        let m = (sum2 / n as f32 + eps).sqrt();
        for ((d, &s), &a) in dst.iter_mut().zip(src).zip(w) {
            *d = s / m * a;
        }
    }
    out
}

/// `x += y`, element by element.
fn add(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `x += y`, with `y`'s rows normed first where the layer has a norm for them (Gemma's post
/// norms).
fn add_normed(x: &mut [f32], y: Vec<f32>, norm: &Option<Vec<f32>>, eps: f32) {
    let y = match norm {
        Some(w) => rms_rows(&y, w, eps),
        None => y,
    };
    add(x, &y);
}

/// Each row of `x` plus `bias`.
fn add_bias(x: &mut [f32], bias: &Option<Vec<f32>>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len().max(1)) {
            add(row, b);
        }
    }
}

/// Rotate the first `dims` values of each head (`head_dim` wide) of `x` by the angles whose
/// cosines and sines are `cos`, `sin` (`dims / 2` each), as candle's `rope_i` (interleaved
/// pairs) or `rope` (halves) computes it.
fn rotate(x: &mut [f32], head_dim: usize, dims: usize, style: RopeStyle, cos: &[f32], sin: &[f32]) {
    let half = dims / 2;
    for head in x.chunks_exact_mut(head_dim.max(1)) {
        for i in 0..half.min(cos.len()).min(sin.len()) {
            let (a, b) = match style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Neox => (i, i + half),
            };
            let (x1, x2) = (head[a], head[b]);
            head[a] = x1 * cos[i] - x2 * sin[i];
            head[b] = x1 * sin[i] + x2 * cos[i];
        }
    }
}

/// A sequence's rope cosines and sines for one base.
type Rope = (Vec<f32>, Vec<f32>);

/// Unpack a fixed number of results.
fn parts<const N: usize>(v: Vec<Vec<f32>>) -> Result<[Vec<f32>; N], ModelError> {
    v.try_into()
        .map_err(|_| ModelError::Internal("projection count"))
}

impl Transformer {
    /// Rotate each sequence's queries and keys (`q`, `k`, one row per sequence) and store its
    /// keys and values (`v`) in its cache at layer `index`; returns the views of each cache the
    /// sequence's query may see. Sequences are shared out over the worker pool: storing a key
    /// writes each of its dimensions to its own row of the transposed cache, a cache miss
    /// apiece, so two threads halve that time.
    #[allow(clippy::too_many_arguments)]
    fn rotate_and_store(
        &self,
        layer: &Layer,
        index: usize,
        q: &mut [f32],
        k: &mut [f32],
        v: &[f32],
        caches: &mut [&mut KvCache],
        tables: &[Rope],
    ) -> Result<Vec<(Tensor, Tensor)>, ModelError> {
        let cfg = &self.cfg;
        let n = caches.len().max(1);
        let (qw, kw) = (q.len() / n, k.len() / n);
        type Views = Result<(Tensor, Tensor), ModelError>;
        let mut results: Vec<Option<Views>> = (0..caches.len()).map(|_| None).collect();
        let items: Vec<_> = caches
            .iter_mut()
            .zip(q.chunks_mut(qw.max(1)))
            .zip(k.chunks_mut(kw.max(1)))
            .zip(v.chunks(kw.max(1)))
            .zip(results.iter_mut())
            .map(|((((c, q), k), v), slot)| (&mut **c, q, k, v, slot))
            .collect();
        super::par_each(items, |i, (cache, qi, ki, vi, slot)| {
            let Some((cos, sin)) = tables.get(i) else {
                return;
            };
            let (dims, style, hd) = (cfg.rope_dims, cfg.rope_style, cfg.head_dim);
            rotate(qi, hd, dims, style, cos, sin);
            rotate(ki, hd, dims, style, cos, sin);
            let pos = cache.len();
            **slot = Some(
                cache
                    .append_values(index, ki, vi, cfg.n_kv_heads, hd)
                    .and_then(|(k_all, v_all)| visible(layer, k_all, v_all, pos, pos + 1))
                    .map(|(k_all, v_all, _)| (k_all, v_all)),
            );
        });
        results
            .into_iter()
            .map(|slot| {
                slot.unwrap_or(Err(ModelError::Internal(
                    "a sequence's KV store did not run",
                )))
            })
            .collect()
    }

    /// Whether [`Transformer::decode_step`] applies: f32 on the CPU, with host parameters.
    pub(super) fn has_decode_step(&self) -> bool {
        decode_attn::applies(&self.device, DType::F32)
            && self.out_norm_host.is_some()
            && self.layers.iter().all(|l| l.host.is_some())
    }

    /// One decode step: `tokens[i]` is the next token of the sequence whose cache is
    /// `caches[i]`. Returns the logits, `(tokens.len(), vocab)`. The caller checks counts and
    /// context lengths.
    ///
    /// # Errors
    /// A candle failure in a kernel or the cache.
    pub(super) fn decode_step(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor, ModelError> {
        time(Phase::Step, || self.decode_step_timed(tokens, caches))
    }

    /// [`Transformer::decode_step`], each phase timed when `llmgenie bench --profile` asks.
    fn decode_step_timed(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor, ModelError> {
        let cfg = &self.cfg;
        let n = tokens.len();
        let mut x = self.embed.lookup(tokens, &self.device)?;
        if cfg.scale_embeddings {
            x = (x * (cfg.hidden as f64).sqrt())?;
        }
        let mut x = super::f32_values(&x)?;
        // Rope tables per base and sequence, built once per step.
        let mut ropes: Vec<(f32, Vec<Rope>)> = Vec::new();
        for layer in &self.layers {
            if ropes.iter().all(|(b, _)| *b != layer.rope_base) {
                let tables = caches
                    .iter()
                    .map(|c| self.rope_values(layer.rope_base, c.len(), 1))
                    .collect();
                ropes.push((layer.rope_base, tables));
            }
        }
        let eps = cfg.rms_eps;
        let heads = self.heads();
        for (index, layer) in self.layers.iter().enumerate() {
            let p = layer
                .host
                .as_ref()
                .ok_or(ModelError::Internal("host parameters missing"))?;
            let tables = ropes
                .iter()
                .find(|(b, _)| *b == layer.rope_base)
                .map(|(_, t)| t)
                .ok_or(ModelError::Internal("rope tables missing"))?;
            // Attention.
            let h = time(Phase::Norms, || rms_rows(&x, &p.attn_norm, eps));
            let (mut q, mut k, v) = time(Phase::Qkv, || {
                let [mut q, mut k, mut v] = parts(Linear::forward_values(
                    &[&layer.wq, &layer.wk, &layer.wv],
                    &h,
                    n,
                )?)?;
                add_bias(&mut q, &p.bq);
                add_bias(&mut k, &p.bk);
                add_bias(&mut v, &p.bv);
                if let Some(w) = &p.q_norm {
                    q = rms_rows(&q, w, eps);
                }
                if let Some(w) = &p.k_norm {
                    k = rms_rows(&k, w, eps);
                }
                Ok::<_, ModelError>((q, k, v))
            })?;
            let kv = time(Phase::RopeAndStore, || {
                self.rotate_and_store(layer, index, &mut q, &mut k, &v, caches, tables)
            })?;
            let out = time(Phase::Attention, || decode_attn::attend(&q, &kv, &heads))?;
            drop(kv);
            let [o] = time(Phase::AttnOutput, || {
                parts(Linear::forward_values(&[&layer.wo], &out, n)?)
            })?;
            time(Phase::Norms, || {
                add_normed(&mut x, o, &p.post_attn_norm, eps)
            });
            // MLP.
            let h = time(Phase::Norms, || rms_rows(&x, &p.ffn_norm, eps));
            let act = time(Phase::GateUp, || {
                Linear::gated_values(&layer.gate, &layer.up, &h, n, cfg.activation)
            })?;
            let [d] = time(Phase::Down, || {
                parts(Linear::forward_values(&[&layer.down], &act, n)?)
            })?;
            time(Phase::Norms, || {
                add_normed(&mut x, d, &p.post_ffn_norm, eps)
            });
        }
        for c in caches.iter_mut() {
            c.advance(1);
        }
        let norm = self
            .out_norm_host
            .as_ref()
            .ok_or(ModelError::Internal("host parameters missing"))?;
        let [logits] = time(Phase::Vocabulary, || {
            let h = rms_rows(&x, norm, eps);
            parts(Linear::forward_values(&[&self.output], &h, n)?)
        })?;
        let vocab = logits.len() / n;
        Ok(Tensor::from_vec(logits, (n, vocab), &self.device)?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// An in-memory model: every tensor a test names.
    struct Mem(std::collections::HashMap<String, candle_core::quantized::QTensor>);

    impl super::super::TensorSource for Mem {
        fn load(
            &mut self,
            name: &str,
        ) -> Result<Option<candle_core::quantized::QTensor>, ModelError> {
            Ok(self.0.remove(name))
        }
    }

    /// A small random model with every optional part (Q/K/V biases, Q/K norms, post norms, an
    /// untied vocabulary projection) and weights in eight formats, k-quants included.
    fn small_model(activation: super::super::Activation) -> Transformer {
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = Device::Cpu;
        let (hidden, ff, heads, kv, hd, vocab) =
            (256usize, 512usize, 4usize, 2usize, 64usize, 300usize);
        let mut m = std::collections::HashMap::new();
        let mut put = |name: String, dims: &[usize], dtype: GgmlDType, mean: f32| {
            // Biases large enough that a path which dropped one would show it.
            let std = if name.ends_with(".bias") { 4.0 } else { 0.5 };
            let t = Tensor::randn(mean, std, dims, &dev).unwrap();
            m.insert(name, QTensor::quantize(&t, dtype).unwrap());
        };
        put(
            "token_embd.weight".into(),
            &[vocab, hidden],
            GgmlDType::Q8_0,
            0.0,
        );
        put(
            "output.weight".into(),
            &[vocab, hidden],
            GgmlDType::Q6K,
            0.0,
        );
        put("output_norm.weight".into(), &[hidden], GgmlDType::F32, 1.0);
        for i in 0..2 {
            let b = |s: &str| format!("blk.{i}.{s}");
            put(b("attn_norm.weight"), &[hidden], GgmlDType::F32, 1.0);
            put(b("ffn_norm.weight"), &[hidden], GgmlDType::F32, 1.0);
            put(
                b("post_attention_norm.weight"),
                &[hidden],
                GgmlDType::F32,
                1.0,
            );
            put(b("post_ffw_norm.weight"), &[hidden], GgmlDType::F32, 1.0);
            put(b("attn_q_norm.weight"), &[hd], GgmlDType::F32, 1.0);
            put(b("attn_k_norm.weight"), &[hd], GgmlDType::F32, 1.0);
            put(b("attn_q.bias"), &[heads * hd], GgmlDType::F32, 0.0);
            put(b("attn_k.bias"), &[kv * hd], GgmlDType::F32, 0.0);
            put(b("attn_v.bias"), &[kv * hd], GgmlDType::F32, 0.0);
            put(
                b("attn_q.weight"),
                &[heads * hd, hidden],
                GgmlDType::Q4K,
                0.0,
            );
            put(b("attn_k.weight"), &[kv * hd, hidden], GgmlDType::Q5K, 0.0);
            put(b("attn_v.weight"), &[kv * hd, hidden], GgmlDType::Q6K, 0.0);
            put(
                b("attn_output.weight"),
                &[hidden, heads * hd],
                GgmlDType::Q4_1,
                0.0,
            );
            put(b("ffn_gate.weight"), &[ff, hidden], GgmlDType::Q4_0, 0.0);
            put(b("ffn_up.weight"), &[ff, hidden], GgmlDType::Q5_1, 0.0);
            put(
                b("ffn_down.weight"),
                &[hidden, ff],
                if i == 0 {
                    GgmlDType::Q8_0
                } else {
                    GgmlDType::Q5_0
                },
                0.0,
            );
        }
        let cfg = super::super::Config {
            hidden,
            n_layers: 2,
            n_heads: heads,
            n_kv_heads: kv,
            head_dim: hd,
            rms_eps: 1e-6,
            rope_style: RopeStyle::Neox,
            rope_base: 10_000.0,
            rope_base_local: None,
            rope_dims: hd,
            activation,
            scale_embeddings: false,
            sliding_window: None,
            attn_scale: 1.0 / (hd as f64).sqrt(),
            context_length: 64,
        };
        Transformer::load(cfg, &mut Mem(m), &dev).unwrap()
    }

    /// The decode step against the prompt path (candle's operations, a different attention
    /// and matmul row split) on a model with every optional part: the last position's logits
    /// agree to rounding. A batched step gives each sequence exactly its single step's logits.
    #[test]
    fn decode_steps_agree_with_the_prompt_path() {
        use super::super::Activation;
        for act in [Activation::Silu, Activation::GeluTanh] {
            let w = small_model(act);
            let prompt = [5u32, 17, 42, 7, 260, 3];
            let mut whole = w.new_cache();
            let want = values(&w.forward(&prompt, &mut whole).unwrap());
            let mut stepped = w.new_cache();
            w.forward(&prompt[..5], &mut stepped).unwrap();
            let got = values(&w.forward(&prompt[5..], &mut stepped).unwrap());
            let range = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                diff <= 1e-2 * range,
                "{act:?}: {diff} against a range of {range}"
            );
            // Two sequences in one batched step, each as its single step.
            let mut a = w.new_cache();
            let mut b = w.new_cache();
            w.forward(&prompt[..4], &mut a).unwrap();
            w.forward(&prompt[..2], &mut b).unwrap();
            let (mut a1, mut b1) = (a.copy_prefix(4).unwrap(), b.copy_prefix(2).unwrap());
            let single_a = values(&w.forward(&[9], &mut a1).unwrap());
            let single_b = values(&w.forward(&[11], &mut b1).unwrap());
            let batch = w.forward_batch(&[9, 11], &mut [&mut a, &mut b]).unwrap();
            assert_eq!(values(&batch.get(0).unwrap()), single_a);
            assert_eq!(values(&batch.get(1).unwrap()), single_b);
        }
    }

    /// The norm is candle's, bit for bit, for rows of several widths.
    #[test]
    fn rms_rows_is_candles_rms_norm() {
        let dev = Device::Cpu;
        for width in [8usize, 64, 576, 640] {
            let x = Tensor::randn(0f32, 2.0, (5, width), &dev).unwrap();
            let w = Tensor::randn(1f32, 0.5, (width,), &dev).unwrap();
            let want = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
            assert_eq!(rms_rows(&values(&x), &values(&w), 1e-5), values(&want));
        }
    }

    /// Both rotations are candle's, bit for bit, over several heads, and a partial rotation
    /// leaves the tail of each head alone.
    #[test]
    fn rotations_are_candles() {
        let dev = Device::Cpu;
        let (heads, hd) = (3usize, 16usize);
        let x = Tensor::randn(0f32, 1.0, (1, heads, 1, hd), &dev).unwrap();
        let cos = Tensor::randn(0f32, 1.0, (1, hd / 2), &dev).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (1, hd / 2), &dev).unwrap();
        for (style, want) in [
            (
                RopeStyle::Interleaved,
                candle_nn::rotary_emb::rope_i(&x, &cos, &sin).unwrap(),
            ),
            (
                RopeStyle::Neox,
                candle_nn::rotary_emb::rope(&x, &cos, &sin).unwrap(),
            ),
        ] {
            let mut got = values(&x);
            rotate(&mut got, hd, hd, style, &values(&cos), &values(&sin));
            assert_eq!(got, values(&want), "{style:?}");
        }
        let mut got = values(&x);
        let (c, s) = (values(&cos), values(&sin));
        rotate(&mut got, hd, 8, RopeStyle::Neox, &c[..4], &s[..4]);
        let orig = values(&x);
        for h in 0..heads {
            assert_eq!(
                got[h * hd + 8..(h + 1) * hd],
                orig[h * hd + 8..(h + 1) * hd]
            );
        }
    }
}
