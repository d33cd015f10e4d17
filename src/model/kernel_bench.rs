//! A hook for `benches/kernels.rs`: the packed matmul on random weights, outside a model, so
//! that kernel changes can be measured without the rest of a decode step around them.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::qdot::packed::Packed;

/// An `n x k` matrix of random weights quantized as `dtype` and packed for this CPU, and `rows`
/// random activation rows. `None` where the packed kernel does not run (no AVX2, or a format it
/// does not take).
pub struct PackedMatmul {
    packed: Packed,
    x: Tensor,
    values: Vec<f32>,
    macs: u64,
}

impl PackedMatmul {
    /// # Errors
    /// A candle failure making or quantizing the random values (a width that is not whole
    /// blocks of `dtype`).
    pub fn new(
        dtype: GgmlDType,
        n: usize,
        k: usize,
        rows: usize,
    ) -> candle_core::Result<Option<Self>> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let Some(packed) = Packed::new(&QTensor::quantize(&w, dtype)?)? else {
            return Ok(None);
        };
        let x = Tensor::randn(0f32, 1.0, (rows, k), &dev)?;
        let values = x.flatten_all()?.to_vec1()?;
        let macs = (n * k * rows) as u64;
        Ok(Some(Self {
            packed,
            x,
            values,
            macs,
        }))
    }

    /// Multiply-adds per call.
    pub fn macs(&self) -> u64 {
        self.macs
    }

    /// One matmul of the same activations: their quantized form is kept from the last call
    /// (as the Q/K/V projections share theirs), so this is the kernel and its driver.
    ///
    /// # Errors
    /// A candle failure (none for the shapes `new` made).
    pub fn run(&self) -> candle_core::Result<Tensor> {
        self.packed.matmul(&self.x)
    }

    /// One matmul of new activations (the same values in a new tensor): quantizing them
    /// included.
    ///
    /// # Errors
    /// As [`PackedMatmul::run`].
    pub fn run_fresh(&self) -> candle_core::Result<Tensor> {
        let x = Tensor::from_slice(&self.values, self.x.dims(), &Device::Cpu)?;
        self.packed.matmul(&x)
    }
}
