//! Q4_1 and Q5_0 weights repacked for AVX-512 VNNI: sixteen rows interleaved, so that one
//! vector holds four weights of each of sixteen rows and `vpdpbusd` against four activation
//! bytes broadcast to every lane advances sixteen dot products at once (`vnni.rs`).
//!
//! The file's layout gives each row its blocks one after another; the kernels in `q4_1.rs` and
//! `q5_0.rs` therefore compute four dot products per vector and sum each block's integer
//! products horizontally, and those horizontal sums (shuffles) bound them. Here there are none,
//! and the weights' unpacking is shared by up to four activation rows: for SmolLM2's decode
//! the kernel does a fifth of the instructions per weight, and for prompts it is an int8
//! GEMM that needs no dequantized copy of the weights.
//!
//! The packing is a permutation of the file's bytes: the same nibbles, fifth bits and f16
//! scales, so the packed matrix takes the memory of the original (which is then dropped);
//! rows are padded to a multiple of sixteen with zero rows. Results are bit-identical to
//! candle's scalar dot products and to this module's other kernels, for any number of rows.
#![allow(unsafe_code)]

use std::sync::Mutex;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::BLOCK;

/// Weight rows per group (lanes of a 512-bit vector of i32).
pub(super) const ROWS: usize = 16;
/// 64-byte chunks of nibbles per group and block (16 rows x 16 bytes).
pub(super) const CHUNKS: usize = 4;
/// Activation rows per kernel call.
const TILE: usize = 4;
/// Activation rows from which the work is shared out by rows instead of by weight groups.
const PROMPT_ROWS: usize = 32;

/// 64 bytes, aligned for whole-vector loads.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(super) struct Chunk(pub [u8; 64]);

/// One activation row as the kernel reads it: its quantized blocks and, per block, the f32
/// scale and either Q8_1's scaled sum (Q4_1) or 16 times the sum of its quants (Q5_0, whose
/// weights are stored with 16 added so that they are unsigned).
#[derive(Clone, Copy)]
pub(super) struct Row<'a> {
    /// The row's quants, 32 per block.
    pub bytes: &'a [u8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub sum16: &'a [i32],
}

/// A group of sixteen packed weight rows: per block, [`CHUNKS`] chunks of nibbles, the sixteen
/// f16 scales (and, for Q4_1, the sixteen f16 minimums), and for Q5_0 eight masks of fifth bits.
#[derive(Clone, Copy)]
pub(super) struct Group<'a> {
    pub quants: &'a [Chunk],
    pub scales: &'a [u16],
    pub high: &'a [u64],
    pub blocks: usize,
}

/// A Q4_1 or Q5_0 matrix in groups of sixteen rows.
pub struct Packed {
    q5: bool,
    n: usize,
    k: usize,
    blocks: usize,
    /// `[group][block][CHUNKS]`.
    quants: Vec<Chunk>,
    /// `[group][block]`: sixteen f16 scales, then (Q4_1) sixteen f16 minimums.
    scales: Vec<u16>,
    /// Q5_0: `[group][block][8]`, the fifth bits of chunk-word `t` (bit `4 * row + i` is value
    /// `4t + i` of that row), as a byte mask.
    high: Vec<u64>,
}

