//! One decoder-only transformer forward pass for the architectures we serve.
//!
//! Llama (SmolLM2, Llama 2/3, Mistral, CodeLlama), Gemma 3, Qwen 2 and Qwen 3 share the same
//! skeleton: token embedding, N blocks of (norm, attention, residual, norm, gated MLP, residual),
//! a final norm and a vocabulary projection. Their differences are flags on [`Config`]:
//!
//! - rotary layout: llama.cpp's converter permutes Llama's Q/K weights so that the *interleaved*
//!   (GPT-J) rotation applies; every other family uses the NeoX (half-split) rotation
//!   (`llama_model_rope_type()` in llama.cpp).
//! - Gemma 3: embeddings scaled by `sqrt(hidden)`, RMS norms on Q and K per head, extra norms after
//!   attention and after the MLP, GELU (tanh approximation) in the MLP, and sliding-window attention
//!   on five of every six layers with their own rope base (`llm_build_gemma3` in llama.cpp).
//! - Qwen 2: biases on the Q/K/V projections. Qwen 3: Q/K norms, no biases.
//!
//! Weights stay quantized (the token embedding too: rows are dequantized on lookup), so resident
//! memory is close to the file size. The KV cache is not part of the weights: each sequence owns a
//! [`KvCache`], so one resident model can serve many sequences.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor, D};

use super::cache::KvCache;
use super::decode_attn;
use super::fused;
use super::linear::Linear;
use super::prompt_attn;
use super::qdot::packed::Packed;
use super::step::HostParams;
use super::ModelError;

/// Which rotation the Q/K heads get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1) rotate together (llama.cpp `LLAMA_ROPE_TYPE_NORM`).
    Interleaved,
    /// Pairs (i, i + d/2) rotate together (llama.cpp `LLAMA_ROPE_TYPE_NEOX`).
    Neox,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU with the tanh approximation, as Gemma uses.
    GeluTanh,
}

/// Everything the forward pass needs to know that is not a tensor.
#[derive(Debug, Clone)]
pub struct Config {
    pub hidden: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    pub rope_style: RopeStyle,
    /// Rope base of global-attention layers.
    pub rope_base: f32,
    /// Rope base of sliding-window layers (Gemma 3); `None` uses `rope_base`.
    pub rope_base_local: Option<f32>,
    /// Number of rotated dimensions per head (`rope.dimension_count`); the rest pass through.
    pub rope_dims: usize,
    pub activation: Activation,
    /// Multiply embeddings by `sqrt(hidden)` (Gemma).
    pub scale_embeddings: bool,
    /// Attention window of sliding layers, and which layers slide (`layer % pattern != pattern-1`).
    pub sliding_window: Option<(usize, usize)>,
    /// Softmax scale; `1/sqrt(head_dim)` for every model here.
    pub attn_scale: f64,
    pub context_length: usize,
}

/// A layer's learned tensors.
pub(super) struct Layer {
    pub(super) attn_norm: Tensor,
    pub(super) wq: Linear,
    pub(super) wk: Linear,
    pub(super) wv: Linear,
    pub(super) wo: Linear,
    pub(super) bq: Option<Tensor>,
    pub(super) bk: Option<Tensor>,
    pub(super) bv: Option<Tensor>,
    pub(super) q_norm: Option<Tensor>,
    pub(super) k_norm: Option<Tensor>,
    pub(super) post_attn_norm: Option<Tensor>,
    pub(super) ffn_norm: Tensor,
    pub(super) gate: Linear,
    pub(super) up: Linear,
    pub(super) down: Linear,
    pub(super) post_ffn_norm: Option<Tensor>,
    /// Window size when this layer uses sliding-window attention.
    pub(super) window: Option<usize>,
    pub(super) rope_base: f32,
    /// Norm weights and biases as host values, for the CPU decode step (`None` elsewhere).
    pub(super) host: Option<HostParams>,
}

/// The token embedding: quantized rows, dequantized on lookup.
pub(super) enum Embedding {
    Quantized(Arc<QTensor>),
    /// Packed for the CPU kernels, shared with the (tied) vocabulary projection.
    Packed(Arc<Packed>),
}

