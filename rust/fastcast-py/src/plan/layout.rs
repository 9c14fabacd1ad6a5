//! A set's plan as tables held by the core, for Python to plan without a
//! Python object per tensor.
//!
//! A model may have 100k tensors (DeepSeek-V3 has 91k). Made into Python
//! objects and planned one by one, they cost a conversion more than its
//! bytes did. [`PlainShard`] is an output shard of a set whose tensors are
//! cast, copied, quantized, dequantized or merged
//! (`fastcast_core::plan::layout::plan_set`) made of the `Entries` the
//! headers gave, and [`PlainRows`] its tensors as a plan's; Python asks them
//! for columns (names, dtypes) or, where it needs objects, for rows. A
//! dequantized or merged tensor's recipe is Python's
//! (`_plan.shards.Making.recipe`), given with the plan's source ids when the
//! rows are made.

use fastcast_core::format::header::{self, Entry, TensorInfo};
use fastcast_core::names;
use std::sync::Arc;

use fastcast_core::plan::layout::{
    self, Added, Made, Member, Mode, Part, Placed, ScaleTensor, View,
};
use fastcast_core::plan::wire::TensorPlan;
use fastcast_core::rules::glob::KeepRule;
use fastcast_core::rules::scheme::Scheme;
use fastcast_core::values::quantize::Quantize;
use fastcast_core::values::Value;
use fastcast_core::DType;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyIterator, PyList, PyString, PyTuple};

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

/// One output shard of a set's plan: tensors of `Entries` cast, copied,
/// quantized or dequantized, in data order.
#[pyclass(frozen, module = "fastcast._core")]
pub struct PlainShard {
    sources: Vec<Py<Entries>>,
    placed: Vec<Placed>,
    /// The names and shapes of the set's scale tensors (`Part::Scale`).
    scales: Arc<Vec<ScaleTensor>>,
    /// The set's made tensors (`Part::Made`): dequantized, merged.
    made: Arc<Vec<Made>>,
    /// A merged set's names of its renamed tensors, by set tensor
    /// (`Placed::tensor`; empty when nothing is renamed).
    renamed: Arc<Vec<Option<String>>>,
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

    /// A tensor's name in the set: its source's, or (merging) the one the
    /// output gives it (a replicated layer's, a replacement's).
    fn name(&self, p: &Placed) -> &str {
        match self.renamed.get(p.tensor) {
            Some(Some(name)) => name,
            _ => &self.source(p).name,
        }
    }

    /// The weight a tensor's values are (or are made from): its source, or
    /// its dequantized weight; its name and shape.
    fn weight(&self, p: &Placed) -> (&str, &[u64]) {
        match recipe_of(p) {
            Some(k) => (&self.made[k].name, &self.made[k].shape),
            None => (self.name(p), &self.source(p).shape),
        }
    }

    /// A tensor's name and shape in the output: its weight's, or its scales'.
    fn out(&self, p: &Placed) -> (&str, &[u64]) {
        match p.part {
            Part::Scale { scale, .. } => (&self.scales[scale].0, &self.scales[scale].1),
            _ => self.weight(p),
        }
    }

    /// How the executor makes a tensor's values (a dequantized weight's
    /// recipe is read from its row).
    fn value(&self, p: &Placed) -> Value {
        match p.part {
            Part::Cast | Part::Made { .. } => Value::Cast,
            Part::Values { block, .. } => {
                Value::Quantize(Box::new(Quantize::Fp8Weight { block }), None)
            }
            Part::Scale { block, .. } => {
                let (weight, shape) = self.weight(p);
                let scale = Quantize::Fp8Scale {
                    block,
                    weight: weight.to_owned(),
                    weight_shape: shape.to_vec(),
                };
                Value::Quantize(Box::new(scale), None)
            }
        }
    }
}

/// The dequantized weight (the `dequantize` list's index) whose values a
/// tensor is, or is quantized from.
fn recipe_of(p: &Placed) -> Option<usize> {
    match p.part {
        Part::Made { made } => Some(made),
        Part::Values { made, .. } | Part::Scale { made, .. } => made,
        Part::Cast => None,
    }
}

