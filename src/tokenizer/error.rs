//! Errors raised while building a tokenizer from GGUF metadata or while using it.

/// Everything that can go wrong in [`crate::tokenizer`].
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// `tokenizer.ggml.model` names a vocabulary type this crate does not implement.
    #[error(
        "unsupported tokenizer model {0:?} (tokenizer.ggml.model): only \"gpt2\" (byte-level BPE) \
         and \"llama\" (SentencePiece) vocabularies are supported"
    )]
    UnsupportedModel(String),

    /// `tokenizer.ggml.pre` names a pre-tokenizer this crate has no regex for.
    #[error(
        "unsupported pre-tokenizer {0:?} (tokenizer.ggml.pre) for a byte-level BPE vocabulary"
    )]
    UnsupportedPreTokenizer(String),

    /// A `tokenizer.*` metadata key is missing or has the wrong type.
    #[error("tokenizer metadata: {0}")]
    Metadata(String),

    /// `tokenizer.ggml.tokens` is empty.
    #[error("the vocabulary (tokenizer.ggml.tokens) is empty")]
    EmptyVocab,

    /// The vocabulary has more tokens than a `u32` id can address.
    #[error("the vocabulary has {0} tokens, more than a u32 token id can address")]
    VocabTooLarge(usize),

    /// A per-token array does not have one entry per token.
    #[error(
        "tokenizer.ggml.{field} has {actual} entries but the vocabulary has {expected} tokens"
    )]
    LengthMismatch {
        /// The metadata key (without the `tokenizer.ggml.` prefix).
        field: &'static str,
        /// Number of tokens in the vocabulary.
        expected: usize,
        /// Number of entries in the array.
        actual: usize,
    },

    /// The same token text appears twice (llama.cpp refuses such vocabularies too).
    #[error("token {text:?} appears twice in the vocabulary (ids {first} and {second})")]
    DuplicateToken {
        /// The repeated token text.
        text: String,
        /// Its first id.
        first: u32,
        /// Its second id.
        second: u32,
    },

    /// A byte-level BPE vocabulary without `tokenizer.ggml.merges`.
    #[error("byte-level BPE vocabulary has no merges (tokenizer.ggml.merges)")]
    MissingMerges,

    /// The vocabulary asks for a BOS (or EOS) token to be added but defines none.
    #[error("the vocabulary asks for a {0} token to be added but defines no {0} token id")]
    MissingSpecialToken(&'static str),

    /// A token id passed to decoding is not in the vocabulary.
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    InvalidTokenId {
        /// The offending id.
        id: u32,
        /// Number of tokens in the vocabulary.
        vocab_size: usize,
    },

    /// The `tokenizers` crate refused the configuration built from the metadata.
    #[error("failed to build the tokenizer: {0}")]
    Build(String),

    /// The `tokenizers` crate failed while encoding.
    #[error("failed to encode text: {0}")]
    Encode(String),

    /// The `tokenizers` crate failed while decoding.
    #[error("failed to decode token ids: {0}")]
    Decode(String),
}
