//! The packed kernel (`vnni.rs`) on 256-bit vectors, for CPUs without AVX-512: with AVX-VNNI
//! (`vpdpbusd` on eight lanes: Intel's client cores since Alder Lake, AMD Zen 5) or with plain
//! AVX2 (`vpmaddubsw` then `vpmaddwd`: older Intel, AMD Zen 2 and 3).
//!
//! A group's sixteen rows are two halves of eight lanes, each run over all the group's blocks
//! in turn (so the accumulators and unpacked weights of one half fit the sixteen registers of
//! AVX2). Each lane computes what the 512-bit kernel's lane computes, in the same order: the
//! same bits, checked by the tests against it. AVX2's `vpmaddubsw` saturates a pair of products
//! above 32,767: two of at most 63 times 127 stay below it (every format up to Q6_K's six bits),
//! but Q8_0's stored bytes (plus 128) do not; for Q8_0 AVX2 multiplies the weights' magnitudes
//! by the activations with the weights' signs instead (at most 2 x 128 x 127), which needs no
//! offset correction and gives the same integer sums.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::packed::{Group, Kind, Row, ROWS};
use super::BLOCK;

/// Lanes of a 256-bit vector of i32.
const HALF: usize = ROWS / 2;

/// How many blocks ahead of the one in use the weights are prefetched.
const AHEAD: usize = 8;

/// Bytes `i` of `bits` as 32 byte masks (0xFF where bit `i` is set).
#[inline(always)]
unsafe fn byte_masks(bits: u32) -> __m256i {
    // Byte j takes byte j / 8 of `bits`, then keeps bit j % 8 of it.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        ),
    );
    let select = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select)
}

