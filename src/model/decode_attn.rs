//! Attention for decode steps on the CPU: one new query per sequence against that sequence's
//! cached keys and values, read in place.
//!
//! Through candle this is a dozen small operations per sequence and layer (two matmuls through a
//! general GEMM with its packing, a scale, a softmax, reshapes), each with an allocation and a
//! dispatch: for a batched step of eight sequences, most of the step's single-threaded time.
//! Here it is one pass per (sequence, head), shared out over candle's worker pool. The single
//! decode path and the batched one both use it, so a sequence gets the same bits either way.
//! The sums follow candle's order where it is known (a fused multiply-add chain per score and
//! per output dimension, as its GEMM accumulates; the softmax total as its AVX sum adds), so
//! results differ from candle's by an ulp at most here and there, and greedy answers match.
//! The exponentials are `fused::exp`'s (vectorised, within 3 ulp of libm's).

use std::sync::atomic::{AtomicU32, Ordering};

use candle_core::{DType, Device, Storage, Tensor};

use super::ModelError;

/// The shape of the heads.
#[derive(Debug, Clone, Copy)]
pub(super) struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// Whether this path applies: f32 tensors on the CPU.
pub(super) fn applies(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && dtype == DType::F32
}

/// A tensor's f32 values.
fn values(t: &Tensor) -> Result<Vec<f32>, ModelError> {
    Ok(super::f32_values(t)?)
}

/// Where a view's elements lie in its storage: element (head, key, dim) is at
/// `offset + head * head_stride + key * key_stride + dim * dim_stride`.
#[derive(Clone, Copy)]
struct View {
    offset: usize,
    head_stride: usize,
    key_stride: usize,
    dim_stride: usize,
    keys: usize,
}

impl View {
    /// Transposed keys, `(1, kv_heads, head_dim, keys)`, positions adjacent.
    fn keys(t: &Tensor, heads: &Heads) -> Result<Self, ModelError> {
        let (_, kvh, dim, keys) = t.dims4()?;
        let stride = t.layout().stride();
        if kvh != heads.n_kv_heads || dim != heads.head_dim || stride[3] != 1 {
            return Err(ModelError::Internal("unexpected key cache layout"));
        }
        Ok(Self {
            offset: t.layout().start_offset(),
            head_stride: stride[1],
            key_stride: 1,
            dim_stride: stride[2],
            keys,
        })
    }

    /// Values, `(1, kv_heads, keys, head_dim)`, dimensions adjacent.
    fn values(t: &Tensor, heads: &Heads) -> Result<Self, ModelError> {
        let (_, kvh, keys, dim) = t.dims4()?;
        let stride = t.layout().stride();
        if kvh != heads.n_kv_heads || dim != heads.head_dim || stride[3] != 1 {
            return Err(ModelError::Internal("unexpected value cache layout"));
        }
        Ok(Self {
            offset: t.layout().start_offset(),
            head_stride: stride[1],
            key_stride: stride[2],
            dim_stride: 1,
            keys,
        })
    }

    /// One past the last element read.
    fn end(&self, heads: &Heads) -> usize {
        self.offset
            + (heads.n_kv_heads - 1) * self.head_stride
            + (self.keys - 1) * self.key_stride
            + (heads.head_dim - 1) * self.dim_stride
            + 1
    }
}

