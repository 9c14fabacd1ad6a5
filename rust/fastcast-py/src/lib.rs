//! `fastcast._core`: the Python face of fastcast-core.
//!
//! Only argument conversion, GIL release and error mapping live here; every
//! decision about bytes is made in fastcast-core.

mod errors;
mod names;
mod plan;
mod results;
mod tables;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use fastcast_core::cast::{CastOptions, Fp8Overflow, Kernel};
use fastcast_core::exec::{self, shard_file, ExecOptions, Progress};
use fastcast_core::format::header::{self, Header};
use fastcast_core::format::journal;
use fastcast_core::format::torchfile::{Leaf, TorchFile};
use fastcast_core::plan::wire::PLAN_VERSION;
use fastcast_core::rules::loss::{self, LossRule};
use fastcast_core::rules::scheme::{self, Scheme};
use fastcast_core::rules::{fates, glob::KeepRule, roles, target};
use fastcast_core::{dtype, DType, Error};
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use errors::{
    insufficient_space_error, loss_error, CoreError, DtypeError, FastcastError,
    InvalidCheckpointError, InvalidSafetensorsError, ModelFolderError, OutputExistsError,
    QuantizedModelError,
};
use plan::plan_from;
use results::{loss_list, ExecStats, LossCounts, ShardRecord};
use tables::{Entries, PlainRows, PlainShard};

/// Parse a user-typed dtype name into its safetensors name.
#[pyfunction]
fn parse_dtype(name: &str) -> PyResult<&'static str> {
    let d: DType = name.parse().map_err(CoreError)?;
    Ok(d.safetensors_name())
}

/// Every dtype fastcast knows, as dicts (name, torch name, aliases, bits,
/// castable, short name and largest finite value of the castable ones).
#[pyfunction]
fn dtypes(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
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
fn safetensors_dtype(name: &str) -> Result<DType, CoreError> {
    DType::from_safetensors_name(name).ok_or_else(|| {
        CoreError(Error::UnknownDtype {
            name: name.to_owned(),
            valid: DType::valid_names(),
        })
    })
}

/// The target dtype `target` names, refused (DtypeError) unless castable.
fn castable_target(target: &str) -> PyResult<DType> {
    let to: DType = target.parse().map_err(CoreError)?;
    if !to.is_castable() {
        return Err(DtypeError::new_err(format!(
            "cannot convert to {to}: the target must be one of {}",
            dtype::CASTABLE.map(DType::safetensors_name).join(", ")
        )));
    }
    Ok(to)
}

/// For each `(tensor name, safetensors dtype)`, the dtype it gets converting
/// to `target`: unchanged when not a castable float, matched by a `keep` glob
/// (`fnmatch.fnmatchcase` semantics) or, with `quantized`, holding
/// quantization state (see `quant_roles`); else `target`.
#[pyfunction]
#[pyo3(signature = (tensors, target, keep, *, quantized=false))]
fn target_dtypes(
    tensors: Vec<(String, String)>,
    target: &str,
    keep: Vec<String>,
    quantized: bool,
) -> PyResult<Vec<&'static str>> {
    let to = castable_target(target)?;
    let typed = tensors
        .into_iter()
        .map(|(name, dtype)| Ok((name, safetensors_dtype(&dtype)?)))
        .collect::<PyResult<Vec<_>>>()?;
    let dtypes = target::target_dtypes(&typed, to, &KeepRule::new(&keep), quantized);
    Ok(dtypes.into_iter().map(DType::safetensors_name).collect())
}

/// What `--quantize` in `scheme` ("fp8", "fp8-channel") makes of each
/// `(tensor name, safetensors dtype, shape)` of a plain model converted to
/// `target`: `(dtype, fate, block, scale)`, the fate being "quantize",
/// "misfit", "fused misfit", "kept", "router" or "other", and for a quantized
/// weight the block each scale covers and the scale tensor's name and shape.
#[pyfunction]
fn quantize_targets(
    tensors: Vec<(String, String, Vec<u64>)>,
    target: Option<&str>,
    keep: Vec<String>,
    scheme: &str,
) -> PyResult<Vec<QuantizeTarget>> {
    let to = target.map(castable_target).transpose()?;
    let scheme = Scheme::from_name(scheme).ok_or_else(|| {
        pyo3::exceptions::PyValueError::new_err(format!(
            "quantize must be one of {}, not {scheme:?}",
            Scheme::ALL.map(Scheme::name).join(", ")
        ))
    })?;
    let typed = tensors
        .into_iter()
        .map(|(name, dtype, shape)| Ok((name, safetensors_dtype(&dtype)?, shape)))
        .collect::<PyResult<Vec<_>>>()?;
    let targets = fates::quantize_targets(&typed, to, &KeepRule::new(&keep), scheme);
    Ok(targets
        .into_iter()
        .map(|t| (t.dtype.safetensors_name(), t.fate.name(), t.block, t.scale))
        .collect())
}

