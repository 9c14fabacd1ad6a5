//! A Python `Plan` dict (see `_core.pyi`) read into the core's [`Plan`].
//!
//! The plan of a model of 100k tensors holds 100k tensor dicts, read each time
//! the plan crosses into the core. Read through pythonize's generic serde path,
//! that took 1.5 µs a tensor (0.15 s); read here field by field with interned
//! keys it takes a fraction of that. The rare nested recipes (`dequant`,
//! `quantize`) and the per-shard and per-source parts still go through serde,
//! so their formats have one definition: the core's `Deserialize` types.
//! A plain tensor may come as a row of its seven fields (`_PlainTensorPlan`),
//! which is quicker to make in Python and to read here than a dict.

use std::path::PathBuf;

use fastcast_core::exec;
use fastcast_core::format::header::json_len;
use fastcast_core::plan::wire::{Plan, ShardPlan, SourceFile, TensorPlan};
use fastcast_core::values::{Value, ValueParts};
use fastcast_core::DType;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyIterator, PyList, PyString, PyTuple};
use serde::de::DeserializeOwned;

use super::layout::PlainRows;
use crate::dtype::DTypes;
use crate::errors::FastcastError;

/// Read `plan`, or raise `FastcastError("malformed plan: <where>: <problem>")`.
/// Its version is checked where it is used.
pub fn plan_from(plan: &Bound<'_, PyAny>) -> PyResult<Plan> {
    read_plan(plan).map_err(|e| FastcastError::new_err(format!("malformed plan: {e}")))
}

/// What is wrong with a plan, and where (`shards[0].tensors[3].shape`).
struct Malformed(String);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

type Read<T> = Result<T, Malformed>;

fn read_plan(obj: &Bound<'_, PyAny>) -> Read<Plan> {
    let py = obj.py();
    let plan = as_dict(obj, "the plan")?;
    let shards = required(&plan, intern!(py, "shards"), "plan")?;
    let mut read = Vec::new();
    for (i, shard) in iterate(&shards, "shards")?.enumerate() {
        read.push(read_shard(&item(shard, "shards")?, i)?);
    }
    let sources = required(&plan, intern!(py, "sources"), "plan")?;
    let mut files = Vec::new();
    for (i, source) in iterate(&sources, "sources")?.enumerate() {
        let at = format!("sources[{i}]");
        let source = as_dict(&item(source, "sources")?, &at)?;
        files.push(SourceFile {
            path: path_field(&source, intern!(py, "path"), &at)?,
            size: extract(&required(&source, intern!(py, "size"), &at)?, "size")?,
        });
    }
    Ok(Plan {
        version: serde_field(&plan, intern!(py, "version"), "plan")?,
        sources: files,
        shards: read,
    })
}

/// A path field: a `str` or `os.PathLike`, converted as Python's `os.fsencode`
/// does, so a folder whose name is not UTF-8 (undecodable bytes arrive as
/// surrogate escapes) is the same folder here.
fn path_field(d: &Bound<'_, PyDict>, key: &Bound<'_, PyString>, at: &str) -> Read<PathBuf> {
    required(d, key, at)?
        .extract::<PathBuf>()
        .map_err(|e| Malformed(format!("{at}.{key}: {e}")))
}

fn read_shard(obj: &Bound<'_, PyAny>, i: usize) -> Read<ShardPlan> {
    let py = obj.py();
    let at = format!("shards[{i}]");
    let shard = as_dict(obj, &at)?;
    let tensors = required(&shard, intern!(py, "tensors"), &at)?;
    let read = match tensors.cast::<PlainRows>() {
        // a shard the core planned: straight from its table
        Ok(plain) => {
            let mut dtypes = DTypes::default();
            plain.get().tensor_plans(
                py,
                |row| read_tensor(row, &mut dtypes).map_err(|e| Malformed(format!("{at}{e}"))),
                |e| Malformed(format!("{at}: {e}")),
            )?
        }
        Err(_) => read_tensors(&tensors, &at)?,
    };
    Ok(ShardPlan {
        name: serde_field(&shard, intern!(py, "name"), &at)?,
        path: path_field(&shard, intern!(py, "path"), &at)?,
        metadata: optional(&shard, intern!(py, "metadata"), &at)?,
        tensors: read,
    })
}

