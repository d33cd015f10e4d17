//! Q4_1 weights (f16 scale, f16 minimum, 32 four-bit values) against Q8_1 activations (f16
//! scale, f16 scale times sum, 32 signed bytes): `d_w * d_x * sum(q_w * q_x) + m_w * s_x` per
//! block, as `ggml_vec_dot_q4_1_q8_1` and candle's scalar code compute it.
#![allow(unsafe_code)]

use candle_core::quantized::GgmlDType;

use super::{f16, Format, LANES};

pub(super) struct Q4_1;

impl Format for Q4_1 {
    const WEIGHTS: GgmlDType = GgmlDType::Q4_1;
    const ACTS: GgmlDType = GgmlDType::Q8_1;
    const W_BYTES: usize = 20;
    const X_BYTES: usize = 36;
    const X_SUM: bool = true;

    fn dot_scalar(w: &[u8], x: &[u8]) -> f32 {
        let mut sumf = 0f32;
        for (wb, xb) in w
            .chunks_exact(Self::W_BYTES)
            .zip(x.chunks_exact(Self::X_BYTES))
        {
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
    unsafe fn avx2_weight_rows(w: [&[u8]; LANES], x: &[u8], d: &[f32], s: &[f32]) -> [f32; LANES] {
        avx2::four_weight_rows(w, x, d, s)
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2_activation_rows(
        w: &[u8],
        x: [&[u8]; LANES],
        d: &[f32],
        s: &[f32],
    ) -> [f32; LANES] {
        avx2::four_activation_rows(w, x, d, s)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::simd::{to_array, totals, unpack};
    use super::LANES;
    use std::arch::x86_64::*;

    const W_BYTES: usize = 20;
    const X_BYTES: usize = 36;

    /// A weight block's 32 nibbles as bytes: the low nibbles of its 16 bytes, then the high.
    #[target_feature(enable = "avx2")]
    unsafe fn nibbles(w: *const u8) -> __m256i {
        // SAFETY (caller): `w` points at a whole Q4_1 block; its quants are bytes 4..20.
        unpack(w.add(4))
    }

    /// Unsigned nibbles times a Q8_1 block's signed quants: eight partial i32 sums (each pair
    /// first summed to i16, at most 2 * 15 * 128 in size, so nothing saturates).
    #[target_feature(enable = "avx2")]
    unsafe fn products(wq: __m256i, x: *const u8) -> __m256i {
        // SAFETY (caller): `x` points at a whole Q8_1 block; its quants are bytes 4..36.
        let xq = _mm256_loadu_si256(x.add(4).cast());
        _mm256_madd_epi16(_mm256_maddubs_epi16(wq, xq), _mm256_set1_epi16(1))
    }

    /// One block's contribution in each lane, in the scalar code's order:
    /// `sumi * d_w * d_x + m_w * s_x` (separate multiplies and adds, never fused).
    #[target_feature(enable = "avx2")]
    unsafe fn scaled(sumi: __m128, dw: __m128, mw: __m128, dx: __m128, sx: __m128) -> __m128 {
        _mm_add_ps(_mm_mul_ps(_mm_mul_ps(sumi, dw), dx), _mm_mul_ps(mw, sx))
    }

    /// # Safety
    /// AVX2, FMA and F16C are present; each `w` row is `d.len()` whole Q4_1 blocks and `x` as
    /// many Q8_1 blocks; `s` is as long as `d`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn four_weight_rows(
        w: [&[u8]; LANES],
        x: &[u8],
        d: &[f32],
        s: &[f32],
    ) -> [f32; LANES] {
        let mut acc = _mm_setzero_ps();
        // Lane order after packing (d0 m0 d1 m1 d2 m2 d3 m3): scales first, then minimums.
        let split = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
        let ones = _mm256_set1_epi16(1);
        for b in 0..d.len() {
            let xq = _mm256_loadu_si256(x.as_ptr().add(b * X_BYTES + 4).cast());
            let wp = [
                w[0].as_ptr().add(b * W_BYTES),
                w[1].as_ptr().add(b * W_BYTES),
                w[2].as_ptr().add(b * W_BYTES),
                w[3].as_ptr().add(b * W_BYTES),
            ];
            let sumi = totals([
                _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles(wp[0]), xq), ones),
                _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles(wp[1]), xq), ones),
                _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles(wp[2]), xq), ones),
                _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles(wp[3]), xq), ones),
            ]);
            // Each block starts with its f16 scale and minimum: four bytes.
            let head = |i: usize| wp[i].cast::<i32>().read_unaligned();
            let head = [head(0), head(1), head(2), head(3)];
            let dm = _mm256_cvtph_ps(_mm_setr_epi32(head[0], head[1], head[2], head[3]));
            let dm = _mm256_permutevar8x32_ps(dm, split);
            let (dw, mw) = (_mm256_castps256_ps128(dm), _mm256_extractf128_ps(dm, 1));
            let dx = _mm_set1_ps(d[b]);
            let sx = _mm_set1_ps(s[b]);
            acc = _mm_add_ps(acc, scaled(sumi, dw, mw, dx, sx));
        }
        to_array(acc)
    }

    /// # Safety
    /// As for `four_weight_rows`, with one weight row and four activation rows, whose scales
    /// `d`, `s` hold four lanes per block.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn four_activation_rows(
        w: &[u8],
        x: [&[u8]; LANES],
        d: &[f32],
        s: &[f32],
    ) -> [f32; LANES] {
        let mut acc = _mm_setzero_ps();
        for b in 0..d.len() / LANES {
            let wp = w.as_ptr().add(b * W_BYTES);
            let wq = nibbles(wp);
            let sumi = totals([
                products(wq, x[0].as_ptr().add(b * X_BYTES)),
                products(wq, x[1].as_ptr().add(b * X_BYTES)),
                products(wq, x[2].as_ptr().add(b * X_BYTES)),
                products(wq, x[3].as_ptr().add(b * X_BYTES)),
            ]);
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(wp.cast::<i32>().read_unaligned()));
            let dw = _mm_shuffle_ps(dm, dm, 0x00);
            let mw = _mm_shuffle_ps(dm, dm, 0x55);
            let dx = _mm_loadu_ps(d.as_ptr().add(b * LANES));
            let sx = _mm_loadu_ps(s.as_ptr().add(b * LANES));
            acc = _mm_add_ps(acc, scaled(sumi, dw, mw, dx, sx));
        }
        to_array(acc)
    }
}