/// `softmax(q k^T * scale) v` for each sequence: `q` is `(n, n_heads, 1, head_dim)` (sequence
/// `i`'s query heads in row `i`), `kv[i]` that sequence's visible keys and values, views of its
/// cache: keys transposed `(1, n_kv_heads, head_dim, keys)`, values
/// `(1, n_kv_heads, keys, head_dim)`. Query head `h` reads KV head
/// `h / (n_heads / n_kv_heads)`. Returns `(n, 1, n_heads * head_dim)`.
///
/// # Errors
/// Tensors not on the CPU, not f32, or shaped otherwise.
pub(super) fn attend(
    q: &Tensor,
    kv: &[(Tensor, Tensor)],
    heads: &Heads,
) -> Result<Tensor, ModelError> {
    let n = kv.len();
    let (hd, nh) = (heads.head_dim, heads.n_heads);
    let group = nh / heads.n_kv_heads.max(1);
    let q = values(q)?;
    if q.len() != n * nh * hd || group == 0 {
        return Err(ModelError::Internal(
            "query shape does not match the caches",
        ));
    }
    // Read locks on every cache's storage, held while the workers read.
    let mut guards = Vec::with_capacity(n);
    for (k, v) in kv {
        let (kview, vview) = (View::keys(k, heads)?, View::values(v, heads)?);
        if kview.keys != vview.keys || kview.keys == 0 {
            return Err(ModelError::Internal("keys and values differ in length"));
        }
        guards.push((
            k.storage_and_layout().0,
            v.storage_and_layout().0,
            kview,
            vview,
        ));
    }
    let mut caches: Vec<(&[f32], &[f32], View, View)> = Vec::with_capacity(n);
    for (ks, vs, kview, vview) in &guards {
        match (&**ks, &**vs) {
            (Storage::Cpu(k), Storage::Cpu(v)) => {
                caches.push((k.as_slice::<f32>()?, v.as_slice::<f32>()?, *kview, *vview));
            }
            _ => return Err(ModelError::Internal("kv cache is not on the CPU")),
        }
    }
    if caches
        .iter()
        .any(|(k, v, kv_, vv)| kv_.end(heads) > k.len() || vv.end(heads) > v.len())
    {
        return Err(ModelError::Internal("kv cache view exceeds its storage"));
    }
    let cells: Vec<AtomicU32> = (0..n * nh * hd).map(|_| AtomicU32::new(0)).collect();
    candle_core::utils::barrier_pool().execute_chunked(n * nh, |items| {
        let mut scores = Vec::new();
        let mut out = vec![0f32; hd];
        for item in items {
            let (seq, h) = (item / nh, item % nh);
            let (k, v, kview, vview) = caches[seq];
            let qh = &q[(seq * nh + h) * hd..(seq * nh + h + 1) * hd];
            let kv_head = h / group;
            one_head(
                qh,
                k,
                v,
                kview,
                vview,
                kv_head,
                heads.scale,
                &mut scores,
                &mut out,
            );
            let base = (seq * nh + h) * hd;
            for (d, &x) in out.iter().enumerate() {
                cells[base + d].store(x.to_bits(), Ordering::Relaxed);
            }
        }
    });
    let out: Vec<f32> = cells
        .into_iter()
        .map(|c| f32::from_bits(c.into_inner()))
        .collect();
    Ok(Tensor::from_vec(out, (n, 1, nh * hd), &Device::Cpu)?)
}

/// One query head over its KV head's keys: scores, softmax, weighted sum of values into `out`.
#[allow(clippy::too_many_arguments)]
fn one_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kview: View,
    vview: View,
    kv_head: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = q.len();
    // Each key's score is one chain of fused multiply-adds in dimension order (as candle's GEMM
    // computes it); with the keys transposed, a dimension's values for all positions are one
    // row, so the chains of many keys advance together in vector registers.
    scores.clear();
    scores.resize(kview.keys, 0.0);
    let kbase = kview.offset + kv_head * kview.head_stride;
    // 32 keys at a time in registers (four independent vectors of chains), then the rest.
    let tiles = kview.keys / 32;
    for (tile, out) in scores.chunks_exact_mut(32).enumerate() {
        let (mut a0, mut a1, mut a2, mut a3) = ([0f32; 8], [0f32; 8], [0f32; 8], [0f32; 8]);
        for (d, &qd) in q.iter().enumerate() {
            let at = kbase + d * kview.dim_stride + 32 * tile;
            let row = &k[at..at + 32];
            fma8(&mut a0, qd, &row[0..8]);
            fma8(&mut a1, qd, &row[8..16]);
            fma8(&mut a2, qd, &row[16..24]);
            fma8(&mut a3, qd, &row[24..32]);
        }
        for (o, a) in out
            .iter_mut()
            .zip(a0.iter().chain(&a1).chain(&a2).chain(&a3))
        {
            *o = a * scale;
        }
    }
    let rest = 32 * tiles;
    for (d, &qd) in q.iter().enumerate() {
        let at = kbase + d * kview.dim_stride;
        for (s, &kd) in scores[rest..]
            .iter_mut()
            .zip(&k[at + rest..at + kview.keys])
        {
            *s = qd.mul_add(kd, *s);
        }
    }
    for s in scores[rest..].iter_mut() {
        *s *= scale;
    }
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    for s in scores.iter_mut() {
        *s = super::fused::exp(*s - max);
    }
    let sum = softmax_sum(scores);
    // Values weighted in key order, one fused multiply-add chain per dimension; 64 dimensions
    // at a time in registers (eight independent vectors of chains), then the rest.
    for s in scores.iter_mut() {
        *s /= sum;
    }
    let base = vview.offset + kv_head * vview.head_stride;
    let mut groups = out.chunks_exact_mut(64);
    for (g, chunk) in groups.by_ref().enumerate() {
        let (mut a0, mut a1, mut a2, mut a3) = ([0f32; 8], [0f32; 8], [0f32; 8], [0f32; 8]);
        let (mut a4, mut a5, mut a6, mut a7) = ([0f32; 8], [0f32; 8], [0f32; 8], [0f32; 8]);
        for (t, &p) in scores.iter().enumerate() {
            let at = base + t * vview.key_stride + 64 * g;
            let row = &v[at..at + 64];
            fma8(&mut a0, p, &row[0..8]);
            fma8(&mut a1, p, &row[8..16]);
            fma8(&mut a2, p, &row[16..24]);
            fma8(&mut a3, p, &row[24..32]);
            fma8(&mut a4, p, &row[32..40]);
            fma8(&mut a5, p, &row[40..48]);
            fma8(&mut a6, p, &row[48..56]);
            fma8(&mut a7, p, &row[56..64]);
        }
        let all = [a0, a1, a2, a3, a4, a5, a6, a7];
        for (o, a) in chunk.iter_mut().zip(all.iter().flatten()) {
            *o = *a;
        }
    }
    let done = hd - groups.into_remainder().len();
    for d in done..hd {
        let mut acc = 0f32;
        for (t, &p) in scores.iter().enumerate() {
            acc = p.mul_add(v[base + t * vview.key_stride + d], acc);
        }
        out[d] = acc;
    }
}

