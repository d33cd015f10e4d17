//! A quantized weight matrix with the ways to multiply it.
//!
//! On an x86 CPU with AVX2 (or AVX-512), Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q6_K, Q4_K and Q5_K
//! matrices are repacked at load (`qdot/packed.rs`) and take the packed int8 kernel for any
//! number of rows: a decode step, a batched step and a whole prompt alike. Other formats (Q2_K,
//! Q3_K, F16, ...), other CPUs and GPUs: one row at a time (decode), candle's quantized dot
//! products are the fastest path and read the fewest bytes. For many rows (prompt prefill) they
//! walk the rows one by one, so on the CPU the matrix is instead dequantized once per call and
//! multiplied with a dense f32 GEMM, 3-4x faster for prompt-sized batches. To keep llama.cpp's
//! numerics, the activations are first rounded through the same 8-bit format llama.cpp's dot
//! products quantize them to (Q8_0, Q8_1 or Q8_K by weight type): the dense product of the
//! dequantized values is then the integer dot product, up to float summation order. GPU
//! backends keep their quantized kernels.

use std::sync::Arc;

use std::sync::Mutex;

use candle_core::quantized::{GgmlDType, GgmlType, QMatMul, QTensor};
use candle_core::{Module, Tensor, D};

use super::qdot::packed::Packed;

/// Rows from which the dense path is used on the CPU.
pub const DENSE_MIN_ROWS: usize = 16;

pub enum Linear {
    /// Packed for this crate's int8 kernel (see the module notes), the fastest path for any
    /// number of rows. The file's copy of the weights is not kept.
    Packed(Arc<Packed>),
    Quantized {
        matmul: QMatMul,
        /// The quantized weights and the activation format of their dot product, kept for the
        /// dense path (CPU, quantized weights only).
        dense: Option<(Arc<QTensor>, GgmlDType)>,
    },
}

/// `x` (`rows` rows of `k`) rounded through `act` and back: the values llama.cpp's dot products
/// see. candle's own code for the format does the rounding (the same bits as quantizing and
/// dequantizing a `QTensor`), row by row on the worker pool instead of on one thread.
fn round_trip(x: &Tensor, rows: usize, k: usize, act: GgmlDType) -> candle_core::Result<Tensor> {
    use candle_core::quantized::k_quants::{BlockQ8K, BlockQ8_0, BlockQ8_1};
    let values = super::f32_values(x)?;
    if values.len() != rows * k {
        candle_core::bail!(
            "round_trip: {} values are not {rows} rows of {k}",
            values.len()
        );
    }
    let mut out = vec![0f32; rows * k];
    match act {
        GgmlDType::Q8_0 => round_trip_rows::<BlockQ8_0>(&values, &mut out, k),
        GgmlDType::Q8_1 => round_trip_rows::<BlockQ8_1>(&values, &mut out, k),
        GgmlDType::Q8K => round_trip_rows::<BlockQ8K>(&values, &mut out, k),
        other => candle_core::bail!("round_trip: no activation format {other:?}"),
    }?;
    Tensor::from_vec(out, (rows, k), x.device())
}

fn round_trip_rows<T: GgmlType>(
    values: &[f32],
    out: &mut [f32],
    k: usize,
) -> candle_core::Result<()> {
    if k == 0 || !k.is_multiple_of(T::BLCK_SIZE) {
        candle_core::bail!("round_trip: width {k} is not whole {:?} blocks", T::DTYPE);
    }
    let slots: Vec<Mutex<&mut [f32]>> = out.chunks_mut(k).map(Mutex::new).collect();
    candle_core::utils::barrier_pool().execute_chunked(slots.len(), |range| {
        let mut blocks = vec![T::zeros(); k / T::BLCK_SIZE];
        for r in range {
            T::from_float(&values[r * k..(r + 1) * k], &mut blocks);
            if let Ok(mut row) = slots[r].lock() {
                T::to_float(&blocks, &mut row);
            }
        }
    });
    Ok(())
}

/// The format ggml quantizes activations to for a dot product with weights of type `t`.
fn vec_dot_type(t: GgmlDType) -> Option<GgmlDType> {
    use GgmlDType::*;
    match t {
        Q4_0 | Q5_0 | Q8_0 => Some(Q8_0),
        Q4_1 | Q5_1 => Some(Q8_1),
        Q2K | Q3K | Q4K | Q5K | Q6K => Some(Q8K),
        _ => None,
    }
}

