//! Q5_0 weights (f16 scale, 32 fifth bits, 32 four-bit values; each weight is
//! `(nibble | fifth bit << 4) - 16`) against Q8_0 activations (f16 scale, 32 signed bytes):
//! `d_w * d_x * sum(q_w * q_x)` per block, as `ggml_vec_dot_q5_0_q8_0` and candle's scalar
//! code compute it.
#![allow(unsafe_code)]

use candle_core::quantized::GgmlDType;

use super::{f16, Format, LANES};

pub(super) struct Q5_0;

impl Format for Q5_0 {
    const WEIGHTS: GgmlDType = GgmlDType::Q5_0;
    const ACTS: GgmlDType = GgmlDType::Q8_0;
    const W_BYTES: usize = 22;
    const X_BYTES: usize = 34;
    const X_SUM: bool = false;

    fn dot_scalar(w: &[u8], x: &[u8]) -> f32 {
        let mut sumf = 0f32;
        for (wb, xb) in w
            .chunks_exact(Self::W_BYTES)
            .zip(x.chunks_exact(Self::X_BYTES))
        {
            let d = f16(&wb[0..2]);
            let qh = u32::from_le_bytes([wb[2], wb[3], wb[4], wb[5]]);
            let qs = &wb[6..22];
            let (dx, xs) = (f16(&xb[0..2]), &xb[2..34]);
            let mut sumi = 0i32;
            for j in 0..16 {
                let h0 = ((qh >> j) & 1) << 4;
                let h1 = ((qh >> (j + 16)) & 1) << 4;
                let x0 = (i32::from(qs[j] & 0x0F) | h0 as i32) - 16;
                let x1 = (i32::from(qs[j] >> 4) | h1 as i32) - 16;
                sumi += x0 * i32::from(xs[j] as i8) + x1 * i32::from(xs[j + 16] as i8);
            }
            sumf += sumi as f32 * d * dx;
        }
        sumf
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
    use super::super::simd::{to_array, totals, unpack};
    use super::LANES;
    use std::arch::x86_64::*;

    const W_BYTES: usize = 22;
    const X_BYTES: usize = 34;

    /// A weight block's 32 values as signed bytes in [-16, 15]: the low nibbles of its 16
    /// bytes, then the high, each with its fifth bit; where that bit is clear the byte's top
    /// nibble is set, which is the value minus 16 in two's complement.
    #[target_feature(enable = "avx2")]
    unsafe fn weights(w: *const u8) -> __m256i {
        // SAFETY (caller): `w` points at a whole Q5_0 block: scale 0..2, fifth bits 2..6,
        // nibbles 6..22.
        let nibbles = unpack(w.add(6));
        // Byte i gets the bits' byte i / 8; OR-ing all bits but bit i % 8 makes it all ones
        // exactly when bit i is set.
        let qh = w.add(2).cast::<i32>().read_unaligned();
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(qh),
            _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            ),
        );
        let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
        let set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1));
        _mm256_or_si256(
            nibbles,
            _mm256_andnot_si256(set, _mm256_set1_epi8(0xF0u8 as i8)),
        )
    }

    /// Signed weights times a Q8_0 block's signed quants: eight partial i32 sums (the weights'
    /// magnitudes, at most 16, times the activations with the weights' signs, pairs summed to
    /// i16 without saturating).
    #[target_feature(enable = "avx2")]
    unsafe fn products(wq: __m256i, x: *const u8) -> __m256i {
        // SAFETY (caller): `x` points at a whole Q8_0 block; its quants are bytes 2..34.
        let xq = _mm256_loadu_si256(x.add(2).cast());
        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xq, wq));
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }

    /// One block's contribution in each lane, in the scalar code's order: `sumi * d_w * d_x`.
    #[target_feature(enable = "avx2")]
    unsafe fn scaled(sumi: __m128, dw: __m128, dx: __m128) -> __m128 {
        _mm_mul_ps(_mm_mul_ps(sumi, dw), dx)
    }

    /// The f16 scale at the start of a block.
    unsafe fn scale_bits(w: *const u8) -> i16 {
        // SAFETY (caller): `w` points at a whole block.
        w.cast::<i16>().read_unaligned()
    }

    /// # Safety
    /// AVX2, FMA and F16C are present; each `w` row is `d.len()` whole Q5_0 blocks and `x` as
    /// many Q8_0 blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn four_weight_rows(w: [&[u8]; LANES], x: &[u8], d: &[f32]) -> [f32; LANES] {
        let mut acc = _mm_setzero_ps();
        for (b, &dx) in d.iter().enumerate() {
            let xp = x.as_ptr().add(b * X_BYTES);
            let wp = [
                w[0].as_ptr().add(b * W_BYTES),
                w[1].as_ptr().add(b * W_BYTES),
                w[2].as_ptr().add(b * W_BYTES),
                w[3].as_ptr().add(b * W_BYTES),
            ];
            let sumi = totals([
                products(weights(wp[0]), xp),
                products(weights(wp[1]), xp),
                products(weights(wp[2]), xp),
                products(weights(wp[3]), xp),
            ]);
            let dw = _mm_cvtph_ps(_mm_setr_epi16(
                scale_bits(wp[0]),
                scale_bits(wp[1]),
                scale_bits(wp[2]),
                scale_bits(wp[3]),
                0,
                0,
                0,
                0,
            ));
            acc = _mm_add_ps(acc, scaled(sumi, dw, _mm_set1_ps(dx)));
        }
        to_array(acc)
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
        let mut acc = _mm_setzero_ps();
        for b in 0..d.len() / LANES {
            let wp = w.as_ptr().add(b * W_BYTES);
            let wq = weights(wp);
            let sumi = totals([
                products(wq, x[0].as_ptr().add(b * X_BYTES)),
                products(wq, x[1].as_ptr().add(b * X_BYTES)),
                products(wq, x[2].as_ptr().add(b * X_BYTES)),
                products(wq, x[3].as_ptr().add(b * X_BYTES)),
            ]);
            let dw = _mm_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                scale_bits(wp) as u16,
            )))));
            let dx = _mm_loadu_ps(d.as_ptr().add(b * LANES));
            acc = _mm_add_ps(acc, scaled(sumi, dw, dx));
        }
        to_array(acc)
    }
}
