//! Plans run: `execute_plan` writes the shards, `scan_plan` predicts what
//! the casts lose, `shard_digest` checks a shard a resumed run would reuse,
//! each on the runtime's worker threads with the GIL released.

use std::path::PathBuf;

use fastcast_core::cast::CastOptions;
use fastcast_core::exec::{self, shard_file, ExecOptions};
use pyo3::prelude::*;

use crate::cast::{kernel_from, overflow_from};
use crate::errors::CoreError;
use crate::plan::wire::plan_from;
use crate::results::{loss_list, ExecStats, LossCounts};
use crate::runtime::{drop_later, watch};

/// Run a conversion plan (a `Plan` dict, version [`exec::PLAN_VERSION`]) with
/// the GIL released.
///
/// Each shard is written under a hidden partial name, synced (unless
/// `fsync=False`), renamed to its `path` and appended to `journal`.
/// `progress(bytes_done)` is called about ten times a second with the input
/// bytes processed so far; Ctrl-C (or an exception from `progress`) stops the
/// run within a chunk, removes the shard in progress and re-raises. Nothing is
/// refused for what a cast loses: the returned `ExecStats` has the counts.
#[pyfunction]
#[pyo3(signature = (plan, *, progress=None, threads=None, fsync=true, chunk_bytes=None, kernel=None, fp8_overflow="saturate", journal=None))]
#[allow(clippy::too_many_arguments)]
pub fn execute_plan<'py>(
    py: Python<'py>,
    plan: &Bound<'py, PyAny>,
    progress: Option<Bound<'py, PyAny>>,
    threads: Option<usize>,
    fsync: bool,
    chunk_bytes: Option<usize>,
    kernel: Option<&str>,
    fp8_overflow: &str,
    journal: Option<PathBuf>,
) -> PyResult<ExecStats> {
    let plan = plan_from(plan)?;
    let opts = ExecOptions {
        cast: CastOptions {
            fp8_overflow: overflow_from(fp8_overflow)?,
            kernel: kernel_from(kernel)?,
        },
        chunk_bytes: chunk_bytes.unwrap_or(exec::DEFAULT_CHUNK_BYTES).max(1),
        fsync,
        journal,
    };
    let stats = watch(py, threads, progress, move |w| {
        let stats = exec::execute(&plan, &opts, w);
        drop_later(plan);
        stats
    })?;
    Ok(ExecStats::from(stats))
}

/// Loss counts of every tensor `plan` would cast, reading the inputs only
/// (what `fastcast inspect --dtype` predicts). Returns `[(name, counts)]`.
#[pyfunction]
#[pyo3(signature = (plan, *, progress=None, threads=None))]
pub fn scan_plan<'py>(
    py: Python<'py>,
    plan: &Bound<'py, PyAny>,
    progress: Option<Bound<'py, PyAny>>,
    threads: Option<usize>,
) -> PyResult<Vec<(String, LossCounts)>> {
    let plan = plan_from(plan)?;
    let losses = watch(py, threads, progress, move |w| exec::scan(&plan, w))?;
    Ok(loss_list(losses))
}

/// The digest of shard `index` of the plan, recomputed from the file at its
/// `path` (to check the shards a resumed run would reuse).
#[pyfunction]
pub fn shard_digest(
    py: Python<'_>,
    plan: &Bound<'_, PyAny>,
    index: usize,
    chunk_bytes: usize,
) -> PyResult<u64> {
    let plan = plan_from(plan)?;
    Ok(py
        .detach(|| exec::shard_digest(&plan, index, chunk_bytes))
        .map_err(CoreError)?)
}

/// The hidden name a file is written under until it is complete (it ends
/// with `PARTIAL_SUFFIX`).
#[pyfunction]
pub fn partial_path(path: PathBuf) -> PathBuf {
    shard_file::temp_path(&path)
}
