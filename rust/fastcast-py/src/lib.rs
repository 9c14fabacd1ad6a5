//! `fastcast._core`: the Python face of fastcast-core.
//!
//! Only argument conversion, GIL release and error mapping live here; every
//! decision about bytes is made in fastcast-core.

mod errors;

use std::path::PathBuf;

use fastcast_core::{dtype, CastOptions, DType, Fp8Overflow, Header, Kernel};
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use errors::{CoreError, DtypeError, FastcastError, InvalidSafetensorsError};

/// Parse a user-typed dtype name into its safetensors name.
#[pyfunction]
fn parse_dtype(name: &str) -> PyResult<&'static str> {
    let d: DType = name.parse().map_err(CoreError)?;
    Ok(d.safetensors_name())
}

/// Every dtype fastcast knows, as dicts (name, torch name, aliases, bits, castable).
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
        list.append(item)?;
    }
    Ok(list)
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
        fastcast_core::cast_parallel(s, from, d, to, &opts)
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
    match &header.metadata {
        Some(meta) => {
            let m = PyDict::new(py);
            for (k, v) in meta {
                m.set_item(k, v)?;
            }
            out.set_item("metadata", m)?;
        }
        None => out.set_item("metadata", py.None())?,
    }
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

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("FastcastError", py.get_type::<FastcastError>())?;
    m.add(
        "InvalidSafetensorsError",
        py.get_type::<InvalidSafetensorsError>(),
    )?;
    m.add("DtypeError", py.get_type::<DtypeError>())?;
    m.add_function(wrap_pyfunction!(parse_dtype, m)?)?;
    m.add_function(wrap_pyfunction!(dtypes, m)?)?;
    m.add_function(wrap_pyfunction!(available_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(select_kernel, m)?)?;
    m.add_function(wrap_pyfunction!(cast_into, m)?)?;
    m.add_function(wrap_pyfunction!(read_header, m)?)?;
    Ok(())
}
