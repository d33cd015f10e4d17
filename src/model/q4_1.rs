//! Q4_1 weights times a few activation rows, with AVX2: candle has only a scalar Q4_1 dot
//! product, which took over half of SmolLM2's decode time.
//!
//! The arithmetic is ggml's (`ggml_vec_dot_q4_1_q8_1`): activations are quantized to Q8_1 (by
//! candle, the same rounding as its own path), each 32-weight block contributes
//! `d_w * d_x * sum(q_w * q_x) + m_w * s_x`. The integer sums are exact and the block results
//! are added in the scalar code's order, so every result has the same bits as candle's, and a
//! row's result does not depend on how many rows are multiplied with it.
//!
//! Four dot products run side by side, one per lane of a vector: four weight rows against one
//! activation row (decode), or one weight row against four activation rows (a batched decode
//! step: each weight block is read and unpacked once for four sequences). Their integer sums
//! are reduced together and their scales applied as one vector, so the per-block cost that
//! dominated the one-at-a-time kernel (a horizontal sum and scalar float work per block and row)
//! is shared four ways. The weights are read in place from the quantized tensor: no copy.
#![allow(unsafe_code)]

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::sync::atomic::{AtomicU32, Ordering};

const BLOCK: usize = 32;
/// Bytes of a Q4_1 block: f16 scale, f16 minimum, 16 bytes of nibbles.
const W_BYTES: usize = 20;
/// Bytes of a Q8_1 block: f16 scale, f16 scale times the sum, 32 signed bytes.
const X_BYTES: usize = 36;
/// Dot products computed side by side.
const LANES: usize = 4;

/// Whether this CPU runs the kernel (checked once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn f16(bytes: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32()
}

/// The activation rows in Q8_1, with their two scales per block converted to f32 once, both row
/// by row and, for each full group of four rows, side by side (`[group][block][lane]`).
struct Acts<'a> {
    q: &'a [u8],
    blocks: usize,
    d: Vec<f32>,
    s: Vec<f32>,
    /// The same scales row by row (`[row][block]`).
    row_d: Vec<f32>,
    row_s: Vec<f32>,
}

impl<'a> Acts<'a> {
    fn new(q: &'a [u8], rows: usize, blocks: usize) -> Self {
        let groups = rows / LANES;
        let mut d = vec![0f32; groups * blocks * LANES];
        let mut s = vec![0f32; groups * blocks * LANES];
        for g in 0..groups {
            for lane in 0..LANES {
                let r = g * LANES + lane;
                for b in 0..blocks {
                    let at = (r * blocks + b) * X_BYTES;
                    let i = (g * blocks + b) * LANES + lane;
                    d[i] = f16(&q[at..at + 2]);
                    s[i] = f16(&q[at + 2..at + 4]);
                }
            }
        }
        let scale = |at: usize| f16(&q[at * X_BYTES..at * X_BYTES + 2]);
        let sum = |at: usize| f16(&q[at * X_BYTES + 2..at * X_BYTES + 4]);
        Self {
            q,
            blocks,
            d,
            s,
            row_d: (0..rows * blocks).map(scale).collect(),
            row_s: (0..rows * blocks).map(sum).collect(),
        }
    }

    /// The scales of row `r` (`blocks` values each).
    fn row_scales(&self, r: usize) -> (&[f32], &[f32]) {
        let span = r * self.blocks..(r + 1) * self.blocks;
        (&self.row_d[span.clone()], &self.row_s[span])
    }

    fn row(&self, r: usize) -> &[u8] {
        &self.q[r * self.blocks * X_BYTES..(r + 1) * self.blocks * X_BYTES]
    }

    /// The scales of group `g` (`blocks * LANES` values each).
    fn scales(&self, g: usize) -> (&[f32], &[f32]) {
        let span = g * self.blocks * LANES..(g + 1) * self.blocks * LANES;
        (&self.d[span.clone()], &self.s[span])
    }
}

