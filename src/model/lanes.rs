//! Vectors of f32 lanes for kernels written once and compiled for each instruction set.
//!
//! A kernel generic over [`Lanes`] keeps its accumulators in arrays of vectors with constant
//! sizes, which the compiler holds in registers; the same code with plain `[f32; 8]` arrays
//! nested in generic loops came out scalar, with every accumulator on the stack. Every
//! operation here is lane by lane (a fused multiply-add is one rounding per lane on every
//! implementation), so a kernel's results have the same bits whichever implementation runs.
#![allow(unsafe_code)]

/// A vector of `LANES` f32 values.
///
/// # Safety
/// Implementations for an instruction set may only be used where the CPU has it: callers reach
/// them through a function compiled with `#[target_feature]` after a run-time check.
pub(super) trait Lanes: Copy {
    const LANES: usize;
    /// All lanes zero.
    unsafe fn zero() -> Self;
    /// Every lane `x`.
    unsafe fn splat(x: f32) -> Self;
    /// `LANES` values from `p`.
    unsafe fn load(p: *const f32) -> Self;
    /// `LANES` half-precision values from `p` (f16 bits), widened exactly.
    unsafe fn load_f16(p: *const u16) -> Self;
    /// `self + a * b` in each lane, rounded once.
    unsafe fn mul_add(self, a: Self, b: Self) -> Self;
    /// The lanes to `p`.
    unsafe fn store(self, p: *mut f32);
    /// Ask for the cache line holding `p` (which need not be valid: a prefetch never faults).
    #[inline(always)]
    unsafe fn prefetch(_p: *const f32) {}
}

/// Eight lanes in a plain array: the portable fallback.
#[derive(Clone, Copy)]
pub(super) struct Portable([f32; 8]);

impl Lanes for Portable {
    const LANES: usize = 8;
    unsafe fn zero() -> Self {
        Self([0.0; 8])
    }
    unsafe fn splat(x: f32) -> Self {
        Self([x; 8])
    }
    unsafe fn load(p: *const f32) -> Self {
        Self(std::ptr::read_unaligned(p.cast::<[f32; 8]>()))
    }
    unsafe fn load_f16(p: *const u16) -> Self {
        let bits = std::ptr::read_unaligned(p.cast::<[u16; 8]>());
        Self(bits.map(|b| half::f16::from_bits(b).to_f32()))
    }
    unsafe fn mul_add(self, a: Self, b: Self) -> Self {
        Self(std::array::from_fn(|i| a.0[i].mul_add(b.0[i], self.0[i])))
    }
    unsafe fn store(self, p: *mut f32) {
        std::ptr::write_unaligned(p.cast::<[f32; 8]>(), self.0);
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Lanes;

    /// Eight lanes, AVX2, FMA and F16C.
    #[derive(Clone, Copy)]
    pub(in crate::model) struct Avx2(__m256);

    impl Lanes for Avx2 {
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            Self(_mm256_setzero_ps())
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Self(_mm256_set1_ps(x))
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Self(_mm256_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> Self {
            Self(_mm256_cvtph_ps(_mm_loadu_si128(p.cast())))
        }
        #[inline(always)]
        unsafe fn mul_add(self, a: Self, b: Self) -> Self {
            Self(_mm256_fmadd_ps(a.0, b.0, self.0))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm256_storeu_ps(p, self.0)
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const f32) {
            _mm_prefetch::<_MM_HINT_T0>(p.cast());
        }
    }

    /// Sixteen lanes, AVX-512 F.
    #[derive(Clone, Copy)]
    pub(in crate::model) struct Avx512(__m512);

    impl Lanes for Avx512 {
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> Self {
            Self(_mm512_setzero_ps())
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Self(_mm512_set1_ps(x))
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Self(_mm512_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> Self {
            Self(_mm512_cvtph_ps(_mm256_loadu_si256(p.cast())))
        }
        #[inline(always)]
        unsafe fn mul_add(self, a: Self, b: Self) -> Self {
            Self(_mm512_fmadd_ps(a.0, b.0, self.0))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm512_storeu_ps(p, self.0)
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const f32) {
            _mm_prefetch::<_MM_HINT_T0>(p.cast());
        }
    }
}
