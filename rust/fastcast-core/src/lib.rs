//! fastcast-core: the engine behind fastcast.
//!
//! - [`dtype`]: the dtypes of safetensors, their names, which ones cast;
//! - [`header`]: safetensors headers read from untrusted bytes, validated
//!   once, and written back;
//! - [`index`]: which file holds each tensor, from a sharded checkpoint's
//!   index json;
//! - [`cast`]: conversion kernels bit-exact with `torch.Tensor.to` on the
//!   CPU, a scalar reference per pair and SIMD paths chosen at run time;
//! - [`dequant`]: a quantized weight's values (fp8 times its block scales,
//!   bitsandbytes 4-bit and LLM.int8, GPTQ, AWQ) as fp32,
//!   for the executor to round once to the target;
//! - [`quantize`]: a float weight quantized to fp8 e4m3 in blocks (or rows),
//!   with its F32 scales, as `--quantize` writes them;
//! - [`keep`]: `--keep` globs (Python's `fnmatch` semantics) and what dtype
//!   each tensor of a conversion gets (and what `--quantize` does with it);
//! - [`layout`]: which shard each tensor goes to and where in it, and the
//!   whole plan of a model of plain safetensors files;
//! - [`quant`]: which tensors of a quantized checkpoint hold its quantization
//!   state, so that no cast touches them, and which are decoder Linears;
//! - [`loss`]: what a cast loses (overflow, underflow, NaN/inf, max |x|);
//! - [`exec`]: runs a conversion plan: parallel chunks, bounded buffers,
//!   writes at final offsets into [`shard_file`]s renamed into place when done;
//! - [`journal`]: the resume journal, one line per shard put in place;
//! - [`positional`]: reads and writes at an offset, on Unix and Windows;
//! - [`torchfile`]: PyTorch `torch.save` files (`.bin`/`.pt`) read without
//!   running pickle: tensors as absolute byte ranges of the file;
//! - [`error`]: the one error type, naming the file and the problem.
//!
//! No Python here: the crate is tested, benchmarked and fuzzed on its own.

pub mod cast;
pub mod dtype;
pub mod error;
pub mod exec;
pub mod header;
pub mod index;
pub mod journal;
pub mod keep;
pub mod layout;
pub mod loss;
pub mod names;
pub mod positional;
pub mod quant;
pub mod quantize;
#[cfg(test)]
mod scratch;
pub mod shard_file;
pub mod torchfile;
pub mod values;

/// Each dequantized format's math: [`values::dequant`], by its older name.
pub use values::dequant;

pub use cast::{cast, cast_parallel, CastOptions, Fp8Overflow, Kernel};
pub use dtype::DType;
pub use error::{Error, HeaderProblem, Result};
pub use exec::{execute, ExecOptions, ExecStats, Plan, Progress, PLAN_VERSION};
pub use header::{Header, TensorInfo};
pub use journal::ShardRecord;
pub use keep::{target_dtype, target_dtypes, KeepRule};
pub use loss::{narrows_range, LossRule, LossStats};
pub use torchfile::TorchFile;
