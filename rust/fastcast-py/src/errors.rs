//! Core errors as Python exception classes.
//!
//! `FastcastError` is the base of every fastcast-specific exception. OS
//! errors become what Python itself would raise: `OSError(errno, strerror,
//! filename)`, which Python turns into `FileNotFoundError`,
//! `PermissionError`... by errno, so `e.errno` and `e.filename` are there.
//! A full disk raises `InsufficientSpaceError`, both a `FastcastError` and
//! an `OSError`.

use std::io;
use std::path::Path;

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyKeyboardInterrupt, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use fastcast_core::Error;

create_exception!(
    fastcast,
    FastcastError,
    PyException,
    "Base class of fastcast's errors."
);
create_exception!(
    fastcast,
    InvalidSafetensorsError,
    FastcastError,
    "A safetensors file that is corrupt, truncated or hostile."
);
create_exception!(
    fastcast,
    InvalidCheckpointError,
    FastcastError,
    "A .bin/.pt/.pth file fastcast refuses to read (hostile, corrupt, unsupported)."
);
create_exception!(
    fastcast,
    DtypeError,
    FastcastError,
    "An unknown dtype name, or a cast fastcast does not perform."
);

create_exception!(
    fastcast,
    ModelFolderError,
    FastcastError,
    "A model folder that cannot be converted as it is: no weights, a broken index, \
     a path escaping the folder, a tensor listed twice, a file changed mid-run."
);
create_exception!(
    fastcast,
    QuantizedModelError,
    ModelFolderError,
    "A quantized checkpoint that a plain cast would corrupt: convert it with \
     keep_quantized=True (cast only what is not quantization state) or dequantize=True."
);
create_exception!(
    fastcast,
    OutputExistsError,
    FastcastError,
    "The output folder exists and is not empty (pass overwrite=True to replace it)."
);

static INSUFFICIENT_SPACE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static LOSS_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// `InsufficientSpaceError(FastcastError, OSError)`. `create_exception!`
/// takes one base, so the class is made by calling `type(...)`, as a
/// `class` statement would.
pub fn insufficient_space_error(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    INSUFFICIENT_SPACE_ERROR
        .get_or_try_init(py, || {
            let bases = PyTuple::new(
                py,
                [py.get_type::<FastcastError>(), py.get_type::<PyOSError>()],
            )?;
            let namespace = PyDict::new(py);
            namespace.set_item("__module__", "fastcast")?;
            namespace.set_item(
                "__doc__",
                "Not enough free disk space for the output. An OSError: errno is \
                 ENOSPC (or EDQUOT) and filename the file being written.",
            )?;
            let class =
                py.get_type::<PyType>()
                    .call1(("InsufficientSpaceError", bases, namespace))?;
            Ok::<_, PyErr>(class.cast_into::<PyType>()?.unbind())
        })
        .map(|class| class.bind(py))
}

/// `LossError(message, tensors=())`, with `.tensors`: a class with its own
/// `__init__`, written in Python because that is what it is.
const LOSS_ERROR_SOURCE: &std::ffi::CStr = cr#"
def make(base):
    class LossError(base):
        """A cast would lose range (values overflowed), so nothing was put in place.

        ``tensors`` lists (tensor name, overflow count), worst first.
        """

        def __init__(self, message, tensors=()):
            super().__init__(message)
            self.tensors = [(name, count) for name, count in tensors]

    LossError.__module__ = "fastcast"
    LossError.__qualname__ = "LossError"
    return LossError
"#;

/// The `LossError` class (made once, from [`LOSS_ERROR_SOURCE`]).
pub fn loss_error(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    LOSS_ERROR
        .get_or_try_init(py, || {
            let module = PyModule::from_code(
                py,
                LOSS_ERROR_SOURCE,
                c"fastcast/_loss_error.py",
                c"fastcast._loss_error",
            )?;
            let class = module
                .getattr("make")?
                .call1((py.get_type::<FastcastError>(),))?;
            Ok::<_, PyErr>(class.cast_into::<PyType>()?.unbind())
        })
        .map(|class| class.bind(py))
}

/// A core error on its way to Python.
pub struct CoreError(pub Error);

impl From<CoreError> for PyErr {
    fn from(CoreError(err): CoreError) -> PyErr {
        let message = err.to_string();
        match err {
            Error::Io { path, source } => os_error(&path, &source),
            Error::SourceChanged { .. } | Error::HeaderTooLarge { .. } => {
                ModelFolderError::new_err(message)
            }
            Error::Plan { .. } | Error::WorkerDied { .. } => FastcastError::new_err(message),
            Error::Cancelled => PyKeyboardInterrupt::new_err(message),
            Error::Header { .. } => InvalidSafetensorsError::new_err(message),
            Error::Checkpoint { .. } => InvalidCheckpointError::new_err(message),
            Error::UnknownDtype { .. } | Error::NotCastable { .. } => DtypeError::new_err(message),
            Error::Buffer { .. } | Error::KernelUnavailable { .. } => {
                PyValueError::new_err(message)
            }
        }
    }
}

/// `source` on `path` as the OSError Python would raise for it:
/// `(errno, strerror, filename)`, the OS's message without the
/// " (os error N)" Rust appends. A full disk or quota raises
/// `InsufficientSpaceError` with the same arguments.
fn os_error(path: &Path, source: &io::Error) -> PyErr {
    let filename = (!path.as_os_str().is_empty()).then(|| path.as_os_str().to_owned());
    let code = source.raw_os_error();
    let message = source.to_string();
    let strerror = match code {
        Some(n) => message
            .strip_suffix(&format!(" (os error {n})"))
            .unwrap_or(&message)
            .to_owned(),
        None => message,
    };
    let no_space = matches!(
        source.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    );
    Python::attach(|py| {
        let class = if no_space {
            insufficient_space_error(py)?.clone()
        } else {
            py.get_type::<PyOSError>()
        };
        // On Windows the raw code is a Windows error, which OSError's fourth
        // argument (winerror) maps to errno and the matching subclass.
        #[cfg(windows)]
        let err = PyErr::from_type(class, (None::<i32>, strerror, filename, code));
        #[cfg(not(windows))]
        let err = PyErr::from_type(class, (code, strerror, filename));
        Ok(err)
    })
    .unwrap_or_else(|e: PyErr| e)
}