/// `acc[i] += w * x[i]` for eight lanes, each a fused multiply-add.
#[inline(always)]
fn fma8(acc: &mut [f32; 8], w: f32, x: &[f32]) {
    for (a, &x) in acc.iter_mut().zip(x) {
        *a = w.mul_add(x, *a);
    }
}

/// The sum of the exponentials, in the order candle's softmax adds them on x86 with AVX (four
/// eight-lane accumulators over blocks of 32, folded pairwise, then the rest one by one), so
/// that the probabilities have the same bits as candle's.
pub(super) fn softmax_sum(xs: &[f32]) -> f32 {
    let blocks = xs.chunks_exact(32);
    let rest = blocks.remainder();
    let mut acc = [[0f32; 8]; 4];
    for block in blocks {
        for (j, lanes) in acc.iter_mut().enumerate() {
            for (l, a) in lanes.iter_mut().enumerate() {
                *a += block[8 * j + l];
            }
        }
    }
    let x: [f32; 8] = std::array::from_fn(|l| (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]));
    let t: [f32; 4] = std::array::from_fn(|l| x[l] + x[l + 4]);
    let mut sum = (t[0] + t[1]) + (t[2] + t[3]);
    for &r in rest {
        sum += r;
    }
    sum
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Against candle's own ops on a grouped-query case with a cache view that is narrower than
    /// its storage (a sliding window over a cache with spare capacity), with key counts from one
    /// to above the 32 of a softmax block. The
    /// same sums in nearly the same order: equal to an ulp or two.
    #[test]
    fn matches_candles_attention() {
        let dev = Device::Cpu;
        let heads = Heads {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 16,
            scale: 0.25,
        };
        let mut kv = Vec::new();
        let mut qs = Vec::new();
        let mut want = Vec::new();
        for (keys, start) in [(5usize, 0usize), (12, 3), (1, 0), (8, 0), (11, 0), (75, 2)] {
            let cap = 80;
            let k_store = Tensor::randn(0f32, 1.0, (1, 2, 16, cap), &dev).unwrap();
            let v_store = Tensor::randn(0f32, 1.0, (1, 2, cap, 16), &dev).unwrap();
            let k = k_store.narrow(3, start, keys - start).unwrap();
            let v = v_store.narrow(2, start, keys - start).unwrap();
            let q = Tensor::randn(0f32, 1.0, (1, 6, 1, 16), &dev).unwrap();
            let scores = (q.reshape((1, 2, 3, 16)).unwrap().matmul(&k).unwrap() * 0.25).unwrap();
            let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
            let out = probs.matmul(&v.contiguous().unwrap()).unwrap();
            want.extend(out.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            qs.push(q);
            kv.push((k, v));
        }
        let q = Tensor::cat(&qs, 0).unwrap();
        let got = attend(&q, &kv, &heads).unwrap();
        assert_eq!(got.dims(), &[6, 1, 96]);
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 1e-5, "{i}: {a} vs {b}");
        }
    }

    #[test]
    fn a_query_that_does_not_fit_the_caches_is_an_error() {
        let dev = Device::Cpu;
        let heads = Heads {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            scale: 1.0,
        };
        let k = Tensor::zeros((1, 2, 8, 3), DType::F32, &dev).unwrap();
        let v = Tensor::zeros((1, 2, 3, 8), DType::F32, &dev).unwrap();
        let q = Tensor::zeros((1, 4, 1, 8), DType::F32, &dev).unwrap();
        assert!(attend(&q, &[(k.clone(), v.clone())], &heads).is_ok());
        let q = Tensor::zeros((2, 4, 1, 8), DType::F32, &dev).unwrap();
        assert!(attend(&q, &[(k.clone(), v.clone())], &heads).is_err());
        // Keys not transposed.
        let q = Tensor::zeros((1, 4, 1, 8), DType::F32, &dev).unwrap();
        assert!(attend(&q, &[(v.clone(), v)], &heads).is_err());
    }
}
