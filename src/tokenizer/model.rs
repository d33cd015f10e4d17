//! The vocabulary model inside the `tokenizers` pipeline: a byte-level BPE (`tokenizers`' own)
//! or this crate's SentencePiece merger ([`Spm`]). `tokenizers`' model enum is closed, so the
//! pipeline is instantiated with this one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokenizers::models::bpe::BPE;
use tokenizers::{AddedToken, Model, Token, Trainer};

use super::spm::Spm;

#[derive(Clone)]
pub(super) enum VocabModel {
    Bpe(Box<BPE>),
    Spm(Spm),
}

/// These models are built from GGUF metadata, never trained.
pub(super) struct NoTrainer;

impl Trainer for NoTrainer {
    type Model = VocabModel;

    fn should_show_progress(&self) -> bool {
        false
    }

    fn train(&self, _model: &mut VocabModel) -> tokenizers::Result<Vec<AddedToken>> {
        Err("GGUF vocabularies are not trained here".into())
    }

    fn feed<I, S, F>(&mut self, _iterator: I, _process: F) -> tokenizers::Result<()>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
        F: Fn(&str) -> tokenizers::Result<Vec<String>> + Sync,
    {
        Ok(())
    }
}

impl Model for VocabModel {
    type Trainer = NoTrainer;

    fn tokenize(&self, sequence: &str) -> tokenizers::Result<Vec<Token>> {
        match self {
            Self::Bpe(m) => m.tokenize(sequence),
            Self::Spm(m) => Ok(m.tokenize(sequence)),
        }
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            Self::Bpe(m) => m.token_to_id(token),
            Self::Spm(m) => m.id(token),
        }
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        match self {
            Self::Bpe(m) => m.id_to_token(id),
            Self::Spm(m) => m.text(id).map(str::to_string),
        }
    }

    fn get_vocab(&self) -> HashMap<String, u32> {
        match self {
            Self::Bpe(m) => m.get_vocab(),
            Self::Spm(m) => m.vocab(),
        }
    }

    fn get_vocab_size(&self) -> usize {
        match self {
            Self::Bpe(m) => m.get_vocab_size(),
            Self::Spm(m) => m.len(),
        }
    }

    fn save(&self, _folder: &Path, _prefix: Option<&str>) -> tokenizers::Result<Vec<PathBuf>> {
        Err("GGUF vocabularies are saved in the GGUF file".into())
    }

    fn get_trainer(&self) -> NoTrainer {
        NoTrainer
    }
}
