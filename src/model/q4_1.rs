//! Q4_1 weights times a few activation rows, with AVX2: candle has only a scalar Q4_1 dot
//! product, which takes over half of SmolLM2's decode time.
//!
//! The arithmetic is ggml's (`ggml_vec_dot_q4_1_q8_1`): activations are quantized to Q8_1 (by
//! candle, the same rounding as its own path), each 32-weight block contributes
//! `d_w * d_x * sum(q_w * q_x) + m_w * s_x`. The integer sums are exact and the block results
//! are added in the scalar code's order, so the result has the same bits as candle's.
//! The weights are read in place from the quantized tensor: no copy, no extra memory.
#![allow(unsafe_code)]

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::sync::atomic::{AtomicU32, Ordering};

const BLOCK: usize = 32;
/// Bytes of a Q4_1 block: f16 scale, f16 minimum, 16 bytes of nibbles.
const W_BYTES: usize = 20;
/// Bytes of a Q8_1 block: f16 scale, f16 scale times the sum, 32 signed bytes.
const X_BYTES: usize = 36;

/// Whether this CPU runs the kernel (checked once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn f16(bytes: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32()
}

/// `x @ w^T` for Q4_1 `w` (`(n, k)`) and `x` (`(..., k)`), or `None` when the kernel does not
/// apply (another type, another device, no AVX2).
///
/// # Errors
/// A candle failure while quantizing the activations or building the result.
pub fn matmul(w: &QTensor, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if w.dtype() != GgmlDType::Q4_1 || !x.device().is_cpu() || !available() {
        return Ok(None);
    }
    let (n, k) = w.shape().dims2()?;
    if k % BLOCK != 0 || x.dim(candle_core::D::Minus1)? != k {
        return Ok(None);
    }
    let m = x.elem_count() / k;
    let flat = x.reshape((m, k))?.contiguous()?;
    let xq = QTensor::quantize(&flat, GgmlDType::Q8_1)?;
    let xb = xq.data()?;
    let wb = w.data()?;
    let nb = k / BLOCK;
    if wb.len() != n * nb * W_BYTES || xb.len() != m * nb * X_BYTES {
        return Ok(None);
    }
    // Weight rows are shared out over candle's worker pool (its threads spin between the
    // many small operations of a decode step instead of sleeping); each result is stored once.
    let cells: Vec<AtomicU32> = (0..n * m).map(|_| AtomicU32::new(0)).collect();
    candle_core::utils::barrier_pool().execute_chunked(n, |range| {
        for j in range {
            let wrow = &wb[j * nb * W_BYTES..(j + 1) * nb * W_BYTES];
            for r in 0..m {
                let v = dot(wrow, &xb[r * nb * X_BYTES..(r + 1) * nb * X_BYTES]);
                cells[j * m + r].store(v.to_bits(), Ordering::Relaxed);
            }
        }
    });
    let out: Vec<f32> = cells
        .into_iter()
        .map(|c| f32::from_bits(c.into_inner()))
        .collect();
    // `out` is (n, m); the result is (m, n) in the input's leading shape.
    let t = Tensor::from_vec(out, (n, m), &Device::Cpu)?;
    let t = if m == 1 {
        t.reshape((1, n))?
    } else {
        t.t()?.contiguous()?
    };
    let mut shape = x.dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    Ok(Some(t.reshape(shape)?))
}

/// One weight row against one activation row (both whole rows of blocks).
fn dot(w: &[u8], x: &[u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if available() {
            // SAFETY: `available()` checked that the CPU has AVX2 and FMA; `dot_avx2` reads
            // only inside the slices it is given, whose lengths are whole blocks.
            return unsafe { dot_avx2(w, x) };
        }
    }
    dot_scalar(w, x)
}

/// The same sum in plain Rust (the reference for the tests, and other CPUs).
fn dot_scalar(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (wb, xb) in w.chunks_exact(W_BYTES).zip(x.chunks_exact(X_BYTES)) {
        let (d, m, qs) = (f16(&wb[0..2]), f16(&wb[2..4]), &wb[4..20]);
        let (dx, sx, xs) = (f16(&xb[0..2]), f16(&xb[2..4]), &xb[4..36]);
        let mut sumi = 0i32;
        for i in 0..16 {
            let lo = i32::from(qs[i] & 0x0F);
            let hi = i32::from(qs[i] >> 4);
            sumi += lo * i32::from(xs[i] as i8) + hi * i32::from(xs[i + 16] as i8);
        }
        sumf += sumi as f32 * d * dx + m * sx;
    }
    sumf
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(w: &[u8], x: &[u8]) -> f32 {
    use std::arch::x86_64::*;
    let mask = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut sumf = 0f32;
    for (wb, xb) in w.chunks_exact(W_BYTES).zip(x.chunks_exact(X_BYTES)) {
        // SAFETY: `wb` is 20 bytes, so `wb[4..20]` is the 16 bytes loaded; `xb` is 36 bytes,
        // so `xb[4..36]` is the 32 bytes loaded. Unaligned loads.
        let q = _mm_loadu_si128(wb[4..20].as_ptr().cast());
        let lo = _mm_and_si128(q, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
        let wq = _mm256_set_m128i(hi, lo);
        let xq = _mm256_loadu_si256(xb[4..36].as_ptr().cast());
        // u8 nibbles times i8 activations, pairs summed to i16 (at most 2 * 15 * 128), then
        // to eight i32 and to one: the block's exact integer sum.
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wq, xq), ones);
        let p = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
        let p = _mm_add_epi32(p, _mm_unpackhi_epi64(p, p));
        let p = _mm_add_epi32(p, _mm_shuffle_epi32(p, 1));
        let sumi = _mm_cvtsi128_si32(p);
        // The scalar code's expression, in its order: the same bits as candle's result.
        sumf += sumi as f32 * f16(&wb[0..2]) * f16(&xb[0..2]) + f16(&wb[2..4]) * f16(&xb[2..4]);
    }
    sumf
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::Module;

    #[test]
    fn matches_candles_q4_1_matmul() {
        let dev = Device::Cpu;
        for (n, k, m) in [
            (64usize, 576usize, 1usize),
            (96, 1536, 3),
            (8, 64, 2),
            (8, 224, 1),
        ] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
            let x = Tensor::randn(0f32, 1.0, (m, 1, k), &dev).unwrap();
            let want: Vec<f32> =
                QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap())
                    .unwrap()
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
            let Some(got) = matmul(&q, &x).unwrap() else {
                assert!(!available());
                return;
            };
            assert_eq!(got.dims(), &[m, 1, n]);
            let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got, want, "{n}x{k}, {m} rows");
        }
    }

    #[test]
    fn the_vector_and_scalar_sums_agree() {
        let w = Tensor::randn(0f32, 1.0, (1, 256), &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 256), &Device::Cpu).unwrap();
        let wq = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let xq = QTensor::quantize(&x, GgmlDType::Q8_1).unwrap();
        let (wb, xb) = (wq.data().unwrap(), xq.data().unwrap());
        assert_eq!(dot(&wb, &xb).to_bits(), dot_scalar(&wb, &xb).to_bits());
    }
}
