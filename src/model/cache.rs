//! A sequence's key/value cache: per layer, keys and values of every position seen so far.
//!
//! Storage grows by doubling (never per token) and is written in place with `slice_set`, so a
//! decode step copies only the new position's keys and values. Keys are stored transposed
//! (`(1, kv_heads, head_dim, capacity)`): a decode step scores a query against many keys at
//! once, and with each dimension's values for consecutive positions side by side those scores
//! are plain vector multiply-adds; for prompts the transposed keys are what `q @ k^T` wants.

use candle_core::Tensor;

use super::ModelError;

/// Smallest number of positions a layer's storage is allocated for.
const MIN_CAPACITY: usize = 64;

/// Keys and values of one layer: keys `(1, kv_heads, head_dim, capacity)`, values
/// `(1, kv_heads, capacity, head_dim)`.
struct LayerCache {
    k: Tensor,
    v: Tensor,
}

/// Position axes: of the transposed keys, and of the values.
const K_POS: usize = 3;
const V_POS: usize = 2;

/// The KV cache of one sequence.
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    /// Positions already stored (the same in every layer once a forward pass ends).
    len: usize,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| None).collect(),
            len: 0,
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
        Ok(Self { layers, len: n })
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Store `k`, `v` (`(1, kv_heads, n, head_dim)`) for layer `layer` after the current
    /// positions and return views over all stored positions: the keys transposed
    /// (`(1, kv_heads, head_dim, total)`), the values as given (`(1, kv_heads, total, head_dim)`).
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let (b, heads, n, dim) = k.dims4()?;
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
            let old_cap = slot.as_ref().map_or(0, |c| c.v.dims()[V_POS]);
            let cap = needed.max(old_cap * 2).max(MIN_CAPACITY);
            let nk = Tensor::zeros((b, heads, dim, cap), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, heads, cap, dim), v.dtype(), v.device())?;
            if let Some(c) = slot.as_ref() {
                if self.len > 0 {
                    nk.slice_set(&c.k.narrow(K_POS, 0, self.len)?.contiguous()?, K_POS, 0)?;
                    nv.slice_set(&c.v.narrow(V_POS, 0, self.len)?.contiguous()?, V_POS, 0)?;
                }
            }
            *slot = Some(LayerCache { k: nk, v: nv });
        }
        let c = slot
            .as_ref()
            .ok_or(ModelError::Internal("kv cache layer missing after growth"))?;
        c.k.slice_set(&k.transpose(2, 3)?.contiguous()?, K_POS, self.len)?;
        c.v.slice_set(&v.contiguous()?, V_POS, self.len)?;
        Ok((c.k.narrow(K_POS, 0, needed)?, c.v.narrow(V_POS, 0, needed)?))
    }
}
