//! Element-wise work of the forward pass on the CPU, vectorised and shared out over candle's
//! worker pool: the MLP's gate (`act(gate) * up` in one pass) and the prompt attention's
//! softmax.
//!
//! candle computes these one element at a time on one thread, calling libm's `expf` and `tanhf`
//! per element: for a 512-token prompt that was 9% of SmolLM2's prefill (`expf`, mostly the
//! softmax) and 12% of Gemma 3's (`tanhf` in GELU). The exponential here is a polynomial that
//! the compiler vectorises, within 2 ulp of libm's over the range that matters. llama.cpp
//! computes these with its own vector exponential too (and GELU from an f16 table).
//!
//! Other devices and dtypes take candle's operations.

use candle_core::{DType, Tensor};

use super::transformer::Activation;
use super::{f32_values as values, par_fill};

/// `e^x`, as a polynomial on `x - n ln 2` scaled by `2^n` (Cephes' coefficients); exactly 0
/// below -87.3 (so a masked score of -inf gives 0), and large but finite (about 2e38) above 88.3.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let c = x.clamp(-87.3, 88.3);
    let n = (c * LOG2E + 0.5).floor();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, c));
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_2e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 0.166_666_65);
    p = p.mul_add(r, 0.5);
    let p = p.mul_add(r * r, r) + 1.0;
    // 2^n from n's bits (`n as i32` made the gated activation several times slower).
    let scale = f32::from_bits((small_int(n).wrapping_add(127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        p * scale
    }
}

/// `v`, a whole number of magnitude below 2^22, as an integer: what `v as i32` gives for such
/// values, from the bits of `v + 1.5 * 2^23` (whose mantissa's low bits then hold it). A
/// saturating `as` conversion stays scalar, lane by lane, inside vectorised loops.
#[inline(always)]
pub(crate) fn small_int(v: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits()) as i32
}

/// `x * sigmoid(x)`.
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// GELU, tanh approximation: `0.5 x (1 + tanh(z))` with `z = sqrt(2/pi) (x + 0.044715 x^3)`,
/// computed as the equal `x / (1 + e^(-2z))`, which keeps its precision in the negative tail
/// (where `1 + tanh(z)` cancels).
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let z = SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x);
    x / (1.0 + exp(-2.0 * z))
}

/// Whether the fused operations apply: contiguous f32 tensors on the CPU.
fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous()
}

/// Elements per piece of work: big enough that the pool's hand-off is small beside it.
pub(super) const PIECE: usize = 4096;

/// `act(gate) * up`, element by element.
///
/// # Errors
/// Shapes differ, or a candle failure.
pub(super) fn gated(gate: &Tensor, up: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    if !applies(gate) || !applies(up) || gate.dims() != up.dims() {
        let g = match act {
            Activation::Silu => candle_nn::ops::silu(gate)?,
            Activation::GeluTanh => gate.gelu()?,
        };
        return g * up;
    }
    let out = gated_values(&values(gate)?, &values(up)?, act);
    Tensor::from_vec(out, gate.shape(), gate.device())
}

/// [`gated`] on values at hand, `gate` and `up` of one length.
pub(super) fn gated_values(g: &[f32], u: &[f32], act: Activation) -> Vec<f32> {
    let mut out = vec![0f32; g.len().min(u.len())];
    par_fill(&mut out, PIECE, |i, o| {
        let start = i * PIECE;
        gated_into(
            &g[start..start + o.len()],
            &u[start..start + o.len()],
            o,
            act,
        );
    });
    out
}

/// `out[i] = act(g[i]) * u[i]` for the shortest of the three.
#[inline]
pub(super) fn gated_into(g: &[f32], u: &[f32], out: &mut [f32], act: Activation) {
    match act {
        Activation::Silu => {
            for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                *o = silu(g) * u;
            }
        }
        Activation::GeluTanh => {
            for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                *o = gelu_tanh(g) * u;
            }
        }
    }
}

