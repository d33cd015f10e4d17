//! Glue from a validated GGUF file to the tokenizer and the chat template.

use crate::chat::{ChatError, ChatTemplate};
use crate::gguf::{Array, GgufError, GgufFile};
use crate::tokenizer::{GgufTokenizer, TokenizerError, VocabSource};

fn gguf_err(e: GgufError) -> TokenizerError {
    TokenizerError::Metadata(e.to_string())
}

fn id(file: &GgufFile, key: &str) -> Result<Option<u32>, TokenizerError> {
    match file.get_u64(key).map_err(gguf_err)? {
        None => Ok(None),
        Some(v) => u32::try_from(v)
            .map(Some)
            .map_err(|_| TokenizerError::Metadata(format!("{key} = {v} does not fit a token id"))),
    }
}

/// Collect the `tokenizer.ggml.*` metadata the tokenizer needs.
///
/// # Errors
/// A key has the wrong type.
pub fn vocab_source(file: &GgufFile) -> Result<VocabSource, TokenizerError> {
    let strings = |key: &str| -> Result<Option<Vec<String>>, TokenizerError> {
        match file.get_array(key).map_err(gguf_err)? {
            None => Ok(None),
            Some(Array::String(v)) => Ok(Some(v.clone())),
            Some(_) => Err(TokenizerError::Metadata(format!(
                "{key} must be an array of strings"
            ))),
        }
    };
    let scores = match file.get_array("tokenizer.ggml.scores").map_err(gguf_err)? {
        None => None,
        Some(Array::F32(v)) => Some(v.clone()),
        Some(_) => {
            return Err(TokenizerError::Metadata(
                "tokenizer.ggml.scores must be an array of f32".into(),
            ))
        }
    };
    let token_types = match file
        .get_array("tokenizer.ggml.token_type")
        .map_err(gguf_err)?
    {
        None => None,
        Some(Array::I32(v)) => Some(v.clone()),
        Some(Array::U32(v)) => Some(v.iter().map(|&x| x as i32).collect()),
        Some(_) => {
            return Err(TokenizerError::Metadata(
                "tokenizer.ggml.token_type must be an array of i32".into(),
            ))
        }
    };
    Ok(VocabSource {
        model: file
            .get_str("tokenizer.ggml.model")
            .map_err(gguf_err)?
            .unwrap_or("gpt2")
            .to_string(),
        pre: file
            .get_str("tokenizer.ggml.pre")
            .map_err(gguf_err)?
            .map(str::to_string),
        tokens: strings("tokenizer.ggml.tokens")?.unwrap_or_default(),
        scores,
        token_types,
        merges: strings("tokenizer.ggml.merges")?,
        bos_id: id(file, "tokenizer.ggml.bos_token_id")?,
        eos_id: id(file, "tokenizer.ggml.eos_token_id")?,
        eot_id: id(file, "tokenizer.ggml.eot_token_id")?,
        eom_id: id(file, "tokenizer.ggml.eom_token_id")?,
        unk_id: id(file, "tokenizer.ggml.unknown_token_id")?,
        pad_id: id(file, "tokenizer.ggml.padding_token_id")?,
        add_bos: file
            .get_bool("tokenizer.ggml.add_bos_token")
            .map_err(gguf_err)?,
        add_eos: file
            .get_bool("tokenizer.ggml.add_eos_token")
            .map_err(gguf_err)?,
        add_space_prefix: file
            .get_bool("tokenizer.ggml.add_space_prefix")
            .map_err(gguf_err)?,
    })
}

/// The tokenizer described by the file's metadata.
///
/// # Errors
/// Metadata is missing or inconsistent, or the vocabulary type is unsupported.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<GgufTokenizer, TokenizerError> {
    GgufTokenizer::from_vocab(&vocab_source(file)?)
}

/// The file's own chat template, or a built-in one chosen by architecture.
///
/// # Errors
/// The file's template does not compile.
pub fn template_from_gguf(
    file: &GgufFile,
    tokenizer: &GgufTokenizer,
) -> Result<ChatTemplate, ChatError> {
    let source = file.get_str("tokenizer.chat_template").ok().flatten();
    let arch = file.architecture().unwrap_or("llama");
    ChatTemplate::new(source, arch, tokenizer.bos_text(), tokenizer.eos_text())
}
