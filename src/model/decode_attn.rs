//! Attention for decode steps on the CPU: one new query per sequence against that sequence's
//! cached keys and values, read in place.
//!
//! Through candle this is a dozen small operations per sequence and layer (two matmuls through a
//! general GEMM with its packing, a scale, a softmax, reshapes), each with an allocation and a
//! dispatch: for a batched step of eight sequences, most of the step's single-threaded time.
//! Here it is one pass per sequence, KV head and group of the query heads that share it (each
//! key and value row read once for the group, the next key tile prefetched), shared out over
//! candle's worker pool, with the running sums in vector registers (`lanes.rs`). A cache longer
//! than [`BLOCK_KEYS`] positions is taken a block at a time (flash-decoding's split: each
//! block's maximum, total and weighted values, combined after), so that one long sequence
//! keeps every worker busy: at 4,000 positions SmolLM2's attention took a third less time.
//! The single decode path and the batched one both use it, so a sequence gets the same bits
//! either way.
//! The sums follow candle's order where it is known (a fused multiply-add chain per score and
//! per output dimension, as its GEMM accumulates; the softmax total as its AVX sum adds), so
//! results differ from candle's by an ulp at most here and there, and greedy answers match.
//! The exponentials are `fused::exp`'s (vectorised, within 3 ulp of libm's). Caches stored as
//! f16 are widened as they are read (exactly: every f16 is an f32), so a sequence's result is
//! the same whether its cache holds halves or the same values as f32.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU32, Ordering};

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

use super::lanes::{Lanes, Portable};
use super::ModelError;