impl Embedding {
    /// The rows of `tokens`, `(tokens.len(), hidden)`.
    pub(super) fn lookup(&self, tokens: &[u32], device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Self::Quantized(q) => {
                q.embedding(&Tensor::from_slice(tokens, (tokens.len(),), device)?)
            }
            Self::Packed(p) => p.rows(tokens),
        }
    }
}

/// The weights of one model, immutable after load; sequences bring their own caches.
pub struct Transformer {
    pub(super) cfg: Config,
    pub(super) embed: Embedding,
    pub(super) layers: Vec<Layer>,
    pub(super) out_norm: Tensor,
    pub(super) output: Linear,
    /// Per-dimension rope frequency divisors (Llama 3.1 `rope_freqs.weight`), if the file has them.
    pub(super) rope_freqs: Option<Vec<f32>>,
    pub(super) device: Device,
    /// The final norm's weights as host values, for the CPU decode step.
    pub(super) out_norm_host: Option<Vec<f32>>,
}

/// State shared by the layers of one forward call: positions, the sequence's cache, and the
/// rope tables and masks, which depend only on positions and so are built once per call.
struct Pass<'c> {
    pos: usize,
    seq_len: usize,
    cache: &'c mut KvCache,
    ropes: Vec<(f32, Tensor, Tensor)>,
    masks: Vec<(MaskKey, Option<Tensor>)>,
}

/// A mask depends on the first visible key and the layer's window.
type MaskKey = (usize, Option<usize>);

/// Where the loader gets tensors from; lets the loader stay independent of file handling.
pub trait TensorSource {
    /// Load the named tensor, or `None` when the file lacks it.
    fn load(&mut self, name: &str) -> Result<Option<QTensor>, ModelError>;

    /// The named matrix packed for the CPU's int8 kernel straight from its stored bytes, or
    /// `None` when this source cannot (the caller then loads it and packs it if it can).
    ///
    /// # Errors
    /// Reading the tensor fails.
    fn packed(&mut self, _name: &str) -> Result<Option<Arc<Packed>>, ModelError> {
        Ok(None)
    }
}

/// The named weight matrix, packed where the kernel takes it; `None` when the file lacks it.
fn optional_matrix(src: &mut dyn TensorSource, name: &str) -> Result<Option<Linear>, ModelError> {
    if let Some(p) = src.packed(name)? {
        return Ok(Some(Linear::Packed(p)));
    }
    Ok(src
        .load(name)?
        .map(|t| Linear::new(Arc::new(t)))
        .transpose()?)
}

/// [`optional_matrix`] for a matrix the architecture needs.
fn matrix(src: &mut dyn TensorSource, name: &str) -> Result<Linear, ModelError> {
    optional_matrix(src, name)?.ok_or_else(|| ModelError::MissingTensor(name.to_string()))
}

/// A tied embedding and vocabulary projection: one packed copy serves both where the kernel
/// takes the format (the file's copy is not held through the rest of the load), else the
/// quantized tensor does.
fn tied(src: &mut dyn TensorSource, name: &str) -> Result<(Embedding, Linear), ModelError> {
    let p = match src.packed(name)? {
        Some(p) => p,
        None => {
            let embed = required(src, name)?;
            match Packed::new(&embed)? {
                Some(p) => Arc::new(p),
                None => {
                    let e = Arc::new(embed);
                    return Ok((Embedding::Quantized(e.clone()), Linear::new(e)?));
                }
            }
        }
    };
    Ok((Embedding::Packed(p.clone()), Linear::Packed(p)))
}

fn required(src: &mut dyn TensorSource, name: &str) -> Result<QTensor, ModelError> {
    src.load(name)?
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
}

fn dense(t: QTensor, device: &Device) -> Result<Tensor, ModelError> {
    Ok(t.dequantize(device)?)
}

fn optional_dense(
    src: &mut dyn TensorSource,
    name: &str,
    device: &Device,
) -> Result<Option<Tensor>, ModelError> {
    src.load(name)?.map(|t| dense(t, device)).transpose()
}

