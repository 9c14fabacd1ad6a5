//! What is on disk, read for Python: safetensors headers (`read_header`,
//! and `read_entries`' tables of tensors, [`Entries`]), torch.save files and
//! the resume journal, each read with the GIL released.

use std::path::PathBuf;

use fastcast_core::format::header::{Header, TensorInfo};
use fastcast_core::format::journal;
use fastcast_core::format::torchfile::{Leaf, TorchFile};
use fastcast_core::DType;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::errors::CoreError;
use crate::results::ShardRecord;

/// An input file's tensors, in data order, offsets absolute in the file: a
/// safetensors file's as `_core.read_entries` reads them, or a torch.save
/// file's as Python chose them (`Entries(file, rows)`), so that every weight
/// set is one kind of table to the planner and the name checks.
#[pyclass(frozen, module = "fastcast._core")]
pub struct Entries {
    /// The caller's object for the file (a `Path`), put in every row.
    file: Py<PyAny>,
    pub tensors: Vec<TensorInfo>,
    /// A torch.save file's: the keys leading to each tensor in its pickle
    /// (verify loads it there); empty for safetensors.
    pickle_paths: Vec<Vec<String>>,
}

impl Entries {
    pub fn new(file: Py<PyAny>, tensors: Vec<TensorInfo>) -> Entries {
        Entries {
            file,
            tensors,
            pickle_paths: Vec::new(),
        }
    }

    /// The tensors' names, borrowed.
    pub fn tensor_names(&self) -> Vec<&str> {
        self.tensors.iter().map(|t| t.name.as_str()).collect()
    }

    /// The tensors' names, borrowed, with their dtypes.
    pub fn tensor_dtypes(&self) -> impl Iterator<Item = (&str, DType)> {
        self.tensors.iter().map(|t| (t.name.as_str(), t.dtype))
    }
}

/// A row of a torch.save file's table: name, dtype, shape, absolute
/// `(begin, end)`, pickle path.
type TorchRow = (String, String, Vec<u64>, (u64, u64), Vec<String>);

#[pymethods]
impl Entries {
    /// A torch.save file's tensors, chosen and in data order: `rows` of
    /// `(name, dtype, shape, (begin, end), pickle path)`.
    #[new]
    fn from_rows(file: Py<PyAny>, rows: Vec<TorchRow>) -> PyResult<Entries> {
        let mut tensors = Vec::with_capacity(rows.len());
        let mut pickle_paths = Vec::with_capacity(rows.len());
        for (name, dtype, shape, data_offsets, path) in rows {
            let dtype = dtype.parse().map_err(CoreError)?;
            tensors.push(TensorInfo {
                name,
                dtype,
                shape,
                data_offsets,
            });
            pickle_paths.push(path);
        }
        Ok(Entries {
            file,
            tensors,
            pickle_paths,
        })
    }

    fn __len__(&self) -> usize {
        self.tensors.len()
    }

    /// The file, as the caller named it.
    #[getter]
    fn file(&self, py: Python<'_>) -> Py<PyAny> {
        self.file.clone_ref(py)
    }

    /// The tensors' names.
    fn names<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.tensors.iter().map(|t| t.name.as_str()))
    }

    /// The rows of `_source.entries.TensorEntry`: `(name, dtype, shape, file,
    /// (begin, end), pickle path or None)`.
    fn rows<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let rows = PyList::empty(py);
        for (i, t) in self.tensors.iter().enumerate() {
            let path = match self.pickle_paths.get(i) {
                Some(keys) => PyTuple::new(py, keys)?.into_any(),
                None => py.None().into_bound(py),
            };
            rows.append((
                &t.name,
                PyString::intern(py, t.dtype.safetensors_name()),
                PyTuple::new(py, &t.shape)?,
                &self.file,
                t.data_offsets,
                path,
            ))?;
        }
        Ok(rows)
    }
}

