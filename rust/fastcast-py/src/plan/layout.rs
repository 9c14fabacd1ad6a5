//! A plain model's plan as tables held by the core, for Python to plan
//! without a Python object per tensor.
//!
//! A model may have 100k tensors (DeepSeek-V3 has 91k). Made into Python
//! objects and planned one by one, they cost a conversion more than its
//! bytes did. [`PlainShard`] is an output shard of a plain plan
//! (`fastcast_core::plan::layout::plan_plain`) made of the `Entries` the
//! headers gave, and [`PlainRows`] its tensors as a plan's; Python asks them
//! for columns (names, dtypes) or, where it needs objects, for rows.

use fastcast_core::format::header::{self, Entry, TensorInfo};
use fastcast_core::names;
use fastcast_core::plan::layout::{self, Placed};
use fastcast_core::plan::wire::TensorPlan;
use fastcast_core::rules::glob::KeepRule;
use fastcast_core::values::Value;
use fastcast_core::DType;
use pyo3::prelude::*;
use pyo3::types::{PyIterator, PyList, PyString, PyTuple};

use crate::dtype::{castable_target, DTypes};
use crate::errors::CoreError;
use crate::format::Entries;

/// Each item's safetensors dtype name, one interned string per dtype.
fn dtype_names<'py>(
    py: Python<'py>,
    dtypes: impl ExactSizeIterator<Item = DType>,
) -> PyResult<Bound<'py, PyList>> {
    PyList::new(
        py,
        dtypes.map(|d| PyString::intern(py, d.safetensors_name())),
    )
}

/// One output shard of a plain plan: tensors of `Entries` cast or copied, in
/// data order.
#[pyclass(frozen, module = "fastcast._core")]
pub struct PlainShard {
    sources: Vec<Py<Entries>>,
    placed: Vec<Placed>,
    /// The bytes of its tensors' data.
    #[pyo3(get)]
    data_bytes: u64,
    /// The input bytes its tensors are read from.
    #[pyo3(get)]
    input_bytes: u64,
    /// The elements of its tensors.
    #[pyo3(get)]
    numel: u64,
}

impl PlainShard {
    fn source(&self, p: &Placed) -> &TensorInfo {
        &self.sources[p.source].get().tensors[p.row]
    }
}

#[pymethods]
impl PlainShard {
    fn __len__(&self) -> usize {
        self.placed.len()
    }

    /// Its tensors' names (a plain tensor keeps its source's).
    fn names<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.placed.iter().map(|p| self.source(p).name.as_str()))
    }

    /// The dtype each tensor is written in.
    fn dtypes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        dtype_names(py, self.placed.iter().map(|p| p.dtype))
    }

    /// A digest of its tensors' source names and the dtypes they are written
    /// in (`tensors_digest` of `names()` and `dtypes()`), for a resumed run's
    /// fingerprint.
    fn digest(&self) -> String {
        names::digest(
            self.placed
                .iter()
                .map(|p| (self.source(p).name.as_str(), p.dtype.safetensors_name())),
        )
    }

    /// Each tensor's dtype in its source.
    fn source_dtypes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        dtype_names(py, self.placed.iter().map(|p| self.source(p).dtype))
    }

    /// Each tensor's bytes in its source.
    fn source_nbytes(&self) -> Vec<u64> {
        self.placed
            .iter()
            .map(|p| self.source(p).nbytes())
            .collect()
    }

    /// Each tensor's role in its model's quantization (`quant_roles`' names).
    fn roles<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(
            py,
            self.placed
                .iter()
                .map(|p| PyString::intern(py, p.role.name())),
        )
    }

    /// Where each tensor comes from and goes: `(source, row, dtype, nbytes,
    /// begin, end, role)`, `source` indexing the `Entries` the plan was made
    /// of and `row` its tensors.
    #[allow(clippy::type_complexity)]
    fn picks(&self) -> Vec<(usize, usize, &'static str, u64, u64, u64, &'static str)> {
        self.placed
            .iter()
            .map(|p| {
                let name = p.dtype.safetensors_name();
                let (begin, end) = (p.begin, p.end);
                (
                    p.source,
                    p.row,
                    name,
                    end - begin,
                    begin,
                    end,
                    p.role.name(),
                )
            })
            .collect()
    }

    /// The shard's tensors as a plan's `tensors` (`PlainRows`), `source_ids[i]`
    /// the plan's id of the `i`th `Entries` the plan was made of.
    fn plan_rows(slf: Bound<'_, Self>, source_ids: Vec<usize>) -> PyResult<PlainRows> {
        let sources = slf.get().sources.len();
        if source_ids.len() != sources {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "{} plan ids for the {sources} sources of the plan",
                source_ids.len()
            )));
        }
        Ok(PlainRows {
            shard: slf.unbind(),
            source_ids,
        })
    }
}

