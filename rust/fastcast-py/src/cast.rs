//! Casts of Python buffers (`cast_into`, with the GIL released) and the
//! kernel paths this CPU offers; the cast options every run reads by name.

use fastcast_core::cast::{CastOptions, Fp8Overflow, Kernel};
use fastcast_core::DType;
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;

use crate::errors::CoreError;

/// Names of the kernel paths this CPU can run, slowest first.
#[pyfunction]
pub fn available_kernels() -> Vec<&'static str> {
    Kernel::available().into_iter().map(Kernel::name).collect()
}

/// The kernel path a cast uses when none is named: `FASTCAST_KERNEL`, else the fastest.
#[pyfunction]
#[pyo3(signature = (name=None))]
pub fn select_kernel(name: Option<&str>) -> PyResult<&'static str> {
    Ok(kernel_from(name)?.name())
}

pub fn kernel_from(name: Option<&str>) -> PyResult<Kernel> {
    let from_env = std::env::var("FASTCAST_KERNEL").ok();
    let chosen = name.or(from_env.as_deref()).unwrap_or("auto");
    Ok(Kernel::from_name(chosen).map_err(CoreError)?)
}

pub fn overflow_from(name: &str) -> PyResult<Fp8Overflow> {
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
pub fn cast_into(
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
