//! Weights repacked for the int8 kernels: sixteen rows interleaved, so that one 512-bit vector
//! (two 256-bit ones) holds four weights of each of sixteen rows and `vpdpbusd` against four
//! activation bytes broadcast to every lane advances sixteen dot products at once (`vnni.rs`,
//! `avx2.rs`).
//!
//! The file's layout gives each row its blocks one after another, so a kernel over it computes
//! a few dot products per vector and sums each block's integer products horizontally, and those
//! horizontal sums (shuffles) bound it (this crate's first AVX2 kernels did so). Here there are
//! none, and the weights' unpacking is shared by up to eight activation rows: for SmolLM2's
//! decode the kernel does about a fifth of the instructions per weight, and for prompts it is
//! an int8 GEMM that needs no dequantized copy of the weights.
//!
//! Q6_K keeps its six bits as a nibble and two bit masks per value, with a scale per half block
//! (`d * sc` rounded to f16); Q4_K and Q5_K arrive rewritten as Q4_1 and Q5_1 (`kquant.rs`).
//!
//! The packing is a permutation of the file's bytes: the same nibbles, fifth bits, bytes (Q8_0's,
//! with 128 added so that they are unsigned) and f16 scales, so the packed matrix takes the
//! memory of the original (which is then dropped; a tied embedding reads its rows from the
//! packed copy); rows are padded to a multiple of sixteen with zero rows. Results are the same
//! bits for any number of rows, and within float rounding of candle's dot products (the blocks
//! are added by fused multiply-adds, as ggml's SIMD code adds them; the tests write the exact
//! arithmetic out).
#![allow(unsafe_code)]

use std::mem::MaybeUninit;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use memmap2::Mmap;

use super::acts::Acts;
use super::pages::Pages;
use super::BLOCK;

/// Weight rows per group (lanes of a 512-bit vector of i32).
pub(super) const ROWS: usize = 16;
/// Activation rows per kernel call (twice this where there are enough).
const TILE: usize = 4;
/// Activation rows from which the work is shared out by rows instead of by weight groups.
const PROMPT_ROWS: usize = 32;
/// Packed bytes of the largest matrix that prompts read once per span of rows.
const CACHED_BYTES: usize = 4 << 20;
/// Rows that a work item over a span of groups computes at a time.
const ROW_TILE: usize = 64;

/// Values and bytes of a Q6_K super-block (`ql`, `qh`, sixteen i8 scales, f16 `d`).
const Q6K_VALUES: usize = 256;
const Q6K_BYTES: usize = 210;

/// 64 bytes, aligned for whole-vector loads.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(super) struct Chunk(pub [u8; 64]);

/// One activation row as the kernel reads it: its quantized blocks and, per block, the f32
/// scale and either Q8_1's scaled sum (Q4_1) or minus the sum of its quants times the offset
/// the weights are stored with (16 for Q5_0, 128 for Q8_0): the start of the block's sum.
#[derive(Clone, Copy)]
pub(super) struct Row<'a> {
    /// The row's quants, 32 per block.
    pub bytes: &'a [u8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub bias: &'a [i32],
}

/// A group of sixteen packed weight rows: per block, four chunks of nibbles (eight of bytes for
/// Q8_0), the sixteen f16 scales (and, for Q4_1, the sixteen f16 minimums), and for Q5_0 eight
/// masks of fifth bits.
#[derive(Clone, Copy)]
pub(super) struct Group<'a> {
    pub quants: &'a [Chunk],
    pub scales: &'a [u16],
    pub high: &'a [u64],
    pub blocks: usize,
}

/// The packed formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Q4_1,
    Q5_0,
    Q8_0,
    Q4_0,
    Q5_1,
    /// Q6_K's six-bit values as nibbles and two bit masks, with a scale per 16 values.
    Q6K,
}

/// The kinds' [`Kind::code`]s, for the const parameters of the packing and the kernels.
pub(super) mod code {
    use super::Kind;
    pub(in crate::model::qdot) const Q4_1: u8 = Kind::Q4_1.code();
    pub(in crate::model::qdot) const Q5_0: u8 = Kind::Q5_0.code();
    pub(in crate::model::qdot) const Q8_0: u8 = Kind::Q8_0.code();
    pub(in crate::model::qdot) const Q6K: u8 = Kind::Q6K.code();
    pub(in crate::model::qdot) const Q4_0: u8 = Kind::Q4_0.code();
    pub(in crate::model::qdot) const Q5_1: u8 = Kind::Q5_1.code();
}

impl Kind {
    /// The kind whose [`Kind::code`] is `code` (Q8_0 for any other).
    pub(super) const fn from_code(code: u8) -> Self {
        match code {
            0 => Self::Q4_1,
            1 => Self::Q5_0,
            3 => Self::Q6K,
            4 => Self::Q4_0,
            5 => Self::Q5_1,
            _ => Self::Q8_0,
        }
    }

    /// The kernel's const parameter.
    pub(super) const fn code(self) -> u8 {
        match self {
            Self::Q4_1 => 0,
            Self::Q5_0 => 1,
            Self::Q8_0 => 2,
            Self::Q6K => 3,
            Self::Q4_0 => 4,
            Self::Q5_1 => 5,
        }
    }

    /// The kind a matrix stored as `dtype` is packed as, and whether it is rewritten into that
    /// kind's format first (Q4_K, Q5_K); `None` for formats that are not packed.
    fn for_stored(dtype: GgmlDType) -> Option<(Self, bool)> {
        Some(match dtype {
            GgmlDType::Q4_1 => (Self::Q4_1, false),
            GgmlDType::Q5_0 => (Self::Q5_0, false),
            GgmlDType::Q8_0 => (Self::Q8_0, false),
            GgmlDType::Q6K => (Self::Q6K, false),
            GgmlDType::Q4_0 => (Self::Q4_0, false),
            GgmlDType::Q5_1 => (Self::Q5_1, false),
            GgmlDType::Q4K => (Self::Q4_1, true),
            GgmlDType::Q5K => (Self::Q5_1, true),
            _ => return None,
        })
    }

    /// Bytes of a block (Q6_K: of a 256-value super-block) in the file.
    fn w_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q8_0 => 34,
            Self::Q6K => Q6K_BYTES,
            Self::Q4_0 => 18,
            Self::Q5_1 => 24,
        }
    }

    /// The stored format.
    fn dtype(self) -> GgmlDType {
        match self {
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q6K => GgmlDType::Q6K,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q5_1 => GgmlDType::Q5_1,
        }
    }

    /// Values per block in the file.
    fn file_block(self) -> usize {
        match self {
            Self::Q6K => Q6K_VALUES,
            _ => BLOCK,
        }
    }

    /// Bit masks per group and block: Q5_0's fifth bits, Q6_K's fifth and sixth.
    pub(super) const fn masks(self) -> usize {
        match self {
            Self::Q5_0 | Self::Q5_1 => 8,
            Self::Q6K => 16,
            _ => 0,
        }
    }

    /// 64-byte chunks per group and block: 16 rows' nibbles (16 bytes each) or bytes.
    pub(super) const fn chunks(self) -> usize {
        match self {
            Self::Q8_0 => 8,
            _ => 4,
        }
    }

    /// f16 values per group and block: the sixteen scales, and Q4_1's sixteen minimums (Q6_K:
    /// sixteen scales of each half block).
    pub(super) const fn scales(self) -> usize {
        match self {
            Self::Q4_1 | Self::Q5_1 | Self::Q6K => 2 * ROWS,
            _ => ROWS,
        }
    }

    /// What the stored weights have added to be unsigned; the activations then carry this
    /// times their block sums. Q4_1's are unsigned already (its activations, Q8_1, carry
    /// their scaled sum for the minimum instead).
    fn acts(self) -> Acts {
        match self {
            Self::Q4_1 | Self::Q5_1 => Acts::Q8_1,
            Self::Q4_0 => Acts::Sums(8),
            Self::Q5_0 => Acts::Sums(16),
            Self::Q8_0 => Acts::Sums(128),
            Self::Q6K => Acts::HalfSums(32),
        }
    }
}