/// A plain shard's tensors as a plan's `tensors`: read by the core straight
/// from the table (`tensor_plans`), with no Python row per tensor; pickled
/// (a batch sends plans to other processes) as the list of rows it stands for.
#[pyclass(frozen, module = "fastcast._core")]
pub struct PlainRows {
    shard: Py<PlainShard>,
    source_ids: Vec<usize>,
}

impl PlainRows {
    /// The length of the shard's header JSON with `metadata` (see
    /// `fastcast_core::header::json_len`), from the table: nothing copied.
    pub fn header_len(&self, metadata: Option<&[(String, String)]>) -> u64 {
        let shard = self.shard.get();
        header::json_len(
            metadata,
            shard.placed.iter().map(|p| {
                let t = shard.source(p);
                Entry {
                    name: &t.name,
                    dtype: p.dtype,
                    shape: &t.shape,
                    data_offsets: (p.begin, p.end),
                }
            }),
        )
    }

    /// The tensors as the executor's plan has them.
    pub fn tensor_plans(&self) -> Vec<TensorPlan> {
        let shard = self.shard.get();
        shard
            .placed
            .iter()
            .map(|p| {
                let t = shard.source(p);
                TensorPlan {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    source: self.source_ids[p.source],
                    src_dtype: t.dtype,
                    dst_dtype: p.dtype,
                    src_offsets: t.data_offsets,
                    dst_offsets: (p.begin, p.end),
                    value: Value::Cast,
                }
            })
            .collect()
    }
}

#[pymethods]
impl PlainRows {
    fn __len__(&self) -> usize {
        self.shard.get().placed.len()
    }

    /// The executor's plain rows (`_core._PlainTensorPlan`).
    fn rows<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let rows = PyList::empty(py);
        for t in self.tensor_plans() {
            rows.append((
                t.name,
                PyTuple::new(py, &t.shape)?,
                t.source,
                PyString::intern(py, t.src_dtype.safetensors_name()),
                PyString::intern(py, t.dst_dtype.safetensors_name()),
                t.src_offsets,
                t.dst_offsets,
            ))?;
        }
        Ok(rows)
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyIterator>> {
        self.rows(py)?.try_iter()
    }

    fn __reduce__<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyList>,))> {
        Ok((py.get_type::<PyList>().into_any(), (self.rows(py)?,)))
    }
}

/// The shards of a weight set whose every tensor is cast or copied (see
/// `fastcast_core::plan::layout::plan_plain`): `sources` its files' tensors,
/// in the set's order; `target` None keeps every dtype; `quantized` keeps
/// quantization state as it is (`--keep-quantized`).
#[pyfunction]
#[pyo3(signature = (sources, target, keep, limit, *, quantized=false))]
pub fn plan_plain(
    py: Python<'_>,
    sources: Vec<Py<Entries>>,
    target: Option<&str>,
    keep: Vec<String>,
    limit: u64,
    quantized: bool,
) -> PyResult<Vec<PlainShard>> {
    let target = target.map(castable_target).transpose()?;
    let keep = KeepRule::new(&keep);
    let tables: Vec<&[TensorInfo]> = sources.iter().map(|e| &e.get().tensors[..]).collect();
    let shards = py.detach(|| layout::plan_plain(&tables, target, &keep, limit, quantized));
    Ok(shards
        .into_iter()
        .map(|placed| {
            let info = |p: &Placed| &tables[p.source][p.row];
            PlainShard {
                data_bytes: placed.last().map_or(0, |p| p.end),
                input_bytes: placed.iter().map(|p| info(p).nbytes()).sum(),
                numel: placed.iter().map(|p| info(p).numel()).sum(),
                sources: sources.iter().map(|s| s.clone_ref(py)).collect(),
                placed,
            }
        })
        .collect())
}

/// Group items of `sizes` (bytes) into shards of at most `limit` bytes as
/// huggingface_hub does (`fastcast_core::layout::pack`): each shard's item
/// indices.
#[pyfunction]
pub fn pack(sizes: Vec<u64>, limit: u64) -> Vec<Vec<usize>> {
    layout::pack(sizes, limit)
}

/// A shard's data laid out (`fastcast_core::layout::lay_out`): `tensors` are
/// `(dtype, bytes)`; returns `(index, begin, end)` in data order.
#[pyfunction]
pub fn lay_out(tensors: Vec<(String, u64)>) -> PyResult<Vec<(usize, u64, u64)>> {
    let mut dtypes = DTypes::default();
    let items = tensors
        .iter()
        .map(|(name, nbytes)| Ok((dtypes.parse(name).map_err(CoreError)?.size(), *nbytes)))
        .collect::<PyResult<Vec<_>>>()?;
    Ok(layout::lay_out(&items))
}
