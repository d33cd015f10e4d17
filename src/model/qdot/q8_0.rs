//! Q8_0 weights (f16 scale, 32 signed bytes) against Q8_0 activations, in the order candle's
//! AVX code (and ggml's) adds them: per block, eight partial integer sums, converted to float
//! and multiplied-added into eight running sums with the product of the two scales; the eight
//! sums are folded at the end. This is the vocabulary projection of both test models (Gemma 3's
//! 262,144 rows are the larger part of its decode time), so sharing each weight block among
//! four activation rows is what makes batched steps cheaper than separate ones.
#![allow(unsafe_code)]

use candle_core::quantized::GgmlDType;

use super::{f16, Format, LANES};

pub(super) struct Q8_0;

/// The eight running sums folded as candle's `hsum_float_8`: halves added, then pairs.
fn fold(acc: [f32; 8]) -> f32 {
    let r: [f32; 4] = std::array::from_fn(|i| acc[4 + i] + acc[i]);
    (r[0] + r[2]) + (r[1] + r[3])
}

impl Format for Q8_0 {
    const WEIGHTS: GgmlDType = GgmlDType::Q8_0;
    const ACTS: GgmlDType = GgmlDType::Q8_0;
    const W_BYTES: usize = 34;
    const X_BYTES: usize = 34;
    const X_SUM: bool = false;

    /// Rows a multiple of 256 wide take candle's repacked AVX-512 VNNI kernels instead. A
    /// single row (decode) too: candle streams the weight rows one after another, which for
    /// this memory-bound case is a little faster than four at a time, and its results have
    /// the same bits as these.
    fn takes(m: usize, k: usize) -> bool {
        m > 1 && !k.is_multiple_of(256)
    }

    fn dot_scalar(w: &[u8], x: &[u8]) -> f32 {
        let mut acc = [0f32; 8];
        for (wb, xb) in w
            .chunks_exact(Self::W_BYTES)
            .zip(x.chunks_exact(Self::X_BYTES))
        {
            let d = f16(&wb[0..2]) * f16(&xb[0..2]);
            let (ws, xs) = (&wb[2..34], &xb[2..34]);
            for (lane, a) in acc.iter_mut().enumerate() {
                let q: i32 = (4 * lane..4 * lane + 4)
                    .map(|i| i32::from(ws[i] as i8) * i32::from(xs[i] as i8))
                    .sum();
                *a = d.mul_add(q as f32, *a);
            }
        }
        fold(acc)
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2_weight_rows(w: [&[u8]; LANES], x: &[u8], d: &[f32], _s: &[f32]) -> [f32; LANES] {
        avx2::four_weight_rows(w, x, d)
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2_activation_rows(
        w: &[u8],
        x: [&[u8]; LANES],
        d: &[f32],
        _s: &[f32],
    ) -> [f32; LANES] {
        avx2::four_activation_rows(w, x, d)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::LANES;
    use std::arch::x86_64::*;

    const BYTES: usize = 34;

    /// Signed bytes times signed bytes, as candle does it: the first operand's magnitudes times
    /// the second with the first's signs, pairs to i16, then to eight i32, then to float.
    #[target_feature(enable = "avx2")]
    unsafe fn products(w: __m256i, x: __m256i) -> __m256 {
        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), p))
    }

    /// The block's quants (after its two scale bytes).
    #[target_feature(enable = "avx2")]
    unsafe fn quants(block: *const u8) -> __m256i {
        // SAFETY (caller): `block` points at a whole Q8_0 block.
        _mm256_loadu_si256(block.add(2).cast())
    }

    #[target_feature(enable = "f16c")]
    unsafe fn scale(block: *const u8) -> f32 {
        // SAFETY (caller): as above; the scale is the first two bytes.
        let bits = i32::from(block.cast::<u16>().read_unaligned());
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    }

    /// candle's `hsum_float_8`.
    #[target_feature(enable = "avx2")]
    unsafe fn fold(x: __m256) -> f32 {
        let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)))
    }

    /// # Safety
    /// AVX2, FMA and F16C are present; each `w` row and `x` are `d.len()` whole Q8_0 blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn four_weight_rows(w: [&[u8]; LANES], x: &[u8], d: &[f32]) -> [f32; LANES] {
        let mut acc = [_mm256_setzero_ps(); LANES];
        for (b, &dx) in d.iter().enumerate() {
            let xq = quants(x.as_ptr().add(b * BYTES));
            for (lane, acc) in acc.iter_mut().enumerate() {
                let wp = w[lane].as_ptr().add(b * BYTES);
                let q = products(quants(wp), xq);
                *acc = _mm256_fmadd_ps(_mm256_set1_ps(scale(wp) * dx), q, *acc);
            }
        }
        [fold(acc[0]), fold(acc[1]), fold(acc[2]), fold(acc[3])]
    }

    /// # Safety
    /// As for `four_weight_rows`, with one weight row and four activation rows, whose scales
    /// `d` hold four lanes per block.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn four_activation_rows(
        w: &[u8],
        x: [&[u8]; LANES],
        d: &[f32],
    ) -> [f32; LANES] {
        let mut acc = [_mm256_setzero_ps(); LANES];
        for b in 0..d.len() / LANES {
            let wp = w.as_ptr().add(b * BYTES);
            let wq = quants(wp);
            let magnitudes = _mm256_sign_epi8(wq, wq);
            let dw = scale(wp);
            for (lane, acc) in acc.iter_mut().enumerate() {
                let xq = quants(x[lane].as_ptr().add(b * BYTES));
                let p = _mm256_maddubs_epi16(magnitudes, _mm256_sign_epi8(xq, wq));
                let q = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), p));
                *acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * d[b * LANES + lane]), q, *acc);
            }
        }
        [fold(acc[0]), fold(acc[1]), fold(acc[2]), fold(acc[3])]
    }
}
