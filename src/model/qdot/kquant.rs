//! Q4_K and Q5_K weights rewritten as Q4_1 and Q5_1, so that the packed VNNI kernel runs them.
//!
//! A Q4_K super-block holds 256 four-bit values in eight sub-blocks of 32; sub-block `j`'s
//! value is `d * sc_j * q - dmin * m_j`, with f16 `d`, `dmin` and six-bit `sc_j`, `m_j`. That is
//! a Q4_1 block per sub-block (`d' * q + m'`) with `d' = d * sc_j` and `m' = -dmin * m_j`,
//! rounded to f16: the same nibbles, and scales within half an f16 ulp (2^-11 relative) of the
//! exact products, far below the four-bit rounding of the weights themselves. The rewrite takes
//! 20 bytes per 32 values instead of 18. Q4_K_M files keep most of their attention output and
//! half their MLP down projections in Q4_K, which otherwise went through candle's kernels one
//! row at a time and, for prompts, through a dense copy dequantized on every call. Q5_K is the
//! same with a fifth bit per value (Q5_1: 24 bytes per 32 values instead of 22).

use half::slice::HalfFloatSliceExt;

use candle_core::quantized::GgmlDType;
#[cfg(test)]
use candle_core::quantized::{ggml_file::qtensor_from_ggml, QTensor};

use super::BLOCK;

/// Values per Q4_K super-block.
const SUPER: usize = 256;
/// Bytes of a Q4_K super-block: `d`, `dmin`, 12 bytes of scales and mins, 128 of nibbles.
const Q4K_BYTES: usize = 144;
/// Bytes of a Q4_1 block: `d`, `m`, 16 bytes of nibbles.
const Q4_1_BYTES: usize = 20;
/// Bytes of a Q5_K super-block: `d`, `dmin`, 12 bytes of scales and mins, 32 of fifth bits,
/// 128 of nibbles.
const Q5K_BYTES: usize = 176;
/// Bytes of a Q5_1 block: `d`, `m`, 4 bytes of fifth bits, 16 bytes of nibbles.
const Q5_1_BYTES: usize = 24;

/// Sub-block `j`'s six-bit scale and min (ggml's `get_scale_min_k4`).
fn scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

fn f16(bytes: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32()
}

/// One Q4_K super-block as eight Q4_1 blocks (or Q5_K as eight Q5_1 blocks, `fifth` set), or
/// `None` when a scale overflows f16.
fn super_block(src: &[u8], out: &mut [u8], fifth: bool) -> Option<()> {
    let (d, dmin) = (f16(&src[0..2]), f16(&src[2..4]));
    let scales = &src[4..16];
    let (qh, qs) = if fifth {
        (&src[16..48], &src[48..Q5K_BYTES])
    } else {
        (&src[16..16], &src[16..Q4K_BYTES])
    };
    let size = if fifth { Q5_1_BYTES } else { Q4_1_BYTES };
    // The eight sub-blocks' scales and minimums, converted to f16 together (one vector
    // conversion instead of sixteen scalar ones).
    let mut wide = [0f32; 16];
    for j in 0..8 {
        let (sc, m) = scale_min(j, scales);
        wide[j] = d * f32::from(sc);
        wide[8 + j] = -(dmin * f32::from(m));
    }
    let mut narrow = [half::f16::ZERO; 16];
    narrow.convert_from_f32_slice(&wide);
    if narrow.iter().any(|h| !h.is_finite()) {
        return None;
    }
    for (j, block) in out.chunks_exact_mut(size).enumerate() {
        block[0..2].copy_from_slice(&narrow[j].to_bits().to_le_bytes());
        block[2..4].copy_from_slice(&narrow[8 + j].to_bits().to_le_bytes());
        let block = if fifth {
            // Sub-block j's fifth bits are bit j of the 32 bytes of `qh`.
            let bits = (0..BLOCK).fold(0u32, |a, l| a | u32::from((qh[l] >> j) & 1) << l);
            block[4..8].copy_from_slice(&bits.to_le_bytes());
            &mut block[4..]
        } else {
            block
        };
        // Sub-blocks 2c and 2c + 1 are the low and high nibbles of bytes 32c..32c + 32; Q4_1
        // wants values i and i + 16 in byte i. (Two loops without a branch inside vectorise.)
        let bytes = &qs[32 * (j / 2)..32 * (j / 2) + 32];
        let (first, second) = bytes.split_at(BLOCK / 2);
        let out = &mut block[4..4 + BLOCK / 2];
        if j % 2 == 0 {
            for ((o, &a), &b) in out.iter_mut().zip(first).zip(second) {
                *o = (a & 0x0F) | (b << 4);
            }
        } else {
            for ((o, &a), &b) in out.iter_mut().zip(first).zip(second) {
                *o = (a >> 4) | (b & 0xF0);
            }
        }
    }
    Some(())
}

