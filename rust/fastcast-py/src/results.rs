//! What the core returns, as typed Python objects: frozen classes for a run's
//! stats and its shard records, a `LossCounts` dict per cast tensor.

use std::path::PathBuf;

use fastcast_core::exec;
use fastcast_core::format::journal;
use fastcast_core::rules::loss::LossStats;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};

/// One tensor's loss counts, which Python sees as a `LossCounts` dict.
#[derive(Clone, Copy, PartialEq)]
pub struct LossCounts(pub LossStats);

impl<'py> IntoPyObject<'py> for &LossCounts {
    type Target = PyDict;
    type Output = Bound<'py, PyDict>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        // Interned keys: a model of 100k tensors builds 100k of these dicts.
        let l = &self.0;
        let counts = PyDict::new(py);
        counts.set_item(intern!(py, "elements"), l.elements)?;
        counts.set_item(intern!(py, "overflow"), l.overflow)?;
        counts.set_item(intern!(py, "underflow"), l.underflow)?;
        counts.set_item(intern!(py, "nan_in"), l.nan_in)?;
        counts.set_item(intern!(py, "inf_in"), l.inf_in)?;
        counts.set_item(intern!(py, "max_abs"), l.max_abs)?;
        Ok(counts)
    }
}

impl<'py> IntoPyObject<'py> for LossCounts {
    type Target = PyDict;
    type Output = Bound<'py, PyDict>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        (&self).into_pyobject(py)
    }
}

/// `[(tensor name, counts)]` as Python will see it (names moved, not copied:
/// a model may have 100k of them).
pub fn loss_list(losses: Vec<(String, LossStats)>) -> Vec<(String, LossCounts)> {
    losses
        .into_iter()
        .map(|(name, l)| (name, LossCounts(l)))
        .collect()
}

/// A shard as written and journaled: output-relative name, size, content
/// digest (and the chunk size it was computed with), the loss counts of its
/// cast tensors in plan order, and the stamp of the synced file.
#[pyclass(module = "fastcast._core", frozen, eq, skip_from_py_object)]
#[derive(Clone, PartialEq)]
pub struct ShardRecord {
    #[pyo3(get)]
    pub name: String,
    #[pyo3(get)]
    pub size: u64,
    #[pyo3(get)]
    pub digest: u64,
    #[pyo3(get)]
    pub chunk_bytes: usize,
    #[pyo3(get)]
    pub losses: Vec<(String, LossCounts)>,
    stamp: Option<journal::FileStamp>,
}

#[pymethods]
impl ShardRecord {
    /// Whether `path` is provably the file this record was journaled for (see
    /// `journal::ShardRecord::unchanged`); `False` means "check its digest".
    fn unchanged(&self, py: Python<'_>, path: PathBuf) -> bool {
        self.stamp
            .is_some_and(|stamp| py.detach(|| stamp.describes(&path, self.size)))
    }

    /// The loss counts as columns, without a dict per tensor (a model may have
    /// 100k): the tensor names in plan order, and one `bytes` of six native-endian
    /// 8-byte columns of `len(names)` values each: `elements`, `overflow`,
    /// `underflow`, `nan_in`, `inf_in` (unsigned) and `max_abs` (a double).
    fn loss_columns<'py>(&self, py: Python<'py>) -> (Vec<&str>, Bound<'py, PyBytes>) {
        let n = self.losses.len();
        let names = self.losses.iter().map(|(name, _)| name.as_str()).collect();
        let columns: [fn(&LossStats) -> [u8; 8]; 6] = [
            |l| l.elements.to_ne_bytes(),
            |l| l.overflow.to_ne_bytes(),
            |l| l.underflow.to_ne_bytes(),
            |l| l.nan_in.to_ne_bytes(),
            |l| l.inf_in.to_ne_bytes(),
            |l| l.max_abs.to_ne_bytes(),
        ];
        let mut bytes = Vec::with_capacity(6 * 8 * n);
        for column in columns {
            for (_, counts) in &self.losses {
                bytes.extend_from_slice(&column(&counts.0));
            }
        }
        (names, PyBytes::new(py, &bytes))
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "ShardRecord(name={}, size={}, digest=0x{:016x}, chunk_bytes={}, losses=<{} tensors>)",
            PyString::new(py, &self.name).repr()?,
            self.size,
            self.digest,
            self.chunk_bytes,
            self.losses.len()
        ))
    }
}

impl From<journal::ShardRecord> for ShardRecord {
    fn from(r: journal::ShardRecord) -> ShardRecord {
        ShardRecord {
            name: r.name,
            size: r.size,
            digest: r.digest,
            chunk_bytes: r.chunk_bytes,
            losses: loss_list(r.losses),
            stamp: r.stamp,
        }
    }
}

/// What `execute_plan` did: counts, the loss counts of every cast tensor in
/// plan order, and a record of every shard written.
#[pyclass(module = "fastcast._core", frozen, get_all, eq, skip_from_py_object)]
#[derive(Clone, PartialEq)]
pub struct ExecStats {
    pub tensors_cast: u64,
    pub tensors_copied: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub shards_written: u64,
    pub shards: Vec<ShardRecord>,
}

#[pymethods]
impl ExecStats {
    /// The shards' loss counts, one after the other (made when asked: the
    /// report reads each shard's columns instead).
    #[getter]
    fn losses(&self) -> Vec<(String, LossCounts)> {
        self.shards.iter().flat_map(|s| s.losses.clone()).collect()
    }

    fn __repr__(&self) -> String {
        format!(
            "ExecStats(tensors_cast={}, tensors_copied={}, bytes_read={}, bytes_written={}, \
             shards_written={}, losses=<{} tensors>, shards=<{} records>)",
            self.tensors_cast,
            self.tensors_copied,
            self.bytes_read,
            self.bytes_written,
            self.shards_written,
            self.shards.iter().map(|s| s.losses.len()).sum::<usize>(),
            self.shards.len()
        )
    }
}

impl From<exec::ExecStats> for ExecStats {
    fn from(s: exec::ExecStats) -> ExecStats {
        ExecStats {
            tensors_cast: s.tensors_cast,
            tensors_copied: s.tensors_copied,
            bytes_read: s.bytes_read,
            bytes_written: s.bytes_written,
            shards_written: s.shards_written,
            shards: s.shards.into_iter().map(ShardRecord::from).collect(),
        }
    }
}
