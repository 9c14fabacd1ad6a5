//! A weight set's names checked by the core (`fastcast_core::names`): the
//! index as a table (`Index`), and the checks Python asks of it and of the
//! set's files, each file given as its `Entries` (no Python string per
//! tensor) or, for a torch.save file, a list of names.

use std::path::PathBuf;

use fastcast_core::format::index;
use fastcast_core::names::Mismatch;
use fastcast_core::rules::roles;
use fastcast_core::{names, DType, Error};
use pyo3::exceptions::{PyKeyError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PySet;

use crate::errors::{CoreError, ModelFolderError};
use crate::format::Entries;

/// A file's tensor names, as Python passes them.
enum FileNames<'py> {
    Table(Bound<'py, Entries>),
    Listed(Vec<String>),
}

impl<'py> FileNames<'py> {
    fn of(obj: Bound<'py, PyAny>) -> PyResult<FileNames<'py>> {
        match obj.cast_into::<Entries>() {
            Ok(table) => Ok(FileNames::Table(table)),
            Err(e) => Ok(FileNames::Listed(e.into_inner().extract()?)),
        }
    }

    fn names(&self) -> Vec<&str> {
        match self {
            FileNames::Table(table) => table.get().tensor_names(),
            FileNames::Listed(names) => names.iter().map(String::as_str).collect(),
        }
    }
}

/// Each file's names, borrowed from `files`.
fn all_names<'a>(files: &'a [FileNames<'_>]) -> Vec<Vec<&'a str>> {
    files.iter().map(FileNames::names).collect()
}

fn file_names(files: Vec<Bound<'_, PyAny>>) -> PyResult<Vec<FileNames<'_>>> {
    files.into_iter().map(FileNames::of).collect()
}

/// A sharded checkpoint's index (`read_index`): the files its `weight_map`
/// names, in name order, each with the tensors it holds in map order.
#[pyclass(frozen, module = "fastcast._core")]
pub struct Index {
    files: Vec<String>,
    tensors: Vec<Vec<String>>,
}

/// Where an index and its files disagree, as `Index.cross_check` tells it.
type Told = (&'static str, usize, String, usize);

#[pymethods]
impl Index {
    fn __len__(&self) -> usize {
        self.files.len()
    }

    /// The files it names, in name order.
    fn files(&self) -> Vec<&str> {
        self.files.iter().map(String::as_str).collect()
    }

    /// The tensors it says `file` holds, in map order.
    fn tensors(&self, file: &str) -> PyResult<Vec<&str>> {
        let at = self.files.iter().position(|f| f == file);
        let at = at.ok_or_else(|| PyKeyError::new_err(file.to_string()))?;
        Ok(self.tensors[at].iter().map(String::as_str).collect())
    }

    /// Check it against `files`, the names each file it names holds (in
    /// `files()` order; see `fastcast_core::names::cross_check`): None, or
    /// `("missing", file, first name, how many)` for the first file lacking
    /// a tensor it names, or `("unlisted", file, first name, how many in
    /// all)` for tensors the files hold that it does not name.
    fn cross_check(&self, files: Vec<Bound<'_, PyAny>>) -> PyResult<Option<Told>> {
        let files = file_names(files)?;
        if files.len() != self.files.len() {
            return Err(PyValueError::new_err(format!(
                "names of {} files for an index of {}",
                files.len(),
                self.files.len()
            )));
        }
        Ok(
            match names::cross_check(&self.tensors, &all_names(&files)) {
                None => None,
                Some(Mismatch::Missing { file, names }) => {
                    Some(("missing", file, names[0].to_string(), names.len()))
                }
                Some(Mismatch::Unlisted(found)) => {
                    let (file, name) = found[0];
                    Some(("unlisted", file, name.to_string(), found.len()))
                }
            },
        )
    }
}

/// The index json at `path` (see `fastcast_core::index`). Raises
/// `ModelFolderError` naming it when it is not JSON or has no `weight_map`
/// of tensor names to file names.
#[pyfunction]
pub fn read_index(py: Python<'_>, path: PathBuf) -> PyResult<Index> {
    let read = py.detach(|| std::fs::read(&path).map(|json| index::files_of(&json)));
    match read.map_err(|e| CoreError(Error::io(&path, e)))? {
        Ok(files) => {
            let (files, tensors) = files.into_iter().unzip();
            Ok(Index { files, tensors })
        }
        Err(index::IndexProblem::NotJson(e)) => Err(ModelFolderError::new_err(format!(
            "{}: not valid JSON: {e}",
            path.display()
        ))),
        Err(index::IndexProblem::NoWeightMap) => Err(ModelFolderError::new_err(format!(
            "{}: has no weight_map of tensor names to file names",
            path.display()
        ))),
    }
}

/// The first tensor of `files` (a weight set's files' names, in order) that
/// an earlier file, or the same file earlier, also holds: `(name, file
/// position, earlier file position)`; None when every name is once.
#[pyfunction]
pub fn first_repeat(files: Vec<Bound<'_, PyAny>>) -> PyResult<Option<(String, usize, usize)>> {
    let files = file_names(files)?;
    Ok(names::first_repeat(&all_names(&files)).map(|(n, f, e)| (n.to_string(), f, e)))
}

/// The roles (`quant_roles`, with dtypes) the tensors of a weight set's
/// files (their `Entries`) take, each once: a plain model is told without a
/// list of its 100k names.
#[pyfunction]
pub fn set_roles<'py>(
    py: Python<'py>,
    files: Vec<PyRef<'py, Entries>>,
) -> PyResult<Bound<'py, PySet>> {
    let typed: Vec<(&str, DType)> = files.iter().flat_map(|f| f.tensor_dtypes()).collect();
    let mut found = roles::typed_roles(&typed);
    found.sort_unstable_by_key(|r| r.name());
    found.dedup();
    PySet::new(py, found.iter().map(|r| r.name()))
}

/// A digest (`fastcast_core::names::digest`) of tensors given as columns:
/// their source names and the dtypes they are written in.
#[pyfunction]
pub fn tensors_digest(names: Vec<String>, dtypes: Vec<String>) -> PyResult<String> {
    if names.len() != dtypes.len() {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "{} names and {} dtypes",
            names.len(),
            dtypes.len()
        )));
    }
    Ok(names::digest(
        names
            .iter()
            .map(String::as_str)
            .zip(dtypes.iter().map(String::as_str)),
    ))
}
