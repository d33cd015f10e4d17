//! Quantized weights times activation rows on x86 CPUs: the packed int8 kernel.
//!
//! Weight matrices of the formats below are repacked at load (`packed.rs`): sixteen rows
//! interleaved, so that one instruction advances sixteen rows' dot products against four
//! activation bytes, with no horizontal sums. The kernel comes in three instruction sets,
//! chosen at run time: AVX-512 VNNI (`vnni.rs`), and on 256-bit vectors AVX-VNNI or plain AVX2
//! (`avx2.rs`); all compute the same bits. It serves every row count: a decode step, a batched
//! step (a weight block read once for up to eight rows) and a prompt (an int8 GEMM).
//!
//! Formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q6_K as they are; Q4_K and Q5_K rewritten as Q4_1
//! and Q5_1 (`kquant.rs`). The arithmetic is ggml's: activations are quantized to 8 bits per
//! 32-value block (`acts.rs`, candle's rounding), and each block contributes its exact integer
//! sum times the two scales by fused multiply-adds (results within float rounding of candle's).
//! A row's result does not depend on how many rows are multiplied with it.

#![allow(unsafe_code)]

mod acts;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod kquant;
pub mod packed;
mod pages;
#[cfg(target_arch = "x86_64")]
mod vnni;

const BLOCK: usize = 32;

/// Whether this CPU has all the named x86 features, checked once per call site; false on other
/// architectures.
macro_rules! cpu_has {
    ($($feature:tt),+) => {{
        #[cfg(target_arch = "x86_64")]
        {
            static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            *OK.get_or_init(|| true $(&& std::is_x86_feature_detected!($feature))+)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }};
}
pub(crate) use cpu_has;
