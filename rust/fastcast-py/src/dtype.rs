//! Dtypes by name: what Python types (`parse_dtype`), the table of every
//! dtype fastcast knows (`dtypes`), and the parsing the other modules share:
//! a header's name, a castable target, a plan's names parsed once each.

use fastcast_core::{dtype, DType, Error};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use crate::errors::{CoreError, DtypeError};

/// Parse a user-typed dtype name into its safetensors name.
#[pyfunction]
pub fn parse_dtype(name: &str) -> PyResult<&'static str> {
    let d: DType = name.parse().map_err(CoreError)?;
    Ok(d.safetensors_name())
}

/// Every dtype fastcast knows, as dicts (name, torch name, aliases, bits,
/// castable, short name and largest finite value of the castable ones).
#[pyfunction]
pub fn dtypes(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let list = PyList::empty(py);
    for d in dtype::ALL {
        let item = PyDict::new(py);
        item.set_item("name", d.safetensors_name())?;
        item.set_item("torch_name", d.torch_name())?;
        item.set_item("aliases", d.aliases().to_vec())?;
        item.set_item("bits", d.bits())?;
        item.set_item("castable", d.is_castable())?;
        item.set_item("is_float", d.is_float())?;
        item.set_item("short_name", d.short_name())?;
        item.set_item("max", d.max_finite())?;
        list.append(item)?;
    }
    Ok(list)
}

/// A safetensors dtype name as a header spells it, or a DtypeError.
pub fn safetensors_dtype(name: &str) -> Result<DType, CoreError> {
    DType::from_safetensors_name(name).ok_or_else(|| {
        CoreError(Error::UnknownDtype {
            name: name.to_owned(),
            valid: DType::valid_names(),
        })
    })
}

/// The target dtype `target` names, refused (DtypeError) unless castable: the
/// one rule for a conversion's target (`ConvertOptions`, the planners).
pub fn castable_target(target: &str) -> PyResult<DType> {
    let to: DType = target.parse().map_err(CoreError)?;
    if !to.is_castable() {
        let typed = Python::attach(|py| -> PyResult<String> {
            Ok(PyString::new(py, target).repr()?.to_string())
        })?;
        // in the order of the dtype table, by the names users type
        let names: Vec<&str> = dtype::ALL.iter().filter_map(|d| d.short_name()).collect();
        return Err(DtypeError::new_err(format!(
            "cannot convert to {typed}: the target must be one of {}",
            names.join(", ")
        )));
    }
    Ok(to)
}

/// The safetensors name of the conversion target `name` names; DtypeError for
/// one fastcast cannot write (an unknown name, an integer or packed dtype).
#[pyfunction]
#[pyo3(name = "castable_target")]
pub fn castable_target_name(name: &str) -> PyResult<&'static str> {
    Ok(castable_target(name)?.safetensors_name())
}

/// The dtype names met so far, parsed: a plan names a handful, 100k times.
#[derive(Default)]
pub struct DTypes(Vec<(String, DType)>);

impl DTypes {
    /// `name`, parsed (once per distinct name).
    pub fn parse(&mut self, name: &str) -> fastcast_core::Result<DType> {
        if let Some((_, dtype)) = self.0.iter().find(|(known, _)| known == name) {
            return Ok(*dtype);
        }
        let dtype: DType = name.parse()?;
        self.0.push((name.to_string(), dtype));
        Ok(dtype)
    }
}
