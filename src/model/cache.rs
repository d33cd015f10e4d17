//! A sequence's key/value cache: per layer, keys and values of every position seen so far.
//!
//! Storage grows by doubling (never per token) and is written in place with `slice_set`, so a
//! decode step copies only the new position's keys and values. Keys are stored transposed
//! (`(1, kv_heads, head_dim, capacity)`): a decode step scores a query against many keys at
//! once, and with each dimension's values for consecutive positions side by side those scores
//! are plain vector multiply-adds; for prompts the transposed keys are what `q @ k^T` wants.
//!
//! On the CPU keys and values are stored as f16 by default, as llama.cpp and Ollama store them:
//! half the memory per position, and half the bytes a decode step's attention reads, which
//! with several sequences or a long context is most of its time. `--kv-cache-type f32` keeps
//! them as computed.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{bail, CpuStorage, DType, Device, InplaceOp1, Layout, Tensor};

use super::ModelError;

/// Smallest number of positions a layer's storage is allocated for.
const MIN_CAPACITY: usize = 64;

/// What a planned capacity is rounded up to ([`KvCache::plan`]): at a capacity of 4,128 (rows
/// of transposed keys 8,256 bytes apart) decode attention ran 30% slower than at 4,096 or
/// 4,608 (measured here; the cause is not known).
const PLAN_STEP: usize = 512;

/// Keys and values of one layer: keys `(1, kv_heads, head_dim, capacity)`, values
/// `(1, kv_heads, capacity, head_dim)`.
struct LayerCache {
    k: Tensor,
    v: Tensor,
}

/// Position axes: of the transposed keys, and of the values.
const K_POS: usize = 3;
const V_POS: usize = 2;

/// How keys and values are stored on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheType {
    /// Half precision: half the memory, and faster decode steps (the default).
    #[default]
    F16,
    /// As computed, single precision.
    F32,
}

impl KvCacheType {
    /// The storage type for values computed as `dtype` on `device`: f16 applies on the CPU.
    fn storage(self, dtype: DType, device: &Device) -> DType {
        match self {
            Self::F16 if device.is_cpu() && dtype == DType::F32 => DType::F16,
            _ => dtype,
        }
    }
}

impl std::str::FromStr for KvCacheType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(Self::F16),
            "f32" => Ok(Self::F32),
            other => Err(format!("unknown KV cache type {other:?} (f16 or f32)")),
        }
    }
}

/// The process-wide choice that new caches follow (`--kv-cache-type`).
static CACHE_TYPE: AtomicU8 = AtomicU8::new(0);

/// Set how caches created from now on store keys and values.
pub fn set_cache_type(t: KvCacheType) {
    CACHE_TYPE.store(t as u8, Ordering::Relaxed);
}

/// How caches created now store keys and values.
pub fn cache_type() -> KvCacheType {
    if CACHE_TYPE.load(Ordering::Relaxed) == KvCacheType::F32 as u8 {
        KvCacheType::F32
    } else {
        KvCacheType::F16
    }
}

/// The KV cache of one sequence.
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    /// Positions already stored (the same in every layer once a forward pass ends).
    len: usize,
    kind: KvCacheType,
    /// Positions the sequence will hold at most, when known ([`KvCache::plan`]).
    planned: usize,
}

impl KvCache {
    /// An empty cache that stores keys and values as [`cache_type`] says.
    pub fn new(n_layers: usize) -> Self {
        Self::with_type(n_layers, cache_type())
    }

    /// An empty cache that stores keys and values as `kind`.
    pub fn with_type(n_layers: usize, kind: KvCacheType) -> Self {
        Self {
            layers: (0..n_layers).map(|_| None).collect(),
            len: 0,
            kind,
            planned: 0,
        }
    }