/// `acc` plus, per i32 lane, the sum of the four products of `w`'s unsigned and `x`'s signed
/// bytes.
#[inline(always)]
unsafe fn dot4<const VNNI: bool>(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
    if VNNI {
        _mm256_dpbusd_avx_epi32(acc, w, x)
    } else {
        let pairs = _mm256_maddubs_epi16(w, x);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
}

/// [`super::vnni::tile`] on 256-bit vectors: `C` activation rows against the group's sixteen
/// weight rows, `out[c][lane]`; `VNNI` chooses AVX-VNNI or plain AVX2 for the integer sums.
///
/// # Safety
/// AVX2, FMA and F16C are present, and AVX-VNNI where `VNNI`. The lengths are those of
/// [`super::vnni::tile`].
#[inline(always)]
unsafe fn tile<const C: usize, const K: u8, const VNNI: bool>(
    g: Group<'_>,
    rows: &[Row<'_>; C],
) -> [[f32; ROWS]; C] {
    let kind = Kind::from_code(K);
    let (q8_0, q6k) = (kind == Kind::Q8_0, kind == Kind::Q6K);
    // Q8_0 on plain AVX2: signed weights, magnitudes times signed activations.
    let signed = q8_0 && !VNNI;
    let flip = _mm256_set1_epi8(-128);
    let with_min = matches!(kind, Kind::Q4_1 | Kind::Q5_1);
    let fifth = matches!(kind, Kind::Q5_0 | Kind::Q5_1);
    let (chunks, per_block, masks) = (kind.chunks(), kind.scales(), kind.masks());
    let low = _mm256_set1_epi8(0x0F);
    let sixteen = _mm256_set1_epi8(16);
    let thirty_two = _mm256_set1_epi8(32);
    let mut out = [[0f32; ROWS]; C];
    for half in 0..2 {
        let mut acc = [_mm256_setzero_ps(); C];
        for b in 0..g.blocks {
            let q = g.quants.as_ptr().add(b * chunks);
            for p in 0..chunks {
                _mm_prefetch::<_MM_HINT_T0>(
                    q.wrapping_add(AHEAD * chunks + p)
                        .cast::<i8>()
                        .wrapping_add(32 * half),
                );
            }
            // This half's 32 bytes of a chunk: four bytes of each of its eight rows.
            let load = |p: usize| _mm256_load_si256(q.add(p).cast::<u8>().add(32 * half).cast());
            let mut w = [_mm256_setzero_si256(); 8];
            if signed {
                for (t, wt) in w.iter_mut().enumerate() {
                    *wt = _mm256_xor_si256(load(t), flip);
                }
            } else if q8_0 {
                for (t, wt) in w.iter_mut().enumerate() {
                    *wt = load(t);
                }
            } else {
                for p in 0..4 {
                    let z = load(p);
                    w[p] = _mm256_and_si256(z, low);
                    w[p + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(z), low);
                }
            }
            if fifth || q6k {
                let h = g.high.as_ptr().add(b * masks);
                let bits = |m: usize| (h.add(m).read() >> (32 * half)) as u32;
                for (t, wt) in w.iter_mut().enumerate() {
                    let m = byte_masks(bits(t));
                    *wt = _mm256_add_epi8(*wt, _mm256_and_si256(m, sixteen));
                    if q6k {
                        let m = byte_masks(bits(8 + t));
                        *wt = _mm256_add_epi8(*wt, _mm256_and_si256(m, thirty_two));
                    }
                }
            }
            let sc = g.scales.as_ptr().add(b * per_block + HALF * half);
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(sc.cast()));
            let mw = if with_min || q6k {
                _mm256_cvtph_ps(_mm_loadu_si128(sc.add(ROWS).cast()))
            } else {
                _mm256_setzero_ps()
            };
            for c in 0..C {
                let r = &rows[c];
                let x = r.bytes.as_ptr().add(b * BLOCK);
                let word =
                    |t: usize| _mm256_set1_epi32(x.add(4 * t).cast::<i32>().read_unaligned());
                let zero = _mm256_setzero_si256();
                let dot = |acc: __m256i, t: usize| {
                    if signed {
                        let x = _mm256_sign_epi8(word(t), w[t]);
                        let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w[t]), x);
                        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
                    } else {
                        dot4::<VNNI>(acc, w[t], word(t))
                    }
                };
                if q6k {
                    // Each half block's sum starts from its bias.
                    let half_sum = |t: usize, bias: i32| {
                        let a = dot4::<VNNI>(_mm256_set1_epi32(bias), w[t], word(t));
                        let b = dot4::<VNNI>(zero, w[t + 1], word(t + 1));
                        let a = dot4::<VNNI>(a, w[t + 2], word(t + 2));
                        let b = dot4::<VNNI>(b, w[t + 3], word(t + 3));
                        _mm256_add_epi32(a, b)
                    };
                    let s0 = half_sum(0, *r.bias.get_unchecked(2 * b));
                    let s1 = half_sum(4, *r.bias.get_unchecked(2 * b + 1));
                    let dx = _mm256_set1_ps(*r.d.get_unchecked(b));
                    let f = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(s1),
                        mw,
                        _mm256_mul_ps(_mm256_cvtepi32_ps(s0), dw),
                    );
                    acc[c] = _mm256_fmadd_ps(f, dx, acc[c]);
                    continue;
                }
                // The first chain starts from the bias that takes back the weights' offset
                // (none for the formats with a minimum, nor for signed Q8_0).
                let start = if with_min || signed {
                    zero
                } else {
                    _mm256_set1_epi32(*r.bias.get_unchecked(b))
                };
                let mut s0 = dot(start, 0);
                let mut s1 = dot(zero, 1);
                for t in (2..8).step_by(2) {
                    s0 = dot(s0, t);
                    s1 = dot(s1, t + 1);
                }
                let s = _mm256_add_epi32(s0, s1);
                let dd = _mm256_mul_ps(dw, _mm256_set1_ps(*r.d.get_unchecked(b)));
                if with_min {
                    let sx = _mm256_set1_ps(*r.s.get_unchecked(b));
                    acc[c] = _mm256_fmadd_ps(mw, sx, acc[c]);
                }
                acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), dd, acc[c]);
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            _mm256_storeu_ps(o.as_mut_ptr().add(HALF * half), a);
        }
    }
    out
}

/// [`tile`] with AVX-VNNI.
///
/// # Safety
/// As [`tile`], with AVX-VNNI.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub(super) unsafe fn tile_vnni<const C: usize, const K: u8>(
    g: Group<'_>,
    rows: &[Row<'_>; C],
) -> [[f32; ROWS]; C] {
    tile::<C, K, true>(g, rows)
}

/// [`tile`] with plain AVX2.
///
/// # Safety
/// As [`tile`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile_avx2<const C: usize, const K: u8>(
    g: Group<'_>,
    rows: &[Row<'_>; C],
) -> [[f32; ROWS]; C] {
    tile::<C, K, false>(g, rows)
}
