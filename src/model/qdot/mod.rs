//! Quantized weights times a few activation rows, with AVX2, for the weight formats candle has
//! only scalar dot products for: Q4_1 (all of SmolLM2's layers) and Q5_0 (Gemma 3's matrices
//! whose rows are not a multiple of 256 wide, where llama.cpp's Q4_K_M mix falls back to it).
//! Together they took over half of those models' decode time.
//!
//! CPUs with AVX-512 VNNI take the packed kernel instead (`packed.rs`, `vnni.rs`: weights
//! repacked at load, sixteen rows per vector, any number of activation rows, Q8_0 too); the
//! four-lane kernels below are what other x86 CPUs with AVX2 run.
//!
//! The arithmetic is ggml's: activations are quantized to the format the weights' dot product
//! pairs with (by candle, the same rounding as its own path), each 32-weight block contributes
//! its exact integer sum times the two scales (plus, for Q4_1, the minimum times the
//! activations' sum), and the block results are added in the scalar code's order: every result
//! has the same bits as candle's, and a row's result does not depend on how many rows are
//! multiplied with it.
//!
//! Four dot products run side by side, one per lane of a vector: four weight rows against one
//! activation row (decode), or one weight row against four activation rows (batched decode
//! steps and prompts: each weight block is read and unpacked once for four rows). Their integer
//! sums are reduced together and their scales applied as one vector, so the per-block costs (a
//! horizontal sum, scalar float work) are shared four ways. Weights are read in place from the
//! quantized tensor: no copy, no extra memory.

#![allow(unsafe_code)]

mod acts;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod kquant;
pub mod packed;
mod q4_1;
mod q5_0;
mod q8_0;
#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(target_arch = "x86_64")]
mod vnni;

use std::sync::atomic::{AtomicU32, Ordering};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// Weights per block, in every format here.
const BLOCK: usize = 32;
/// Dot products computed side by side.
const LANES: usize = 4;

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

/// Whether this CPU runs the kernels (checked once).
pub fn available() -> bool {
    cpu_has!("avx2", "fma", "f16c")
}

fn f16(bytes: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32()
}

/// A weight format and its four-lane kernels (safe wrappers: each checks its slices and falls
/// back to the scalar sum on CPUs without the kernels' features).
trait Format {
    const WEIGHTS: GgmlDType;
    /// The activations' format for this dot product.
    const ACTS: GgmlDType;
    /// Bytes of a weight block and of an activation block.
    const W_BYTES: usize;
    const X_BYTES: usize;
    /// Whether activation blocks carry a second scale (Q8_1's scale times sum) at bytes 2..4.
    const X_SUM: bool;
    /// Most activation rows worth multiplying here; with more, the dense path of `Linear`
    /// (dequantized weights, f32 GEMM) is faster. Measured (2 threads, AVX-512 GEMM), prompt
    /// tokens/s kernel vs dense: SmolLM2 at 128 rows 341 vs 291, at 192 rows 285 vs 317;
    /// Gemma 3 at 128 rows 279 vs 266, at 192 rows 293 vs 331.
    const MAX_ROWS: usize = 160;

    /// Whether `m` activation rows `k` wide are better done here than by candle.
    fn takes(_m: usize, _k: usize) -> bool {
        true
    }

    /// One weight row against one activation row, in plain Rust.
    fn dot_scalar(w: &[u8], x: &[u8]) -> f32;

    /// Four weight rows against one activation row whose block scales are `d`, `s`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C are present; every row is the same whole number of blocks, and `d`,
    /// `s` hold one value per block (as [`four_weight_rows`] checks).
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2_weight_rows(w: [&[u8]; LANES], x: &[u8], d: &[f32], s: &[f32]) -> [f32; LANES];

    /// One weight row against four activation rows whose block scales are `d`, `s`
    /// (`[block][lane]`).
    ///
    /// # Safety
    /// As for `avx2_weight_rows`, with four values per block in `d`, `s` (as
    /// [`four_activation_rows`] checks).
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2_activation_rows(
        w: &[u8],
        x: [&[u8]; LANES],
        d: &[f32],
        s: &[f32],
    ) -> [f32; LANES];
}

