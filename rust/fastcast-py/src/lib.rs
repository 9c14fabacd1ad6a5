//! `fastcast._core`: the Python face of fastcast-core. This file only
//! registers: every function, class, constant and exception of the module is
//! defined in the module named like the core's that it serves.
//!
//! Only argument conversion, GIL release and error mapping live in this
//! crate; every decision about bytes is made in fastcast-core:
//!
//! - `dtype`, `cast`, `rules`, `names`: the core's dtypes, kernels, rules and
//!   name checks, asked by Python;
//! - `format`: headers, torch.save files and the journal, read;
//! - `plan`: a `Plan` dict read (`wire`) and a plain model's plan as tables
//!   (`layout`);
//! - `exec`: plans run, on the GIL-free worker threads of `runtime`;
//! - `results`: what a run returns, as typed Python objects; `errors`: core
//!   errors as Python exception classes.

mod cast;
mod dtype;
mod errors;
mod exec;
mod format;
mod names;
mod plan;
mod results;
mod rules;
mod runtime;

use fastcast_core::exec::shard_file;
use fastcast_core::format::header;
use fastcast_core::plan::wire::PLAN_VERSION;
use fastcast_core::rules::fates::Fate;
use fastcast_core::rules::roles::Role;
use fastcast_core::rules::scheme::{self, Scheme};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use errors::{
    insufficient_space_error, loss_error, DtypeError, FastcastError, InvalidCheckpointError,
    InvalidSafetensorsError, ModelFolderError, OutputExistsError, QuantizedModelError,
};
use plan::{layout, wire};

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PLAN_VERSION", PLAN_VERSION)?;
    m.add("PARTIAL_SUFFIX", shard_file::PARTIAL_SUFFIX)?;
    m.add("MAX_HEADER_LEN", header::MAX_HEADER_LEN)?;
    m.add(
        "QUANTIZE_SCHEMES",
        PyTuple::new(py, Scheme::ALL.map(Scheme::name))?,
    )?;
    m.add("FP8_BLOCK", scheme::FP8_BLOCK)?;
    m.add(
        "DEFAULT_CHUNK_BYTES",
        fastcast_core::exec::DEFAULT_CHUNK_BYTES,
    )?;
    let names = |roles: Vec<&'static str>| PyTuple::new(py, roles);
    m.add(
        "STATE_ROLES",
        names(
            Role::ALL
                .into_iter()
                .filter(|r| r.is_state())
                .map(Role::name)
                .collect(),
        )?,
    )?;
    m.add(
        "SURVIVING_ROLES",
        names(
            Role::ALL
                .into_iter()
                .filter(|r| !r.is_state())
                .map(Role::name)
                .collect(),
        )?,
    )?;
    m.add(
        "UNQUANTIZED_FATES",
        names(
            Fate::ALL
                .into_iter()
                .filter(|f| f.leaves_unquantized())
                .map(Fate::name)
                .collect(),
        )?,
    )?;
    m.add_class::<results::ExecStats>()?;
    m.add_class::<results::ShardRecord>()?;
    m.add_class::<format::Entries>()?;
    m.add_class::<layout::PlainShard>()?;
    m.add_class::<layout::PlainRows>()?;
    m.add_class::<names::Index>()?;
    m.add("FastcastError", py.get_type::<FastcastError>())?;
    m.add(
        "InvalidSafetensorsError",
        py.get_type::<InvalidSafetensorsError>(),
    )?;
    m.add(
        "InvalidCheckpointError",
        py.get_type::<InvalidCheckpointError>(),
    )?;
    m.add("DtypeError", py.get_type::<DtypeError>())?;
    m.add("ModelFolderError", py.get_type::<ModelFolderError>())?;
    m.add("QuantizedModelError", py.get_type::<QuantizedModelError>())?;
    m.add("OutputExistsError", py.get_type::<OutputExistsError>())?;
    m.add("InsufficientSpaceError", insufficient_space_error(py)?)?;
    m.add("LossError", loss_error(py)?)?;
    m.add_function(wrap_pyfunction!(dtype::parse_dtype, m)?)?;
    m.add_function(wrap_pyfunction!(dtype::castable_target_name, m)?)?;
    m.add_function(wrap_pyfunction!(dtype::dtypes, m)?)?;
    m.add_function(wrap_pyfunction!(rules::target_dtypes, m)?)?;
    m.add_function(wrap_pyfunction!(rules::quant_roles, m)?)?;
    m.add_function(wrap_pyfunction!(rules::quantize_targets, m)?)?;
    m.add_function(wrap_pyfunction!(rules::cast_rule, m)?)?;
    m.add_function(wrap_pyfunction!(cast::available_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(cast::select_kernel, m)?)?;
    m.add_function(wrap_pyfunction!(cast::cast_into, m)?)?;
    m.add_function(wrap_pyfunction!(format::read_header, m)?)?;
    m.add_function(wrap_pyfunction!(format::read_entries, m)?)?;
    m.add_function(wrap_pyfunction!(names::first_repeat, m)?)?;
    m.add_function(wrap_pyfunction!(names::set_roles, m)?)?;
    m.add_function(wrap_pyfunction!(layout::plan_plain, m)?)?;
    m.add_function(wrap_pyfunction!(layout::pack, m)?)?;
    m.add_function(wrap_pyfunction!(layout::lay_out, m)?)?;
    m.add_function(wrap_pyfunction!(names::tensors_digest, m)?)?;
    m.add_function(wrap_pyfunction!(names::read_index, m)?)?;
    m.add_function(wrap_pyfunction!(format::read_torch_file, m)?)?;
    m.add_function(wrap_pyfunction!(exec::execute_plan, m)?)?;
    m.add_function(wrap_pyfunction!(exec::scan_plan, m)?)?;
    m.add_function(wrap_pyfunction!(exec::shard_digest, m)?)?;
    m.add_function(wrap_pyfunction!(format::read_journal, m)?)?;
    m.add_function(wrap_pyfunction!(wire::header_lengths, m)?)?;
    m.add_function(wrap_pyfunction!(exec::partial_path, m)?)?;
    Ok(())
}
