//! ggml tensor element types: code, name, block size and bytes per block.
//!
//! Sizes mirror ggml's `type_traits` table (`blck_size`, `type_size`); the
//! values are the `static_assert`ed block struct sizes from `ggml-common.h`.
//! Codes that ggml has retired (4, 5, 31..=33, 36..=38) are rejected as
//! unknown.

use std::fmt;

/// A ggml tensor element type. Only constructed from the known table, so
/// the block parameters are always valid (`block_size >= 1`, `type_size >= 1`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType {
    code: u32,
    name: &'static str,
    block_size: u64,
    type_size: u64,
}

macro_rules! ggml_types {
    ($($konst:ident = $code:literal, $name:literal, $bs:literal, $ts:literal;)*) => {
        impl GgmlType {
            $(
                #[doc = concat!("`", $name, "`: code ", stringify!($code), ", ", stringify!($bs),
                    " elements per block, ", stringify!($ts), " bytes per block.")]
                pub const $konst: GgmlType =
                    GgmlType { code: $code, name: $name, block_size: $bs, type_size: $ts };
            )*
            /// Every known type, in code order.
            pub const ALL: &'static [GgmlType] = &[$(GgmlType::$konst),*];
        }
    };
}

ggml_types! {
    F32 = 0, "F32", 1, 4;
    F16 = 1, "F16", 1, 2;
    Q4_0 = 2, "Q4_0", 32, 18;
    Q4_1 = 3, "Q4_1", 32, 20;
    Q5_0 = 6, "Q5_0", 32, 22;
    Q5_1 = 7, "Q5_1", 32, 24;
    Q8_0 = 8, "Q8_0", 32, 34;
    Q8_1 = 9, "Q8_1", 32, 36;
    Q2_K = 10, "Q2_K", 256, 84;
    Q3_K = 11, "Q3_K", 256, 110;
    Q4_K = 12, "Q4_K", 256, 144;
    Q5_K = 13, "Q5_K", 256, 176;
    Q6_K = 14, "Q6_K", 256, 210;
    Q8_K = 15, "Q8_K", 256, 292;
    IQ2_XXS = 16, "IQ2_XXS", 256, 66;
    IQ2_XS = 17, "IQ2_XS", 256, 74;
    IQ3_XXS = 18, "IQ3_XXS", 256, 98;
    IQ1_S = 19, "IQ1_S", 256, 50;
    IQ4_NL = 20, "IQ4_NL", 32, 18;
    IQ3_S = 21, "IQ3_S", 256, 110;
    IQ2_S = 22, "IQ2_S", 256, 82;
    IQ4_XS = 23, "IQ4_XS", 256, 136;
    I8 = 24, "I8", 1, 1;
    I16 = 25, "I16", 1, 2;
    I32 = 26, "I32", 1, 4;
    I64 = 27, "I64", 1, 8;
    F64 = 28, "F64", 1, 8;
    IQ1_M = 29, "IQ1_M", 256, 56;
    BF16 = 30, "BF16", 1, 2;
    TQ1_0 = 34, "TQ1_0", 256, 54;
    TQ2_0 = 35, "TQ2_0", 256, 66;
    MXFP4 = 39, "MXFP4", 32, 17;
}

impl GgmlType {
    /// Looks up a ggml type code; `None` for unknown or retired codes.
    pub fn from_code(code: u32) -> Option<GgmlType> {
        Self::ALL.iter().copied().find(|t| t.code == code)
    }

    /// The numeric ggml type code as stored in GGUF.
    pub fn code(&self) -> u32 {
        self.code
    }

    /// Upper-case name as used by llama.cpp tooling (`Q4_K`, `F16`, ...).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Number of elements per block (1 for plain types).
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Bytes per block.
    pub fn type_size(&self) -> u64 {
        self.type_size
    }

    /// Whether this is a block-quantized type.
    pub fn is_quantized(&self) -> bool {
        !matches!(
            self.code,
            0 | 1 | 24 | 25 | 26 | 27 | 28 | 30 // F32 F16 I8 I16 I32 I64 F64 BF16
        )
    }

    /// Bytes needed for `n_elements` elements, or `None` if `n_elements`
    /// is not a whole number of blocks or the size overflows `u64`.
    pub fn bytes_for(&self, n_elements: u64) -> Option<u64> {
        if !n_elements.is_multiple_of(self.block_size) {
            return None;
        }
        (n_elements / self.block_size).checked_mul(self.type_size)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

impl fmt::Debug for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name, self.code)
    }
}