/// Read and validate a safetensors file's header.
///
/// Returns `{"metadata": dict | None, "tensors": [(name, dtype, shape, (begin, end))],
/// "data_start": int}`.
#[pyfunction]
pub fn read_header(py: Python<'_>, path: PathBuf) -> PyResult<Bound<'_, PyDict>> {
    let header = py.detach(|| Header::read(&path)).map_err(CoreError)?;
    let out = PyDict::new(py);
    out.set_item("metadata", metadata_dict(py, &header)?)?;
    let tensors = PyList::empty(py);
    for t in &header.tensors {
        tensors.append((
            &t.name,
            t.dtype.safetensors_name(),
            t.shape.clone(),
            t.data_offsets,
        ))?;
    }
    out.set_item("tensors", tensors)?;
    out.set_item("data_start", header.data_start())?;
    Ok(out)
}

/// A header's `__metadata__` as a dict, or `None` when it has none.
fn metadata_dict<'py>(py: Python<'py>, header: &Header) -> PyResult<Option<Bound<'py, PyDict>>> {
    let Some(meta) = &header.metadata else {
        return Ok(None);
    };
    let m = PyDict::new(py);
    for (k, v) in meta {
        m.set_item(k, v)?;
    }
    Ok(Some(m))
}

/// Each safetensors file's metadata and tensors, `(metadata, Entries)`, for
/// `paths` (each path the `file` its rows name): the tensors in data order,
/// offsets absolute in the file. A model may have 100k tensors: they stay
/// here until Python asks for columns or rows. The headers (megabytes of
/// JSON for 100k tensors) are read and checked in parallel; on failure, the
/// error of the first failing file in `paths` order.
#[pyfunction]
pub fn read_entries<'py>(
    py: Python<'py>,
    paths: Vec<Bound<'py, PyAny>>,
) -> PyResult<Vec<(Option<Bound<'py, PyDict>>, Entries)>> {
    let files: Vec<PathBuf> = paths.iter().map(|p| p.extract()).collect::<PyResult<_>>()?;
    let headers: Vec<_> = py.detach(|| {
        use rayon::prelude::*;
        files.par_iter().map(|f| Header::read(f)).collect()
    });
    headers
        .into_iter()
        .zip(paths)
        .map(|(header, file)| entries_of(py, header.map_err(CoreError)?, file.unbind()))
        .collect()
}

fn entries_of<'py>(
    py: Python<'py>,
    header: Header,
    file: Py<PyAny>,
) -> PyResult<(Option<Bound<'py, PyDict>>, Entries)> {
    let metadata = metadata_dict(py, &header)?;
    let start = header.data_start();
    let mut tensors = header.tensors;
    tensors.sort_by_key(|t| t.data_offsets); // stable: ties keep the header's order
    for t in &mut tensors {
        t.data_offsets = (start + t.data_offsets.0, start + t.data_offsets.1);
    }
    Ok((metadata, Entries::new(file, tensors)))
}

/// Read a torch.save file (`.bin`/`.pt`/`.pth`) without running pickle.
///
/// Returns `{"format": "zip", "prefix", "byteorder": "little", "entries",
/// "unreferenced"}`: each entry is `{"path": [keys], "tensor": {...}}` or
/// `{"path": [keys], "other": "int"}` (see `_core.pyi`). A file fastcast
/// refuses raises `InvalidCheckpointError` with one line.
#[pyfunction]
pub fn read_torch_file(py: Python<'_>, path: PathBuf) -> PyResult<Bound<'_, PyDict>> {
    let file = py.detach(|| TorchFile::read(&path)).map_err(CoreError)?;
    let out = PyDict::new(py);
    out.set_item("format", "zip")?;
    out.set_item("prefix", &file.prefix)?;
    out.set_item("byteorder", file.byteorder)?;
    let entries = PyList::empty(py);
    for entry in &file.entries {
        let e = PyDict::new(py);
        e.set_item("path", &entry.path)?;
        match &entry.leaf {
            Leaf::Tensor(t) => {
                let d = PyDict::new(py);
                d.set_item("dtype", t.dtype.safetensors_name())?;
                d.set_item("shape", &t.shape)?;
                d.set_item("stride", &t.stride)?;
                d.set_item("storage", &t.storage)?;
                d.set_item("storage_offset", t.storage_offset)?;
                d.set_item("offsets", [t.offsets.0, t.offsets.1])?;
                d.set_item("contiguous", t.contiguous)?;
                e.set_item("tensor", d)?;
            }
            Leaf::Other(what) => e.set_item("other", what)?,
        }
        entries.append(e)?;
    }
    out.set_item("entries", entries)?;
    out.set_item("unreferenced", &file.unreferenced)?;
    Ok(out)
}

/// The records of a resume journal, in the order written; a torn last line
/// is skipped and a missing journal has none.
#[pyfunction]
pub fn read_journal(py: Python<'_>, path: PathBuf) -> PyResult<Vec<ShardRecord>> {
    let records = py.detach(|| journal::read(&path)).map_err(CoreError)?;
    Ok(records.into_iter().map(ShardRecord::from).collect())
}
