//! Attention for prompt chunks on the CPU, a KV head and a tile of query rows at a time.
//!
//! Computed for a whole chunk at once, the scores of a 512-token chunk against 4,000 cached
//! positions are 73 MB per layer for SmolLM2, and the scale, the mask and the softmax each made
//! another such tensor: hundreds of megabytes per layer, mapped and cleared afresh each time
//! (page faults were 40% of a 4,000-token prefill, which ran at 0.8x llama.cpp's speed, and
//! the peak memory was 1.5x its). Here the scores of one KV head's query heads for a tile of
//! rows stay under [`TILE_BYTES`]; the scale, the causal (and sliding-window) mask and the
//! softmax are one pass over them; and each tile multiplies only the keys its rows can see,
//! which also skips the masked half of a fresh prompt's square.

use std::ops::Range;

use candle_core::{CpuStorage, InplaceOp1, Layout, Tensor};

use super::fused::{softmax_in_place, PIECE};
use super::{par_fill, ModelError};

/// Bytes of scores per tile (the probabilities take as much again).
const TILE_BYTES: usize = 8 << 20;

/// Where the queries and keys are: the chunk's first query is at position `pos`, the keys start
/// at position `first_key`, and a sliding layer sees fewer than `window` positions back.
#[derive(Clone, Copy, Debug)]
pub(super) struct Span {
    pub pos: usize,
    pub first_key: usize,
    pub window: Option<usize>,
}

impl Span {
    /// The positions of the keys that the query at position `q` sees.
    fn visible(&self, q: usize) -> Range<usize> {
        let lo = match self.window {
            Some(w) => (q + 1).saturating_sub(w).max(self.first_key),
            None => self.first_key,
        };
        lo..q + 1
    }
}

/// `softmax(q k^T * scale + mask) v` for a prompt chunk: `q` `(1, n_heads, seq, head_dim)`,
/// `k_t` the visible keys transposed, `(1, n_kv_heads, head_dim, keys)`, `v`
/// `(1, n_kv_heads, keys, head_dim)`, all f32 on the CPU. Query head `h` reads KV head
/// `h / (n_heads / n_kv_heads)`. Returns `(1, n_heads, seq, head_dim)`.
///
/// # Errors
/// Shapes that do not fit, keys that do not reach the last query, or a candle failure.
pub(super) fn attend(
    q: &Tensor,
    k_t: &Tensor,
    v: &Tensor,
    span: Span,
    scale: f64,
) -> Result<Tensor, ModelError> {
    let (_, n_heads, seq, hd) = q.dims4()?;
    let (_, kv_heads, _, keys) = k_t.dims4()?;
    let group = n_heads / kv_heads.max(1);
    if group == 0
        || group * kv_heads != n_heads
        || seq == 0
        || span.pos + seq > span.first_key + keys
    {
        return Err(ModelError::Internal("prompt attention shapes"));
    }
    let q = q.reshape((kv_heads, group, seq, hd))?;
    // Rows per tile: a multiple of 16 whose scores fit the budget, at least 16.
    let rows = (TILE_BYTES / (4 * group * keys).max(1)) / 16 * 16;
    let rows = rows.clamp(16, seq.next_multiple_of(16));
    let mut heads = Vec::with_capacity(kv_heads);
    for h in 0..kv_heads {
        let (qh, kh, vh) = (q.get(h)?, k_t.get(0)?.get(h)?, v.get(0)?.get(h)?);
        let mut tiles = Vec::with_capacity(seq.div_ceil(rows));
        for t0 in (0..seq).step_by(rows) {
            let n = rows.min(seq - t0);
            let first = span.pos + t0;
            // The keys any row of the tile sees.
            let lo = span.visible(first).start;
            let hi = first + n;
            let (at, len) = (lo - span.first_key, hi - lo);
            let qt = qh
                .narrow(1, t0, n)?
                .contiguous()?
                .reshape((group * n, hd))?;
            let scores = qt.matmul(&kh.narrow(1, at, len)?)?;
            scores.inplace_op1(&MaskedSoftmax {
                span,
                first,
                n,
                scale: scale as f32,
            })?;
            let out = scores.matmul(&vh.narrow(0, at, len)?)?;
            tiles.push(out.reshape((group, n, hd))?);
        }
        heads.push(Tensor::cat(&tiles, 1)?);
    }
    Ok(Tensor::stack(&heads, 0)?.reshape((1, n_heads, seq, hd))?)
}

