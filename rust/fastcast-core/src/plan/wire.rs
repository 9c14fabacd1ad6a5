//! The plan's wire format: what Python hands the executor (input files, output
//! shards, where each tensor comes from and goes), one versioned definition
//! read by these serde types and by `fastcast-py`'s `plan/wire.rs`.

use std::path::PathBuf;

use serde::Deserialize;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::values::Value;

/// The plan format this build reads; see [`Plan::version`].
pub const PLAN_VERSION: u32 = 1;

/// A whole conversion: input files and the output shards to produce.
#[derive(Debug, Clone, Deserialize)]
pub struct Plan {
    /// The format of this plan, [`PLAN_VERSION`]: a plan made for another
    /// version is refused rather than half understood.
    pub version: u32,
    pub sources: Vec<SourceFile>,
    pub shards: Vec<ShardPlan>,
}

impl Plan {
    /// Refuse a plan in a format this build does not read.
    pub fn check_version(&self) -> Result<()> {
        if self.version == PLAN_VERSION {
            return Ok(());
        }
        Err(Error::Plan {
            path: PathBuf::new(),
            problem: format!(
                "plan version {}, this fastcast reads version {PLAN_VERSION}",
                self.version
            ),
        })
    }
}

/// An input file and the size it had when the plan was made.
#[derive(Debug, Clone, Deserialize)]
pub struct SourceFile {
    pub path: PathBuf,
    pub size: u64,
}

/// One output file.
#[derive(Debug, Clone, Deserialize)]
pub struct ShardPlan {
    /// The shard's output-relative name, as the journal records it
    /// (`unet/diffusion_pytorch_model-00001-of-00002.safetensors`).
    pub name: String,
    /// Where to write it (possibly inside a private staging folder).
    pub path: PathBuf,
    /// `__metadata__` to write, in order.
    pub metadata: Option<Vec<(String, String)>>,
    /// Tensors in the order the header lists them.
    pub tensors: Vec<TensorPlan>,
}

/// Where one tensor comes from and where it goes.
#[derive(Debug, Clone, Deserialize)]
pub struct TensorPlan {
    pub name: String,
    pub shape: Vec<u64>,
    /// Index into [`Plan::sources`].
    pub source: usize,
    /// Any name [`DType`] parses (`F32`, `bfloat16`...), read as the plan is.
    #[serde(deserialize_with = "dtype_named")]
    pub src_dtype: DType,
    #[serde(deserialize_with = "dtype_named")]
    pub dst_dtype: DType,
    /// `[begin, end)` in the source *file* (header included).
    pub src_offsets: (u64, u64),
    /// `[begin, end)` in the output's data buffer.
    pub dst_offsets: (u64, u64),
    /// What its values are: its source cast, a quantized weight's values
    /// reconstructed, a float weight quantized (see [`crate::values`]).
    #[serde(flatten)]
    pub value: Value,
}

/// A dtype from its name: a plan of 100k tensors would otherwise hold 200k
/// strings for a handful of dtypes.
fn dtype_named<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<DType, D::Error> {
    let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    name.parse().map_err(serde::de::Error::custom)
}
