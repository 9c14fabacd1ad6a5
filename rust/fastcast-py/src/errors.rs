//! Core errors as Python exception classes.
//!
//! `FastcastError` is the base of every fastcast-specific exception; OS
//! errors become the matching built-in (`FileNotFoundError`, ...), with the
//! file named in the message.

use pyo3::create_exception;
use pyo3::exceptions::{
    PyException, PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyPermissionError,
    PyValueError,
};
use pyo3::PyErr;

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
    OutputExistsError,
    FastcastError,
    "The output folder exists and is not empty (pass overwrite=True to replace it)."
);
create_exception!(
    fastcast,
    InsufficientSpaceError,
    FastcastError,
    "Not enough free disk space for the output."
);

create_exception!(
    fastcast,
    LossError,
    FastcastError,
    "strict mode: a cast would lose range (values overflowed), so nothing was written."
);

/// A core error on its way to Python.
pub struct CoreError(pub Error);

impl From<CoreError> for PyErr {
    fn from(CoreError(err): CoreError) -> PyErr {
        let message = err.to_string();
        match err {
            Error::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(message),
                std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(message),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                    InsufficientSpaceError::new_err(message)
                }
                _ => PyOSError::new_err(message),
            },
            Error::SourceChanged { .. } => ModelFolderError::new_err(message),
            Error::Plan { .. } => FastcastError::new_err(message),
            Error::Cancelled => PyKeyboardInterrupt::new_err(message),
            Error::Overflow { .. } => LossError::new_err(message),
            Error::Header { .. } => InvalidSafetensorsError::new_err(message),
            Error::UnknownDtype { .. } | Error::NotCastable { .. } => DtypeError::new_err(message),
            Error::Buffer { .. } | Error::KernelUnavailable { .. } => {
                PyValueError::new_err(message)
            }
        }
    }
}