impl Transformer {
    /// Build the model from a tensor source.
    ///
    /// # Errors
    /// A tensor the architecture needs is missing, or candle fails to place it on the device.
    pub fn load(
        cfg: Config,
        src: &mut dyn TensorSource,
        device: &Device,
    ) -> Result<Self, ModelError> {
        const EMBED: &str = "token_embd.weight";
        let (embed, output) = match optional_matrix(src, "output.weight")? {
            Some(output) => (
                Embedding::Quantized(Arc::new(required(src, EMBED)?)),
                output,
            ),
            // Tied: one copy serves the lookups and the vocabulary projection.
            None => tied(src, EMBED)?,
        };
        let out_norm = dense(required(src, "output_norm.weight")?, device)?;
        let rope_freqs = match src.load("rope_freqs.weight")? {
            Some(t) => Some(
                t.dequantize(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            ),
            None => None,
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            layers.push(Self::load_layer(&cfg, i, src, device)?);
        }
        let out_norm_host = if device.is_cpu() {
            Some(super::f32_values(&out_norm)?)
        } else {
            None
        };
        Ok(Self {
            cfg,
            embed,
            layers,
            out_norm,
            output,
            rope_freqs,
            device: device.clone(),
            out_norm_host,
        })
    }

    fn load_layer(
        cfg: &Config,
        i: usize,
        src: &mut dyn TensorSource,
        device: &Device,
    ) -> Result<Layer, ModelError> {
        let name = |s: &str| format!("blk.{i}.{s}");
        let mut qm = |s: &str| matrix(src, &name(s));
        let wq = qm("attn_q.weight")?;
        let wk = qm("attn_k.weight")?;
        let wv = qm("attn_v.weight")?;
        let wo = qm("attn_output.weight")?;
        let gate = qm("ffn_gate.weight")?;
        let up = qm("ffn_up.weight")?;
        let down = qm("ffn_down.weight")?;
        let window = cfg
            .sliding_window
            .and_then(|(w, pattern)| (pattern == 0 || i % pattern != pattern - 1).then_some(w));
        let rope_base = match (window, cfg.rope_base_local) {
            (Some(_), Some(local)) => local,
            _ => cfg.rope_base,
        };
        let mut layer = Layer {
            attn_norm: dense(required(src, &name("attn_norm.weight"))?, device)?,
            ffn_norm: dense(required(src, &name("ffn_norm.weight"))?, device)?,
            bq: optional_dense(src, &name("attn_q.bias"), device)?,
            bk: optional_dense(src, &name("attn_k.bias"), device)?,
            bv: optional_dense(src, &name("attn_v.bias"), device)?,
            q_norm: optional_dense(src, &name("attn_q_norm.weight"), device)?,
            k_norm: optional_dense(src, &name("attn_k_norm.weight"), device)?,
            post_attn_norm: optional_dense(src, &name("post_attention_norm.weight"), device)?,
            post_ffn_norm: optional_dense(src, &name("post_ffw_norm.weight"), device)?,
            wq,
            wk,
            wv,
            wo,
            gate,
            up,
            down,
            window,
            rope_base,
            host: None,
        };
        if device.is_cpu() {
            layer.host = Some(HostParams::new(&layer)?);
        }
        Ok(layer)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A new, empty cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.n_layers)
    }

