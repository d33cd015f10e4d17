//! Activations quantized for the packed kernel: per 32-value block, 32 signed bytes, the f32
//! value of the block's f16 scale, and Q8_1's f16 scaled sum (for Q4_1 weights) or the sum of
//! the bytes times the offset the weights are stored with (Q5_0: 16, Q8_0: 128).
//!
//! The bytes and scales are exactly those of candle's `quantize_row_q8_0` / `q8_1` (ggml's
//! reference rounding), computed on candle's worker pool instead of on one thread, and laid out
//! without the block headers between the quants. candle's serial quantizer was 8% of SmolLM2's
//! prefill.

use std::sync::Arc;

use candle_core::Tensor;

use super::BLOCK;

/// Values from which the work is shared out over the pool (and at least two rows): handing
/// a batched step's eight rows of 576 to the pool took 5.3-6.4 us against 3.9 us on this
/// thread, eight rows of 1,536 8.8-9.6 us against 10.0.
const POOL_VALUES: usize = 8192;

/// What the activations carry besides their bytes and scales, for the weights' format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Acts {
    /// Q8_1: each block's scaled sum (for Q4_1 weights' minimums).
    Q8_1,
    /// Q8_0 with each block's sum of quants times the weights' offset (Q5_0: 16, Q8_0: 128).
    Sums(i32),
    /// Q8_0 with the sums of each half block times the offset (Q6_K: a scale per 16 values).
    HalfSums(i32),
}

impl Acts {
    /// Sums per block.
    pub(super) const fn sums_per_block(self) -> usize {
        match self {
            Self::Q8_1 => 0,
            Self::Sums(_) => 1,
            Self::HalfSums(_) => 2,
        }
    }
}

/// One row's share of a [`Quantized`]: bytes, scales, and Q8_1's scaled sums or the biases.
type Row<'a> = (
    &'a mut [u8],
    &'a mut [f32],
    Option<&'a mut [f32]>,
    Option<&'a mut [i32]>,
);

pub(super) struct Quantized {
    /// `[row][value]`, as signed bytes.
    pub q: Vec<u8>,
    /// `[row][block]`.
    pub d: Vec<f32>,
    /// Q8_1 only: `[row][block]`.
    pub s: Vec<f32>,
    /// Q8_0 only: `[row][block]` (`[row][block][half]` for half sums), minus the offset times
    /// the sum of the block's (half block's) bytes: what the weights' offset adds to the
    /// block's integer sum, taken back. The kernels start the block's sum from it.
    pub bias: Vec<i32>,
}

/// `f32::round` (halves away from zero), written so that it vectorises: `round` itself
/// becomes a call to libm per value. Exact: `v - trunc(v)` is exact for every f32.
#[inline(always)]
fn round(v: f32) -> f32 {
    let t = v.trunc();
    if (v - t).abs() >= 0.5 {
        t + 1f32.copysign(v)
    } else {
        t
    }
}

/// One block as candle rounds it: `(d, s as Q8_1 stores it, sum of the quants)`.
fn block(x: &[f32], q: &mut [u8]) -> (half::f16, half::f16, i32) {
    // The largest magnitude (any order gives the same maximum), in eight lanes that vectorise
    // instead of one chain of dependent comparisons.
    let mut lanes = [0f32; 8];
    for c in x.chunks_exact(8) {
        for (m, v) in lanes.iter_mut().zip(c) {
            *m = m.max(v.abs());
        }
    }
    let amax = x
        .chunks_exact(8)
        .remainder()
        .iter()
        .fold(lanes.iter().fold(0f32, |a, &m| a.max(m)), |a, v| {
            a.max(v.abs())
        });
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in q.iter_mut().zip(x) {
        let v = super::super::fused::small_int(round(v * id));
        sum += v;
        *q = v as u8;
    }
    let dh = half::f16::from_f32(d);
    (dh, half::f16::from_f32(sum as f32) * dh, sum)
}