/// Four weight rows against one activation row: the lengths checked, then AVX2, or the scalar
/// sum on other CPUs.
fn four_weight_rows<F: Format>(w: [&[u8]; LANES], x: &[u8], d: &[f32], s: &[f32]) -> [f32; LANES] {
    let nb = x.len() / F::X_BYTES;
    assert!(x.len() == nb * F::X_BYTES && w.iter().all(|w| w.len() == nb * F::W_BYTES));
    assert!(d.len() == nb && s.len() == nb);
    #[cfg(target_arch = "x86_64")]
    {
        if available() {
            // SAFETY: `available()` checked AVX2, FMA and F16C; the lengths were checked above,
            // and the kernels read only whole blocks inside those slices.
            return unsafe { F::avx2_weight_rows(w, x, d, s) };
        }
    }
    w.map(|w| F::dot_scalar(w, x))
}

/// One weight row against four activation rows, as [`four_weight_rows`].
fn four_activation_rows<F: Format>(
    w: &[u8],
    x: [&[u8]; LANES],
    d: &[f32],
    s: &[f32],
) -> [f32; LANES] {
    let nb = w.len() / F::W_BYTES;
    assert!(w.len() == nb * F::W_BYTES && x.iter().all(|x| x.len() == nb * F::X_BYTES));
    assert!(d.len() == nb * LANES && s.len() == nb * LANES);
    #[cfg(target_arch = "x86_64")]
    {
        if available() {
            // SAFETY: as above.
            return unsafe { F::avx2_activation_rows(w, x, d, s) };
        }
    }
    x.map(|x| F::dot_scalar(w, x))
}

/// The activation rows, with their scales per block converted to f32 once, both row by row
/// and, for each full group of four rows, side by side (`[group][block][lane]`).
struct Acts<'a> {
    q: &'a [u8],
    blocks: usize,
    row_bytes: usize,
    d: Vec<f32>,
    s: Vec<f32>,
    row_d: Vec<f32>,
    row_s: Vec<f32>,
}

impl<'a> Acts<'a> {
    fn new<F: Format>(q: &'a [u8], rows: usize, blocks: usize) -> Self {
        let scale = |at: usize| f16(&q[at * F::X_BYTES..at * F::X_BYTES + 2]);
        let sum = |at: usize| {
            if F::X_SUM {
                f16(&q[at * F::X_BYTES + 2..at * F::X_BYTES + 4])
            } else {
                0.0
            }
        };
        let row_d: Vec<f32> = (0..rows * blocks).map(scale).collect();
        let row_s: Vec<f32> = (0..rows * blocks).map(sum).collect();
        let groups = rows / LANES;
        let mut d = vec![0f32; groups * blocks * LANES];
        let mut s = vec![0f32; groups * blocks * LANES];
        for g in 0..groups {
            for lane in 0..LANES {
                for b in 0..blocks {
                    let from = (g * LANES + lane) * blocks + b;
                    let to = (g * blocks + b) * LANES + lane;
                    d[to] = row_d[from];
                    s[to] = row_s[from];
                }
            }
        }
        Self {
            q,
            blocks,
            row_bytes: blocks * F::X_BYTES,
            d,
            s,
            row_d,
            row_s,
        }
    }