/// One tensor's `(dtype, fate, block, (scale name, scale shape))` under `--quantize`.
type QuantizeTarget = (
    &'static str,
    &'static str,
    Option<(u64, u64)>,
    Option<(String, Vec<u64>)>,
);

/// The role of each tensor in its model's quantization ("plain", "quantized
/// weight", "scale", "zero point", "group index", "quant state", "pinned
/// fp32", "unknown state"), from every tensor name of the model and, when
/// given, their dtypes (which tell state of formats fastcast does not know).
#[pyfunction]
#[pyo3(signature = (names, dtypes=None))]
fn quant_roles(names: Vec<String>, dtypes: Option<Vec<String>>) -> PyResult<Vec<&'static str>> {
    let roles = match dtypes {
        None => roles::roles(&names),
        Some(dtypes) => {
            if dtypes.len() != names.len() {
                return Err(pyo3::exceptions::PyValueError::new_err(
                    "one dtype per name",
                ));
            }
            let typed = names
                .iter()
                .zip(&dtypes)
                .map(|(n, d)| Ok((n.as_str(), safetensors_dtype(d)?)))
                .collect::<Result<Vec<_>, CoreError>>()?;
            roles::typed_roles(&typed)
        }
    };
    Ok(roles.into_iter().map(roles::Role::name).collect())
}

/// What casting `src` to `dst` can lose: the smallest finite magnitude that
/// overflows, the largest non-zero one that becomes 0, whether the exponent
/// range shrinks, and whether overflow saturates under the default policy.
#[pyfunction]
fn cast_rule<'py>(py: Python<'py>, src: &str, dst: &str) -> PyResult<Bound<'py, PyDict>> {
    let from: DType = src.parse().map_err(CoreError)?;
    let to: DType = dst.parse().map_err(CoreError)?;
    if !(from.is_castable() && to.is_castable()) {
        return Err(CoreError(Error::not_castable(from, to)).into());
    }
    let rule = LossRule::new(from, to);
    let out = PyDict::new(py);
    out.set_item("overflow_from", rule.overflow_from())?;
    out.set_item("underflow_to", rule.underflow_to())?;
    out.set_item("narrows_range", loss::narrows_range(from, to))?;
    out.set_item("saturates", loss::saturates(to, Fp8Overflow::default()))?;
    Ok(out)
}

/// Names of the kernel paths this CPU can run, slowest first.
#[pyfunction]
fn available_kernels() -> Vec<&'static str> {
    Kernel::available().into_iter().map(Kernel::name).collect()
}

/// The kernel path a cast uses when none is named: `FASTCAST_KERNEL`, else the fastest.
#[pyfunction]
#[pyo3(signature = (name=None))]
fn select_kernel(name: Option<&str>) -> PyResult<&'static str> {
    Ok(kernel_from(name)?.name())
}

fn kernel_from(name: Option<&str>) -> PyResult<Kernel> {
    let from_env = std::env::var("FASTCAST_KERNEL").ok();
    let chosen = name.or(from_env.as_deref()).unwrap_or("auto");
    Ok(Kernel::from_name(chosen).map_err(CoreError)?)
}

fn overflow_from(name: &str) -> PyResult<Fp8Overflow> {
    match name {
        "saturate" => Ok(Fp8Overflow::Saturate),
        "nan" => Ok(Fp8Overflow::Nan),
        other => Err(pyo3::exceptions::PyValueError::new_err(format!(
            "fp8_overflow must be 'saturate' or 'nan', not {other:?}"
        ))),
    }
}