/// The shape of the heads.
#[derive(Debug, Clone, Copy)]
pub(super) struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// Whether this path applies: f32 tensors on the CPU (in caches of f32 or f16).
pub(super) fn applies(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && dtype == DType::F32
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

/// `softmax(q k^T * scale) v` for each sequence: `q` holds `n` rows of `n_heads * head_dim`
/// values, row-major (sequence `i`'s query heads in row `i`), `kv[i]` that sequence's visible
/// keys and values, views of its cache: keys transposed `(1, n_kv_heads, head_dim, keys)`,
/// values `(1, n_kv_heads, keys, head_dim)`. Query head `h` reads KV head
/// `h / (n_heads / n_kv_heads)`. Returns the outputs likewise, `n` rows of
/// `n_heads * head_dim`.
///
/// # Errors
/// Caches not on the CPU, not f32 or f16, or shaped otherwise; a query that does not fit them.
pub(super) fn attend(
    q: &[f32],
    kv: &[(Tensor, Tensor)],
    heads: &Heads,
) -> Result<Vec<f32>, ModelError> {
    let n = kv.len();
    let (hd, nh) = (heads.head_dim, heads.n_heads);
    let group = nh / heads.n_kv_heads.max(1);
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
    let mut caches: Vec<(Slices<'_>, View, View)> = Vec::with_capacity(n);
    for (ks, vs, kview, vview) in &guards {
        let slices = match (&**ks, &**vs) {
            (Storage::Cpu(CpuStorage::F32(k)), Storage::Cpu(CpuStorage::F32(v))) => {
                Slices::F32(k, v)
            }
            (Storage::Cpu(CpuStorage::F16(k)), Storage::Cpu(CpuStorage::F16(v))) => {
                Slices::F16(k, v)
            }
            _ => {
                return Err(ModelError::Internal(
                    "kv cache is not f32 or f16 on the CPU",
                ))
            }
        };
        caches.push((slices, *kview, *vview));
    }
    if caches.iter().any(|(s, kv_, vv)| {
        let (k, v) = s.lens();
        kv_.end(heads) > k || vv.end(heads) > v
    }) {
        return Err(ModelError::Internal("kv cache view exceeds its storage"));
    }
    // Work items: (sequence, KV head, block of keys, piece of that KV head's query heads). A
    // piece's heads read each key and value once between them; pieces are smaller only when
    // there would otherwise be too few items to keep every worker busy. A long cache is taken a
    // block of keys at a time (the same blocks whatever else is in the step, so a sequence's
    // bits do not depend on its company), and the blocks' results combined.
    // The pool's own size (the calling thread and its workers): `get_num_threads` reads
    // /proc/cpuinfo at every call where RAYON_NUM_THREADS is unset (a library user's process).
    let threads = candle_core::utils::barrier_pool().n_workers() + 1;
    let kv_heads = heads.n_kv_heads;
    let blocks: Vec<usize> = caches
        .iter()
        .map(|(_, kview, _)| kview.keys.div_ceil(BLOCK_KEYS))
        .collect();
    let all_blocks: usize = blocks.iter().sum();
    let piece = (1..=MAX_PIECE.min(group))
        .rev()
        .find(|&p| all_blocks * kv_heads * group.div_ceil(p) >= 4 * threads)
        .unwrap_or(1);
    let per_kv = group.div_ceil(piece);
    let mut items = Vec::with_capacity(all_blocks * kv_heads * per_kv);
    for (seq, &nb) in blocks.iter().enumerate() {
        for kv_head in 0..kv_heads {
            for block in 0..nb {
                for p in 0..per_kv {
                    items.push((seq, kv_head, block, p));
                }
            }
        }
    }
    // Where each split sequence's partial results start: per query head and block, the
    // maximum, the total and `hd` outputs.
    let entry = hd + 2;
    let mut part_at = vec![0usize; n];
    let mut parts_len = 0;
    for (at, &nb) in part_at.iter_mut().zip(&blocks) {
        *at = parts_len;
        if nb > 1 {
            parts_len += nh * nb * entry;
        }
    }
    let cells: Vec<AtomicU32> = (0..n * nh * hd).map(|_| AtomicU32::new(0)).collect();
    let parts: Vec<AtomicU32> = (0..parts_len).map(|_| AtomicU32::new(0)).collect();
    let store = |cells: &[AtomicU32], at: usize, x: f32| {
        cells[at].store(x.to_bits(), Ordering::Relaxed);
    };
    candle_core::utils::barrier_pool().execute_chunked(items.len(), |range| {
        let mut scores = Vec::new();
        let mut out = vec![0f32; piece * hd];
        for &(seq, kv_head, block, p) in &items[range] {
            let first = kv_head * group + p * piece;
            let count = piece.min(kv_head * group + group - first);
            let (slices, kview, vview) = caches[seq];
            let nb = blocks[seq];
            let qs = &q[(seq * nh + first) * hd..(seq * nh + first + count) * hd];
            let out = &mut out[..count * hd];
            let stats = match slices {
                Slices::F32(k, v) => {
                    let at = Kv::new(k, v, kview, vview, kv_head, heads.scale).block(block, nb);
                    by_count(count, qs, &at, &mut scores, out)
                }
                Slices::F16(k, v) => {
                    let at = Kv::new(k, v, kview, vview, kv_head, heads.scale).block(block, nb);
                    by_count(count, qs, &at, &mut scores, out)
                }
            };
            if nb == 1 {
                let base = (seq * nh + first) * hd;
                for (d, &x) in out.iter().enumerate() {
                    store(&cells, base + d, x);
                }
                continue;
            }
            for (h, (o, (max, sum))) in out.chunks_exact(hd).zip(stats).enumerate() {
                let base = part_at[seq] + ((first + h) * nb + block) * entry;
                store(&parts, base, max);
                store(&parts, base + 1, sum);
                for (d, &x) in o.iter().enumerate() {
                    store(&parts, base + 2 + d, x);
                }
            }
        }
    });
    let mut out: Vec<f32> = cells
        .into_iter()
        .map(|c| f32::from_bits(c.into_inner()))
        .collect();
    let parts: Vec<f32> = parts
        .into_iter()
        .map(|c| f32::from_bits(c.into_inner()))
        .collect();
    for (seq, &nb) in blocks.iter().enumerate() {
        if nb > 1 {
            let seq_parts = &parts[part_at[seq]..part_at[seq] + nh * nb * entry];
            for (h, head) in seq_parts.chunks_exact(nb * entry).enumerate() {
                let base = (seq * nh + h) * hd;
                combine(head, entry, &mut out[base..base + hd]);
            }
        }
    }
    Ok(out)
}

/// Keys per block of a long cache.
const BLOCK_KEYS: usize = 1024;

/// One head's blocks (`entry` values each: the block's maximum score, its total of
/// exponentials, and its outputs weighted by those exponentials) into its output: each block
/// rescaled to the largest maximum, then the sums divided by the rescaled totals' sum.
fn combine(blocks: &[f32], entry: usize, out: &mut [f32]) {
    let max = blocks
        .chunks_exact(entry)
        .fold(f32::NEG_INFINITY, |m, b| m.max(b[0]));
    let mut total = 0f32;
    out.fill(0.0);
    for b in blocks.chunks_exact(entry) {
        let w = super::fused::exp(b[0] - max);
        total = w.mul_add(b[1], total);
        for (o, &x) in out.iter_mut().zip(&b[2..]) {
            *o = w.mul_add(x, *o);
        }
    }
    for o in out.iter_mut() {
        *o /= total;
    }
}

/// Most query heads that one work item handles together.
const MAX_PIECE: usize = 4;

/// A cache's key and value storage.
#[derive(Clone, Copy)]
enum Slices<'a> {
    F32(&'a [f32], &'a [f32]),
    F16(&'a [half::f16], &'a [half::f16]),
}

impl Slices<'_> {
    fn lens(&self) -> (usize, usize) {
        match self {
            Self::F32(k, v) => (k.len(), v.len()),
            Self::F16(k, v) => (k.len(), v.len()),
        }
    }
}

