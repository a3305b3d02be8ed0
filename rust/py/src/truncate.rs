//! `Truncation` for Python: the four truncation settings as one frozen, validated value, built
//! once from the configuration and handed whole to every collator and data report.

use epsdpo_core::truncate::{PromptTruncation, Truncation};
use pyo3::prelude::*;

use crate::errors::{guarded, opt_size, ConfigError};

/// How pairs are cut to length: `max_length` (prompt + one completion), `max_prompt_length`,
/// `max_completion_length` (each None for no limit) and which end of a long prompt survives.
#[pyclass(module = "epsdpo._core", name = "Truncation", frozen, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PyTruncation {
    pub inner: Truncation,
}

fn prompt_mode_name(mode: PromptTruncation) -> &'static str {
    match mode {
        PromptTruncation::KeepEnd => "keep_end",
        PromptTruncation::KeepStart => "keep_start",
    }
}

#[pymethods]
impl PyTruncation {
    #[new]
    #[pyo3(signature = (*, max_length=None, max_prompt_length=None, max_completion_length=None, prompt_truncation_mode="keep_end"))]
    fn new(
        py: Python<'_>,
        max_length: Option<i64>,
        max_prompt_length: Option<i64>,
        max_completion_length: Option<i64>,
        prompt_truncation_mode: &str,
    ) -> PyResult<Self> {
        let prompt_mode = match prompt_truncation_mode {
            "keep_end" => PromptTruncation::KeepEnd,
            "keep_start" => PromptTruncation::KeepStart,
            other => return Err(ConfigError::new_err(format!("prompt_truncation_mode must be 'keep_end' or 'keep_start', got {other:?}"))),
        };
        let inner = Truncation {
            max_length: opt_size(max_length, "max_length")?,
            max_prompt_length: opt_size(max_prompt_length, "max_prompt_length")?,
            max_completion_length: opt_size(max_completion_length, "max_completion_length")?,
            prompt_mode,
        };
        guarded(py, || inner.validate())?;
        Ok(PyTruncation { inner })
    }

    #[getter]
    fn max_length(&self) -> Option<usize> {
        self.inner.max_length
    }
    #[getter]
    fn max_prompt_length(&self) -> Option<usize> {
        self.inner.max_prompt_length
    }
    #[getter]
    fn max_completion_length(&self) -> Option<usize> {
        self.inner.max_completion_length
    }
    #[getter]
    fn prompt_truncation_mode(&self) -> &'static str {
        prompt_mode_name(self.inner.prompt_mode)
    }

    pub fn __repr__(&self) -> String {
        let t = &self.inner;
        format!(
            "Truncation(max_length={}, max_prompt_length={}, max_completion_length={}, prompt_truncation_mode={:?})",
            optional(t.max_length), optional(t.max_prompt_length), optional(t.max_completion_length), self.prompt_truncation_mode()
        )
    }
}

/// A limit as Python writes it.
fn optional(value: Option<usize>) -> String {
    value.map_or_else(|| "None".to_string(), |v| v.to_string())
}