    /// Run `tokens` (positions `cache.len()..`) through the model, append their keys and values to
    /// `cache`, and return the logits of the last token as a `(vocab,)` f32 tensor.
    ///
    /// # Errors
    /// Empty input, a position past the context length, or a candle failure.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor, ModelError> {
        let seq_len = tokens.len();
        if seq_len == 0 {
            return Err(ModelError::EmptyInput);
        }
        let pos = cache.len();
        if pos + seq_len > self.cfg.context_length {
            return Err(ModelError::ContextOverflow {
                needed: pos + seq_len,
                limit: self.cfg.context_length,
            });
        }
        if seq_len == 1 && self.has_decode_step() {
            // One token: the decode step's path, which computes the same bits.
            return Ok(self.decode_step(tokens, &mut [cache])?.flatten_all()?);
        }
        let mut x = self.embed.lookup(tokens, &self.device)?.unsqueeze(0)?;
        if self.cfg.scale_embeddings {
            x = (x * (self.cfg.hidden as f64).sqrt())?;
        }
        let mut pass = Pass {
            pos,
            seq_len,
            cache,
            ropes: Vec::with_capacity(2),
            masks: Vec::with_capacity(2),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            x = self.block(layer, i, &x, &mut pass)?;
        }
        cache.advance(seq_len);
        let last = x.narrow(1, seq_len - 1, 1)?;
        let last = candle_nn::ops::rms_norm(&last, &self.out_norm, self.cfg.rms_eps)?;
        let logits = self.output.forward(&last)?;
        Ok(logits.flatten_all()?.to_dtype(DType::F32)?)
    }

    /// One decode step for several sequences at once: `tokens[i]` is the next token of the
    /// sequence whose cache is `caches[i]`. Norms, projections and the MLP run over all rows
    /// together (each weight matrix is read once per step, not once per sequence); attention
    /// runs per sequence over its own cache. Returns the logits, `(tokens.len(), vocab)` f32.
    /// Each row is computed exactly as [`Transformer::forward`] computes a single token.
    ///
    /// # Errors
    /// No tokens, a count that differs from the caches', a cache at the context length, or a
    /// candle failure.
    pub fn forward_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor, ModelError> {
        let n = tokens.len();
        if n == 0 || caches.len() != n {
            return Err(ModelError::EmptyInput);
        }
        if let Some(c) = caches
            .iter()
            .find(|c| c.len() + 1 > self.cfg.context_length)
        {
            return Err(ModelError::ContextOverflow {
                needed: c.len() + 1,
                limit: self.cfg.context_length,
            });
        }
        if self.has_decode_step() {
            return self.decode_step(tokens, caches);
        }
        let mut x = self.embed.lookup(tokens, &self.device)?.unsqueeze(1)?;
        if self.cfg.scale_embeddings {
            x = (x * (self.cfg.hidden as f64).sqrt())?;
        }
        // Rope tables per base, built once per step: `(n, 1, rope_dims / 2)`, one row per
        // sequence at its own position, so the whole batch rotates in one operation.
        let mut ropes: Vec<(f32, (Tensor, Tensor))> = Vec::new();
        for layer in &self.layers {
            if ropes.iter().all(|(b, _)| *b != layer.rope_base) {
                let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
                for c in caches.iter() {
                    let (c, s) = self.rope_tables(layer.rope_base, c.len(), 1)?;
                    cos.push(c);
                    sin.push(s);
                }
                let half = self.cfg.rope_dims / 2;
                let cos = Tensor::cat(&cos, 0)?.reshape((n, 1, half))?;
                let sin = Tensor::cat(&sin, 0)?.reshape((n, 1, half))?;
                ropes.push((layer.rope_base, (cos, sin)));
            }
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let (cos, sin) = ropes
                .iter()
                .find(|(b, _)| *b == layer.rope_base)
                .map(|(_, t)| t)
                .ok_or(ModelError::Internal("rope tables missing"))?;
            x = self.block_with(layer, &x, |h| {
                self.attention_batch(layer, i, h, caches, cos, sin)
            })?;
        }
        for c in caches.iter_mut() {
            c.advance(1);
        }
        let x = candle_nn::ops::rms_norm(&x, &self.out_norm, self.cfg.rms_eps)?;
        let logits = self.output.forward(&x)?;
        Ok(logits.reshape((n, ()))?.to_dtype(DType::F32)?)
    }

    /// Attention for one new token per sequence, each over its own cache. `cos`, `sin` hold one
    /// row per sequence.
    fn attention_batch(
        &self,
        layer: &Layer,
        index: usize,
        x: &Tensor,
        caches: &mut [&mut KvCache],
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let cfg = &self.cfg;
        let (q, k, v) = self.qkv(layer, x)?;
        let q = self.rotate(&q, cos, sin)?;
        let k = self.rotate(&k, cos, sin)?;
        let mut kv = Vec::with_capacity(caches.len());
        for (i, cache) in caches.iter_mut().enumerate() {
            let pos = cache.len();
            let (k_all, v_all) = cache.append(index, &k.narrow(0, i, 1)?, &v.narrow(0, i, 1)?)?;
            let (k_all, v_all, _) = visible(layer, k_all, v_all, pos, pos + 1)?;
            kv.push((k_all.to_dtype(q.dtype())?, v_all.to_dtype(q.dtype())?));
        }
        // (On the CPU, decode steps take `step.rs` instead.)
        let group = cfg.n_heads / cfg.n_kv_heads;
        let mut outs = Vec::with_capacity(kv.len());
        for (i, (k_all, v_all)) in kv.iter().enumerate() {
            let qi = q
                .narrow(0, i, 1)?
                .reshape((1, cfg.n_kv_heads, group, cfg.head_dim))?;
            let scores = (qi.matmul(&gpu_ready(k_all)?)? * cfg.attn_scale)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let out = probs
                .matmul(v_all)?
                .reshape((1, 1, cfg.n_heads * cfg.head_dim))?;
            outs.push(out);
        }
        let out = Tensor::cat(&outs, 0)?;
        Ok(layer.wo.forward(&out)?)
    }

    /// The head shapes, for the CPU decode attention.
    pub(super) fn heads(&self) -> decode_attn::Heads {
        decode_attn::Heads {
            n_heads: self.cfg.n_heads,
            n_kv_heads: self.cfg.n_kv_heads,
            head_dim: self.cfg.head_dim,
            scale: self.cfg.attn_scale as f32,
        }
    }

    fn block(
        &self,
        layer: &Layer,
        index: usize,
        x: &Tensor,
        pass: &mut Pass<'_>,
    ) -> Result<Tensor, ModelError> {
        self.block_with(layer, x, |h| self.attention(layer, index, h, pass))
    }

    /// A layer around an attention function: norms, residuals and the MLP.
    fn block_with(
        &self,
        layer: &Layer,
        x: &Tensor,
        attention: impl FnOnce(&Tensor) -> Result<Tensor, ModelError>,
    ) -> Result<Tensor, ModelError> {
        let eps = self.cfg.rms_eps;
        let h = candle_nn::ops::rms_norm(x, &layer.attn_norm, eps)?;
        let mut h = attention(&h)?;
        if let Some(w) = &layer.post_attn_norm {
            h = candle_nn::ops::rms_norm(&h, w, eps)?;
        }
        let x = (x + h)?;
        let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
        let Ok::<[Tensor; 2], _>([gate, up]) =
            Linear::forward_many(&[&layer.gate, &layer.up], &h)?.try_into()
        else {
            return Err(ModelError::Internal("two projections expected"));
        };
        let h = layer
            .down
            .forward(&fused::gated(&gate, &up, self.cfg.activation)?)?;
        let h = match &layer.post_ffn_norm {
            Some(w) => candle_nn::ops::rms_norm(&h, w, eps)?,
            None => h,
        };
        Ok((x + h)?)
    }

    /// Queries, keys and values of `x` (`(b, seq, hidden)`), each `(b, heads, seq, head_dim)`,
    /// with their biases and (Gemma) their norms applied.
    fn qkv(&self, layer: &Layer, x: &Tensor) -> Result<(Tensor, Tensor, Tensor), ModelError> {
        let cfg = &self.cfg;
        let (b, seq_len, _) = x.dims3()?;
        let project =
            |t: Tensor, bias: &Option<Tensor>, heads: usize| -> candle_core::Result<Tensor> {
                let t = match bias {
                    Some(bias) => t.broadcast_add(bias)?,
                    None => t,
                };
                t.reshape((b, seq_len, heads, cfg.head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
        let Ok::<[Tensor; 3], _>([q, k, v]) =
            Linear::forward_many(&[&layer.wq, &layer.wk, &layer.wv], x)?.try_into()
        else {
            return Err(ModelError::Internal("three projections expected"));
        };
        let mut q = project(q, &layer.bq, cfg.n_heads)?;
        let mut k = project(k, &layer.bk, cfg.n_kv_heads)?;
        let v = project(v, &layer.bv, cfg.n_kv_heads)?;
        if let Some(w) = &layer.q_norm {
            q = candle_nn::ops::rms_norm(&q, w, cfg.rms_eps)?;
        }
        if let Some(w) = &layer.k_norm {
            k = candle_nn::ops::rms_norm(&k, w, cfg.rms_eps)?;
        }
        Ok((q, k, v))
    }

    fn attention(
        &self,
        layer: &Layer,
        index: usize,
        x: &Tensor,
        pass: &mut Pass<'_>,
    ) -> Result<Tensor, ModelError> {
        let cfg = &self.cfg;
        let (b, seq_len, _) = x.dims3()?;
        let pos = pass.pos;
        let (q, k, v) = self.qkv(layer, x)?;
        let (cos, sin) = self.rope(pass, layer.rope_base)?;
        let q = self.rotate(&q, &cos, &sin)?;
        let k = self.rotate(&k, &cos, &sin)?;
        let (k_all, v_all) = pass.cache.append(index, &k, &v)?;
        let (k_all, v_all, start) = visible(layer, k_all, v_all, pos, pos + seq_len)?;
        // An f16 cache is read as f32 (a copy of the visible positions once per layer and pass).
        let (k_all, v_all) = (k_all.to_dtype(q.dtype())?, v_all.to_dtype(q.dtype())?);
        if self.device.is_cpu() && b == 1 && q.dtype() == DType::F32 {
            let span = prompt_attn::Span {
                pos,
                first_key: start,
                window: layer.window,
            };
            let out = prompt_attn::attend(&q, &k_all, &v_all, span, cfg.attn_scale)?
                .transpose(1, 2)?
                .reshape((b, seq_len, cfg.n_heads * cfg.head_dim))?;
            return Ok(layer.wo.forward(&out)?);
        }
        // Other devices: the whole chunk at once. Grouped-query attention without copying keys:
        // the `group` query heads that share a KV head are consecutive, so (heads, seq) folds
        // into (kv_heads, group * seq) rows.
        let group = cfg.n_heads / cfg.n_kv_heads;
        let q = q.reshape((b, cfg.n_kv_heads, group * seq_len, cfg.head_dim))?;
        let scores = (q.matmul(&gpu_ready(&k_all)?)? * cfg.attn_scale)?;
        let scores = match self.mask(pass, start, layer.window, group)? {
            Some(mask) => scores.broadcast_add(&mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v_all)?;
        let out = out
            .reshape((b, cfg.n_heads, seq_len, cfg.head_dim))?
            .transpose(1, 2)?
            .reshape((b, seq_len, cfg.n_heads * cfg.head_dim))?;
        Ok(layer.wo.forward(&out)?)
    }

    /// The rope tables for `base` at this pass's positions, computed once per pass.
    fn rope(&self, pass: &mut Pass<'_>, base: f32) -> Result<(Tensor, Tensor), ModelError> {
        if let Some((_, cos, sin)) = pass.ropes.iter().find(|(b, _, _)| *b == base) {
            return Ok((cos.clone(), sin.clone()));
        }
        let (cos, sin) = self.rope_tables(base, pass.pos, pass.seq_len)?;
        pass.ropes.push((base, cos.clone(), sin.clone()));
        Ok((cos, sin))
    }

    /// The additive mask over keys `start..` for this pass, repeated for the `group` query heads
    /// that share a KV head; built once per pass and window.
    fn mask(
        &self,
        pass: &mut Pass<'_>,
        start: usize,
        window: Option<usize>,
        group: usize,
    ) -> Result<Option<Tensor>, ModelError> {
        let key = (start, window);
        if let Some((_, m)) = pass.masks.iter().find(|(k, _)| *k == key) {
            return Ok(m.clone());
        }
        let (pos, seq_len) = (pass.pos, pass.seq_len);
        let total = pos + seq_len;
        let mask = match attention_mask(pos, seq_len, start, total, window, &self.device)? {
            Some(m) if group > 1 => Some(
                m.unsqueeze(0)?
                    .expand((group, seq_len, total - start))?
                    .reshape((group * seq_len, total - start))?,
            ),
            other => other,
        };
        pass.masks.push((key, mask.clone()));
        Ok(mask)
    }

    fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let rope_dims = self.cfg.rope_dims;
        let head_dim = self.cfg.head_dim;
        let rot = |t: &Tensor| match self.cfg.rope_style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(t, cos, sin),
            RopeStyle::Neox => candle_nn::rotary_emb::rope(t, cos, sin),
        };
        if rope_dims == head_dim {
            return rot(x);
        }
        let head = x.narrow(D::Minus1, 0, rope_dims)?.contiguous()?;
        let tail = x.narrow(D::Minus1, rope_dims, head_dim - rope_dims)?;
        Tensor::cat(&[&rot(&head)?, &tail], D::Minus1)?.contiguous()
    }

    /// cos and sin tables `(seq_len, rope_dims/2)` for positions `pos..pos+seq_len`.
    fn rope_tables(
        &self,
        base: f32,
        pos: usize,
        seq_len: usize,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let half = self.cfg.rope_dims / 2;
        let (cos, sin) = self.rope_values(base, pos, seq_len);
        let cos = Tensor::from_vec(cos, (seq_len, half), &self.device)?;
        let sin = Tensor::from_vec(sin, (seq_len, half), &self.device)?;
        Ok((cos, sin))
    }

    /// [`Transformer::rope_tables`]' values, row-major.
    pub(super) fn rope_values(
        &self,
        base: f32,
        pos: usize,
        seq_len: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let half = self.cfg.rope_dims / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                let f = 1.0 / base.powf(2.0 * i as f32 / self.cfg.rope_dims as f32);
                match &self.rope_freqs {
                    Some(div) => f / div.get(i).copied().unwrap_or(1.0),
                    None => f,
                }
            })
            .collect();
        let mut cos = Vec::with_capacity(seq_len * half);
        let mut sin = Vec::with_capacity(seq_len * half);
        for p in pos..pos + seq_len {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        (cos, sin)
    }
}