/// What a cache stores: f32 or f16, read as f32 lanes.
trait Elem: Copy {
    /// `L::LANES` values from `p`, as f32.
    ///
    /// # Safety
    /// The CPU has `L`'s instruction set; `p` points at `L::LANES` readable values.
    unsafe fn lanes<L: Lanes>(p: *const Self) -> L;
    fn f32(self) -> f32;
}

impl Elem for f32 {
    #[inline(always)]
    unsafe fn lanes<L: Lanes>(p: *const Self) -> L {
        L::load(p)
    }
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}

impl Elem for half::f16 {
    #[inline(always)]
    unsafe fn lanes<L: Lanes>(p: *const Self) -> L {
        L::load_f16(p.cast())
    }
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

/// One KV head of one sequence's cache (the keys `first..first + keys` of its view), and the
/// softmax scale.
struct Kv<'a, E> {
    k: &'a [E],
    v: &'a [E],
    kview: View,
    vview: View,
    kv_head: usize,
    scale: f32,
    first: usize,
    keys: usize,
    /// Whether the probabilities are divided by their total (the whole view), or left as
    /// exponentials for [`combine`] (one block of a long view).
    normalize: bool,
}

impl<'a, E> Kv<'a, E> {
    fn new(k: &'a [E], v: &'a [E], kview: View, vview: View, kv_head: usize, scale: f32) -> Self {
        Self {
            k,
            v,
            kview,
            vview,
            kv_head,
            scale,
            first: 0,
            keys: kview.keys,
            normalize: true,
        }
    }

    /// Block `b` of [`BLOCK_KEYS`] keys of a view of `blocks` blocks.
    fn block(self, b: usize, blocks: usize) -> Self {
        if blocks <= 1 {
            return self;
        }
        let first = b * BLOCK_KEYS;
        Self {
            first,
            keys: BLOCK_KEYS.min(self.kview.keys - first),
            normalize: false,
            ..self
        }
    }
}

/// A head's softmax over one block of keys: the largest score and the total of the
/// exponentials shifted by it.
type Stats = (f32, f32);

/// [`one_group`] for `count` (1 to 4) heads.
fn by_count<E: Elem>(
    count: usize,
    q: &[f32],
    at: &Kv<'_, E>,
    s: &mut Vec<f32>,
    out: &mut [f32],
) -> [Stats; MAX_PIECE] {
    fn pad<const H: usize>(stats: [Stats; H]) -> [Stats; MAX_PIECE] {
        std::array::from_fn(|h| stats.get(h).copied().unwrap_or_default())
    }
    match count {
        1 => pad(one_group::<E, 1>(q, at, s, out)),
        2 => pad(one_group::<E, 2>(q, at, s, out)),
        3 => pad(one_group::<E, 3>(q, at, s, out)),
        _ => pad(one_group::<E, 4>(q, at, s, out)),
    }
}

