//! Core errors as typed Python exceptions. All derive from `EpsdpoError`, itself a `ValueError`,
//! and the pair-level ones carry `pair_index` so callers can find the row.

use epsdpo_core::Error;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(epsdpo, EpsdpoError, PyValueError, "Base class of every epsdpo data-path error.");
pyo3::create_exception!(epsdpo, InvalidPairError, EpsdpoError, "A preference pair failed validation; `pair_index` names it.");
pyo3::create_exception!(epsdpo, TruncationError, InvalidPairError, "Truncation left a completion with no tokens; `pair_index` names the pair.");
pyo3::create_exception!(epsdpo, StoreFileError, EpsdpoError, "A store file is truncated, corrupted, of another format version, or not a store.");
pyo3::create_exception!(epsdpo, ConfigError, EpsdpoError, "A configuration value is out of range.");
pyo3::create_exception!(epsdpo, StateError, EpsdpoError, "Saved sampler or controller state cannot be restored.");

pub fn to_py(py: Python<'_>, error: Error) -> PyErr {
    let message = error.to_string();
    match error {
        Error::InvalidPair { pair, .. } => with_pair(py, InvalidPairError::new_err(message), pair),
        Error::EmptyAfterTruncation { pair, .. } => with_pair(py, TruncationError::new_err(message), pair),
        Error::StoreFile { .. } => StoreFileError::new_err(message),
        Error::InvalidArgument(_) => ConfigError::new_err(message),
        Error::State(_) => StateError::new_err(message),
        Error::Io(e) => PyOSError::new_err(e.to_string()),
    }
}

fn with_pair(py: Python<'_>, err: PyErr, pair: usize) -> PyErr {
    // Setting an attribute on a fresh exception instance cannot fail in practice; if it ever did,
    // the message still names the pair.
    let _ = err.value(py).setattr("pair_index", pair);
    err
}

/// Run core work with the GIL released and map its error.
pub fn detached<T: Send>(py: Python<'_>, work: impl FnOnce() -> epsdpo_core::Result<T> + Send) -> PyResult<T> {
    py.detach(work).map_err(|e| to_py(py, e))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("EpsdpoError", py.get_type::<EpsdpoError>())?;
    m.add("InvalidPairError", py.get_type::<InvalidPairError>())?;
    m.add("TruncationError", py.get_type::<TruncationError>())?;
    m.add("StoreFileError", py.get_type::<StoreFileError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("StateError", py.get_type::<StateError>())?;
    Ok(())
}