#[pymethods]
impl PlainShard {
    fn __len__(&self) -> usize {
        self.placed.len()
    }

    /// Its tensors' names (a cast tensor and quantized values keep their
    /// source's; scales have their own).
    fn names<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.placed.iter().map(|p| self.out(p).0))
    }

    /// Each tensor's name in the set (its source's, a weight's for its
    /// scales; merging, as the output renames it).
    fn source_names<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.placed.iter().map(|p| self.name(p)))
    }

    /// The dtype each tensor is written in.
    fn dtypes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        dtype_names(py, self.placed.iter().map(|p| p.dtype))
    }

    /// A digest of its tensors' source names and the dtypes they are written
    /// in (`tensors_digest` of `source_names()` and `dtypes()`), for a resumed
    /// run's fingerprint.
    fn digest(&self) -> String {
        names::digest(
            self.placed
                .iter()
                .map(|p| (self.name(p), p.dtype.safetensors_name())),
        )
    }

    /// Its cast (or copied) tensors' source dtypes, dtypes and source bytes.
    #[allow(clippy::type_complexity)]
    fn cast_columns<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>, Vec<u64>)> {
        let cast: Vec<&Placed> = self
            .placed
            .iter()
            .filter(|p| p.part == Part::Cast)
            .collect();
        Ok((
            dtype_names(py, cast.iter().map(|p| self.source(p).dtype))?,
            dtype_names(py, cast.iter().map(|p| p.dtype))?,
            cast.iter().map(|p| self.source(p).nbytes()).collect(),
        ))
    }

    /// Its `--quantize` tensors: `(position, kind, name, shape, block)`, the
    /// kind "fp8_weight" (the weight's e4m3 values) or "fp8_scale" (a
    /// requantized weight's are also in `made()`).
    #[allow(clippy::type_complexity)]
    fn quantized(&self) -> Vec<(usize, &'static str, &str, Vec<u64>, (u64, u64))> {
        self.placed
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let (kind, block) = match p.part {
                    Part::Cast | Part::Made { .. } => return None,
                    Part::Values { block, .. } => ("fp8_weight", block),
                    Part::Scale { block, .. } => ("fp8_scale", block),
                };
                let (name, shape) = self.out(p);
                Some((i, kind, name, shape.to_vec(), block))
            })
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

    /// Its tensors made of a dequantized weight (written dequantized, or
    /// quantized from it): `(position, made)`, `made` indexing the
    /// `dequantize` list the plan was made with.
    fn made(&self) -> Vec<(usize, usize)> {
        self.placed
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((i, recipe_of(p)?)))
            .collect()
    }

    /// The shard's tensors as a plan's `tensors` (`PlainRows`), `source_ids[i]`
    /// the plan's id of the `i`th `Entries` the plan was made of; `recipes`
    /// the fields each made (dequantized, merged) tensor's row adds, in
    /// `made()`'s order.
    #[pyo3(signature = (source_ids, recipes=Vec::new()))]
    fn plan_rows(
        slf: Bound<'_, Self>,
        source_ids: Vec<usize>,
        recipes: Vec<Py<PyDict>>,
    ) -> PyResult<PlainRows> {
        let shard = slf.get();
        let sources = shard.sources.len();
        if source_ids.len() != sources {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "{} plan ids for the {sources} sources of the plan",
                source_ids.len()
            )));
        }
        let made = shard.made().len();
        if recipes.len() != made {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "{} recipes for the {made} made tensors of the shard",
                recipes.len()
            )));
        }
        Ok(PlainRows {
            shard: slf.unbind(),
            source_ids,
            recipes,
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
    /// What each made tensor's row adds (its `dequant`, `merge` or `rows`
    /// recipe).
    recipes: Vec<Py<PyDict>>,
}

impl PlainRows {
    /// The length of the shard's header JSON with `metadata` (see
    /// `fastcast_core::header::json_len`), from the table: nothing copied.
    pub fn header_len(&self, metadata: Option<&[(String, String)]>) -> u64 {
        let shard = self.shard.get();
        header::json_len(
            metadata,
            shard.placed.iter().map(|p| {
                let (name, shape) = shard.out(p);
                Entry {
                    name,
                    dtype: p.dtype,
                    shape,
                    data_offsets: (p.begin, p.end),
                }
            }),
        )
    }

    /// The tensors as the executor's plan has them, a made tensor's
    /// made of its row by `read`.
    pub fn tensor_plans<E>(
        &self,
        py: Python<'_>,
        mut read: impl FnMut(&Bound<'_, PyAny>) -> Result<TensorPlan, E>,
        fail: impl Fn(PyErr) -> E,
    ) -> Result<Vec<TensorPlan>, E> {
        let shard = self.shard.get();
        let mut recipes = self.recipes.iter();
        let mut plans = Vec::with_capacity(shard.placed.len());
        for (p, base) in shard.placed.iter().zip(self.base_plans()) {
            plans.push(match recipe_of(p) {
                Some(_) => {
                    let recipe = recipes.next().expect("a recipe per made tensor");
                    let row = self.dict_row(py, base, Some(recipe.bind(py)));
                    read(row.map_err(&fail)?.as_any())?
                }
                None => base,
            });
        }
        Ok(plans)
    }

    /// A tensor's row as a dict (`_core.TensorPlan`): its `quantize` field
    /// if it has one, and the fields of its `recipe`.
    fn dict_row<'py>(
        &self,
        py: Python<'py>,
        t: TensorPlan,
        recipe: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let row = PyDict::new(py);
        row.set_item("name", t.name)?;
        row.set_item("shape", PyTuple::new(py, &t.shape)?)?;
        row.set_item("source", t.source)?;
        row.set_item(
            "src_dtype",
            PyString::intern(py, t.src_dtype.safetensors_name()),
        )?;
        row.set_item(
            "dst_dtype",
            PyString::intern(py, t.dst_dtype.safetensors_name()),
        )?;
        row.set_item("src_offsets", t.src_offsets)?;
        row.set_item("dst_offsets", t.dst_offsets)?;
        if let Value::Quantize(q, None) = &t.value {
            row.set_item("quantize", quantize_dict(py, q)?)?;
        }
        if let Some(recipe) = recipe {
            row.update(recipe.as_mapping())?;
        }
        Ok(row)
    }

    /// Each tensor's plan from the table (a made tensor's without its
    /// recipe).
    fn base_plans(&self) -> Vec<TensorPlan> {
        let shard = self.shard.get();
        shard
            .placed
            .iter()
            .map(|p| {
                let t = shard.source(p);
                let (name, shape) = shard.out(p);
                TensorPlan {
                    name: name.to_owned(),
                    shape: shape.to_vec(),
                    source: self.source_ids[p.source],
                    src_dtype: t.dtype,
                    dst_dtype: p.dtype,
                    src_offsets: t.data_offsets,
                    dst_offsets: (p.begin, p.end),
                    value: shard.value(p),
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

    /// The executor's rows: a cast tensor's as a tuple
    /// (`_core._PlainTensorPlan`), a quantized or dequantized one's as a
    /// dict (`_core.TensorPlan`).
    fn rows<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let rows = PyList::empty(py);
        let shard = self.shard.get();
        let mut recipes = self.recipes.iter();
        for (p, t) in shard.placed.iter().zip(self.base_plans()) {
            if p.part == Part::Cast {
                let src = PyString::intern(py, t.src_dtype.safetensors_name());
                let dst = PyString::intern(py, t.dst_dtype.safetensors_name());
                let shape = PyTuple::new(py, &t.shape)?;
                let (name, at, to) = (t.name, t.src_offsets, t.dst_offsets);
                rows.append((name, shape, t.source, src, dst, at, to))?;
                continue;
            }
            let recipe = recipe_of(p).map(|_| {
                let recipe = recipes.next().expect("a recipe per made tensor");
                recipe.bind(py)
            });
            rows.append(self.dict_row(py, t, recipe)?)?;
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

/// `Quantize` as `_plan.shards.tensor_plan` writes it.
fn quantize_dict<'py>(py: Python<'py>, q: &Quantize) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    match q {
        Quantize::Fp8Weight { block } => {
            out.set_item("kind", "fp8_weight")?;
            out.set_item("block", *block)?;
        }
        Quantize::Fp8Scale {
            block,
            weight,
            weight_shape,
        } => {
            out.set_item("kind", "fp8_scale")?;
            out.set_item("block", *block)?;
            out.set_item("weight", weight)?;
            out.set_item("weight_shape", PyList::new(py, weight_shape)?)?;
        }
    }
    Ok(out)
}

/// A dequantized weight as Python gives it: `(tensor, name, shape, dtype)`.
type MadeRow = (usize, String, Vec<u64>, String);

/// A merged weight as Python gives it: `(tensor, name, shape)` (its dtype the
/// rule's).
type MergedRow = (usize, String, Vec<u64>);

/// A merged set's tensors as Python gives them (`layout::View`): each
/// member's `(rules source, rules row, values source, values row, name)`,
/// each added tensor's `(source, row, name, dtype)`.
type ViewRows = (
    Vec<(usize, usize, usize, usize, Option<String>)>,
    Vec<(usize, usize, String, String)>,
);

/// The shards of a weight set (see `fastcast_core::plan::layout::plan_set`):
/// `sources` its files' tensors, in the set's order (merging, then the
/// adapter's); `target` None keeps every dtype; `quantized` keeps
/// quantization state as it is (`--keep-quantized`); `quantize` names a
/// `--quantize` scheme; `dequantize` lists `(tensor, name, shape, dtype)` of
/// each weight `--dequantize` writes in the place of set tensor `tensor`
/// (files in order), and leaves the rest of the state out. Merging an
/// adapter, `view` lists the set's tensors (`ViewRows`) and `merged` the
/// weights whose values are merged (`(tensor, name, shape)`, after
/// `dequantize`'s in the made tensors' order).
#[pyfunction]
#[pyo3(signature = (sources, target, keep, limit, *, quantized=false, quantize=None, dequantize=None, merged=None, view=None))]
#[allow(clippy::too_many_arguments)]
pub fn plan_plain(
    py: Python<'_>,
    sources: Vec<Py<Entries>>,
    target: Option<&str>,
    keep: Vec<String>,
    limit: u64,
    quantized: bool,
    quantize: Option<&str>,
    dequantize: Option<Vec<MadeRow>>,
    merged: Option<Vec<MergedRow>>,
    view: Option<ViewRows>,
) -> PyResult<Vec<PlainShard>> {
    let target = target.map(castable_target).transpose()?;
    let scheme = quantize
        .map(|name| {
            Scheme::from_name(name).ok_or_else(|| invalid(format!("no --quantize scheme {name:?}")))
        })
        .transpose()?;
    let mode = match (scheme, &dequantize) {
        (Some(scheme), Some(_)) => Mode::Requantize(scheme),
        (Some(scheme), None) => Mode::Quantize(scheme),
        (None, Some(_)) => Mode::Dequantize,
        (None, None) if quantized => Mode::KeepQuantized,
        (None, None) => Mode::Cast,
    };
    let keep = KeepRule::new(&keep);
    let tables: Vec<&[TensorInfo]> = sources.iter().map(|e| &e.get().tensors[..]).collect();
    let view = view.map(|v| view_of(&tables, v)).transpose()?;
    let count = match &view {
        Some(v) => v.members.len(),
        None => tables.iter().map(|t| t.len()).sum(),
    };
    let made = made_of(dequantize, merged, count)?;
    let planned =
        py.detach(|| layout::plan_set(&tables, target, &keep, limit, mode, &made, view.as_ref()));
    let renamed: Vec<Option<String>> = view.map_or_else(Vec::new, |v| {
        let members = v.members.into_iter().map(|m| m.name);
        members
            .chain(v.added.into_iter().map(|a| Some(a.name)))
            .collect()
    });
    let (scales, made, renamed) = (Arc::new(planned.scales), Arc::new(made), Arc::new(renamed));
    Ok(planned
        .shards
        .into_iter()
        .map(|placed| {
            let info = |p: &Placed| &tables[p.source][p.row];
            let numel = |p: &Placed| match (p.part, recipe_of(p)) {
                (Part::Scale { scale, .. }, _) => scales[scale].1.iter().product(),
                (_, Some(k)) => made[k].shape.iter().product(),
                _ => info(p).numel(),
            };
            PlainShard {
                data_bytes: placed.last().map_or(0, |p| p.end),
                // a weight's scales are made of what its values read
                input_bytes: placed
                    .iter()
                    .filter(|p| !matches!(p.part, Part::Scale { .. }))
                    .map(|p| info(p).nbytes())
                    .sum(),
                numel: placed.iter().map(numel).sum(),
                sources: sources.iter().map(|s| s.clone_ref(py)).collect(),
                scales: Arc::clone(&scales),
                made: Arc::clone(&made),
                renamed: Arc::clone(&renamed),
                placed,
            }
        })
        .collect())
}

fn invalid(why: String) -> PyErr {
    pyo3::exceptions::PyValueError::new_err(why)
}

/// The made tensors of a request: `dequantize`'s, then `merged`'s, each of
/// one of the set's `count` tensors.
fn made_of(
    dequantize: Option<Vec<MadeRow>>,
    merged: Option<Vec<MergedRow>>,
    count: usize,
) -> PyResult<Vec<Made>> {
    let mut dtypes = DTypes::default();
    let dequantized = dequantize.unwrap_or_default().into_iter().map(|row| {
        let (tensor, name, shape, dtype) = row;
        let dtype = Some(dtypes.parse(&dtype).map_err(CoreError)?);
        Ok::<_, PyErr>((tensor, name, shape, dtype))
    });
    let merged = (merged.unwrap_or_default().into_iter()).map(|(t, n, s)| Ok((t, n, s, None)));
    let (mut made, mut taken) = (Vec::new(), vec![false; count]);
    for row in dequantized.chain(merged) {
        let (tensor, name, shape, dtype) = row?;
        if tensor >= count {
            return Err(invalid(format!("tensor {tensor} of a set of {count}")));
        }
        if std::mem::replace(&mut taken[tensor], true) {
            return Err(invalid(format!("tensor {tensor} made twice")));
        }
        made.push(Made {
            tensor,
            name,
            shape,
            dtype,
        });
    }
    Ok(made)
}

/// A merged set's [`View`] of `tables`, every `(source, row)` checked.
fn view_of(tables: &[&[TensorInfo]], (members, added): ViewRows) -> PyResult<View> {
    let at = |source: usize, row: usize| {
        let rows = tables.get(source).map_or(0, |t| t.len());
        if row < rows {
            Ok((source, row))
        } else {
            Err(invalid(format!(
                "row {row} of source {source} of {} sources",
                tables.len()
            )))
        }
    };
    let mut dtypes = DTypes::default();
    Ok(View {
        members: (members.into_iter())
            .map(|(rs, rr, vs, vr, name)| {
                let (rules, values) = (at(rs, rr)?, at(vs, vr)?);
                Ok(Member {
                    rules,
                    values,
                    name,
                })
            })
            .collect::<PyResult<_>>()?,
        added: (added.into_iter())
            .map(|(source, row, name, dtype)| {
                let values = at(source, row)?;
                let dtype = dtypes.parse(&dtype).map_err(CoreError)?;
                Ok(Added {
                    values,
                    name,
                    dtype,
                })
            })
            .collect::<PyResult<_>>()?,
    })
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