/// `H` query heads (`q`, consecutive, `head_dim` each) over the same KV head: scores, softmax
/// and the weighted sum of values into `out` (the heads' outputs, consecutive), with the widest
/// vectors this CPU has.
fn one_group<E: Elem, const H: usize>(
    q: &[f32],
    at: &Kv<'_, E>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) -> [Stats; H] {
    #[cfg(target_arch = "x86_64")]
    {
        if super::qdot::cpu_has!("avx512f") {
            // SAFETY: the CPU has AVX-512 F.
            return unsafe { one_group_avx512::<E, H>(q, at, scores, out) };
        }
        if super::qdot::cpu_has!("avx2", "fma", "f16c") {
            // SAFETY: the CPU has AVX2, FMA and F16C.
            return unsafe { one_group_avx2::<E, H>(q, at, scores, out) };
        }
    }
    // SAFETY: the portable lanes need no CPU feature.
    unsafe { group_with::<Portable, E, H>(q, at, scores, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn one_group_avx512<E: Elem, const H: usize>(
    q: &[f32],
    at: &Kv<'_, E>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) -> [Stats; H] {
    group_with::<super::lanes::Avx512, E, H>(q, at, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn one_group_avx2<E: Elem, const H: usize>(
    q: &[f32],
    at: &Kv<'_, E>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) -> [Stats; H] {
    group_with::<super::lanes::Avx2, E, H>(q, at, scores, out)
}

/// Key tiles of `KT` vectors: enough independent chains for `H` heads without running out of
/// registers.
const fn key_vectors(h: usize) -> usize {
    if h <= 2 {
        4
    } else {
        2
    }
}

/// [`one_group`] on lanes `L`. Keys are read in tiles of `KT` vectors of positions and values in
/// tiles of `DT` vectors of dimensions, each load shared by the `H` heads. Every score is one
/// chain of fused multiply-adds in dimension order and every output one chain in key order,
/// whatever the tiling and the lanes, so a head's result does not depend on `H` or `L`.
///
/// # Safety
/// The CPU has `L`'s instruction set.
#[inline(always)]
unsafe fn group_with<L: Lanes, E: Elem, const H: usize>(
    q: &[f32],
    at: &Kv<'_, E>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) -> [Stats; H] {
    const DT: usize = 4;
    let kt = key_vectors(H);
    let hd = q.len() / H;
    let (k, v, kview, vview) = (at.k, at.v, at.kview, at.vview);
    let keys = at.keys;
    // Scores of head h at `scores[h * keys..]`. With the keys transposed, a dimension's values
    // for consecutive positions are one row, so many keys' chains advance together.
    scores.clear();
    scores.resize(H * keys, 0.0);
    let kbase = kview.offset + at.kv_head * kview.head_stride + at.first * kview.key_stride;
    let tile = kt * L::LANES;
    let tiles = keys / tile;
    for t in 0..tiles {
        let mut acc = [[L::zero(); 4]; H];
        for d in 0..hd {
            let from = kbase + d * kview.dim_stride + tile * t;
            let row = &k[from..from + tile];
            // The next tile of this row: the rows are far apart (a stride of the cache's
            // capacity), too many streams for the hardware prefetcher to follow.
            let next = row.as_ptr().wrapping_add(tile).cast::<u8>();
            let bytes = tile * std::mem::size_of::<E>();
            for line in (0..bytes).step_by(64) {
                L::prefetch(next.wrapping_add(line).cast());
            }
            for (h, acc) in acc.iter_mut().enumerate() {
                let qd = L::splat(q[h * hd + d]);
                for (j, a) in acc.iter_mut().enumerate().take(kt) {
                    *a = a.mul_add(qd, E::lanes(row.as_ptr().add(j * L::LANES)));
                }
            }
        }
        let scale = L::splat(at.scale);
        for (h, acc) in acc.iter().enumerate() {
            let dst = &mut scores[h * keys + tile * t..h * keys + tile * (t + 1)];
            for (j, a) in acc.iter().enumerate().take(kt) {
                L::zero()
                    .mul_add(*a, scale)
                    .store(dst.as_mut_ptr().add(j * L::LANES));
            }
        }
    }
    let rest = tile * tiles;
    if rest < keys {
        for d in 0..hd {
            let from = kbase + d * kview.dim_stride;
            let row = &k[from + rest..from + keys];
            for h in 0..H {
                let qd = q[h * hd + d];
                for (s, &kd) in scores[h * keys + rest..(h + 1) * keys].iter_mut().zip(row) {
                    *s = qd.mul_add(kd.f32(), *s);
                }
            }
        }
        for h in 0..H {
            for s in scores[h * keys + rest..(h + 1) * keys].iter_mut() {
                *s *= at.scale;
            }
        }
    }
    let mut stats = [(0f32, 0f32); H];
    for (head, stats) in scores.chunks_exact_mut(keys).zip(&mut stats) {
        let max = head.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        for s in head.iter_mut() {
            *s = super::fused::exp(*s - max);
        }
        let sum = softmax_sum(head);
        if at.normalize {
            for s in head.iter_mut() {
                *s /= sum;
            }
        }
        *stats = (max, sum);
    }
    // Values weighted in key order, one fused multiply-add chain per output dimension.
    let vbase = vview.offset + at.kv_head * vview.head_stride + at.first * vview.key_stride;
    let width = DT * L::LANES;
    let full = hd / width;
    for g in 0..full {
        let mut acc = [[L::zero(); DT]; H];
        for t in 0..keys {
            let from = vbase + t * vview.key_stride + width * g;
            let row = &v[from..from + width];
            for (h, acc) in acc.iter_mut().enumerate() {
                let p = L::splat(scores[h * keys + t]);
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = a.mul_add(p, E::lanes(row.as_ptr().add(j * L::LANES)));
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            let dst = &mut out[h * hd + width * g..h * hd + width * (g + 1)];
            for (j, a) in acc.iter().enumerate() {
                a.store(dst.as_mut_ptr().add(j * L::LANES));
            }
        }
    }
    for h in 0..H {
        for d in width * full..hd {
            let mut acc = 0f32;
            for t in 0..keys {
                acc = scores[h * keys + t].mul_add(v[vbase + t * vview.key_stride + d].f32(), acc);
            }
            out[h * hd + d] = acc;
        }
    }
    stats
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

    /// A tensor's f32 values.
    fn values(t: &Tensor) -> Result<Vec<f32>, ModelError> {
        Ok(crate::model::f32_values(t)?)
    }

    /// The values' bits, for comparisons that must be exact.
    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|f| f.to_bits()).collect()
    }

    /// Random f16 keys `(1, kv_heads, hd, keys)` and values `(1, kv_heads, keys, hd)`: views of
    /// the first `keys` positions of storage for `cap`.
    fn f16_cache(kv_heads: usize, hd: usize, keys: usize, cap: usize) -> (Tensor, Tensor) {
        let dev = Device::Cpu;
        let k = Tensor::randn(0f32, 1.0, (1, kv_heads, hd, cap), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, kv_heads, cap, hd), &dev).unwrap();
        (
            k.to_dtype(DType::F16).unwrap().narrow(3, 0, keys).unwrap(),
            v.to_dtype(DType::F16).unwrap().narrow(2, 0, keys).unwrap(),
        )
    }

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
        let got = attend(&values(&q).unwrap(), &kv, &heads).unwrap();
        assert_eq!(got.len(), 6 * 96);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 1e-5, "{i}: {a} vs {b}");
        }
    }

    /// A head's result has the same bits however many heads share its pass over the keys and
    /// values, and whichever lanes compute it: one head at a time against two, three and four
    /// together, on every implementation this CPU runs, with key counts below, at and above
    /// the tile widths and a head size that leaves a remainder of dimensions.
    #[test]
    fn heads_sharing_a_pass_get_the_same_bits() {
        let dev = Device::Cpu;
        let hd = 72;
        for keys in [1usize, 7, 16, 33, 70, 130] {
            let k = Tensor::randn(0f32, 1.0, (1, 1, hd, keys), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (1, 1, keys, hd), &dev).unwrap();
            let q = Tensor::randn(0f32, 1.0, (4 * hd,), &dev).unwrap();
            let (k, v, q) = (
                values(&k).unwrap(),
                values(&v).unwrap(),
                values(&q).unwrap(),
            );
            let kview = View {
                offset: 0,
                head_stride: hd * keys,
                key_stride: 1,
                dim_stride: keys,
                keys,
            };
            let vview = View {
                offset: 0,
                head_stride: hd * keys,
                key_stride: hd,
                dim_stride: 1,
                keys,
            };
            let at = Kv::new(&k, &v, kview, vview, 0, 0.3);
            let mut scores = Vec::new();
            let mut alone = vec![0f32; 4 * hd];
            for (h, out) in alone.chunks_exact_mut(hd).enumerate() {
                // SAFETY: portable lanes.
                unsafe {
                    group_with::<Portable, _, 1>(&q[h * hd..(h + 1) * hd], &at, &mut scores, out)
                };
            }
            let mut two = vec![0f32; 4 * hd];
            one_group::<_, 2>(&q[..2 * hd], &at, &mut scores, &mut two[..2 * hd]);
            one_group::<_, 2>(&q[2 * hd..], &at, &mut scores, &mut two[2 * hd..]);
            assert_eq!(bits(&alone), bits(&two), "{keys} keys, pairs");
            let mut three = vec![0f32; 4 * hd];
            one_group::<_, 3>(&q[..3 * hd], &at, &mut scores, &mut three[..3 * hd]);
            one_group::<_, 1>(&q[3 * hd..], &at, &mut scores, &mut three[3 * hd..]);
            assert_eq!(bits(&alone), bits(&three), "{keys} keys, three and one");
            let mut four = vec![0f32; 4 * hd];
            one_group::<_, 4>(&q, &at, &mut scores, &mut four);
            assert_eq!(bits(&alone), bits(&four), "{keys} keys, four");
            #[cfg(target_arch = "x86_64")]
            if crate::model::qdot::cpu_has!("avx2", "fma", "f16c") {
                let mut avx2 = vec![0f32; 4 * hd];
                // SAFETY: the CPU has AVX2, FMA and F16C.
                unsafe { one_group_avx2::<_, 4>(&q, &at, &mut scores, &mut avx2) };
                assert_eq!(bits(&alone), bits(&avx2), "{keys} keys, AVX2");
            }
        }
    }

    /// Caches stored as f16 give, bit for bit, what caches of the same values as f32 give:
    /// the halves are widened exactly, on every path (vector tiles and the scalar rest).
    #[test]
    fn f16_caches_read_as_their_f32_values() {
        let dev = Device::Cpu;
        let heads = Heads {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 72,
            scale: 0.2,
        };
        let (mut halves, mut singles, mut qs) = (Vec::new(), Vec::new(), Vec::new());
        for keys in [1usize, 9, 40, 131] {
            let (k, v) = f16_cache(2, 72, keys, 140);
            let widen = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            singles.push((widen(&k), widen(&v)));
            halves.push((k, v));
            qs.push(Tensor::randn(0f32, 1.0, (1, 6 * 72), &dev).unwrap());
        }
        let q = values(&Tensor::cat(&qs, 0).unwrap()).unwrap();
        let a = attend(&q, &halves, &heads).unwrap();
        let b = attend(&q, &singles, &heads).unwrap();
        assert_eq!(bits(&a), bits(&b));
        // Mixed storage types are refused, not misread.
        let mixed = [(halves[0].0.clone(), singles[0].1.clone())];
        assert!(attend(&q[..6 * 72], &mixed, &heads).is_err());
    }

    /// Caches longer than a block are attended to a block at a time and the blocks combined:
    /// within float rounding of candle's whole softmax, and a sequence gets the same bits alone
    /// as in a step with others (its blocks do not depend on them).
    #[test]
    fn long_caches_are_combined_from_blocks() {
        let dev = Device::Cpu;
        let heads = Heads {
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            scale: 0.125,
        };
        let (mut kv, mut qs, mut want) = (Vec::new(), Vec::new(), Vec::new());
        for keys in [BLOCK_KEYS + 1, 2500, 40] {
            let (k, v) = f16_cache(3, 64, keys, keys + 7);
            let q = Tensor::randn(0f32, 2.0, (1, 9, 1, 64), &dev).unwrap();
            let (kf, vf) = (
                k.to_dtype(DType::F32).unwrap(),
                v.to_dtype(DType::F32).unwrap().contiguous().unwrap(),
            );
            let scores = (q.reshape((1, 3, 3, 64)).unwrap().matmul(&kf).unwrap() * 0.125).unwrap();
            let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
            want.extend(values(&probs.matmul(&vf).unwrap()).unwrap());
            qs.push(q);
            kv.push((k, v));
        }
        let q = values(&Tensor::cat(&qs, 0).unwrap()).unwrap();
        let together = attend(&q, &kv, &heads).unwrap();
        for (i, (a, b)) in together.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 1e-5, "{i}: {a} vs {b}");
        }
        for (s, pair) in kv.iter().enumerate() {
            let w = 9 * 64;
            let alone = attend(&q[s * w..(s + 1) * w], std::slice::from_ref(pair), &heads).unwrap();
            assert_eq!(
                bits(&alone),
                bits(&together[s * w..(s + 1) * w]),
                "sequence {s}"
            );
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
        assert!(attend(&values(&q).unwrap(), &[(k.clone(), v.clone())], &heads).is_ok());
        let q = Tensor::zeros((2, 4, 1, 8), DType::F32, &dev).unwrap();
        assert!(attend(&values(&q).unwrap(), &[(k.clone(), v.clone())], &heads).is_err());
        // Keys not transposed.
        let q = Tensor::zeros((1, 4, 1, 8), DType::F32, &dev).unwrap();
        assert!(attend(&values(&q).unwrap(), &[(v.clone(), v)], &heads).is_err());
    }
}