    /// Number of positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the cache's storage.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| (l.k.elem_count() + l.v.elem_count()) * l.k.dtype().size_in_bytes())
            .sum()
    }

    /// The sequence will hold at most `positions` positions (its prompt and its `max_tokens`):
    /// when storage grows to within doubling's reach of the plan, it takes the plan (rounded up
    /// to `PLAN_STEP` positions) instead of doubling, which copies the cache once more and can
    /// leave half of it unused (a 4,100-position sequence held storage for 8,192). Storage
    /// never exceeds what doubling would take; past the plan it grows by doubling again.
    pub fn plan(&mut self, positions: usize) {
        self.planned = positions;
    }

    /// Forget every position from `n` on (their storage is overwritten by later appends).
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// A new cache holding a copy of the first `n` positions (with room to grow).
    ///
    /// # Errors
    /// A candle failure while copying.
    pub fn copy_prefix(&self, n: usize) -> Result<Self, ModelError> {
        let n = n.min(self.len);
        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let Some(c) = layer else {
                layers.push(None);
                continue;
            };
            let (b, heads, _, dim) = c.v.dims4()?;
            let cap = (n + MIN_CAPACITY).next_power_of_two();
            let k = Tensor::zeros((b, heads, dim, cap), c.k.dtype(), c.k.device())?;
            let v = Tensor::zeros((b, heads, cap, dim), c.v.dtype(), c.v.device())?;
            if n > 0 {
                k.slice_set(&c.k.narrow(K_POS, 0, n)?.contiguous()?, K_POS, 0)?;
                v.slice_set(&c.v.narrow(V_POS, 0, n)?.contiguous()?, V_POS, 0)?;
            }
            layers.push(Some(LayerCache { k, v }));
        }
        Ok(Self {
            layers,
            len: n,
            kind: self.kind,
            planned: 0,
        })
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Store `k`, `v` (`(1, kv_heads, n, head_dim)`) for layer `layer` after the current
    /// positions and return views over all stored positions: the keys transposed
    /// (`(1, kv_heads, head_dim, total)`), the values as given (`(1, kv_heads, total, head_dim)`),
    /// both of the storage type (f16 where the cache stores halves: callers convert).
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let (b, heads, n, dim) = k.dims4()?;
        if k.device().is_cpu() && k.dtype() == DType::F32 && b == 1 {
            let (k, v) = (super::f32_values(k)?, super::f32_values(v)?);
            return self.append_values(layer, &k, &v, heads, dim);
        }
        let len = self.len;
        let c = self.reserve(layer, (b, heads, n, dim), k.dtype(), k.device())?;
        let dtype = c.k.dtype();
        c.k.slice_set(
            &k.transpose(2, 3)?.to_dtype(dtype)?.contiguous()?,
            K_POS,
            len,
        )?;
        c.v.slice_set(&v.to_dtype(dtype)?.contiguous()?, V_POS, len)?;
        Ok((
            c.k.narrow(K_POS, 0, len + n)?,
            c.v.narrow(V_POS, 0, len + n)?,
        ))
    }

    /// [`KvCache::append`] for f32 keys and values at hand on the CPU, `(heads, n, dim)`
    /// row-major, written into the storage in place (without candle's strided copy, one tiny
    /// copy per key dimension).
    pub(crate) fn append_values(
        &mut self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        heads: usize,
        dim: usize,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let n = k.len() / (heads * dim).max(1);
        if k.len() != heads * n * dim || v.len() != k.len() || n == 0 {
            return Err(ModelError::Internal("keys and values do not fit the heads"));
        }
        let len = self.len;
        let c = self.reserve(layer, (1, heads, n, dim), DType::F32, &Device::Cpu)?;
        let at = |src, transposed| Store {
            src,
            heads,
            n,
            pos: len,
            transposed,
        };
        c.k.inplace_op1(&at(k, true))?;
        c.v.inplace_op1(&at(v, false))?;
        Ok((
            c.k.narrow(K_POS, 0, len + n)?,
            c.v.narrow(V_POS, 0, len + n)?,
        ))
    }

    /// Layer `layer`'s storage with room for `n` more positions (of `(b, heads, n, dim)`,
    /// computed as `dtype`), doubled when it is full.
    fn reserve(
        &mut self,
        layer: usize,
        (b, heads, n, dim): (usize, usize, usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<&LayerCache, ModelError> {
        let needed = self.len + n;
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or(ModelError::Internal("kv cache layer out of range"))?;
        let grow = match slot {
            Some(c) => c.v.dim(V_POS)? < needed,
            None => true,
        };
        if grow {
            let dtype = self.kind.storage(dtype, device);
            let old_cap = slot.as_ref().map_or(0, |c| c.v.dims()[V_POS]);
            let doubled = needed.max(old_cap * 2).max(MIN_CAPACITY);
            // The plan, where it is no more than doubling may take anyway: a plan far past
            // what is stored (a `max_tokens` of the whole context) reserves nothing up front.
            let planned = self.planned.next_multiple_of(PLAN_STEP);
            let cap = if (needed..=doubled.max(2 * needed)).contains(&planned) {
                planned
            } else {
                doubled
            };
            let nk = Tensor::zeros((b, heads, dim, cap), dtype, device)?;
            let nv = Tensor::zeros((b, heads, cap, dim), dtype, device)?;
            if let Some(c) = slot.as_ref() {
                if self.len > 0 {
                    nk.slice_set(&c.k.narrow(K_POS, 0, self.len)?.contiguous()?, K_POS, 0)?;
                    nv.slice_set(&c.v.narrow(V_POS, 0, self.len)?.contiguous()?, V_POS, 0)?;
                }
            }
            *slot = Some(LayerCache { k: nk, v: nv });
        }
        slot.as_ref()
            .ok_or(ModelError::Internal("kv cache layer missing after growth"))
    }
}

/// Writes new positions' keys or values, `src` `(heads, n, head_dim)` row-major, into a layer's
/// f32 or f16 storage at position `pos`: transposed for keys (`(1, heads, head_dim, capacity)`),
/// as they are for values (`(1, heads, capacity, head_dim)`).
struct Store<'a> {
    src: &'a [f32],
    heads: usize,
    n: usize,
    pos: usize,
    transposed: bool,
}