/// Cast the bytes of `src` (elements of `src_dtype`) into `dst` (elements of
/// `dst_dtype`), in parallel, with the GIL released.
///
/// Both are contiguous byte buffers (e.g. `ndarray.view(np.uint8)`); `dst`
/// must be writable and hold exactly as many elements as `src`.
#[pyfunction]
#[pyo3(signature = (src, src_dtype, dst, dst_dtype, *, fp8_overflow="saturate", kernel=None, threads=None))]
#[allow(clippy::too_many_arguments)]
fn cast_into(
    py: Python<'_>,
    src: PyBuffer<u8>,
    src_dtype: &str,
    dst: PyBuffer<u8>,
    dst_dtype: &str,
    fp8_overflow: &str,
    kernel: Option<&str>,
    threads: Option<usize>,
) -> PyResult<()> {
    let from: DType = src_dtype.parse().map_err(CoreError)?;
    let to: DType = dst_dtype.parse().map_err(CoreError)?;
    let opts = CastOptions {
        fp8_overflow: overflow_from(fp8_overflow)?,
        kernel: kernel_from(kernel)?,
    };
    if !src.is_c_contiguous() || !dst.is_c_contiguous() {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "cast_into needs C-contiguous buffers",
        ));
    }
    if dst.readonly() {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "cast_into: the destination buffer is read-only",
        ));
    }
    let (src_addr, src_len) = (src.buf_ptr() as usize, src.len_bytes());
    let (dst_addr, dst_len) = (dst.buf_ptr() as usize, dst.len_bytes());
    if src_addr < dst_addr + dst_len && dst_addr < src_addr + src_len && src_len > 0 && dst_len > 0
    {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "cast_into: source and destination buffers overlap",
        ));
    }
    let run = move || {
        // SAFETY: both buffers are held (and so kept alive and unmoved) by
        // `src`/`dst` until this function returns, they are contiguous with
        // the lengths given, they do not overlap (checked above), and `dst`
        // is writable. Other Python threads could still write to them while
        // the GIL is released; like numpy, we leave that to the caller.
        let (s, d) = unsafe {
            (
                std::slice::from_raw_parts(src_addr as *const u8, src_len),
                std::slice::from_raw_parts_mut(dst_addr as *mut u8, dst_len),
            )
        };
        fastcast_core::cast::cast_parallel(s, from, d, to, &opts)
    };
    let result = py.detach(|| match threads {
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map_err(|e| fastcast_core::Error::Buffer {
                problem: format!("cannot start {n} threads: {e}"),
            })
            .and_then(|pool| pool.install(run)),
        None => run(),
    });
    result.map_err(CoreError)?;
    Ok(())
}