/// Whether this CPU runs the packed kernel (checked once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Packed {
    /// `w` packed, or `None` for another type, another device, a width that is not whole
    /// blocks, or a CPU without the kernel.
    ///
    /// # Errors
    /// candle cannot hand out the tensor's bytes.
    pub fn new(w: &QTensor) -> candle_core::Result<Option<Self>> {
        let q5 = match w.dtype() {
            GgmlDType::Q4_1 => false,
            GgmlDType::Q5_0 => true,
            _ => return Ok(None),
        };
        if !available() || !w.device().is_cpu() {
            return Ok(None);
        }
        let (n, k) = w.shape().dims2()?;
        let w_bytes = if q5 { 22 } else { 20 };
        let blocks = k / BLOCK;
        let data = w.data()?;
        if n == 0 || k % BLOCK != 0 || data.len() != n * blocks * w_bytes {
            return Ok(None);
        }
        let groups = n.div_ceil(ROWS);
        let per_block = if q5 { ROWS } else { 2 * ROWS };
        let mut quants = vec![Chunk([0; 64]); groups * blocks * CHUNKS];
        let mut scales = vec![0u16; groups * blocks * per_block];
        let mut high = vec![0u64; if q5 { groups * blocks * 8 } else { 0 }];
        for row in 0..n {
            let (g, lane) = (row / ROWS, row % ROWS);
            for b in 0..blocks {
                let at = (row * blocks + b) * w_bytes;
                let block = &data[at..at + w_bytes];
                let u16_at = |i: usize| u16::from_le_bytes([block[i], block[i + 1]]);
                let gb = g * blocks + b;
                let qs = if q5 { &block[6..22] } else { &block[4..20] };
                for p in 0..CHUNKS {
                    let to = &mut quants[gb * CHUNKS + p].0[lane * 4..lane * 4 + 4];
                    to.copy_from_slice(&qs[4 * p..4 * p + 4]);
                }
                scales[gb * per_block + lane] = u16_at(0);
                if q5 {
                    let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                    for t in 0..8 {
                        high[gb * 8 + t] |= u64::from((qh >> (4 * t)) & 0xF) << (4 * lane);
                    }
                } else {
                    scales[gb * per_block + ROWS + lane] = u16_at(2);
                }
            }
        }
        Ok(Some(Self {
            q5,
            n,
            k,
            blocks,
            quants,
            scales,
            high,
        }))
    }

    /// `x @ w^T` for `x` `(..., k)` on the CPU.
    ///
    /// # Errors
    /// `x` is not `k` wide, or a candle failure quantizing it or building the result.
    pub fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, k, blocks) = (self.n, self.k, self.blocks);
        let width = x.dim(candle_core::D::Minus1)?;
        if width != k {
            candle_core::bail!("packed matmul: input is {width} wide, weights {k}");
        }
        let m = x.elem_count() / k;
        let xq = super::acts::quantize(x, m, k, self.q5)?;
        let row = |r: usize| {
            let span = r * blocks..(r + 1) * blocks;
            Row {
                bytes: &xq.q[r * k..(r + 1) * k],
                d: &xq.d[span.clone()],
                s: if self.q5 { &[] } else { &xq.s[span.clone()] },
                sum16: if self.q5 { &xq.sum16[span] } else { &[] },
            }
        };
        let groups = n.div_ceil(ROWS);
        let mut y = vec![0f32; m * n];
        // Rows `rows` against group `g`, into `out`: row `r`'s results at
        // `(r - rows.start) * stride + col`.
        let run = |g: usize, rows: std::ops::Range<usize>, out: &mut [f32], stride, col| {
            let group = self.group(g);
            let cols = ROWS.min(n - g * ROWS);
            let base = rows.start;
            let mut put = |r: usize, v: &[f32; ROWS]| {
                let at = (r - base) * stride + col;
                out[at..at + cols].copy_from_slice(&v[..cols]);
            };
            let mut r = rows.start;
            while r + TILE <= rows.end {
                let tile: [_; TILE] = std::array::from_fn(|i| row(r + i));
                for (i, v) in self.tile(group, tile).iter().enumerate() {
                    put(r + i, v);
                }
                r += TILE;
            }
            for r in r..rows.end {
                let [v] = self.tile(group, [row(r)]);
                put(r, &v);
            }
        };
        if m >= PROMPT_ROWS {
            // Prompts: work items are spans of rows, each writing its own rows of the result;
            // a span reads all the weights, which stay in cache between its tiles.
            let span = (m / 8).next_multiple_of(TILE).clamp(TILE, 64);
            let slots: Vec<Mutex<&mut [f32]>> = y.chunks_mut(span * n).map(Mutex::new).collect();
            candle_core::utils::barrier_pool().execute_chunked(slots.len(), |items| {
                for i in items {
                    if let Ok(mut out) = slots[i].lock() {
                        let rows = i * span..((i + 1) * span).min(m);
                        for g in 0..groups {
                            run(g, rows.clone(), &mut out, n, g * ROWS);
                        }
                    }
                }
            });
        } else {
            // Decode steps: work items are groups of weight rows, each with its own `(m, 16)`
            // result, gathered into `y` afterwards.
            let mut parts = vec![0f32; groups * m * ROWS];
            let slots: Vec<Mutex<&mut [f32]>> =
                parts.chunks_mut(m * ROWS).map(Mutex::new).collect();
            candle_core::utils::barrier_pool().execute_chunked(groups, |items| {
                for g in items {
                    if let Ok(mut out) = slots[g].lock() {
                        run(g, 0..m, &mut out, ROWS, 0);
                    }
                }
            });
            drop(slots);
            for (g, part) in parts.chunks(m * ROWS).enumerate() {
                let cols = ROWS.min(n - g * ROWS);
                for r in 0..m {
                    y[r * n + g * ROWS..r * n + g * ROWS + cols]
                        .copy_from_slice(&part[r * ROWS..r * ROWS + cols]);
                }
            }
        }
        let mut shape = x.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        Tensor::from_vec(y, (m, n), &Device::Cpu)?.reshape(shape)
    }

    /// Group `g`'s weights.
    fn group(&self, g: usize) -> Group<'_> {
        let blocks = self.blocks;
        let per_block = if self.q5 { ROWS } else { 2 * ROWS };
        Group {
            quants: &self.quants[g * blocks * CHUNKS..(g + 1) * blocks * CHUNKS],
            scales: &self.scales[g * blocks * per_block..(g + 1) * blocks * per_block],
            high: if self.q5 {
                &self.high[g * blocks * 8..(g + 1) * blocks * 8]
            } else {
                &[]
            },
            blocks,
        }
    }

    /// The kernel for one group and `C` rows, the lengths checked first.
    fn tile<const C: usize>(&self, g: Group<'_>, rows: [Row<'_>; C]) -> [[f32; ROWS]; C] {
        let b = g.blocks;
        let per_block = if self.q5 { ROWS } else { 2 * ROWS };
        assert!(g.quants.len() == b * CHUNKS && g.scales.len() == b * per_block);
        assert!(!self.q5 || g.high.len() == b * 8);
        assert!(rows.iter().all(|r| r.bytes.len() == b * BLOCK
            && r.d.len() == b
            && (if self.q5 { r.sum16.len() } else { r.s.len() }) == b));
        assert!(available());
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available()` checked AVX-512 F, BW and VNNI (a `Packed` exists only then);
        // the lengths the kernel reads were checked above.
        unsafe {
            if self.q5 {
                super::vnni::tile::<C, true>(g, rows)
            } else {
                super::vnni::tile::<C, false>(g, rows)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no packed matrices without AVX-512")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::Module;

    /// Against candle's own matmul, bit for bit: one row, tiles of four with rows left over,
    /// a prompt-sized batch, and a row count that leaves the last group part empty.
    #[test]
    fn matches_candles_matmul_bit_for_bit() {
        let dev = Device::Cpu;
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q5_0] {
            for (n, k, m) in [
                (64usize, 576usize, 1usize),
                (40, 640, 7),
                (16, 64, 4),
                (21, 160, 2),
                (48, 96, 37),
                (33, 64, 130),
            ] {
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let Some(packed) = Packed::new(&q).unwrap() else {
                    assert!(!available());
                    return;
                };
                let x = Tensor::randn(0f32, 1.0, (m, 1, k), &dev).unwrap();
                let want: Vec<f32> = QMatMul::from_qtensor(q)
                    .unwrap()
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let got = packed.matmul(&x).unwrap();
                assert_eq!(got.dims(), &[m, 1, n]);
                let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(got, want, "{dtype:?} {n}x{k}, {m} rows");
            }
        }
    }

    #[test]
    fn other_types_and_wrong_widths_are_refused() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (16, 64), &dev).unwrap();
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        assert!(Packed::new(&q8).unwrap().is_none());
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        if let Some(p) = Packed::new(&q).unwrap() {
            let x = Tensor::randn(0f32, 1.0, (2, 96), &dev).unwrap();
            assert!(p.matmul(&x).is_err());
        }
    }
}