/// A matrix of one of the [`Kind`]s in groups of sixteen rows.
pub struct Packed {
    kind: Kind,
    n: usize,
    k: usize,
    blocks: usize,
    /// `[group][block][kind.chunks()]`.
    quants: Pages<Chunk>,
    /// `[group][block]`: sixteen f16 scales, then (Q4_1, Q5_1) sixteen f16 minimums or (Q6_K)
    /// the second half block's sixteen scales.
    scales: Pages<u16>,
    /// Q5_0, Q5_1: `[group][block][8]`, the fifth bits of chunk-word `t` (bit `4 * row + i` is
    /// value `4t + i` of that row); Q6_K: `[group][block][16]`, fifth bits then sixth.
    high: Pages<u64>,
}

/// One row of Q6_K super-blocks into lane `lane` of a group: per 32-value block, the values'
/// low four bits as nibbles (as Q4_1's), their fifth and sixth bits as masks (as Q5_0's fifth,
/// bits 4 and 5 at `[block][t]` and `[block][8 + t]`), and the two half blocks' scales
/// `d * sc` rounded to f16 (within 2^-11 of the product, relative).
fn pack_q6k_row(
    row: &[u8],
    lane: usize,
    quants: &mut [Chunk],
    scales: &mut [u16],
    high: &mut [u64],
) {
    let per_block = Kind::Q6K.scales();
    for (sb, block) in row.chunks_exact(Q6K_BYTES).enumerate() {
        let (ql, qh) = (&block[..128], &block[128..192]);
        let sc = &block[192..208];
        let d = half::f16::from_bits(u16::from_le_bytes([block[208], block[209]])).to_f32();
        // ggml's layout: two halves of 128 values, each from 64 bytes of low bits and 32 of
        // high bits.
        let mut q = [0u8; Q6K_VALUES];
        for half in 0..2 {
            let (ql, qh) = (
                &ql[64 * half..64 * half + 64],
                &qh[32 * half..32 * half + 32],
            );
            for l in 0..32 {
                let at = 128 * half + l;
                q[at] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
                q[at + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
                q[at + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                q[at + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
            }
        }
        for j in 0..Q6K_VALUES / BLOCK {
            let b = sb * (Q6K_VALUES / BLOCK) + j;
            let v = &q[BLOCK * j..BLOCK * (j + 1)];
            for p in 0..4 {
                for i in 0..4 {
                    let lo = v[4 * p + i] & 0x0F;
                    let hi = v[16 + 4 * p + i] & 0x0F;
                    quants[b * 4 + p].0[lane * 4 + i] = lo | (hi << 4);
                }
            }
            // Word t's fifth and sixth bits, four each, gathered before one write per mask.
            for t in 0..8 {
                let (mut fifth, mut sixth) = (0u64, 0u64);
                for i in 0..4 {
                    let x = u64::from(v[4 * t + i]);
                    fifth |= ((x >> 4) & 1) << i;
                    sixth |= ((x >> 5) & 1) << i;
                }
                high[b * 16 + t] |= fifth << (4 * lane);
                high[b * 16 + 8 + t] |= sixth << (4 * lane);
            }
            for h in 0..2 {
                let scale = f32::from(sc[2 * j + h] as i8) * d;
                scales[b * per_block + h * ROWS + lane] = half::f16::from_f32(scale).to_bits();
            }
        }
    }
}

/// One group's rows (up to sixteen, lane `i` from `rows[i]`) of 32-value blocks of format `K`
/// (a [`Kind::code`], not Q6_K), block by block: each block's chunks, scales and masks are
/// finished before the next, so the writes go out in order instead of sixteen passes over the
/// group's whole span. The format is a constant, so the offsets below are too.
fn fill_blocks<const K: u8>(
    rows: &[&[u8]],
    quants: &mut [Chunk],
    scales: &mut [u16],
    mut high: Option<&mut [u64]>,
) {
    let kind = Kind::from_code(K);
    let (w_bytes, chunks, per_block) = (kind.w_bytes(), kind.chunks(), kind.scales());
    // Where the quants start in a block; Q5_0's and Q5_1's fifth bits; the minimum's offset.
    let (qs_at, qh_at, min_at) = match kind {
        Kind::Q4_1 => (4, None, Some(2)),
        Kind::Q5_0 => (6, Some(2), None),
        Kind::Q8_0 => (2, None, None),
        Kind::Q4_0 => (2, None, None),
        Kind::Q5_1 => (8, Some(4), Some(2)),
        Kind::Q6K => return,
    };
    // Signed Q8_0 bytes to unsigned: plus 128, four at a time.
    let flip = if kind == Kind::Q8_0 {
        0x8080_8080u32
    } else {
        0
    };
    let blocks = quants.len() / chunks.max(1);
    let word = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    for b in 0..blocks {
        let q = &mut quants[b * chunks..(b + 1) * chunks];
        let sc = &mut scales[b * per_block..(b + 1) * per_block];
        for (lane, row) in rows.iter().enumerate() {
            let block = &row[b * w_bytes..(b + 1) * w_bytes];
            for (p, chunk) in q.iter_mut().enumerate() {
                let w = word(block, qs_at + 4 * p) ^ flip;
                chunk.0[lane * 4..lane * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            sc[lane] = u16::from_le_bytes([block[0], block[1]]);
            if let Some(m) = min_at {
                sc[ROWS + lane] = u16::from_le_bytes([block[m], block[m + 1]]);
            }
            if let (Some(i), Some(high)) = (qh_at, high.as_deref_mut()) {
                let qh = word(block, i);
                for t in 0..8 {
                    high[b * 8 + t] |= u64::from((qh >> (4 * t)) & 0xF) << (4 * lane);
                }
            }
        }
    }
}

/// The instruction sets the packed kernel comes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kernel {
    /// AVX-512 F, BW and VNNI: sixteen rows per vector (`vnni.rs`).
    Avx512,
    /// AVX2 with AVX-VNNI: eight rows per vector (`avx2.rs`).
    AvxVnni,
    /// AVX2 alone, `vpmaddubsw` for the integer sums (`avx2.rs`).
    Avx2,
}

/// The kernel this CPU runs best, checked once; `LLMGENIE_CPU_KERNEL` (`avxvnni`, `avx2` or
/// `none`) picks a lesser one, to measure it.
pub(super) fn kernel() -> Option<Kernel> {
    static KERNEL: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| {
        let avx2 = super::cpu_has!("avx2", "fma", "f16c");
        let vnni256 = avx2 && super::cpu_has!("avxvnni");
        let best = if super::cpu_has!("avx512f", "avx512bw", "avx512vnni") {
            Some(Kernel::Avx512)
        } else if vnni256 {
            Some(Kernel::AvxVnni)
        } else if avx2 {
            Some(Kernel::Avx2)
        } else {
            None
        };
        match std::env::var("LLMGENIE_CPU_KERNEL").as_deref() {
            Ok("avxvnni") if vnni256 => Some(Kernel::AvxVnni),
            Ok("avx2") if avx2 => Some(Kernel::Avx2),
            Ok("none") => None,
            _ => best,
        }
    })
}

/// Whether this CPU runs the packed kernel (checked once).
pub fn available() -> bool {
    kernel().is_some()
}

/// What the bytes of a packed matrix are, for packed-weight cache files
/// (`model::pack_cache`): bump it whenever packing a matrix gives other bytes (the test
/// `packing_gives_the_bytes_of_layout_1` pins them).
pub const LAYOUT: u32 = 1;

/// How an `n` x `k` matrix stored as `dtype` is packed: the kind, whether it is rewritten
/// first, blocks per row and the lengths of the three arrays; `None` for another type, a
/// width that is not whole blocks, or a CPU without the kernel.
fn layout(dtype: GgmlDType, n: usize, k: usize) -> Option<(Kind, bool, usize, [usize; 3])> {
    if !available() || n == 0 {
        return None;
    }
    let (kind, rewritten) = Kind::for_stored(dtype)?;
    if !k.is_multiple_of(dtype.block_size()) || !k.is_multiple_of(kind.file_block()) {
        return None;
    }
    let blocks = k / BLOCK;
    let per_group = n.div_ceil(ROWS).checked_mul(blocks)?;
    let lens = [kind.chunks(), kind.scales(), kind.masks()].map(|m| per_group.saturating_mul(m));
    Some((kind, rewritten, blocks, lens))
}

/// Packs a matrix from its stored bytes a piece of rows at a time, so that a loader needs no
/// buffer the size of the whole matrix (a 7B model's vocabulary projection is hundreds of
/// megabytes): `Packer::new`, then [`Packer::rows`] for each piece in any order, then
/// [`Packer::finish`].
pub struct Packer {
    packed: Packed,
    /// The stored format, when it is rewritten into the packed one first (Q4_K, Q5_K).
    rewrite_from: Option<GgmlDType>,
    /// The rewritten bytes of the last piece, reused.
    scratch: Vec<u8>,
}

impl Packer {
    /// A packer for an `n` x `k` matrix stored as `dtype`, or `None` for another type, a width
    /// that is not whole blocks, or a CPU without the kernel.
    pub fn new(dtype: GgmlDType, n: usize, k: usize) -> Option<Self> {
        let (kind, rewritten, blocks, [q, s, h]) = layout(dtype, n, k)?;
        Some(Self {
            packed: Packed {
                kind,
                n,
                k,
                blocks,
                quants: Pages::zeroed(q)?,
                scales: Pages::zeroed(s)?,
                high: Pages::zeroed(h)?,
            },
            rewrite_from: rewritten.then_some(dtype),
            scratch: Vec::new(),
        })
    }

    /// Rows of the matrix.
    pub fn n(&self) -> usize {
        self.packed.n
    }

    /// Bytes of one stored row.
    pub fn row_bytes(&self) -> usize {
        let dtype = self
            .rewrite_from
            .unwrap_or_else(|| self.packed.kind.dtype());
        self.packed.k / dtype.block_size() * dtype.type_size()
    }

    /// Rows `first..` from their stored bytes `data` (whole rows; `first` a multiple of 16, and
    /// so is the count unless the piece ends the matrix). `None` when the piece does not fit,
    /// or when a Q4_K/Q5_K scale overflows the rewritten format's f16.
    pub fn rows(&mut self, first: usize, data: &[u8]) -> Option<()> {
        let row_bytes = self.row_bytes();
        let n = self.packed.n;
        if row_bytes == 0 || !data.len().is_multiple_of(row_bytes) || !first.is_multiple_of(ROWS) {
            return None;
        }
        let count = data.len() / row_bytes;
        if count == 0 || first + count > n || (first + count < n && !count.is_multiple_of(ROWS)) {
            return None;
        }
        let data = match self.rewrite_from {
            Some(dtype) => {
                super::kquant::rewrite(dtype, self.packed.k, data, &mut self.scratch)?;
                &self.scratch[..]
            }
            None => data,
        };
        self.packed.fill(first, count, data);
        Some(())
    }

    /// The packed matrix. Rows no piece covered are zero.
    pub fn finish(self) -> Packed {
        self.packed
    }
}

impl Packed {
    /// `w` packed, or `None` for another type, another device, a width that is not whole
    /// blocks, or a CPU without the kernel.
    ///
    /// # Errors
    /// candle cannot hand out the tensor's bytes.
    pub fn new(w: &QTensor) -> candle_core::Result<Option<Self>> {
        if !w.device().is_cpu() || !Self::takes(w.dtype()) {
            return Ok(None);
        }
        let (n, k) = w.shape().dims2()?;
        Ok(Self::from_bytes(w.dtype(), n, k, &w.data()?))
    }

    /// Whether this CPU packs matrices of `dtype`.
    pub fn takes(dtype: GgmlDType) -> bool {
        available() && Kind::for_stored(dtype).is_some()
    }

    /// An `n` x `k` matrix of `dtype` packed from its stored bytes (as a GGUF file holds them),
    /// or `None` for another type, a width that is not whole blocks, bytes that do not fit, or
    /// a CPU without the kernel.
    pub fn from_bytes(dtype: GgmlDType, n: usize, k: usize, data: &[u8]) -> Option<Self> {
        let mut packer = Packer::new(dtype, n, k)?;
        if data.len() != n * packer.row_bytes() {
            return None;
        }
        packer.rows(0, data)?;
        Some(packer.finish())
    }

    /// An `n` x `k` matrix of `dtype` packed earlier, whose [`Packed::arrays`] were saved:
    /// `map(bytes)` gives each of them that is not empty, in their order. `None` where a
    /// packer would not take the matrix or a mapping is missing or short.
    pub fn mapped(
        dtype: GgmlDType,
        n: usize,
        k: usize,
        mut map: impl FnMut(usize) -> Option<Mmap>,
    ) -> Option<Self> {
        let (kind, _, blocks, [q, s, h]) = layout(dtype, n, k)?;
        let mut take = |bytes: Option<usize>| match bytes? {
            0 => Some(None),
            bytes => map(bytes).map(Some),
        };
        let quants = Pages::read_only(take(Pages::<Chunk>::bytes(q))?, q)?;
        let scales = Pages::read_only(take(Pages::<u16>::bytes(s))?, s)?;
        let high = Pages::read_only(take(Pages::<u64>::bytes(h))?, h)?;
        Some(Self {
            kind,
            n,
            k,
            blocks,
            quants,
            scales,
            high,
        })
    }

    /// Rows and columns.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The bytes of the packed arrays that are not empty, in the order [`Packed::mapped`] takes
    /// them back.
    pub fn arrays(&self) -> Vec<&[u8]> {
        [
            self.quants.as_bytes(),
            self.scales.as_bytes(),
            self.high.as_bytes(),
        ]
        .into_iter()
        .filter(|a| !a.is_empty())
        .collect()
    }

    /// Rows `first..first + count` from their stored bytes `data` (the packed format's; the
    /// caller checked the sizes), into the groups they cover, on the worker pool (a vocabulary
    /// of 262,144 rows is 16,384 groups).
    fn fill(&mut self, first: usize, count: usize, data: &[u8]) {
        let (kind, blocks) = (self.kind, self.blocks);
        let (chunks, per_block, masks) = (kind.chunks(), kind.scales(), kind.masks());
        let w_bytes = kind.w_bytes();
        let file_blocks = self.k / kind.file_block();
        let row_bytes = file_blocks * w_bytes;
        let end = first + count;
        let groups = first / ROWS..end.div_ceil(ROWS);
        // Each group's share of the three arrays.
        let quants = &mut self.quants[groups.start * blocks * chunks..groups.end * blocks * chunks];
        let scales =
            &mut self.scales[groups.start * blocks * per_block..groups.end * blocks * per_block];
        let mut high = self.high[groups.start * blocks * masks..groups.end * blocks * masks]
            .chunks_mut((blocks * masks).max(1));
        let slots: Vec<_> = quants
            .chunks_mut(blocks * chunks)
            .zip(scales.chunks_mut(blocks * per_block))
            .map(|(q, s)| (q, s, high.next()))
            .collect();
        super::super::par_each(slots, |i, (quants, scales, high)| {
            let g = groups.start + i;
            let rows: Vec<&[u8]> = (g * ROWS..end.min((g + 1) * ROWS))
                .map(|row| &data[(row - first) * row_bytes..(row - first + 1) * row_bytes])
                .collect();
            use code::{Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
            match kind {
                Kind::Q6K => {
                    if let Some(high) = high.as_deref_mut() {
                        for (lane, row) in rows.iter().enumerate() {
                            pack_q6k_row(row, lane, quants, scales, high);
                        }
                    }
                }
                Kind::Q4_1 => fill_blocks::<Q4_1>(&rows, quants, scales, high.as_deref_mut()),
                Kind::Q5_0 => fill_blocks::<Q5_0>(&rows, quants, scales, high.as_deref_mut()),
                Kind::Q8_0 => fill_blocks::<Q8_0>(&rows, quants, scales, high.as_deref_mut()),
                Kind::Q4_0 => fill_blocks::<Q4_0>(&rows, quants, scales, high.as_deref_mut()),
                Kind::Q5_1 => fill_blocks::<Q5_1>(&rows, quants, scales, high.as_deref_mut()),
            }
        });
    }

    /// The rows `ids` dequantized, `(ids.len(), k)` (an embedding lookup), with candle's
    /// arithmetic: the same values as its `dequantize`.
    ///
    /// # Errors
    /// An id past the last row, or a candle failure building the tensor.
    pub fn rows(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let (k, blocks, chunks, per_block) =
            (self.k, self.blocks, self.kind.chunks(), self.kind.scales());
        let mut out = vec![0f32; ids.len() * k];
        for (&id, out) in ids.iter().zip(out.chunks_exact_mut(k.max(1))) {
            let r = id as usize;
            if r >= self.n {
                candle_core::bail!("row {r} of a {}-row matrix", self.n);
            }
            let (g, lane) = (r / ROWS, r % ROWS);
            for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
                let gb = g * blocks + b;
                let half =
                    |i: usize| half::f16::from_bits(self.scales[gb * per_block + i]).to_f32();
                let d = half(lane);
                // Stored byte of value v (Q8_0), or the byte holding its nibble.
                let byte = |v: usize| self.quants[gb * chunks + v / 4].0[lane * 4 + v % 4];
                let nibble = |v: usize| {
                    if v < 16 {
                        byte(v) & 0x0F
                    } else {
                        byte(v - 16) >> 4
                    }
                };
                // Bit `v` of the group-block's mask `m` (fifth bits; Q6_K's sixth at `m = 8`).
                let bit = |m: usize, v: usize| {
                    ((self.high[gb * self.kind.masks() + m + v / 4] >> (4 * lane + v % 4)) & 1)
                        as u8
                };
                for (v, o) in out.iter_mut().enumerate() {
                    *o = match self.kind {
                        Kind::Q8_0 => f32::from((byte(v) ^ 0x80) as i8) * d,
                        Kind::Q4_1 => f32::from(nibble(v)) * d + half(ROWS + lane),
                        Kind::Q5_0 => f32::from((nibble(v) | bit(0, v) << 4) as i8 - 16) * d,
                        Kind::Q4_0 => f32::from(nibble(v) as i8 - 8) * d,
                        Kind::Q5_1 => f32::from(nibble(v) | bit(0, v) << 4) * d + half(ROWS + lane),
                        Kind::Q6K => {
                            let q = nibble(v) | bit(0, v) << 4 | bit(8, v) << 5;
                            let d = if v < 16 { d } else { half(ROWS + lane) };
                            f32::from(q as i8 - 32) * d
                        }
                    };
                }
            }
        }
        Tensor::from_vec(out, (ids.len(), k), &Device::Cpu)
    }

    /// Bytes of the packed weights.
    fn bytes(&self) -> usize {
        self.quants.len() * std::mem::size_of::<Chunk>()
            + self.scales.len() * 2
            + self.high.len() * 8
    }

    /// Whether `other` has this matrix's format and input width, so that both can share a
    /// [`Packed::matmul_many`].
    pub fn same_format(&self, other: &Self) -> bool {
        self.kind == other.kind && self.k == other.k
    }

    /// `x @ w^T` for `x` `(..., k)` on the CPU.
    ///
    /// # Errors
    /// `x` is not `k` wide, or a candle failure quantizing it or building the result.
    pub fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut ys = Self::matmul_many(&[self], x)?;
        ys.pop()
            .ok_or_else(|| candle_core::Error::Msg("packed matmul: no result".into()))
    }

    /// `x @ w^T` for each of `mats` (all of one format and input width), the decode steps' work
    /// shared out in one dispatch: the Q, K and V projections (or gate and up) of a step keep
    /// both threads busy together instead of meeting at a barrier after each.
    ///
    /// # Errors
    /// No matrices, formats or widths that differ, `x` of another width, or a candle failure
    /// quantizing it or building the results.
    pub fn matmul_many(mats: &[&Self], x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let (k, kind) = Self::common(mats)?;
        let width = x.dim(candle_core::D::Minus1)?;
        if width != k {
            candle_core::bail!("packed matmul: input is {width} wide, weights {k}");
        }
        let m = x.elem_count() / k;
        let xq = super::acts::quantize(x, m, k, kind.acts())?;
        let ys = Self::matmul_quantized(mats, &xq, m);
        let mut out = Vec::with_capacity(mats.len());
        for (p, y) in mats.iter().zip(ys) {
            let mut shape = x.dims().to_vec();
            if let Some(last) = shape.last_mut() {
                *last = p.n;
            }
            out.push(Tensor::from_vec(y, (m, p.n), &Device::Cpu)?.reshape(shape)?);
        }
        Ok(out)
    }

    /// [`Packed::matmul_many`] for `m` rows of values at hand: one result, `(m, n)` row-major,
    /// per matrix.
    ///
    /// # Errors
    /// As [`Packed::matmul_many`].
    pub fn matmul_many_values(
        mats: &[&Self],
        x: &[f32],
        m: usize,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let (k, kind) = Self::common(mats)?;
        let xq = super::acts::quantize_values(x, m, k, kind.acts())?;
        Ok(Self::matmul_quantized(mats, &xq, m))
    }

    /// A gated MLP's first half for `m` rows of values at hand: `combine(g, u, out)` over the
    /// results of `gate` and `up` (`(m, n)` row-major). For a decode step's rows it is one
    /// dispatch: each work item computes both matrices' results for its weight rows and
    /// combines them while they are in its cache, so there is no pass over the two results
    /// afterwards (more rows take the two matmuls, then `combine`). The same bits as
    /// `combine` over [`Packed::matmul_many_values`]' two results, when `combine` computes each
    /// element from its own two inputs alone.
    ///
    /// # Errors
    /// The matrices differ in format, width or height.
    pub fn gated_values(
        gate: &Self,
        up: &Self,
        x: &[f32],
        m: usize,
        combine: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
    ) -> candle_core::Result<Vec<f32>> {
        let (k, kind) = Self::common(&[gate, up])?;
        if gate.n != up.n {
            candle_core::bail!("packed gated matmul: gate and up differ in height");
        }
        let xq = super::acts::quantize_values(x, m, k, kind.acts())?;
        let n = gate.n;
        if m > PROMPT_ROWS {
            // Not a decode step's rows (the decode steps, this function's use, have at most
            // eight): the two matmuls, then one pass over their results.
            let [g, u]: [Vec<f32>; 2] = Self::matmul_quantized(&[gate, up], &xq, m)
                .try_into()
                .map_err(|_| candle_core::Error::Msg("packed gated matmul: two results".into()))?;
            let mut out = vec![0f32; m * n];
            combine(&g, &u, &mut out);
            return Ok(out);
        }
        let all = gate.row_views(&xq, m);
        let mut out: Box<[MaybeUninit<f32>]> = Box::new_uninit_slice(m * n);
        let (mut spans, mut pieces) = (Vec::new(), Vec::new());
        column_items(0, &mut out, n, &mut spans, &mut pieces);
        let items: Vec<_> = spans.into_iter().zip(pieces.chunks_mut(m.max(1))).collect();
        super::super::par_each(items, |_, ((_, span), rows)| {
            let mut gated = [[0f32; ROWS]; PROMPT_ROWS];
            for g in span.clone() {
                let col = (g - span.start) * ROWS;
                gate.run(g, &all, 0..m, |r, v, _| gated[r] = *v);
                up.run(g, &all, 0..m, |r, v, cols| {
                    let mut o = [0f32; ROWS];
                    combine(&gated[r][..cols], &v[..cols], &mut o[..cols]);
                    if let Some(out) = rows.get_mut(r) {
                        put_cols(&mut out[col..], &o, cols);
                    }
                });
            }
        });
        // SAFETY: every element was written: each item writes, for every row, the `cols`
        // results of each of its groups, which cover that row's piece; the pieces cover the
        // rows. A panic in any item reaches this thread before this point.
        Ok(unsafe { out.assume_init() }.into_vec())
    }

    /// Whether `other` has as many rows as this matrix.
    pub fn same_height(&self, other: &Self) -> bool {
        self.n == other.n
    }

    /// The input width and format that `mats` share.
    fn common(mats: &[&Self]) -> candle_core::Result<(usize, Kind)> {
        let Some(first) = mats.first() else {
            candle_core::bail!("packed matmul: no matrices")
        };
        if mats.iter().any(|p| !p.same_format(first)) {
            candle_core::bail!("packed matmul: matrices of different formats or widths");
        }
        Ok((first.k, first.kind))
    }

    /// The views of `m` quantized rows that the kernels take, made once per matmul (the kernel
    /// calls take them per group of weights).
    fn row_views<'a>(&self, xq: &'a super::acts::Quantized, m: usize) -> Vec<Row<'a>> {
        let (k, blocks) = (self.k, self.blocks);
        let per_block = self.kind.acts().sums_per_block();
        (0..m)
            .map(|r| {
                let span = r * blocks..(r + 1) * blocks;
                Row {
                    bytes: &xq.q[r * k..(r + 1) * k],
                    d: &xq.d[span.clone()],
                    s: if xq.s.is_empty() {
                        &[]
                    } else {
                        &xq.s[span.clone()]
                    },
                    bias: if xq.bias.is_empty() {
                        &[]
                    } else {
                        &xq.bias[span.start * per_block..span.end * per_block]
                    },
                }
            })
            .collect()
    }

    /// The matrices against `m` quantized rows (of the width and format checked by the caller).
    fn matmul_quantized(mats: &[&Self], xq: &super::acts::Quantized, m: usize) -> Vec<Vec<f32>> {
        let all = mats[0].row_views(xq, m);
        // The results start uninitialized: zeroing them here would cost a pass over them on
        // this thread while the workers wait, and make each worker's writes fetch lines this
        // thread's cache holds (about 3% of a step of eight SmolLM2 sequences).
        let mut ys: Vec<Box<[MaybeUninit<f32>]>> = mats
            .iter()
            .map(|p| Box::new_uninit_slice(m * p.n))
            .collect();
        // A matrix larger than a core's cache would be read from memory again by every span of
        // rows (eight times for a 64-token chunk): those (a 7B model's) are split by weight
        // rows for prompts too, each weight read once per chunk.
        let cached = mats.iter().all(|p| p.bytes() <= CACHED_BYTES);
        if m >= PROMPT_ROWS && cached {
            // Prompts: work items are spans of rows, each writing its own rows of the result;
            // a span reads all the weights, which stay in cache between its tiles.
            let span = (m / 8).next_multiple_of(TILE).clamp(TILE, 64);
            for (p, y) in mats.iter().zip(ys.iter_mut()) {
                let n = p.n;
                super::super::par_fill(&mut y[..], span * n, |i, out| {
                    let rows = i * span..((i + 1) * span).min(m);
                    let base = rows.start;
                    for g in 0..n.div_ceil(ROWS) {
                        p.run(g, &all, rows.clone(), |r, v, cols| {
                            put_cols(&mut out[(r - base) * n + g * ROWS..], v, cols);
                        });
                    }
                });
            }
        } else {
            // Decode steps (and prompts through large matrices): work items are spans of
            // groups of weight rows (up to sixteen per matrix), each writing its columns of
            // every row of its matrix's result, a tile of rows at a time against all of its
            // groups (the tile's activations stay in cache, and so do the span's weights).
            // Item `i`'s `m` row pieces are `pieces[i * m..(i + 1) * m]`, handed to it whole
            // (one lock per item, none per row).
            let (mut spans, mut pieces) = (Vec::new(), Vec::new());
            for (j, (p, y)) in mats.iter().zip(ys.iter_mut()).enumerate() {
                column_items(j, y, p.n, &mut spans, &mut pieces);
            }
            let items: Vec<_> = spans.into_iter().zip(pieces.chunks_mut(m.max(1))).collect();
            super::super::par_each(items, |_, ((j, span), rows)| {
                for tile in (0..m).step_by(ROW_TILE) {
                    for g in span.clone() {
                        let col = (g - span.start) * ROWS;
                        let tile = tile..m.min(tile + ROW_TILE);
                        mats[*j].run(g, &all, tile, |r, v, cols| {
                            if let Some(out) = rows.get_mut(r) {
                                put_cols(&mut out[col..], v, cols);
                            }
                        });
                    }
                }
            });
        }
        ys.into_iter()
            // SAFETY: every element was written above. Prompts: each span of rows gets every
            // group's `cols` results (`min(16, n - 16 g)`) for each of its rows, which covers
            // its `rows x n` piece. Decode steps: each item writes, for every row, its groups'
            // columns, which cover that row's piece; the pieces cover the rows. A panic in any
            // work item reaches this thread (the pool passes it on) before this point.
            .map(|y| unsafe { y.assume_init() }.into_vec())
            .collect()
    }

    /// Activation rows `rows[span]` against group `g`, in tiles of eight, four and one:
    /// `put(r, results, cols)` receives row `r`'s results for the group's `cols` rows.
    fn run(
        &self,
        g: usize,
        rows: &[Row<'_>],
        span: std::ops::Range<usize>,
        mut put: impl FnMut(usize, &[f32; ROWS], usize),
    ) {
        let group = self.group(g);
        let cols = ROWS.min(self.n - g * ROWS);
        let mut r = span.start;
        // The tiles are the callers' rows in place: a kernel call copies none of them.
        while let Some(tile) = rows
            .get(r..span.end)
            .and_then(|t| t.first_chunk::<{ 2 * TILE }>())
        {
            for (i, v) in self.tile(group, tile).iter().enumerate() {
                put(r + i, v, cols);
            }
            r += 2 * TILE;
        }
        while let Some(tile) = rows.get(r..span.end).and_then(|t| t.first_chunk::<TILE>()) {
            for (i, v) in self.tile(group, tile).iter().enumerate() {
                put(r + i, v, cols);
            }
            r += TILE;
        }
        for (r, one) in rows.iter().enumerate().take(span.end).skip(r) {
            let [v] = self.tile(group, std::array::from_ref(one));
            put(r, &v, cols);
        }
    }

    /// Group `g`'s weights.
    fn group(&self, g: usize) -> Group<'_> {
        let (blocks, chunks, per_block) = (self.blocks, self.kind.chunks(), self.kind.scales());
        Group {
            quants: &self.quants[g * blocks * chunks..(g + 1) * blocks * chunks],
            scales: &self.scales[g * blocks * per_block..(g + 1) * blocks * per_block],
            high: {
                let masks = self.kind.masks();
                &self.high[g * blocks * masks..(g + 1) * blocks * masks]
            },
            blocks,
        }
    }

    /// The kernel for one group and `C` rows, the lengths checked first.
    fn tile<const C: usize>(&self, g: Group<'_>, rows: &[Row<'_>; C]) -> [[f32; ROWS]; C] {
        let (b, kind) = (g.blocks, self.kind);
        assert!(g.quants.len() == b * kind.chunks() && g.scales.len() == b * kind.scales());
        assert!(g.high.len() == b * kind.masks());
        assert!(rows.iter().all(|r| r.bytes.len() == b * BLOCK
            && r.d.len() == b
            && (if kind.acts() == Acts::Q8_1 {
                r.s.len()
            } else {
                r.bias.len()
            }) == b * kind.acts().sums_per_block().max(1)));
        let kernel = kernel();
        assert!(kernel.is_some());
        Self::tile_on(kernel, g, rows, kind)
    }

    /// [`Packed::tile`] on `kernel`, which the caller checked this CPU has (and that it takes
    /// this format).
    fn tile_on<const C: usize>(
        kernel: Option<Kernel>,
        g: Group<'_>,
        rows: &[Row<'_>; C],
        kind: Kind,
    ) -> [[f32; ROWS]; C] {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked that the CPU has the kernel's instruction sets (a `Packed`
        // exists only where one runs), and `tile` the lengths the kernel reads.
        unsafe {
            macro_rules! on {
                ($($f:tt)*) => {{
                    use code::{Q4_0, Q4_1, Q5_0, Q5_1, Q6K, Q8_0};
                    match kind {
                        Kind::Q4_1 => $($f)*::<C, Q4_1>(g, rows),
                        Kind::Q5_0 => $($f)*::<C, Q5_0>(g, rows),
                        Kind::Q8_0 => $($f)*::<C, Q8_0>(g, rows),
                        Kind::Q6K => $($f)*::<C, Q6K>(g, rows),
                        Kind::Q4_0 => $($f)*::<C, Q4_0>(g, rows),
                        Kind::Q5_1 => $($f)*::<C, Q5_1>(g, rows),
                    }
                }};
            }
            match kernel {
                Some(Kernel::Avx512) => on!(super::vnni::tile),
                Some(Kernel::AvxVnni) => on!(super::avx2::tile_vnni),
                Some(Kernel::Avx2) => on!(super::avx2::tile_avx2),
                None => unreachable!("no packed matrices without a kernel"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no packed matrices off x86")
    }
}

/// The decode path's work items for result `owner`, `m` rows of `n` columns in `y`: spans of up
/// to a sixteenth of its groups of weight rows (so that the pool's threads share them out
/// evenly), pushed as `(owner, span)` to `spans`, and each item's `m` row pieces, in row order,
/// to `pieces`.
fn column_items<'a>(
    owner: usize,
    y: &'a mut [MaybeUninit<f32>],
    n: usize,
    spans: &mut Vec<(usize, std::ops::Range<usize>)>,
    pieces: &mut Vec<&'a mut [MaybeUninit<f32>]>,
) {
    let groups = n.div_ceil(ROWS);
    let per = groups.div_ceil(16);
    let mut rows: Vec<_> = y.chunks_mut(n).map(|r| r.chunks_mut(per * ROWS)).collect();
    for first in (0..groups).step_by(per) {
        pieces.extend(rows.iter_mut().filter_map(Iterator::next));
        spans.push((owner, first..groups.min(first + per)));
    }
}

/// The first `cols` of a group's results into `out` (a whole group's as one fixed-size copy,
/// not a call to `memcpy`).
#[inline(always)]
fn put_cols(out: &mut [MaybeUninit<f32>], v: &[f32; ROWS], cols: usize) {
    if let Some(whole) = out.first_chunk_mut::<ROWS>().filter(|_| cols == ROWS) {
        *whole = v.map(MaybeUninit::new);
    } else {
        for (o, &x) in out[..cols].iter_mut().zip(v) {
            o.write(x);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::Module;

    /// Every stored type that is packed.
    const PACKED_TYPES: [GgmlDType; 8] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q6K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
    ];

    /// The kernels' arithmetic, one block after another from the files' bytes: per block the
    /// exact integer sum of the weights' and the activations' quants, then (Q4_1) `m_w * s_x`
    /// and `sumi * (d_w * d_x)` added by fused multiply-adds. Activations are candle's Q8_1
    /// blocks for Q4_1 and its Q8_0 blocks for the others.
    fn scalar(dtype: GgmlDType, w: &QTensor, x: &Tensor) -> Vec<f32> {
        let (n, k) = w.shape().dims2().unwrap();
        let with_min = dtype == GgmlDType::Q4_1;
        let acts = if with_min {
            GgmlDType::Q8_1
        } else {
            GgmlDType::Q8_0
        };
        let xq = QTensor::quantize(&x.reshape(((), k)).unwrap(), acts).unwrap();
        let (wb, xb) = (w.data().unwrap(), xq.data().unwrap());
        let blocks = k / BLOCK;
        let (w_bytes, x_bytes) = (dtype.type_size(), acts.type_size());
        let m = xb.len() / (blocks * x_bytes);
        let f16 = |b: &[u8]| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
        // A weight block's 32 values, as the signed integers its scale multiplies.
        let values = |b: &[u8]| -> [i32; 32] {
            std::array::from_fn(|i| match dtype {
                GgmlDType::Q4_1 => i32::from(if i < 16 {
                    b[4 + i] & 15
                } else {
                    b[4 + i - 16] >> 4
                }),
                GgmlDType::Q5_0 => {
                    let high = u32::from_le_bytes([b[2], b[3], b[4], b[5]]) >> i & 1;
                    let low = if i < 16 {
                        b[6 + i] & 15
                    } else {
                        b[6 + i - 16] >> 4
                    };
                    i32::from(low) + 16 * high as i32 - 16
                }
                _ => i32::from(b[2 + i] as i8),
            })
        };
        let mut out = Vec::with_capacity(m * n);
        for r in 0..m {
            for j in 0..n {
                let mut acc = 0f32;
                for b in 0..blocks {
                    let wb = &wb[(j * blocks + b) * w_bytes..(j * blocks + b + 1) * w_bytes];
                    let xb = &xb[(r * blocks + b) * x_bytes..(r * blocks + b + 1) * x_bytes];
                    let xs = &xb[if with_min { 4 } else { 2 }..];
                    let sumi: i32 = values(wb)
                        .iter()
                        .zip(xs)
                        .map(|(&w, &x)| w * i32::from(x as i8))
                        .sum();
                    if with_min {
                        acc = f16(&wb[2..]).mul_add(f16(&xb[2..]), acc);
                    }
                    acc = (sumi as f32).mul_add(f16(wb) * f16(xb), acc);
                }
                out.push(acc);
            }
        }
        out
    }

    /// Bit for bit the kernels' arithmetic as written out in [`scalar`], and within float
    /// rounding of candle's own matmul: one row, tiles of four with rows left over, a
    /// prompt-sized batch, and row counts that leave the last group part empty.
    #[test]
    fn matches_the_scalar_arithmetic_bit_for_bit_and_candle_to_rounding() {
        let dev = Device::Cpu;
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0] {
            for (n, k, m) in [
                (64usize, 576usize, 1usize),
                (40, 640, 7),
                (16, 64, 4),
                (21, 160, 2),
                (48, 96, 37),
                (33, 64, 130),
                (300, 64, 1),
                (300, 64, 3),
            ] {
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let Some(packed) = Packed::new(&q).unwrap() else {
                    assert!(!available());
                    return;
                };
                let x = Tensor::randn(0f32, 1.0, (m, 1, k), &dev).unwrap();
                let want = scalar(dtype, &q, &x);
                let candle: Vec<f32> = QMatMul::from_qtensor(q)
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
                for (a, b) in got.iter().zip(&candle) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
                }
            }
        }
    }

    /// What every packed format makes of fixed bytes, as one digest: cache files written with
    /// one [`LAYOUT`] are mapped by later builds, so a change to the packing must change it.
    #[test]
    fn packing_gives_the_bytes_of_layout_1() {
        use sha2::{Digest, Sha256};
        if !available() {
            return;
        }
        let (n, k) = (40, 256);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut digest = Sha256::new();
        for dtype in PACKED_TYPES {
            let size = dtype.type_size();
            let mut data: Vec<u8> = (0..n * k / dtype.block_size() * size)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 24) as u8
                })
                .collect();
            // Finite scales (0.01 as f16): where the super-block's d (and K's dmin) are.
            for block in data.chunks_exact_mut(size) {
                let at = if dtype == GgmlDType::Q6K { size - 2 } else { 0 };
                block[at..at + 2].copy_from_slice(&0x211Fu16.to_le_bytes());
                if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K) {
                    block[2..4].copy_from_slice(&0x211Fu16.to_le_bytes());
                }
            }
            let p = Packed::from_bytes(dtype, n, k, &data).unwrap();
            for a in p.arrays() {
                digest.update(a);
            }
        }
        let got: String = digest
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            (LAYOUT, got.as_str()),
            (
                1,
                "86f1624e35933630e81f039c3e687d4eebfe176fa6b58803780537c82a1953da"
            ),
            "the packed bytes changed: bump LAYOUT (cache files of the old layout must not be \
             mapped) and put the new digest here"
        );
    }

    /// An `n x k` matrix of random weights in `dtype`, packed (`None` without the kernel).
    fn pack(n: usize, k: usize, dtype: GgmlDType) -> Option<Packed> {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        Packed::new(&QTensor::quantize(&w, dtype).unwrap()).unwrap()
    }

    /// Several matrices in one dispatch give each matrix's own result, bit for bit, for decode
    /// row counts and a prompt's; matrices of another format or width are refused.
    #[test]
    fn many_matrices_at_once_match_one_at_a_time() {
        let dev = Device::Cpu;
        let (Some(a), Some(b), Some(c)) = (
            pack(576, 128, GgmlDType::Q4_1),
            pack(40, 128, GgmlDType::Q4_1),
            pack(200, 128, GgmlDType::Q4_1),
        ) else {
            assert!(!available());
            return;
        };
        for m in [1usize, 3, 8, 40] {
            let x = Tensor::randn(0f32, 1.0, (m, 1, 128), &dev).unwrap();
            let many = Packed::matmul_many(&[&a, &b, &c], &x).unwrap();
            for (p, got) in [&a, &b, &c].iter().zip(&many) {
                let want = p.matmul(&x).unwrap();
                assert_eq!(got.dims(), want.dims());
                let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(bits(got), bits(&want), "{m} rows");
            }
        }
        let other = pack(32, 128, GgmlDType::Q8_0).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 128), &dev).unwrap();
        assert!(Packed::matmul_many(&[&a, &other], &x).is_err());
        assert!(Packed::matmul_many(&[], &x).is_err());
    }

    /// The gate/up matmuls with their combination in one dispatch give, bit for bit, the
    /// combination of the two results (decode row counts, a prompt's, and heights that leave
    /// the last group part empty); mismatched matrices are refused.
    #[test]
    fn gated_matmuls_combine_the_two_results() {
        let dev = Device::Cpu;
        // Something that mixes the two the way an activation would, per element.
        let combine = |g: &[f32], u: &[f32], out: &mut [f32]| {
            for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        };
        for (n, dtype) in [(1536usize, GgmlDType::Q4_1), (200, GgmlDType::Q8_0)] {
            let (Some(gate), Some(up)) = (pack(n, 256, dtype), pack(n, 256, dtype)) else {
                assert!(!available());
                return;
            };
            for m in [1usize, 3, 8, 40] {
                let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, 256), &dev)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let [g, u]: [Vec<f32>; 2] = Packed::matmul_many_values(&[&gate, &up], &x, m)
                    .unwrap()
                    .try_into()
                    .unwrap();
                let mut want = vec![0f32; m * n];
                combine(&g, &u, &mut want);
                let got = Packed::gated_values(&gate, &up, &x, m, combine).unwrap();
                assert_eq!(got.len(), m * n);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{dtype:?}, {n} rows of weights, {m} rows"
                );
            }
        }
        let (a, b) = (
            pack(64, 256, GgmlDType::Q4_1),
            pack(48, 256, GgmlDType::Q4_1),
        );
        let (Some(a), Some(b)) = (a, b) else { return };
        assert!(Packed::gated_values(&a, &b, &[0.0; 256], 1, combine).is_err());
        let other = pack(64, 256, GgmlDType::Q8_0).unwrap();
        assert!(Packed::gated_values(&a, &other, &[0.0; 256], 1, combine).is_err());
    }

    /// Formats without a bit-exact candle counterpart (Q6_K, Q4_0, Q5_1, and Q4_K and Q5_K as
    /// rewritten): rows read back are candle's dequantized rows (within the f16 rounding of
    /// the k-quants' sub-block scales), and products are those rows against the rounded
    /// activations, to float rounding (Q8_1 activations: also the f16 rounding of their
    /// scaled sums), for decode and prompt row counts.
    #[test]
    fn other_formats_match_their_dequantized_weights() {
        let dev = Device::Cpu;
        let (n, k) = (40usize, 512usize);
        for (dtype, row_tol, tol) in [
            (GgmlDType::Q6K, 5e-4, 1e-5),
            (GgmlDType::Q4_0, 0.0, 1e-5),
            (GgmlDType::Q5_1, 0.0, 1e-3),
            (GgmlDType::Q4K, 1e-3, 1e-3),
            (GgmlDType::Q5K, 1e-3, 1e-3),
        ] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let Some(packed) = Packed::new(&q).unwrap() else {
                assert!(!available());
                return;
            };
            let ids: Vec<u32> = (0..n as u32).collect();
            let flat = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
            let rows = flat(packed.rows(&ids).unwrap());
            let want = flat(q.dequantize(&dev).unwrap());
            // The rounding of a scale (and a minimum) is relative to the block's terms, not to
            // the value they add up to: bounded by a share of the largest weight.
            let range = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (a, b) in rows.iter().zip(&want) {
                assert!((a - b).abs() <= row_tol * range, "{dtype:?}: {a} vs {b}");
            }
            for m in [1usize, 3, 8, 37] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                let xq = QTensor::quantize(&x, GgmlDType::Q8_0).unwrap();
                let xs = flat(xq.dequantize(&dev).unwrap());
                let got = flat(packed.matmul(&x).unwrap());
                for r in 0..m {
                    for j in 0..n {
                        let (wr, xr) = (&rows[j * k..(j + 1) * k], &xs[r * k..(r + 1) * k]);
                        let pairs = || {
                            wr.iter()
                                .zip(xr)
                                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        };
                        let exact: f64 = pairs().sum();
                        let size: f64 = pairs().map(f64::abs).sum();
                        let g = f64::from(got[r * n + j]);
                        assert!(
                            (g - exact).abs() <= tol * size,
                            "{dtype:?}, {m} rows, [{r}, {j}]: {g} vs {exact}"
                        );
                    }
                }
            }
        }
    }

    /// `C` rows of `packed.k` values against every group of `packed`, on each kernel in `on`.
    fn on_kernels<const C: usize>(packed: &Packed, on: &[Kernel]) -> Vec<Vec<[[f32; ROWS]; C]>> {
        let (k, blocks) = (packed.k, packed.blocks);
        let x = Tensor::randn(0f32, 1.0, (C, k), &Device::Cpu).unwrap();
        let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let acts = packed.kind.acts();
        let xq = super::super::acts::quantize_values(&x, C, k, acts).unwrap();
        let per = acts.sums_per_block();
        let row = |r: usize| Row {
            bytes: &xq.q[r * k..(r + 1) * k],
            d: &xq.d[r * blocks..(r + 1) * blocks],
            s: if xq.s.is_empty() {
                &[]
            } else {
                &xq.s[r * blocks..(r + 1) * blocks]
            },
            bias: &xq.bias[r * blocks * per..(r + 1) * blocks * per],
        };
        on.iter()
            .map(|&kernel| {
                (0..packed.n.div_ceil(ROWS))
                    .map(|g| {
                        let rows: [Row<'_>; C] = std::array::from_fn(row);
                        Packed::tile_on(Some(kernel), packed.group(g), &rows, packed.kind)
                    })
                    .collect()
            })
            .collect()
    }

    /// The 256-bit kernels (AVX-VNNI and AVX2) compute what the 512-bit one computes, bit for
    /// bit, for every format and one, three and eight rows, on the kernels
    /// this CPU has.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn kernels_agree_bit_for_bit() {
        use crate::model::qdot::cpu_has;
        let mut on = Vec::new();
        if cpu_has!("avx512f", "avx512bw", "avx512vnni") {
            on.push(Kernel::Avx512);
        }
        if cpu_has!("avx2", "fma", "f16c", "avxvnni") {
            on.push(Kernel::AvxVnni);
        }
        if cpu_has!("avx2", "fma", "f16c") {
            on.push(Kernel::Avx2);
        }
        let dev = Device::Cpu;
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
            GgmlDType::Q6K,
            GgmlDType::Q4_0,
            GgmlDType::Q5_1,
        ] {
            let w = Tensor::randn(0f32, 1.0, (37, 512), &dev).unwrap();
            let Some(packed) = Packed::new(&QTensor::quantize(&w, dtype).unwrap()).unwrap() else {
                return;
            };
            let one = on_kernels::<1>(&packed, &on);
            let three = on_kernels::<3>(&packed, &on);
            let eight = on_kernels::<8>(&packed, &on);
            for (i, kernel) in on.iter().enumerate().skip(1) {
                assert_eq!(one[i], one[0], "{dtype:?} on {kernel:?}, one row");
                assert_eq!(three[i], three[0], "{dtype:?} on {kernel:?}, three rows");
                assert_eq!(eight[i], eight[0], "{dtype:?} on {kernel:?}, eight rows");
            }
        }
    }

    /// Rows read back from the packed copy are candle's dequantized rows, exactly.
    #[test]
    fn rows_are_candles_dequantized_rows() {
        let dev = Device::Cpu;
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0] {
            let w = Tensor::randn(0f32, 1.0, (37, 96), &dev).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let Some(packed) = Packed::new(&q).unwrap() else {
                return;
            };
            let ids = [0u32, 36, 17, 16, 17];
            let all = q.dequantize(&dev).unwrap();
            let want: Vec<f32> =
                Tensor::cat(&ids.map(|i| all.narrow(0, i as usize, 1).unwrap()), 0)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
            let got = packed.rows(&ids).unwrap();
            assert_eq!(got.dims(), &[5, 96]);
            assert_eq!(
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want,
                "{dtype:?}"
            );
            assert!(packed.rows(&[37]).is_err());
        }
    }

    /// A tensor's values as bits.
    fn bits(t: &Tensor) -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.iter().map(|v| v.to_bits()).collect()
    }

    /// A matrix packed in pieces of rows (in any order, the last one short) is the matrix
    /// packed whole, in every stored format, the rewritten k-quants included; pieces that do
    /// not start on a group or that leave a group half filled are refused.
    #[test]
    fn pieces_of_rows_pack_as_the_whole() {
        if !available() {
            return;
        }
        let dev = Device::Cpu;
        let (n, k) = (83usize, 512usize);
        for dtype in PACKED_TYPES {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let bytes = QTensor::quantize(&w, dtype)
                .unwrap()
                .data()
                .unwrap()
                .to_vec();
            let whole = Packed::from_bytes(dtype, n, k, &bytes).unwrap();
            let mut packer = Packer::new(dtype, n, k).unwrap();
            let row = packer.row_bytes();
            assert_eq!(row * n, bytes.len(), "{dtype:?}");
            for (first, count) in [(64, 19), (0, 32), (32, 32)] {
                let piece = &bytes[first * row..(first + count) * row];
                assert!(packer.rows(first, piece).is_some(), "{dtype:?}");
            }
            let pieces = packer.finish();
            let x = Tensor::randn(0f32, 1.0, (3, k), &dev).unwrap();
            let (a, b) = (whole.matmul(&x).unwrap(), pieces.matmul(&x).unwrap());
            assert_eq!(bits(&a), bits(&b), "{dtype:?}");
            let mut packer = Packer::new(dtype, n, k).unwrap();
            assert!(packer.rows(8, &bytes[8 * row..24 * row]).is_none());
            assert!(packer.rows(0, &bytes[..20 * row]).is_none());
            assert!(packer.rows(0, &bytes[..row / 2]).is_none());
            assert!(packer.rows(80, &bytes[..4 * row]).is_none());
        }
    }

    /// A prompt through a matrix too large to stay cached is split by weight rows instead of
    /// by prompt rows: every row still gets exactly what it gets alone.
    #[test]
    fn prompts_through_large_matrices_give_each_row_its_own_bits() {
        let dev = Device::Cpu;
        let (n, k, m) = (4096usize, 2048usize, 70usize);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let Some(p) = Packed::new(&QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap() else {
            return;
        };
        assert!(p.bytes() > CACHED_BYTES && m > ROW_TILE && m >= PROMPT_ROWS);
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let all = p.matmul(&x).unwrap();
        for r in [0, 1, 33, 64, 69] {
            let one = p.matmul(&x.narrow(0, r, 1).unwrap()).unwrap();
            assert_eq!(bits(&all.narrow(0, r, 1).unwrap()), bits(&one), "row {r}");
        }
    }

    #[test]
    fn other_types_and_wrong_widths_are_refused() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (16, 64), &dev).unwrap();
        let q2k = QTensor::quantize(
            &Tensor::randn(0f32, 1.0, (16, 256), &dev).unwrap(),
            GgmlDType::Q2K,
        )
        .unwrap();
        assert!(Packed::new(&q2k).unwrap().is_none());
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        if let Some(p) = Packed::new(&q).unwrap() {
            let x = Tensor::randn(0f32, 1.0, (2, 96), &dev).unwrap();
            assert!(p.matmul(&x).is_err());
        }
    }
}
