//! Core errors as typed Python exceptions. All derive from `EpsdpoError`, itself a `ValueError`,
//! and the pair-level ones carry `pair_index` so callers can find the row. File errors become
//! `OSError` subclasses (`FileNotFoundError`, `PermissionError`, ...) with `filename` set.
//!
//! No Rust panic reaches Python as pyo3's `PanicException` (a `BaseException` that `except
//! Exception` does not catch): every call into the core goes through [`guarded`], which turns a
//! panic into `InternalError`, a `RuntimeError`, and leaves the interpreter usable.

use std::panic::{catch_unwind, AssertUnwindSafe};

use epsdpo_core::Error;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(epsdpo, EpsdpoError, PyValueError, "Base class of every epsdpo data-path error.");
pyo3::create_exception!(epsdpo, InvalidPairError, EpsdpoError, "A preference pair failed validation; `pair_index` names it.");
pyo3::create_exception!(epsdpo, TruncationError, InvalidPairError, "Truncation left a completion with no tokens; `pair_index` names the pair.");
pyo3::create_exception!(epsdpo, StoreFileError, EpsdpoError, "A store file is truncated, corrupted, of another format version, or not a store.");
pyo3::create_exception!(epsdpo, ConfigError, EpsdpoError, "A configuration value is out of range.");
pyo3::create_exception!(epsdpo, StateError, EpsdpoError, "Saved sampler or controller state cannot be restored.");
pyo3::create_exception!(epsdpo, InternalError, PyRuntimeError, "A bug in epsdpo's Rust core (a panic), caught at the boundary; please report it.");

pub fn to_py(py: Python<'_>, error: Error) -> PyErr {
    let message = error.to_string();
    match error {
        Error::InvalidPair { pair, .. } => with_pair(py, InvalidPairError::new_err(message), pair),
        Error::EmptyAfterTruncation { pair, .. } => with_pair(py, TruncationError::new_err(message), pair),
        Error::StoreFile { .. } => StoreFileError::new_err(message),
        Error::MappedPair { pair, .. } => with_pair(py, StoreFileError::new_err(message), pair),
        Error::InvalidArgument(_) => ConfigError::new_err(message),
        Error::State(_) => StateError::new_err(message),
        Error::File { path, action, source } => os_error(&source, format!("cannot {action}"), Some(path.display().to_string())),
        Error::Io(e) => os_error(&e, "i/o error".into(), None),
    }
}

/// `OSError(errno, strerror, filename)`: Python then picks the subclass from errno
/// (`FileNotFoundError`, `PermissionError`, `IsADirectoryError`, ...) and prints the path.
fn os_error(source: &std::io::Error, what: String, filename: Option<String>) -> PyErr {
    // io::Error's text ends with " (os error N)"; Python prints the errno itself.
    let text = source.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text).to_string();
    match (source.raw_os_error(), filename) {
        (Some(errno), Some(f)) => PyOSError::new_err((errno, format!("{what}: {text}"), f)),
        (Some(errno), None) => PyOSError::new_err((errno, format!("{what}: {text}"))),
        (None, Some(f)) => PyOSError::new_err(format!("{what} {f}: {text}")),
        (None, None) => PyOSError::new_err(format!("{what}: {text}")),
    }
}

fn with_pair(py: Python<'_>, err: PyErr, pair: usize) -> PyErr {
    // Setting an attribute on a fresh exception instance cannot fail in practice; if it ever did,
    // the message still names the pair.
    let _ = err.value(py).setattr("pair_index", pair);
    err
}

/// Run core work with the GIL released and map its error (or its panic).
pub fn detached<T: Send>(py: Python<'_>, work: impl FnOnce() -> epsdpo_core::Result<T> + Send) -> PyResult<T> {
    py.detach(|| catch_unwind(AssertUnwindSafe(work))).map_err(panic_to_py)?.map_err(|e| to_py(py, e))
}

/// Run core work holding the GIL and map its error (or its panic).
pub fn guarded<T>(py: Python<'_>, work: impl FnOnce() -> epsdpo_core::Result<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(work)).map_err(panic_to_py)?.map_err(|e| to_py(py, e))
}

/// Core work that cannot fail but, being Rust, could still panic.
pub fn infallible<T>(work: impl FnOnce() -> T) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(work)).map_err(panic_to_py)
}

fn panic_to_py(payload: Box<dyn std::any::Any + Send>) -> PyErr {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    InternalError::new_err(format!("internal error in epsdpo's Rust core (please report it): {what}"))
}

/// A Python int for a size or count: signed at the boundary so that a negative value reaches
/// us and gets a message naming the argument (pyo3's own unsigned conversion would raise a bare
/// `OverflowError`).
pub fn size(value: i64, name: &str) -> PyResult<usize> {
    usize::try_from(value).map_err(|_| ConfigError::new_err(format!("{name} must not be negative (got {value})")))
}

pub fn opt_size(value: Option<i64>, name: &str) -> PyResult<Option<usize>> {
    value.map(|v| size(v, name)).transpose()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("EpsdpoError", py.get_type::<EpsdpoError>())?;
    m.add("InvalidPairError", py.get_type::<InvalidPairError>())?;
    m.add("TruncationError", py.get_type::<TruncationError>())?;
    m.add("StoreFileError", py.get_type::<StoreFileError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("StateError", py.get_type::<StateError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    m.add_function(wrap_pyfunction!(_raise_panic, m)?)?;
    Ok(())
}

/// Test hook: panics inside the guard every binding call uses, so the test suite can prove a Rust
/// panic arrives as `InternalError` and the interpreter carries on.
#[pyfunction]
fn _raise_panic(py: Python<'_>, message: &str) -> PyResult<()> {
    detached(py, || -> epsdpo_core::Result<()> { panic!("{message}") })
}