/// A shard's `tensors`, dicts or rows, read one by one.
fn read_tensors(tensors: &Bound<'_, PyAny>, at: &str) -> Read<Vec<TensorPlan>> {
    let mut dtypes = DTypes::default();
    let mut read = Vec::new();
    for (j, tensor) in iterate(tensors, &format!("{at}.tensors"))?.enumerate() {
        let tensor = item(tensor, at)?;
        let tensor = read_tensor(&tensor, &mut dtypes)
            .map_err(|e| Malformed(format!("{at}.tensors[{j}]{e}")))?;
        read.push(tensor);
    }
    Ok(read)
}

/// The length of each shard's header JSON as the executor will write it (no
/// input is read): a shard past `MAX_HEADER_LEN` would be unreadable.
#[pyfunction]
pub fn header_lengths(plan: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
    read_header_lengths(plan).map_err(|e| FastcastError::new_err(format!("malformed plan: {e}")))
}

fn read_header_lengths(obj: &Bound<'_, PyAny>) -> Read<Vec<u64>> {
    let py = obj.py();
    let plan = as_dict(obj, "the plan")?;
    let shards = required(&plan, intern!(py, "shards"), "plan")?;
    let mut lengths = Vec::new();
    for (i, shard) in iterate(&shards, "shards")?.enumerate() {
        let at = format!("shards[{i}]");
        let shard = as_dict(&item(shard, "shards")?, &at)?;
        let metadata: Option<Vec<(String, String)>> =
            optional(&shard, intern!(py, "metadata"), &at)?;
        let tensors = required(&shard, intern!(py, "tensors"), &at)?;
        lengths.push(match tensors.cast::<PlainRows>() {
            Ok(plain) => plain.get().header_len(metadata.as_deref()),
            Err(_) => {
                let read = read_tensors(&tensors, &at)?;
                json_len(metadata.as_deref(), read.iter().map(exec::entry))
            }
        });
    }
    Ok(lengths)
}

// Reading a dtype field of a plan: its errors are this reader's.
impl DTypes {
    /// `value`, the dtype field `key`, parsed.
    fn read(&mut self, value: &Bound<'_, PyAny>, key: &str) -> Read<DType> {
        let name = value
            .cast::<PyString>()
            .map_err(|_| Malformed(format!(".{key}: not a string")))?;
        let name = name
            .to_str()
            .map_err(|e| Malformed(format!(".{key}: {e}")))?;
        self.parse(name)
            .map_err(|e| Malformed(format!(".{key}: {e}")))
    }
}

/// The fields of a plain tensor's row, in order (`_core._PlainTensorPlan`).
const ROW: [&str; 7] = [
    "name",
    "shape",
    "source",
    "src_dtype",
    "dst_dtype",
    "src_offsets",
    "dst_offsets",
];

/// One tensor, a dict or a plain tensor's row (a tuple, or the list JSON
/// makes of one); the error says which field (`.shape: ...`), the caller
/// where.
fn read_tensor(obj: &Bound<'_, PyAny>, dtypes: &mut DTypes) -> Read<TensorPlan> {
    if let Ok(row) = obj.cast::<PyTuple>() {
        return read_row(row, dtypes);
    }
    if let Ok(row) = obj.cast::<PyList>() {
        return read_row(&row.to_tuple(), dtypes); // a plan read back from JSON
    }
    let py = obj.py();
    let t = as_dict(obj, "")?;
    let field = |key| required(&t, key, "");
    Ok(TensorPlan {
        name: extract(&field(intern!(py, "name"))?, "name")?,
        shape: extract(&field(intern!(py, "shape"))?, "shape")?,
        source: extract(&field(intern!(py, "source"))?, "source")?,
        src_dtype: dtypes.read(&field(intern!(py, "src_dtype"))?, "src_dtype")?,
        dst_dtype: dtypes.read(&field(intern!(py, "dst_dtype"))?, "dst_dtype")?,
        src_offsets: pair(&field(intern!(py, "src_offsets"))?, "src_offsets")?,
        dst_offsets: pair(&field(intern!(py, "dst_offsets"))?, "dst_offsets")?,
        value: Value::of(ValueParts {
            dequant: optional(&t, intern!(py, "dequant"), "")?,
            quantize: optional(&t, intern!(py, "quantize"), "")?,
            merge: optional(&t, intern!(py, "merge"), "")?,
            rows: optional(&t, intern!(py, "rows"), "")?,
        })
        .map_err(|e| Malformed(format!(": {e}")))?,
    })
}