/// `x` as `rows` rows of `k` values, quantized as Q8_1 (`offset` `None`, for Q4_1 weights) or
/// as Q8_0 with minus the block sums times `offset`; once per input ([`super::super::per_input`]).
///
/// # Errors
/// A candle failure reading `x`.
pub(super) fn quantize(
    x: &Tensor,
    rows: usize,
    k: usize,
    acts: Acts,
) -> candle_core::Result<Arc<Quantized>> {
    super::super::per_input(x, acts, || quantize_now(x, rows, k, acts))
}

fn quantize_now(x: &Tensor, rows: usize, k: usize, acts: Acts) -> candle_core::Result<Quantized> {
    quantize_values(&super::super::f32_values(x)?, rows, k, acts)
}

/// [`quantize`] for values already at hand (no cache: the caller quantizes each input once).
///
/// # Errors
/// `values` is not `rows` rows of `k`, or `k` is not a multiple of the block.
pub(super) fn quantize_values(
    values: &[f32],
    rows: usize,
    k: usize,
    acts: Acts,
) -> candle_core::Result<Quantized> {
    if values.len() != rows * k || !k.is_multiple_of(BLOCK) {
        candle_core::bail!(
            "quantize: {} values are not {rows} rows of {k}",
            values.len()
        );
    }
    let blocks = k / BLOCK;
    let mut out = Quantized {
        q: vec![0; rows * k],
        d: vec![0.0; rows * blocks],
        s: vec![0.0; if acts == Acts::Q8_1 { rows * blocks } else { 0 }],
        bias: vec![0; rows * blocks * acts.sums_per_block()],
    };
    let per = acts.sums_per_block().max(1);
    // Per row: its bytes, scales and (by format) scaled sums or biases.
    let mut second = out.s.chunks_mut(blocks);
    let mut bias = out.bias.chunks_mut(blocks * per);
    let rows_out = out
        .q
        .chunks_mut(k)
        .zip(out.d.chunks_mut(blocks))
        .map(|(q, d)| (q, d, second.next(), bias.next()));
    let fill = |r: usize, (q, d, s, bias): &mut Row<'_>| {
        let x = &values[r * k..(r + 1) * k];
        for b in 0..blocks {
            let span = b * BLOCK..(b + 1) * BLOCK;
            let (dh, sh, sum) = block(&x[span.clone()], &mut q[span]);
            d[b] = dh.to_f32();
            if let Some(s) = s {
                s[b] = sh.to_f32();
            }
            match (acts, bias.as_deref_mut()) {
                (Acts::Sums(offset), Some(bias)) => bias[b] = -offset * sum,
                (Acts::HalfSums(offset), Some(bias)) => {
                    let first: i32 = q[b * BLOCK..b * BLOCK + BLOCK / 2]
                        .iter()
                        .map(|&v| i32::from(v as i8))
                        .sum();
                    bias[2 * b] = -offset * first;
                    bias[2 * b + 1] = -offset * (sum - first);
                }
                _ => {}
            }
        }
    };
    if rows < 2 || rows * k < POOL_VALUES {
        // A decode step's row or few: handing them to the pool costs more than it saves.
        for (r, mut row) in rows_out.enumerate() {
            fill(r, &mut row);
        }
    } else {
        super::super::par_each(rows_out.collect(), fill);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_is_f32_round() {
        for v in [
            0.5f32,
            -0.5,
            1.5,
            -1.5,
            2.5,
            0.499_999_97,
            -0.499_999_97,
            126.5,
            -127.0,
            0.0,
            -0.0,
            3.7,
            -3.2,
        ] {
            assert_eq!(super::round(v).to_bits(), v.round().to_bits(), "{v}");
        }
        let mut v = -130.0f32;
        while v < 130.0 {
            assert_eq!(super::round(v), v.round(), "{v}");
            v += 0.012_345;
        }
    }
}
