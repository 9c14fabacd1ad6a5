//! fastcast-core: the engine behind fastcast. The tree names the jobs, each
//! layer using only those above it in this list:
//!
//! - [`error`]: the one error type, naming the file and the problem (a leaf);
//! - [`dtype`]: the dtypes of safetensors, their names, which ones cast;
//! - [`cast`]: conversion kernels bit-exact with `torch.Tensor.to` on the
//!   CPU, a scalar reference per pair and SIMD paths chosen at run time;
//! - [`names`]: a weight set's tensor names checked on the core's tables;
//! - [`rules`]: the rules of a conversion, one per file: `--keep` globs
//!   (Python's `fnmatch` semantics), the dtype each tensor gets, which
//!   tensors hold quantization state, what `--quantize` makes of each, and
//!   what a cast loses (overflow, underflow, NaN/inf, max |x|);
//! - [`format`](mod@format): what is on disk: safetensors headers read from untrusted
//!   bytes and validated once, the index json, the resume journal, and
//!   PyTorch `torch.save` files read without running pickle;
//! - [`values`]: what each output tensor's values are, one file per kind
//!   (a cast, a quantized weight dequantized, a float weight quantized to
//!   fp8), each implementing one trait;
//! - [`plan`]: the plan's versioned wire format, and where each tensor goes
//!   (shard packing, offsets, the whole plan of a plain model);
//! - [`exec`]: runs a plan: parallel chunks, bounded buffers, inputs mapped,
//!   writes at final offsets into shard files renamed into place by a commit
//!   thread, positional I/O on Unix and Windows.
//!
//! No Python here: the crate is tested, benchmarked and fuzzed on its own.

pub mod cast;
pub mod dtype;
pub mod error;
pub mod exec;
pub mod format;
pub mod names;
pub mod plan;
pub mod rules;
#[cfg(test)]
mod scratch;
pub mod values;

// The crate's vocabulary, named in nearly every signature a user of the crate
// writes: one short path for each.
pub use dtype::DType;
pub use error::{Error, Result};