/// Turns a tile's scores (`(rows, keys)`, fresh from their matmul; row `r` is the query at
/// position `first + r % n`, column `j` the first key the tile's first query sees plus `j`)
/// into probabilities in place: each row times `scale`, softmaxed over the keys its query
/// sees, zero elsewhere.
struct MaskedSoftmax {
    span: Span,
    first: usize,
    n: usize,
    scale: f32,
}

impl InplaceOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("masked softmax: contiguous f32 scores expected");
        };
        let (_, keys) = layout.shape().dims2()?;
        if keys == 0 {
            return Ok(());
        }
        let lo = self.span.visible(self.first).start;
        let piece = (PIECE / keys).max(1) * keys;
        par_fill(&mut data[start..end], piece, |p, o| {
            let first_row = p * piece / keys;
            for (r, row) in o.chunks_exact_mut(keys).enumerate() {
                let seen = self
                    .span
                    .visible(self.first + (first_row + r) % self.n.max(1));
                let cols = (seen.start - lo).min(keys)..(seen.end - lo).min(keys);
                row[..cols.start].fill(0.0);
                row[cols.end..].fill(0.0);
                let row = &mut row[cols];
                for x in row.iter_mut() {
                    *x *= self.scale;
                }
                softmax_in_place(row);
            }
        });
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    /// The whole-chunk computation with an explicit mask (written out independently of
    /// `Span::visible`), as the model did it before.
    fn reference(q: &Tensor, k_t: &Tensor, v: &Tensor, span: Span, scale: f64) -> Tensor {
        let (_, nh, seq, hd) = q.dims4().unwrap();
        let (_, kvh, _, keys) = k_t.dims4().unwrap();
        let group = nh / kvh;
        let q = q.reshape((1, kvh, group * seq, hd)).unwrap();
        let scores = (q.matmul(k_t).unwrap() * scale).unwrap();
        let mask: Vec<f32> = (0..group * seq)
            .flat_map(|r| {
                let qpos = span.pos + r % seq;
                (0..keys).map(move |j| {
                    let kpos = span.first_key + j;
                    let hidden = kpos > qpos || span.window.is_some_and(|w| qpos - kpos >= w);
                    if hidden {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (group * seq, keys), &Device::Cpu).unwrap();
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
        probs.matmul(v).unwrap().reshape((1, nh, seq, hd)).unwrap()
    }

    /// Fresh prompts, chunks after cached positions, long contexts that take several tiles and
    /// sliding windows: within float rounding of the masked whole-chunk attention.
    #[test]
    fn tiles_compute_the_masked_attention() {
        let dev = Device::Cpu;
        // (heads, kv heads, head dim, chunk, cached before it, first key, window)
        let cases = [
            (4, 2, 16, 7, 0, 0, None),
            (9, 3, 64, 40, 100, 0, None),
            (9, 3, 64, 200, 5000, 0, None),
            (8, 1, 32, 100, 600, 89, Some(512)),
            (6, 2, 8, 33, 0, 0, Some(5)),
        ];
        for (nh, kvh, hd, seq, cached, first_key, window) in cases {
            let keys = cached + seq - first_key;
            let q = Tensor::randn(0f32, 1.0, (1, nh, seq, hd), &dev).unwrap();
            let k_t = Tensor::randn(0f32, 1.0, (1, kvh, hd, keys), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (1, kvh, keys, hd), &dev).unwrap();
            let span = Span {
                pos: cached,
                first_key,
                window,
            };
            let scale = 1.0 / (hd as f64).sqrt();
            let got = attend(&q, &k_t, &v, span, scale).unwrap();
            let want = reference(&q, &k_t, &v, span, scale);
            assert_eq!(got.dims(), want.dims());
            let diff = crate::model::max_diff(&got, &want);
            assert!(diff < 1e-5, "{nh} heads, {seq} rows after {cached}: {diff}");
        }
    }

    #[test]
    fn keys_that_stop_short_of_the_queries_are_an_error() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 2, 4, 8), DType::F32, &dev).unwrap();
        let k_t = Tensor::zeros((1, 1, 8, 3), DType::F32, &dev).unwrap();
        let v = Tensor::zeros((1, 1, 3, 8), DType::F32, &dev).unwrap();
        let span = Span {
            pos: 0,
            first_key: 0,
            window: None,
        };
        assert!(attend(&q, &k_t, &v, span, 1.0).is_err());
    }
}