/// `x @ w^T` for Q4_1 `w` (`(n, k)`) and `x` (`(..., k)`), or `None` when the kernel does not
/// apply (another type, another device, no AVX2).
///
/// # Errors
/// A candle failure while quantizing the activations or building the result.
pub fn matmul(w: &QTensor, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if w.dtype() != GgmlDType::Q4_1 || !x.device().is_cpu() || !available() {
        return Ok(None);
    }
    let (n, k) = w.shape().dims2()?;
    if n == 0 || k % BLOCK != 0 || x.dim(candle_core::D::Minus1)? != k {
        return Ok(None);
    }
    let m = x.elem_count() / k;
    if m == 0 {
        return Ok(None);
    }
    let xq = super::linear::quantize_rows(x, m, k, GgmlDType::Q8_1)?;
    let xb = xq.data()?;
    let wb = w.data()?;
    let nb = k / BLOCK;
    if wb.len() != n * nb * W_BYTES || xb.len() != m * nb * X_BYTES {
        return Ok(None);
    }
    let acts = Acts::new(&xb, m, nb);
    let wrow = |j: usize| &wb[j * nb * W_BYTES..(j + 1) * nb * W_BYTES];
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
                    let v = four_activation_rows(wrow(j), xs, d, s);
                    for (i, v) in v.into_iter().enumerate() {
                        put(a * LANES + i, j, v);
                    }
                }
            }
            for r in full..m {
                let (d, s) = acts.row_scales(r);
                let v = four_weight_rows(js.map(wrow), acts.row(r), d, s);
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

/// Four weight rows against one activation row whose block scales are `d`, `s`.
fn four_weight_rows(w: [&[u8]; LANES], x: &[u8], d: &[f32], s: &[f32]) -> [f32; LANES] {
    let nb = x.len() / X_BYTES;
    assert!(w.iter().all(|w| w.len() == nb * W_BYTES) && d.len() == nb);
    assert!(s.len() == d.len());
    #[cfg(target_arch = "x86_64")]
    {
        if available() {
            // SAFETY: `available()` checked AVX2, FMA and F16C; the lengths were checked above,
            // and the kernel reads only whole blocks inside those slices.
            return unsafe { avx2::four_weight_rows(w, x, d, s) };
        }
    }
    let dot = |lane: usize| dot_scalar(w[lane], x);
    [dot(0), dot(1), dot(2), dot(3)]
}

/// One weight row against four activation rows whose block scales are `d`, `s`.
fn four_activation_rows(w: &[u8], x: [&[u8]; LANES], d: &[f32], s: &[f32]) -> [f32; LANES] {
    let nb = w.len() / W_BYTES;
    assert!(x.iter().all(|x| x.len() == nb * X_BYTES) && d.len() == nb * LANES);
    assert!(s.len() == d.len());
    #[cfg(target_arch = "x86_64")]
    {
        if available() {
            // SAFETY: as above.
            return unsafe { avx2::four_activation_rows(w, x, d, s) };
        }
    }
    let dot = |lane: usize| dot_scalar(w, x[lane]);
    [dot(0), dot(1), dot(2), dot(3)]
}

/// The same sum in plain Rust, one weight row against one activation row (the reference for
/// the tests, and other CPUs).
fn dot_scalar(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (wb, xb) in w.chunks_exact(W_BYTES).zip(x.chunks_exact(X_BYTES)) {
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
mod avx2 {
    use super::{LANES, W_BYTES, X_BYTES};
    use std::arch::x86_64::*;

    /// A weight block's 32 nibbles as bytes: the low nibbles of its 16 bytes, then the high.
    #[target_feature(enable = "avx2")]
    unsafe fn nibbles(w: *const u8) -> __m256i {
        // SAFETY (caller): `w` points at a whole Q4_1 block; its quants are bytes 4..20.
        let q = _mm_loadu_si128(w.add(4).cast());
        let mask = _mm_set1_epi8(0x0F);
        _mm256_set_m128i(
            _mm_and_si128(_mm_srli_epi16(q, 4), mask),
            _mm_and_si128(q, mask),
        )
    }

    /// Unsigned nibbles times a Q8_1 block's signed quants: eight partial i32 sums (each pair
    /// first summed to i16, at most 2 * 15 * 128 in size, so nothing saturates).
    #[target_feature(enable = "avx2")]
    unsafe fn products(wq: __m256i, x: *const u8) -> __m256i {
        // SAFETY (caller): `x` points at a whole Q8_1 block; its quants are bytes 4..36.
        let xq = _mm256_loadu_si256(x.add(4).cast());
        _mm256_madd_epi16(_mm256_maddubs_epi16(wq, xq), _mm256_set1_epi16(1))
    }

    /// Four vectors of partial sums to their four exact totals.
    #[target_feature(enable = "avx2")]
    unsafe fn totals(p: [__m256i; LANES]) -> __m128 {
        let h = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
        let t = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        _mm_cvtepi32_ps(t)
    }

    /// One block's contribution in each lane, in the scalar code's order:
    /// `sumi * d_w * d_x + m_w * s_x` (separate multiplies and adds, never fused).
    #[target_feature(enable = "avx2")]
    unsafe fn scaled(sumi: __m128, dw: __m128, mw: __m128, dx: __m128, sx: __m128) -> __m128 {
        _mm_add_ps(_mm_mul_ps(_mm_mul_ps(sumi, dw), dx), _mm_mul_ps(mw, sx))
    }

    fn to_array(v: __m128) -> [f32; LANES] {
        let mut out = [0f32; LANES];
        // SAFETY: `out` has room for four f32; the store is unaligned.
        unsafe { _mm_storeu_ps(out.as_mut_ptr(), v) };
        out
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
        for b in 0..d.len() {
            let xq = _mm256_loadu_si256(x.as_ptr().add(b * X_BYTES + 4).cast());
            let wp = [
                w[0].as_ptr().add(b * W_BYTES),
                w[1].as_ptr().add(b * W_BYTES),
                w[2].as_ptr().add(b * W_BYTES),
                w[3].as_ptr().add(b * W_BYTES),
            ];
            let ones = _mm256_set1_epi16(1);
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
    /// As for `four_weight_rows`, with one weight row and four activation rows.
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
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::Module;

    /// Every shape path: one row (weight rows four at a time, with a short last group), and
    /// several (activation rows four at a time, with short groups), against candle's own
    /// Q4_1 matmul, bit for bit.
    #[test]
    fn matches_candles_q4_1_matmul() {
        let dev = Device::Cpu;
        for (n, k, m) in [
            (64usize, 576usize, 1usize),
            (10, 576, 1),
            (96, 1536, 3),
            (8, 64, 2),
            (8, 224, 1),
            (7, 96, 4),
            (13, 576, 5),
            (9, 160, 8),
        ] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
            let x = Tensor::randn(0f32, 1.0, (m, 1, k), &dev).unwrap();
            let want: Vec<f32> =
                QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap())
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
            assert_eq!(got, want, "{n}x{k}, {m} rows");
        }
    }

    /// A row's result is the same whether it is multiplied alone or with others (what lets a
    /// batched decode step give each sequence exactly its single-step logits).
    #[test]
    fn a_row_gets_the_same_bits_alone_or_in_a_batch() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (37, 320), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let x = Tensor::randn(0f32, 1.0, (6, 320), &dev).unwrap();
        let Some(all) = matmul(&q, &x).unwrap() else {
            assert!(!available());
            return;
        };
        for r in 0..6 {
            let alone = matmul(&q, &x.narrow(0, r, 1).unwrap()).unwrap().unwrap();
            let want: Vec<f32> = alone.flatten_all().unwrap().to_vec1().unwrap();
            let got: Vec<f32> = all.get(r).unwrap().to_vec1().unwrap();
            assert_eq!(got, want, "row {r}");
        }
    }

    #[test]
    fn the_vector_and_scalar_sums_agree() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (4, 256), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (4, 256), &dev).unwrap();
        let wq = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let xq = QTensor::quantize(&x, GgmlDType::Q8_1).unwrap();
        let (wb, xb) = (wq.data().unwrap(), xq.data().unwrap());
        let acts = Acts::new(&xb, 4, 8);
        let row = |j: usize| &wb[j * 8 * W_BYTES..(j + 1) * 8 * W_BYTES];
        let bits = |v: [f32; 4]| v.map(f32::to_bits);
        // Four weight rows against activation row 0.
        let (d, s) = acts.row_scales(0);
        let got = four_weight_rows([row(0), row(1), row(2), row(3)], acts.row(0), d, s);
        let want = [0, 1, 2, 3].map(|j| dot_scalar(row(j), acts.row(0)));
        assert_eq!(bits(got), bits(want));
        // Weight row 2 against the four activation rows.
        let (d, s) = acts.scales(0);
        let xs = [acts.row(0), acts.row(1), acts.row(2), acts.row(3)];
        let got = four_activation_rows(row(2), xs, d, s);
        let want = [0, 1, 2, 3].map(|r| dot_scalar(row(2), acts.row(r)));
        assert_eq!(bits(got), bits(want));
    }
}