/// One row's softmax, in place: the maximum kept in sixteen lanes (so that it vectorises; a
/// maximum is the same in any order), the exponentials shifted by it, and their total added in
/// candle's order. That order matters more than an ulp of the exponential: with the total's
/// lanes added otherwise, SmolLM2's greedy answer to a test prompt turned into a loop.
pub(super) fn softmax_in_place(row: &mut [f32]) {
    const L: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; L];
    let mut chunks = row.chunks_exact(L);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = m.max(x);
        }
    }
    let max = chunks.remainder().iter().fold(
        lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        |a, &x| a.max(x),
    );
    for d in row.iter_mut() {
        *d = exp(*d - max);
    }
    let sum = super::decode_attn::softmax_sum(row);
    for d in row.iter_mut() {
        *d /= sum;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Relative error against libm's `expf` over the range a softmax and the activations use.
    #[test]
    fn exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_7;
        }
        assert!(worst < 3.0 * f32::EPSILON, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(100.0).is_finite() && exp(100.0) > 1e38);
        assert!(exp(f32::INFINITY).is_finite());
        // Near every whole power of two (where the scale alone makes the result, so a wrong
        // exponent would be off by a factor of two or more).
        for n in -125..=127 {
            let x = n as f32 * std::f32::consts::LN_2;
            let (got, want) = (exp(x), 2f32.powi(n));
            assert!(((got - want) / want).abs() < 1e-5, "2^{n}: {got} vs {want}");
        }
    }

    /// The bits trick gives `as i32` for the whole numbers it serves (quantized activations,
    /// exponents).
    #[test]
    fn small_int_is_as_i32() {
        for n in -127..=127 {
            assert_eq!(small_int(n as f32), n);
        }
        assert_eq!(small_int(-0.0), 0);
    }

    /// GELU and SiLU against their formulas in f64, relative error, over the range activations
    /// take (the negative tails included, where `1 + tanh` would cancel).
    #[test]
    fn activations_are_accurate_in_both_tails() {
        let (mut worst_gelu, mut worst_silu) = (0f64, 0f64);
        let mut x = -12.0f32;
        while x < 12.0 {
            let xd = f64::from(x);
            // z as the f32 code rounds it (its own rounding is not what is tested here).
            let z = f64::from(0.797_884_6f32 * x * (1.0 + 0.044_715 * x * x));
            // `0.5 x (1 + tanh z)`, written as `x sigmoid(2z)`: in f64 too, `1 + tanh z`
            // cancels to 0 below z = -19.
            let gelu = xd / (1.0 + (-2.0 * z).exp());
            let sig = xd / (1.0 + (-xd).exp());
            // Below 1e-30 (the far negative tail, where e^(-2z) passes f32's range and the
            // exponential saturates) only the size matters.
            let rel = |got: f32, want: f64| {
                if want.abs() < 1e-30 {
                    if f64::from(got).abs() < 1e-30 {
                        0.0
                    } else {
                        1.0
                    }
                } else {
                    ((f64::from(got) - want) / want).abs()
                }
            };
            worst_gelu = worst_gelu.max(rel(gelu_tanh(x), gelu));
            worst_silu = worst_silu.max(rel(silu(x), sig));
            x += 0.000_7;
        }
        assert!(worst_gelu < 2e-6, "GELU: worst relative error {worst_gelu}");
        assert!(worst_silu < 2e-6, "SiLU: worst relative error {worst_silu}");
    }

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let (a, b): (Vec<f32>, Vec<f32>) = (values(a).unwrap(), values(b).unwrap());
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "element {i}: {x} vs {y}"
            );
        }
    }

    #[test]
    fn gated_activations_match_candles() {
        let dev = Device::Cpu;
        // More than one piece of work, and a length that is not a multiple of the vector width.
        let g = Tensor::randn(0f32, 3.0, (3, 5001), &dev).unwrap();
        let u = Tensor::randn(0f32, 1.0, (3, 5001), &dev).unwrap();
        let want = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
        // candle's GELU loses precision where `1 + tanh` cancels (about 1e-7 of the gate, times
        // the up value); `activations_are_accurate_in_both_tails` checks ours against f64.
        close(&gated(&g, &u, Activation::Silu).unwrap(), &want, 1e-5);
        let want = (g.gelu().unwrap() * &u).unwrap();
        close(&gated(&g, &u, Activation::GeluTanh).unwrap(), &want, 1e-5);
        // Extreme gates saturate instead of overflowing to NaN.
        let g = Tensor::new(&[-200f32, -20.0, 0.0, 20.0, 200.0], &dev).unwrap();
        let u = Tensor::ones(5, DType::F32, &dev).unwrap();
        for act in [Activation::Silu, Activation::GeluTanh] {
            let y: Vec<f32> = gated(&g, &u, act).unwrap().to_vec1().unwrap();
            assert!(y.iter().all(|v| v.is_finite()), "{act:?}: {y:?}");
            assert_eq!(y[2], 0.0);
            assert!(
                (y[4] - 200.0).abs() < 1e-3 && y[0].abs() < 1e-3,
                "{act:?}: {y:?}"
            );
        }
    }

    #[test]
    fn softmax_matches_candles_with_masked_scores() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 4.0, (2, 3, 37, 300), &dev).unwrap();
        // A causal mask's -inf entries come out as exact zeros.
        let mask: Vec<f32> = (0..37 * 300)
            .map(|i| {
                if i % 300 > 150 + i / 300 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (37, 300), &dev).unwrap();
        let x = x.broadcast_add(&mask).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&x).unwrap();
        let mut rows = values(&x).unwrap();
        for row in rows.chunks_exact_mut(300) {
            softmax_in_place(row);
        }
        let got = Tensor::from_vec(rows, x.shape(), &dev).unwrap();
        close(&got, &want, 1e-6);
        let got: Vec<f32> = values(&got).unwrap();
        assert_eq!(got[299], 0.0);
    }
}