/// Read and validate a safetensors file's header.
///
/// Returns `{"metadata": dict | None, "tensors": [(name, dtype, shape, (begin, end))],
/// "data_start": int}`.
#[pyfunction]
fn read_header(py: Python<'_>, path: PathBuf) -> PyResult<Bound<'_, PyDict>> {
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
fn read_entries<'py>(
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
fn read_torch_file(py: Python<'_>, path: PathBuf) -> PyResult<Bound<'_, PyDict>> {
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

/// How often the executor's watcher wakes to report progress and check for Ctrl-C.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

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
fn execute_plan<'py>(
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

/// Free `value` on a thread of its own: a plan of 100k tensors takes tens of
/// milliseconds to free, which the caller need not wait for.
fn drop_later<T: Send + 'static>(value: T) {
    // If no thread can be started, the closure, and `value` with it, is dropped here.
    let _ = std::thread::Builder::new()
        .name("fastcast-drop".into())
        .spawn(move || drop(value));
}

/// Loss counts of every tensor `plan` would cast, reading the inputs only
/// (what `fastcast inspect --dtype` predicts). Returns `[(name, counts)]`.
#[pyfunction]
#[pyo3(signature = (plan, *, progress=None, threads=None))]
fn scan_plan<'py>(
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
fn shard_digest(
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

/// The length of each shard's header JSON as the executor will write it (no
/// input is read): a shard past `MAX_HEADER_LEN` would be unreadable.
#[pyfunction]
fn header_lengths(plan: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
    plan::header_lengths(plan)
}

/// The records of a resume journal, in the order written; a torn last line
/// is skipped and a missing journal has none.
#[pyfunction]
fn read_journal(py: Python<'_>, path: PathBuf) -> PyResult<Vec<ShardRecord>> {
    let records = py.detach(|| journal::read(&path)).map_err(CoreError)?;
    Ok(records.into_iter().map(ShardRecord::from).collect())
}

/// Run `work` on its own thread, inside a rayon pool of `threads`, with the GIL
/// released; wake every [`WATCH_INTERVAL`] to report progress and check for
/// Ctrl-C. On either, ask the work to cancel, wait for it to clean up, re-raise.
fn watch<T: Send + 'static>(
    py: Python<'_>,
    threads: Option<usize>,
    progress: Option<Bound<'_, PyAny>>,
    work: impl FnOnce(&Progress) -> fastcast_core::Result<T> + Send + 'static,
) -> PyResult<T> {
    let mut builder = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("fastcast-{i}"));
    if let Some(n) = threads {
        builder = builder.num_threads(n);
    }
    let pool = builder.build().map_err(|e| {
        pyo3::exceptions::PyValueError::new_err(format!("cannot start worker threads: {e}"))
    })?;
    // A Ctrl-C or a failing callback before any work means no work at all.
    py.check_signals()?;
    if let Some(cb) = &progress {
        cb.call1((0u64,))?;
    }
    let watch = Arc::new(Progress::default());
    let (done_tx, done_rx) = mpsc::channel();
    // Receivers are not Sync; the mutex lets the GIL-free closure borrow it.
    let done_rx = std::sync::Mutex::new(done_rx);
    let worker_watch = Arc::clone(&watch);
    let worker = std::thread::spawn(move || {
        let result = pool.install(|| work(&worker_watch));
        let _ = done_tx.send(result);
    });
    let mut interrupted: Option<PyErr> = None;
    let result = loop {
        let waited = py.detach(|| {
            let rx = done_rx.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv_timeout(WATCH_INTERVAL)
        });
        match waited {
            Ok(result) => break result,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err(fastcast_core::Error::WorkerDied {
                    what: "the conversion thread died",
                })
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if interrupted.is_some() {
            continue; // cancelled: wait for the workers to clean up
        }
        let reported = match &progress {
            Some(cb) => cb
                .call1((watch.bytes_done.load(Ordering::Relaxed),))
                .map(|_| ()),
            None => Ok(()),
        };
        if let Err(e) = py.check_signals().and(reported) {
            watch.cancel.store(true, Ordering::Relaxed);
            interrupted = Some(e);
        }
    };
    let _ = py.detach(|| worker.join());
    if let Some(e) = interrupted {
        return Err(e);
    }
    let value = result.map_err(CoreError)?;
    if let Some(cb) = &progress {
        cb.call1((watch.bytes_done.load(Ordering::Relaxed),))?;
    }
    Ok(value)
}

/// The hidden name a file is written under until it is complete (it ends
/// with `PARTIAL_SUFFIX`).
#[pyfunction]
fn partial_path(path: PathBuf) -> PathBuf {
    shard_file::temp_path(&path)
}

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
    m.add_class::<ExecStats>()?;
    m.add_class::<ShardRecord>()?;
    m.add_class::<Entries>()?;
    m.add_class::<PlainShard>()?;
    m.add_class::<PlainRows>()?;
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
    m.add_function(wrap_pyfunction!(parse_dtype, m)?)?;
    m.add_function(wrap_pyfunction!(dtypes, m)?)?;
    m.add_function(wrap_pyfunction!(target_dtypes, m)?)?;
    m.add_function(wrap_pyfunction!(quant_roles, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_targets, m)?)?;
    m.add_function(wrap_pyfunction!(cast_rule, m)?)?;
    m.add_function(wrap_pyfunction!(available_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(select_kernel, m)?)?;
    m.add_function(wrap_pyfunction!(cast_into, m)?)?;
    m.add_function(wrap_pyfunction!(read_header, m)?)?;
    m.add_function(wrap_pyfunction!(read_entries, m)?)?;
    m.add_function(wrap_pyfunction!(names::first_repeat, m)?)?;
    m.add_function(wrap_pyfunction!(names::set_roles, m)?)?;
    m.add_function(wrap_pyfunction!(tables::plan_plain, m)?)?;
    m.add_function(wrap_pyfunction!(tables::pack, m)?)?;
    m.add_function(wrap_pyfunction!(tables::lay_out, m)?)?;
    m.add_function(wrap_pyfunction!(tables::tensors_digest, m)?)?;
    m.add_function(wrap_pyfunction!(names::read_index, m)?)?;
    m.add_function(wrap_pyfunction!(read_torch_file, m)?)?;
    m.add_function(wrap_pyfunction!(execute_plan, m)?)?;
    m.add_function(wrap_pyfunction!(scan_plan, m)?)?;
    m.add_function(wrap_pyfunction!(shard_digest, m)?)?;
    m.add_function(wrap_pyfunction!(read_journal, m)?)?;
    m.add_function(wrap_pyfunction!(header_lengths, m)?)?;
    m.add_function(wrap_pyfunction!(partial_path, m)?)?;
    Ok(())
}