/// The stored keys (transposed) and values (`total` positions, the new ones from `pos`) that
/// this layer's queries may see, and the first of them: a sliding layer never looks further back than its
/// window, so older keys are dropped up front.
pub(super) fn visible(
    layer: &Layer,
    k_all: Tensor,
    v_all: Tensor,
    pos: usize,
    total: usize,
) -> Result<(Tensor, Tensor, usize), ModelError> {
    let start = match layer.window {
        Some(w) if pos + 1 > w => pos + 1 - w,
        _ => 0,
    };
    if start == 0 {
        return Ok((k_all, v_all, 0));
    }
    Ok((
        k_all.narrow(3, start, total - start)?,
        v_all.narrow(2, start, total - start)?,
        start,
    ))
}

/// The cache's transposed keys as a matmul operand: the CPU multiplies the strided view in
/// place; GPU matmuls want rows of exactly the view's width, so they get a copy.
fn gpu_ready(k_t: &Tensor) -> candle_core::Result<Tensor> {
    if k_t.device().is_cpu() {
        Ok(k_t.clone())
    } else {
        k_t.contiguous()
    }
}

/// Additive mask `(seq_len, keys)` over keys `start..total` for queries at `pos..pos+seq_len`:
/// a query sees keys at or before its own position and, on a sliding layer, fewer than `window`
/// positions back (llama.cpp's `is_masked_swa`, standard type). `None` when nothing is masked.
fn attention_mask(
    pos: usize,
    seq_len: usize,
    start: usize,
    total: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Option<Tensor>, ModelError> {
    let keys = total - start;
    let mut any = false;
    let mut mask = vec![0f32; seq_len * keys];
    for i in 0..seq_len {
        let qpos = pos + i;
        for j in 0..keys {
            let kpos = start + j;
            let hidden = kpos > qpos || window.is_some_and(|w| qpos - kpos >= w);
            if hidden {
                mask[i * keys + j] = f32::NEG_INFINITY;
                any = true;
            }
        }
    }
    if !any {
        return Ok(None);
    }
    Ok(Some(Tensor::from_vec(mask, (seq_len, keys), device)?))
}