impl Linear {
    pub fn new(weights: Arc<QTensor>) -> candle_core::Result<Self> {
        if let Some(packed) = Packed::new(&weights)? {
            return Ok(Self::Packed(Arc::new(packed)));
        }
        let dense = match vec_dot_type(weights.dtype()) {
            Some(act) if weights.device().is_cpu() => Some((weights.clone(), act)),
            _ => None,
        };
        Ok(Self::Quantized {
            matmul: QMatMul::from_arc(weights)?,
            dense,
        })
    }

    /// The packed matrices of `mats`, when all are packed in one format and input width.
    fn packed_alike<'a>(mats: &[&'a Self]) -> Option<Vec<&'a Packed>> {
        let packed: Vec<&Packed> = mats
            .iter()
            .filter_map(|l| match l {
                Self::Packed(p) => Some(&**p),
                Self::Quantized { .. } => None,
            })
            .collect();
        (packed.len() == mats.len() && packed.windows(2).all(|w| w[0].same_format(w[1])))
            .then_some(packed)
    }

    /// `x @ w^T` for each of `mats`: in one dispatch where they are all packed in one format
    /// (see [`Packed::matmul_many`]), else one after another.
    ///
    /// # Errors
    /// As [`Linear::forward`].
    pub fn forward_many(mats: &[&Self], x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        if let Some(packed) = Self::packed_alike(mats) {
            return Packed::matmul_many(&packed, x);
        }
        mats.iter().map(|l| l.forward(x)).collect()
    }

    /// [`Linear::forward_many`] for `m` rows of `k` values at hand (on the CPU): one result,
    /// `(m, n)` row-major, per matrix.
    ///
    /// # Errors
    /// As [`Linear::forward`].
    pub fn forward_values(
        mats: &[&Self],
        x: &[f32],
        m: usize,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        if let Some(packed) = Self::packed_alike(mats) {
            return Packed::matmul_many_values(&packed, x, m);
        }
        // One tensor for all: the quantized input is computed once (`per_input`).
        let x = Tensor::from_slice(x, (m, x.len() / m.max(1)), &candle_core::Device::Cpu)?;
        mats.iter()
            .map(|l| super::f32_values(&l.forward(&x)?))
            .collect()
    }

    /// A gated MLP's first half for `m` rows of values at hand: `act(x gate^T) * (x up^T)`,
    /// `(m, n)` row-major. Packed alike, the two matmuls and the activation are one dispatch
    /// ([`Packed::gated_values`]); else the two results are combined afterwards. The same bits
    /// either way.
    ///
    /// # Errors
    /// As [`Linear::forward`].
    pub fn gated_values(
        gate: &Self,
        up: &Self,
        x: &[f32],
        m: usize,
        act: super::Activation,
    ) -> candle_core::Result<Vec<f32>> {
        if let Some([g, u]) =
            Self::packed_alike(&[gate, up]).and_then(|p| <[_; 2]>::try_from(p).ok())
        {
            if g.same_height(u) {
                return Packed::gated_values(g, u, x, m, |g, u, out| {
                    super::fused::gated_into(g, u, out, act)
                });
            }
        }
        let [g, u]: [Vec<f32>; 2] = Self::forward_values(&[gate, up], x, m)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("gated matmul: two results".into()))?;
        Ok(super::fused::gated_values(&g, &u, act))
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (matmul, dense) = match self {
            Self::Packed(p) => return p.matmul(x),
            Self::Quantized { matmul, dense } => (matmul, dense),
        };
        let k = x.dim(D::Minus1)?;
        let rows = x.elem_count() / k.max(1);
        let Some((w, act)) = dense else {
            return matmul.forward(x);
        };
        if rows < DENSE_MIN_ROWS || k % act.block_size() != 0 {
            return matmul.forward(x);
        }
        let device = x.device();
        let xq = round_trip(x, rows, k, *act)?;
        let w = w.dequantize(device)?;
        let y = xq.matmul(&w.t()?)?;
        let mut shape = x.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = y.dim(1)?;
        }
        y.reshape(shape)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The pool's round trip gives the bits of quantizing to a `QTensor` and dequantizing it.
    #[test]
    fn round_trip_is_quantize_then_dequantize() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (37, 512), &dev).unwrap();
        for act in [GgmlDType::Q8_0, GgmlDType::Q8_1, GgmlDType::Q8K] {
            let want: Vec<f32> = QTensor::quantize(&x, act)
                .unwrap()
                .dequantize(&dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got: Vec<f32> = round_trip(&x, 37, 512, act)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got, want, "{act:?}");
        }
        assert!(round_trip(&x, 37, 512, GgmlDType::F16).is_err());
        assert!(round_trip(&x, 36, 512, GgmlDType::Q8_0).is_err());
    }
}