    fn row(&self, r: usize) -> &[u8] {
        &self.q[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// The scales of full group `g` (`blocks * LANES` values each).
    fn scales(&self, g: usize) -> (&[f32], &[f32]) {
        let span = g * self.blocks * LANES..(g + 1) * self.blocks * LANES;
        (&self.d[span.clone()], &self.s[span])
    }

    /// The scales of row `r` (`blocks` values each).
    fn row_scales(&self, r: usize) -> (&[f32], &[f32]) {
        let span = r * self.blocks..(r + 1) * self.blocks;
        (&self.row_d[span.clone()], &self.row_s[span])
    }
}

/// `x @ w^T` for `w` (`(n, k)`) and `x` (`(..., k)`), or `None` when no kernel here applies
/// (another type, another device, no AVX2).
///
/// # Errors
/// A candle failure while quantizing the activations or building the result.
pub fn matmul(w: &QTensor, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !x.device().is_cpu() || !available() {
        return Ok(None);
    }
    match w.dtype() {
        GgmlDType::Q4_1 => run::<q4_1::Q4_1>(w, x),
        GgmlDType::Q5_0 => run::<q5_0::Q5_0>(w, x),
        GgmlDType::Q8_0 => run::<q8_0::Q8_0>(w, x),
        _ => Ok(None),
    }
}

fn run<F: Format>(w: &QTensor, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (n, k) = w.shape().dims2()?;
    if w.dtype() != F::WEIGHTS || n == 0 || k % BLOCK != 0 || x.dim(candle_core::D::Minus1)? != k {
        return Ok(None);
    }
    let m = x.elem_count() / k;
    if m == 0 || m > F::MAX_ROWS || !F::takes(m, k) {
        return Ok(None);
    }
    let xq = super::linear::quantize_rows(x, m, k, F::ACTS)?;
    let xb = xq.data()?;
    let wb = w.data()?;
    let nb = k / BLOCK;
    if wb.len() != n * nb * F::W_BYTES || xb.len() != m * nb * F::X_BYTES {
        return Ok(None);
    }
    let acts = Acts::new::<F>(&xb, m, nb);
    let wrow = |j: usize| &wb[j * nb * F::W_BYTES..(j + 1) * nb * F::W_BYTES];
    // Results in (m, n) order; each cell is stored once, by whichever worker of candle's pool
    // (threads that spin between the many small operations of a decode step) owns it.
    let cells: Vec<AtomicU32> = (0..n * m).map(|_| AtomicU32::new(0)).collect();
    let put = |r: usize, j: usize, v: f32| cells[r * n + j].store(v.to_bits(), Ordering::Relaxed);
    // Work items are groups of four weight rows (the last one may repeat its last row: those
    // lanes are computed and dropped). Within a group, each full group of four activation rows
    // takes one weight row at a time against the four; each activation row left over takes the
    // four weight rows at once. No lane is wasted on padding rows.
    let full = m / LANES * LANES;
    candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(LANES), |groups| {
        for g in groups {
            let js: [usize; LANES] = std::array::from_fn(|lane| (g * LANES + lane).min(n - 1));
            let fresh = |lane: usize| g * LANES + lane < n;
            for (lane, &j) in js.iter().enumerate() {
                if !fresh(lane) {
                    continue;
                }
                for a in 0..full / LANES {
                    let xs: [&[u8]; LANES] = std::array::from_fn(|i| acts.row(a * LANES + i));
                    let (d, s) = acts.scales(a);
                    let v = four_activation_rows::<F>(wrow(j), xs, d, s);
                    for (i, v) in v.into_iter().enumerate() {
                        put(a * LANES + i, j, v);
                    }
                }
            }
            for r in full..m {
                let (d, s) = acts.row_scales(r);
                let v = four_weight_rows::<F>(js.map(wrow), acts.row(r), d, s);
                for (lane, v) in v.into_iter().enumerate() {
                    if fresh(lane) {
                        put(r, js[lane], v);
                    }
                }
            }
        }
    });
    let out: Vec<f32> = cells
        .into_iter()
        .map(|c| f32::from_bits(c.into_inner()))
        .collect();
    let mut shape = x.dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    Ok(Some(
        Tensor::from_vec(out, (m, n), &Device::Cpu)?.reshape(shape)?,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::Module;

    const FORMATS: [GgmlDType; 3] = [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0];

    /// Every shape path: one row (weight rows four at a time, with a short last group), and
    /// several (activation rows four at a time, with rows left over), against candle's own
    /// matmul, bit for bit.
    #[test]
    fn matches_candles_matmul() {
        let dev = Device::Cpu;
        for dtype in FORMATS {
            for (n, k, m) in [
                (64usize, 576usize, 1usize),
                (10, 576, 1),
                (96, 1536, 3),
                (8, 64, 2),
                (8, 224, 1),
                (7, 96, 4),
                (13, 640, 5),
                (9, 160, 8),
            ] {
                if dtype == GgmlDType::Q8_0 && (k % 256 == 0 || m == 1) {
                    // Left to candle: its repacked AVX-512 kernels (a different rounding), and
                    // single rows.
                    continue;
                }
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let x = Tensor::randn(0f32, 1.0, (m, 1, k), &dev).unwrap();
                let want: Vec<f32> = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap())
                    .unwrap()
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let Some(got) = matmul(&q, &x).unwrap() else {
                    assert!(!available());
                    return;
                };
                assert_eq!(got.dims(), &[m, 1, n]);
                let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(got, want, "{dtype:?} {n}x{k}, {m} rows");
            }
        }
    }

    /// A row's result is the same whether it is multiplied alone or with others (what lets a
    /// batched decode step give each sequence exactly its single-step logits), also for a row
    /// narrowed out of a larger tensor, and also where candle takes the single row.
    #[test]
    fn a_row_gets_the_same_bits_alone_or_in_a_batch() {
        let dev = Device::Cpu;
        for dtype in FORMATS {
            let w = Tensor::randn(0f32, 1.0, (37, 320), &dev).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let x = Tensor::randn(0f32, 1.0, (6, 320), &dev).unwrap();
            let Some(all) = matmul(&q, &x).unwrap() else {
                assert!(!available());
                return;
            };
            for r in 0..6 {
                let row = x.narrow(0, r, 1).unwrap();
                // A single row may be left to candle (Q8_0): the same bits are expected.
                let alone = match matmul(&q, &row).unwrap() {
                    Some(y) => y,
                    None => QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap())
                        .unwrap()
                        .forward(&row)
                        .unwrap(),
                };
                let want: Vec<f32> = alone.flatten_all().unwrap().to_vec1().unwrap();
                let got: Vec<f32> = all.get(r).unwrap().to_vec1().unwrap();
                assert_eq!(got, want, "{dtype:?} row {r}");
            }
        }
    }

    fn vector_and_scalar_agree<F: Format>() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (4, 256), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (4, 256), &dev).unwrap();
        let wq = QTensor::quantize(&w, F::WEIGHTS).unwrap();
        let xq = QTensor::quantize(&x, F::ACTS).unwrap();
        let (wb, xb) = (wq.data().unwrap(), xq.data().unwrap());
        let acts = Acts::new::<F>(&xb, 4, 8);
        let row = |j: usize| &wb[j * 8 * F::W_BYTES..(j + 1) * 8 * F::W_BYTES];
        let bits = |v: [f32; 4]| v.map(f32::to_bits);
        let (d, s) = acts.row_scales(0);
        let got = four_weight_rows::<F>([row(0), row(1), row(2), row(3)], acts.row(0), d, s);
        let want = [0, 1, 2, 3].map(|j| F::dot_scalar(row(j), acts.row(0)));
        assert_eq!(bits(got), bits(want), "{:?}, four weight rows", F::WEIGHTS);
        let (d, s) = acts.scales(0);
        let xs = [acts.row(0), acts.row(1), acts.row(2), acts.row(3)];
        let got = four_activation_rows::<F>(row(2), xs, d, s);
        let want = [0, 1, 2, 3].map(|r| F::dot_scalar(row(2), acts.row(r)));
        assert_eq!(
            bits(got),
            bits(want),
            "{:?}, four activation rows",
            F::WEIGHTS
        );
    }

    #[test]
    fn the_vector_and_scalar_sums_agree() {
        vector_and_scalar_agree::<q4_1::Q4_1>();
        vector_and_scalar_agree::<q5_0::Q5_0>();
        vector_and_scalar_agree::<q8_0::Q8_0>();
    }
}