/// A plain tensor (neither dequantized nor quantized) as a row of `ROW`'s
/// fields: a model may have 100k, and a tuple is quicker to make and to read
/// than a dict.
fn read_row(row: &Bound<'_, PyTuple>, dtypes: &mut DTypes) -> Read<TensorPlan> {
    if row.len() != ROW.len() {
        return Err(Malformed(format!(
            ": a row of {} fields, not {} ({})",
            row.len(),
            ROW.len(),
            ROW.join(", ")
        )));
    }
    let field = |i: usize| row.get_borrowed_item(i).expect("in range");
    Ok(TensorPlan {
        name: extract(&field(0), ROW[0])?,
        shape: extract(&field(1), ROW[1])?,
        source: extract(&field(2), ROW[2])?,
        src_dtype: dtypes.read(&field(3), ROW[3])?,
        dst_dtype: dtypes.read(&field(4), ROW[4])?,
        src_offsets: pair(&field(5), ROW[5])?,
        dst_offsets: pair(&field(6), ROW[6])?,
        value: Value::Cast,
    })
}

fn as_dict<'py>(obj: &Bound<'py, PyAny>, what: &str) -> Read<Bound<'py, PyDict>> {
    obj.cast::<PyDict>()
        .cloned()
        .map_err(|_| Malformed(format!("{what}: not a dict")))
}

fn iterate<'py>(obj: &Bound<'py, PyAny>, at: &str) -> Read<Bound<'py, PyIterator>> {
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyDict>() {
        return Err(Malformed(format!("{at}: not a list")));
    }
    obj.try_iter()
        .map_err(|_| Malformed(format!("{at}: not a list")))
}

fn item<'py>(item: PyResult<Bound<'py, PyAny>>, at: &str) -> Read<Bound<'py, PyAny>> {
    item.map_err(|e| Malformed(format!("{at}: {e}")))
}

fn required<'py>(
    d: &Bound<'py, PyDict>,
    key: &Bound<'py, PyString>,
    at: &str,
) -> Read<Bound<'py, PyAny>> {
    match d.get_item(key) {
        Ok(Some(value)) => Ok(value),
        Ok(None) => Err(Malformed(format!("{at}: missing field `{key}`"))),
        Err(e) => Err(Malformed(format!("{at}.{key}: {e}"))),
    }
}

/// A field pyo3 extracts (strings, integers, lists of integers).
fn extract<'py, T: FromPyObjectOwned<'py>>(value: &Bound<'py, PyAny>, key: &str) -> Read<T> {
    value
        .extract::<T>()
        .map_err(|e| Malformed(format!(".{key}: {}", Into::<PyErr>::into(e))))
}

/// `[begin, end)`: a tuple, or a list as JSON gives it.
fn pair(value: &Bound<'_, PyAny>, key: &str) -> Read<(u64, u64)> {
    if let Ok(p) = value.extract::<(u64, u64)>() {
        return Ok(p);
    }
    match value.extract::<Vec<u64>>() {
        Ok(v) if v.len() == 2 => Ok((v[0], v[1])),
        _ => Err(Malformed(format!(".{key}: not a pair of offsets"))),
    }
}

/// A field read by the core's serde definition.
fn serde_field<T: DeserializeOwned>(
    d: &Bound<'_, PyDict>,
    key: &Bound<'_, PyString>,
    at: &str,
) -> Read<T> {
    let value = required(d, key, at)?;
    pythonize::depythonize(&value).map_err(|e| Malformed(format!("{at}.{key}: {e}")))
}

/// An optional field (absent or None) read by the core's serde definition.
fn optional<T: DeserializeOwned>(
    d: &Bound<'_, PyDict>,
    key: &Bound<'_, PyString>,
    at: &str,
) -> Read<Option<T>> {
    match d.get_item(key) {
        Ok(None) => Ok(None),
        Ok(Some(value)) if value.is_none() => Ok(None),
        Ok(Some(value)) => pythonize::depythonize(&value)
            .map(Some)
            .map_err(|e| Malformed(format!("{at}.{key}: {e}"))),
        Err(e) => Err(Malformed(format!("{at}.{key}: {e}"))),
    }
}
