//! AVX2 pieces the format kernels share.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::LANES;

/// 16 bytes of packed nibbles as 32 bytes: the low nibbles, then the high. The bytes are
/// loaded into both halves of the vector and the upper half shifted (a load and two
/// arithmetic operations, keeping the shuffle port free for the sums).
#[target_feature(enable = "avx2")]
pub(super) unsafe fn unpack(q: *const u8) -> __m256i {
    // SAFETY (caller): `q` points at 16 readable bytes.
    let both = _mm256_broadcastsi128_si256(_mm_loadu_si128(q.cast()));
    let shifted = _mm256_srlv_epi64(both, _mm256_set_epi64x(4, 4, 0, 0));
    _mm256_and_si256(shifted, _mm256_set1_epi8(0x0F))
}

/// Four vectors of partial sums to their four exact totals.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn totals(p: [__m256i; LANES]) -> __m128 {
    let h = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    let t = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    _mm_cvtepi32_ps(t)
}

/// The four lanes as an array.
pub(super) fn to_array(v: __m128) -> [f32; LANES] {
    let mut out = [0f32; LANES];
    // SAFETY: `out` has room for four f32; the store is unaligned.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), v) };
    out
}