/// `w` (Q4_K or Q5_K) rewritten as a tensor (Q4_1 or Q5_1) of the same shape, or `None`.
#[cfg(test)]
fn rewritten(w: &QTensor) -> candle_core::Result<Option<QTensor>> {
    let (n, k) = w.shape().dims2()?;
    let mut bytes = Vec::new();
    Ok(match rewrite(w.dtype(), k, &w.data()?, &mut bytes) {
        Some(to) => Some(qtensor_from_ggml(to, &bytes, vec![n, k], &w.device())?),
        None => None,
    })
}

/// The stored bytes `data` of rows of a Q4_K or Q5_K matrix `k` wide, rewritten as Q4_1 or
/// Q5_1 into `out` (resized; a buffer reused between calls costs no fresh memory): the new
/// format, or `None` for other formats, widths that are not whole super-blocks, or scales that
/// do not fit f16.
pub(super) fn rewrite(
    dtype: GgmlDType,
    k: usize,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Option<GgmlDType> {
    let (from_bytes, to, to_bytes) = match dtype {
        GgmlDType::Q4K => (Q4K_BYTES, GgmlDType::Q4_1, Q4_1_BYTES),
        GgmlDType::Q5K => (Q5K_BYTES, GgmlDType::Q5_1, Q5_1_BYTES),
        _ => return None,
    };
    if !k.is_multiple_of(SUPER) || !data.len().is_multiple_of(from_bytes) {
        return None;
    }
    // Every byte is written below: no need to clear what a previous call left.
    out.resize(data.len() / from_bytes * 8 * to_bytes, 0);
    // Pieces of super-blocks on the worker pool (a 7B model's Q4_K matrices are billions of
    // values).
    const PIECE: usize = 1024;
    let failed = std::sync::atomic::AtomicBool::new(false);
    super::super::par_fill(out, PIECE * 8 * to_bytes, |i, dst| {
        let src = data.chunks_exact(from_bytes).skip(i * PIECE);
        for (src, dst) in src.zip(dst.chunks_exact_mut(8 * to_bytes)) {
            if super_block(src, dst, dtype == GgmlDType::Q5K).is_none() {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    (!failed.into_inner()).then_some(to)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// The rewritten matrix dequantizes to the Q4_K matrix's values within the f16 rounding of
    /// the scales, and has its shape.
    #[test]
    fn rewrites_hold_the_same_values() {
        let dev = Device::Cpu;
        for (from, to) in [
            (GgmlDType::Q4K, GgmlDType::Q4_1),
            (GgmlDType::Q5K, GgmlDType::Q5_1),
        ] {
            let w = Tensor::randn(0f32, 1.0, (37, 512), &dev).unwrap();
            let q = QTensor::quantize(&w, from).unwrap();
            let r = rewritten(&q).unwrap().unwrap();
            assert_eq!(r.dtype(), to);
            assert_eq!(r.shape().dims(), &[37, 512]);
            let a = q.dequantize(&dev).unwrap().flatten_all().unwrap();
            let b = r.dequantize(&dev).unwrap().flatten_all().unwrap();
            let (a, b) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
            let range = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 2e-3 * range, "{from:?}: {x} vs {y}");
            }
        }
    }

    /// Other formats and widths that are not whole super-blocks are left alone.
    #[test]
    fn other_formats_are_not_rewritten() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (4, 256), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q6K).unwrap();
        assert!(rewritten(&q).unwrap().is_none());
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        assert!(rewritten(&q).unwrap().is_none());
    }
}
