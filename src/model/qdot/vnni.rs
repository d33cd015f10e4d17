//! The AVX-512 VNNI kernel over packed weights (`packed.rs`): sixteen weight rows, one per lane
//! of a vector, against up to eight activation rows.
//!
//! Because each lane is a weight row, a block's integer sums come out of `vpdpbusd` already
//! separated by row: no horizontal sums, no shuffles. Each lane then adds its block to its
//! running total with fused multiply-adds, as ggml's SIMD code does: `m_w * s_x` first (Q4_1,
//! Q5_1), then `sumi * (d_w * d_x)`. (Separate multiplies and adds in candle's scalar order
//! gave candle's bits, at two more vector instructions per block and row on the ports that
//! `vpdpbusd` needs: the kernel is 15% faster at eight rows without them.) Every row count and
//! instruction set computes a lane the same way; `packed.rs`'s tests write the arithmetic out.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::packed::{Group, Kind, Row, ROWS};
use super::BLOCK;

/// How many blocks ahead of the one in use the weights are prefetched.
const AHEAD: usize = 8;

/// `C` activation rows against the group's sixteen weight rows: `out[c][lane]`. `K` is the
/// format's [`super::packed::Kind::code`]: 0 Q4_1, 1 Q5_0, 2 Q8_0.
///
/// # Safety
/// AVX-512 F, BW and VNNI are present. `g.quants` holds `g.blocks` times the format's chunks,
/// `g.scales` `g.blocks` times its scales, `g.high` `g.blocks * 8` masks for Q5_0; every row
/// has `g.blocks` blocks of 32 signed bytes and `g.blocks` values in `d`, and in `s` (Q4_1) or
/// `bias` (the others).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn tile<const C: usize, const K: u8>(
    g: Group<'_>,
    rows: &[Row<'_>; C],
) -> [[f32; ROWS]; C] {
    use super::packed::code::{Q4_1, Q5_0, Q5_1, Q6K, Q8_0};
    let kind = Kind::from_code(K);
    // Formats with a minimum per block (their activations are Q8_1), and with fifth bits.
    let with_min = K == Q4_1 || K == Q5_1;
    let (chunks, per_block) = (kind.chunks(), kind.scales());
    let low = _mm512_set1_epi8(0x0F);
    let sixteen = _mm512_set1_epi8(16);
    let thirty_two = _mm512_set1_epi8(32);
    let mut acc = [_mm512_setzero_ps(); C];
    for b in 0..g.blocks {
        // Word t of every lane: values 4t..4t+4 of that lane's row. Nibble chunk p holds words
        // p (low nibbles) and p + 4 (high); a Q8_0 chunk is one word of bytes.
        let q = g.quants.as_ptr().add(b * chunks);
        // The weights stream from memory once per step; ask for them a few blocks ahead.
        // (A prefetch past the end is harmless: it never faults.)
        for p in 0..chunks {
            _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(AHEAD * chunks + p).cast());
        }
        let mut w = [_mm512_setzero_si512(); 8];
        if K == Q8_0 {
            for (t, wt) in w.iter_mut().enumerate() {
                *wt = _mm512_load_si512(q.add(t).cast());
            }
        } else {
            for p in 0..4 {
                let z = _mm512_load_si512(q.add(p).cast());
                w[p] = _mm512_and_si512(z, low);
                w[p + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(z), low);
            }
        }
        if K == Q5_0 || K == Q5_1 {
            let h = g.high.as_ptr().add(b * 8);
            for (t, wt) in w.iter_mut().enumerate() {
                *wt = _mm512_mask_add_epi8(*wt, h.add(t).read(), *wt, sixteen);
            }
        }
        if K == Q6K {
            let h = g.high.as_ptr().add(b * 16);
            for (t, wt) in w.iter_mut().enumerate() {
                *wt = _mm512_mask_add_epi8(*wt, h.add(t).read(), *wt, sixteen);
                *wt = _mm512_mask_add_epi8(*wt, h.add(8 + t).read(), *wt, thirty_two);
            }
        }
        let sc = g.scales.as_ptr().add(b * per_block);
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(sc.cast()));
        // Q4_1's minimums, or Q6_K's second half block's scales.
        let mw = if with_min || K == Q6K {
            _mm512_cvtph_ps(_mm256_loadu_si256(sc.add(ROWS).cast()))
        } else {
            _mm512_setzero_ps()
        };
        for c in 0..C {
            let r = &rows[c];
            let x = r.bytes.as_ptr().add(b * BLOCK);
            let word = |t: usize| _mm512_set1_epi32(x.add(4 * t).cast::<i32>().read_unaligned());
            if K == Q6K {
                // Words 0..4 are the first half block, 4..8 the second: a sum and a scale each,
                // each sum starting from its bias.
                let half = |t: usize, bias: i32| {
                    let a = _mm512_dpbusd_epi32(_mm512_set1_epi32(bias), w[t], word(t));
                    let b = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[t + 1], word(t + 1));
                    let a = _mm512_dpbusd_epi32(a, w[t + 2], word(t + 2));
                    let b = _mm512_dpbusd_epi32(b, w[t + 3], word(t + 3));
                    _mm512_add_epi32(a, b)
                };
                let s0 = half(0, *r.bias.get_unchecked(2 * b));
                let s1 = half(4, *r.bias.get_unchecked(2 * b + 1));
                let dx = _mm512_set1_ps(*r.d.get_unchecked(b));
                let f = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(s1),
                    mw,
                    _mm512_mul_ps(_mm512_cvtepi32_ps(s0), dw),
                );
                acc[c] = _mm512_fmadd_ps(f, dx, acc[c]);
                continue;
            }
            // Two chains of four, so that one product need not wait for the last; the first
            // starts from the bias that takes back the weights' offset (zero for Q4_1).
            let start = if with_min {
                _mm512_setzero_si512()
            } else {
                _mm512_set1_epi32(*r.bias.get_unchecked(b))
            };
            let mut s0 = _mm512_dpbusd_epi32(start, w[0], word(0));
            let mut s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], word(1));
            for t in (2..8).step_by(2) {
                s0 = _mm512_dpbusd_epi32(s0, w[t], word(t));
                s1 = _mm512_dpbusd_epi32(s1, w[t + 1], word(t + 1));
            }
            let s = _mm512_add_epi32(s0, s1);
            let dd = _mm512_mul_ps(dw, _mm512_set1_ps(*r.d.get_unchecked(b)));
            if with_min {
                let sx = _mm512_set1_ps(*r.s.get_unchecked(b));
                acc[c] = _mm512_fmadd_ps(mw, sx, acc[c]);
            }
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), dd, acc[c]);
        }
    }
    let mut out = [[0f32; ROWS]; C];
    for (o, a) in out.iter_mut().zip(acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), a);
    }
    out
}
