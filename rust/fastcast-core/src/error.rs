//! fastcast's one error type: every variant names the file (where there is
//! one) and says what is wrong in words a user can act on.
//!
//! A leaf: every module of the crate may use it, so it uses none of them. A
//! dtype is held by its name (what a message shows), and the constructor that
//! needs the dtype table, [`Error::not_castable`], lives in `dtype.rs`.

use std::io;
use std::path::{Path, PathBuf};

/// Everything that can go wrong in the core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on a named file.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A safetensors file whose header cannot be trusted.
    #[error("{}: {problem}", path.display())]
    Header {
        path: PathBuf,
        problem: HeaderProblem,
    },

    /// A torch.save file (`.bin`/`.pt`/`.pth`) that fastcast refuses to read:
    /// hostile, corrupt or of a kind it does not support. `problem` is one line.
    #[error("{}: {problem}", path.display())]
    Checkpoint { path: PathBuf, problem: String },

    /// A dtype name nobody recognises.
    #[error("unknown dtype {name:?}; valid dtypes: {valid}")]
    UnknownDtype { name: String, valid: String },

    /// A cast to or from a dtype fastcast never converts.
    #[error("cannot cast {from} to {to}: fastcast casts only between {castable}")]
    NotCastable {
        from: &'static str,
        to: &'static str,
        castable: String,
    },

    /// Buffers handed to a cast that do not hold whole, matching elements.
    #[error("{problem}")]
    Buffer { problem: String },

    /// An input file that changed between planning and running.
    #[error("{}: changed since the conversion was planned ({expected} bytes then, {actual} now)", path.display())]
    SourceChanged {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },

    /// A conversion plan that contradicts itself or the input files (the
    /// path is the shard concerned, empty when the plan as a whole is wrong).
    #[error("{}inconsistent plan: {problem}", located(path))]
    Plan { path: PathBuf, problem: String },

    /// A thread of the run (the commit thread, or the one a conversion runs
    /// on) died without reporting: a bug, not a fault of the plan or the
    /// files. Worded as it was when [`Error::Plan`] stood in for it, since
    /// callers may match the words.
    #[error("inconsistent plan: {what}")]
    WorkerDied { what: &'static str },

    /// An output shard whose header would be larger than safetensors readers
    /// accept (too many tensors, or names too long, for one shard).
    #[error("{}: its header would be {len} bytes for {tensors} tensors, past the {limit}-byte limit of safetensors readers; a smaller shard size puts fewer tensors in each shard", path.display())]
    HeaderTooLarge {
        path: PathBuf,
        len: u64,
        limit: u64,
        tensors: usize,
    },

    /// The run was asked to stop (Ctrl-C); nothing partial was left behind.
    #[error("cancelled")]
    Cancelled,

    /// A kernel path that was asked for by name but cannot run here.
    #[error("kernel {name:?} is not available on this CPU (available: {available})")]
    KernelUnavailable { name: String, available: String },
}

/// Why a safetensors header was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderProblem {
    #[error(
        "file is {file_len} bytes, too short to be safetensors (needs an 8-byte header length)"
    )]
    TooShort { file_len: u64 },

    #[error("header length {len} exceeds the {limit}-byte limit; not a safetensors file?")]
    HeaderTooLarge { len: u64, limit: u64 },

    #[error("header length {len} runs past the end of the file ({file_len} bytes); truncated or not safetensors?")]
    HeaderPastEnd { len: u64, file_len: u64 },

    #[error("header is not valid UTF-8 (byte {offset})")]
    NotUtf8 { offset: usize },

    #[error("header is not valid JSON: {message}")]
    NotJson { message: String },

    #[error("__metadata__ must map strings to strings: {message}")]
    BadMetadata { message: String },

    #[error("tensor {tensor:?} is listed twice")]
    DuplicateTensor { tensor: String },

    #[error("tensor {tensor:?}: {message}")]
    BadEntry { tensor: String, message: String },

    #[error("tensor {tensor:?}: unknown dtype {dtype:?}")]
    UnknownDtype { tensor: String, dtype: String },

    #[error("tensor {tensor:?}: shape {shape:?} has more elements than fit in 64 bits")]
    ShapeOverflow { tensor: String, shape: Vec<u64> },

    #[error("tensor {tensor:?}: data_offsets [{begin}, {end}] are reversed")]
    OffsetsReversed {
        tensor: String,
        begin: u64,
        end: u64,
    },

    #[error("tensor {tensor:?}: data_offsets [{begin}, {end}] hold {} bytes but {dtype} {shape:?} needs {expected}", end - begin)]
    SizeMismatch {
        tensor: String,
        /// The dtype's safetensors name.
        dtype: &'static str,
        shape: Vec<u64>,
        begin: u64,
        end: u64,
        expected: u64,
    },

    #[error("tensor {tensor:?}: data_offsets end {end} is past the end of the data ({data_len} bytes); file truncated?")]
    DataPastEnd {
        tensor: String,
        end: u64,
        data_len: u64,
    },

    #[error("tensor {tensor:?} overlaps tensor {other:?} (both use bytes from {begin})")]
    Overlap {
        tensor: String,
        other: String,
        begin: u64,
    },

    #[error("tensor {tensor:?} starts at {begin}, leaving a gap after byte {expected}")]
    Gap {
        tensor: String,
        begin: u64,
        expected: u64,
    },

    #[error("{extra} bytes after the last tensor's data; file corrupt or not safetensors?")]
    TrailingBytes { extra: u64 },
}

impl Error {
    /// Attach a path to an `io::Error`.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A header problem found in `path`.
    pub fn header(path: impl Into<PathBuf>, problem: HeaderProblem) -> Error {
        Error::Header {
            path: path.into(),
            problem,
        }
    }
}

/// `"path: "`, or nothing for an empty path.
fn located(path: &Path) -> String {
    if path.as_os_str().is_empty() {
        String::new()
    } else {
        format!("{}: ", path.display())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The words of a plan error, which they were until the variant was its own.
    #[test]
    fn a_dead_worker_reads_as_it_always_did() {
        let e = Error::WorkerDied {
            what: "the commit thread panicked",
        };
        assert_eq!(
            e.to_string(),
            "inconsistent plan: the commit thread panicked"
        );
    }
}
