//! Typed errors of the core. Every error that concerns one preference pair names it by its
//! index in the batch being appended (or in the store), so a user can find the offending row.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A pair failed validation on append, or a request referred to a pair that does not exist.
    #[error("pair {pair}: {reason}")]
    InvalidPair { pair: usize, reason: String },

    /// Truncation left a completion with no tokens, and the collator was told to fail on it.
    #[error("pair {pair}: the {which} completion is empty after truncation (prompt {prompt_len} tokens, max_length {max_length}); raise max_length, lower max_prompt_length, or skip such pairs")]
    EmptyAfterTruncation { pair: usize, which: &'static str, prompt_len: usize, max_length: usize },

    /// A store file is truncated, corrupted, from another format version, or not a store at all.
    #[error("store file {path}: {reason}")]
    StoreFile { path: PathBuf, reason: String },

    /// One pair of a memory-mapped store no longer holds what `load` verified: the file was
    /// rewritten or truncated in place while mapped.
    #[error("store file {path}, pair {pair}: {reason}")]
    MappedPair { path: PathBuf, pair: usize, reason: String },

    /// A file operation failed; unlike a bare `Io` error it names the path and what was tried.
    #[error("cannot {action} {path}: {source}")]
    File {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// A configuration value out of range (batch size 0, capacity too small, ...).
    #[error("{0}")]
    InvalidArgument(String),

    /// Saved sampler or controller state that cannot be restored.
    #[error("state: {0}")]
    State(String),

    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    pub(crate) fn pair(pair: usize, reason: impl Into<String>) -> Self {
        Error::InvalidPair { pair, reason: reason.into() }
    }
    pub(crate) fn arg(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }
    /// For `map_err`: an io error while doing `action` on `path`.
    pub(crate) fn file<'a>(path: &'a std::path::Path, action: &'static str) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| Error::File { path: path.to_path_buf(), action, source }
    }
}