impl InplaceOp1 for Store<'_> {
    fn name(&self) -> &'static str {
        "kv-cache-store"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout) -> candle_core::Result<()> {
        match dst {
            CpuStorage::F32(dst) => self.put(dst, dst_l, |x| x),
            CpuStorage::F16(dst) => self.put(dst, dst_l, half::f16::from_f32),
            _ => bail!("kv cache store: f32 or f16 storage expected"),
        }
    }
}

impl Store<'_> {
    fn put<E: Copy>(
        &self,
        dst: &mut [E],
        dst_l: &Layout,
        from: impl Fn(f32) -> E,
    ) -> candle_core::Result<()> {
        let Some((d0, d1)) = dst_l.contiguous_offsets() else {
            bail!("kv cache store: contiguous storage expected")
        };
        let dst = &mut dst[d0..d1];
        let (heads, n, pos) = (self.heads, self.n, self.pos);
        let (_, dst_heads, a, b) = dst_l.shape().dims4()?;
        let (cap, dim) = if self.transposed { (b, a) } else { (a, b) };
        if dst_heads != heads || self.src.len() != heads * n * dim || pos + n > cap {
            bail!("kv cache store: shapes do not fit")
        }
        for (h, rows) in self.src.chunks_exact(n * dim).enumerate() {
            if self.transposed {
                let head = &mut dst[h * dim * cap..(h + 1) * dim * cap];
                for (i, row) in rows.chunks_exact(dim).enumerate() {
                    for (d, &x) in row.iter().enumerate() {
                        head[d * cap + pos + i] = from(x);
                    }
                }
            } else {
                let at = (h * cap + pos) * dim;
                for (d, &x) in dst[at..at + n * dim].iter_mut().zip(rows) {
                    *d = from(x);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Appends of a few positions, one, and enough to grow the storage twice: the views hold
    /// every position appended, keys transposed, in order (as f16 when the cache stores halves:
    /// each value rounded once); a prefix copy holds the first ones.
    #[test]
    fn appends_land_at_their_positions() {
        for kind in [KvCacheType::F32, KvCacheType::F16] {
            appends_land(kind);
        }
    }

    /// A planned cache grows to its plan (rounded up) once the plan is within doubling's reach,
    /// and keeps it; past the plan it doubles again and keeps every position. A plan far beyond
    /// what is stored reserves nothing.
    #[test]
    fn a_planned_cache_stops_at_its_plan() {
        let dev = Device::Cpu;
        let per_position = 2 * 2 * 8 * 4; // keys and values, 2 heads of 8 f32s
        let mut cache = KvCache::with_type(1, KvCacheType::F32);
        cache.plan(300);
        let mut all = Vec::new();
        // The plan is rounded up to 512 positions.
        for (n, cap) in [
            (3usize, 64usize),
            (200, 203),
            (97, 512),
            (1, 512),
            (300, 1024),
        ] {
            let k = Tensor::randn(0f32, 1.0, (1, 2, n, 8), &dev).unwrap();
            let (k_all, v_all) = cache.append(0, &k, &k).unwrap();
            cache.advance(n);
            all.push(k);
            assert_eq!(cache.bytes(), cap * per_position, "after {n}");
            let want = Tensor::cat(&all, 2).unwrap();
            assert_eq!(crate::model::max_diff(&v_all, &want), 0.0);
            let keys = k_all.transpose(2, 3).unwrap();
            assert_eq!(crate::model::max_diff(&keys, &want), 0.0);
        }
        let mut huge = KvCache::with_type(1, KvCacheType::F32);
        huge.plan(1 << 20);
        let k = Tensor::randn(0f32, 1.0, (1, 2, 10, 8), &dev).unwrap();
        huge.append(0, &k, &k).unwrap();
        assert_eq!(huge.bytes(), 64 * per_position);
    }

    fn appends_land(kind: KvCacheType) {
        let dev = Device::Cpu;
        let mut cache = KvCache::with_type(2, kind);
        let stored = match kind {
            KvCacheType::F32 => DType::F32,
            KvCacheType::F16 => DType::F16,
        };
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        for n in [3usize, 1, 70, 1, 90] {
            let k = Tensor::randn(0f32, 1.0, (1, 2, n, 8), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (1, 2, n, 8), &dev).unwrap();
            let (k_all, v_all) = cache.append(1, &k, &v).unwrap();
            cache.advance(n);
            ks.push(k);
            vs.push(v);
            let want_k = Tensor::cat(&ks, 2).unwrap().transpose(2, 3).unwrap();
            let want_v = Tensor::cat(&vs, 2).unwrap();
            let diff =
                |a: &Tensor, b: &Tensor| crate::model::max_diff(a, &b.to_dtype(stored).unwrap());
            assert_eq!(k_all.dtype(), stored);
            assert_eq!(k_all.dims(), want_k.dims());
            assert_eq!(diff(&k_all, &want_k), 0.0);
            assert_eq!(diff(&v_all, &want_v), 0.0);
        }
        let copy = cache.copy_prefix(4).unwrap();
        let (k_all, _) = copy.layers[1].as_ref().map(|c| (&c.k, &c.v)).unwrap();
        let want = Tensor::cat(&ks, 2).unwrap().narrow(2, 0, 4).unwrap();
        let got = k_all.narrow(K_POS, 0, 4).unwrap().transpose(2, 3).unwrap();
        let want = want.to_dtype(stored).unwrap().to_dtype(DType::F32).unwrap();
        let got = got.to_dtype(DType::F32).unwrap();
        let d = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }
}
