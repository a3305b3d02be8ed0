//! `Collator` for Python: configured once, called per batch.

use epsdpo_core::collate::{collate, truncated_lengths, Batch, CollateConfig, Layout};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::{indices, vec1, vec2};
use crate::errors::{detached, guarded, opt_size, size, ConfigError};
use crate::store::PyPreferenceStore;
use crate::truncate::PyTruncation;

/// Turns a list of pair indices into one batch layout (a dict of numpy arrays).
#[pyclass(module = "epsdpo._core", name = "Collator", frozen)]
pub struct PyCollator {
    config: CollateConfig,
}

/// The layout names in the order users see them: `epsdpo._core.LAYOUTS`, the one list that the
/// configuration and the command line read.
pub fn layout_names() -> Vec<&'static str> {
    Layout::ALL.iter().map(|l| l.name()).collect()
}

fn batch_dict<'py>(py: Python<'py>, b: Batch) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let (r, c) = (b.rows, b.cols);
    d.set_item("input_ids", vec2(py, b.input_ids, r, c)?)?;
    d.set_item("attention_mask", vec2(py, b.attention_mask, r, c)?)?;
    d.set_item("position_ids", vec2(py, b.position_ids, r, c)?)?;
    d.set_item("completion_mask", vec2(py, b.completion_mask, r, c)?)?;
    d.set_item("sequence_index", vec2(py, b.sequence_index, r, c)?)?;
    d.set_item("segment_ids", vec2(py, b.segment_ids, r, c)?)?;
    d.set_item("branch_ids", vec2(py, b.branch_ids, r, c)?)?;
    d.set_item("cu_seqlens", vec1(py, b.cu_seqlens))?;
    d.set_item("max_seqlen", b.max_seqlen)?;
    d.set_item("logit_index", vec1(py, b.logit_index))?;
    d.set_item("target_ids", vec1(py, b.target_ids))?;
    d.set_item("target_sequence", vec1(py, b.target_sequence))?;
    d.set_item("num_sequences", 2 * b.pair_indices.len())?;
    d.set_item("pair_indices", vec1(py, b.pair_indices))?;
    d.set_item("pair_ids", vec1(py, b.pair_ids))?;
    d.set_item("skipped", vec1(py, b.skipped))?;
    d.set_item("identical", vec1(py, b.identical))?;
    d.set_item("num_truncated", b.num_truncated)?;
    d.set_item("sequence_lengths", vec1(py, b.sequence_lengths))?;
    d.set_item("layout", b.layout.name())?;
    // What the layout means travels with its batch, so that the model side picks its attention
    // path from these facts and never from the layout's name.
    d.set_item("branched", b.layout.branched())?;
    d.set_item("right_padded", b.layout.right_padded())?;
    Ok(d)
}

#[pymethods]
impl PyCollator {
    #[new]
    #[pyo3(signature = (layout="padded", *, truncation=None, pad_token_id=0, pad_to_multiple_of=1, capacity=None, skip_empty=false))]
    fn new(
        py: Python<'_>,
        layout: &str,
        truncation: Option<PyRef<'_, PyTruncation>>,
        pad_token_id: i64,
        pad_to_multiple_of: i64,
        capacity: Option<i64>,
        skip_empty: bool,
    ) -> PyResult<Self> {
        let pad_to_multiple_of = size(pad_to_multiple_of, "pad_to_multiple_of")?;
        let capacity = opt_size(capacity, "capacity")?;
        let pad_token_id = u32::try_from(pad_token_id)
            .map_err(|_| ConfigError::new_err(format!("pad_token_id must be a token id between 0 and {} (got {pad_token_id})", u32::MAX)))?;
        let config = CollateConfig {
            layout: guarded(py, || Layout::from_name(layout))?,
            truncation: truncation.map(|t| t.inner).unwrap_or_default(),
            pad_token_id,
            pad_to_multiple_of,
            capacity,
            skip_empty,
        };
        guarded(py, || config.validate())?;
        Ok(PyCollator { config })
    }

    /// Collate the pairs `indices` of `store` into a dict of numpy arrays (see the module docs of
    /// `epsdpo_core::collate` for every key).
    fn __call__<'py>(&self, py: Python<'py>, store: PyRef<'py, PyPreferenceStore>, indices_: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        let idx = indices(indices_)?;
        let (inner, config) = (&store.inner, &self.config);
        let batch = detached(py, move || collate(inner, &idx, config))?;
        batch_dict(py, batch)
    }

    /// Truncated `prompt`, `chosen`, `rejected` lengths of every pair (uint32), the pairs whose
    /// completion truncation would empty (`empty`), the pairs whose chosen and rejected are the
    /// same tokens after truncation (`identical`, which the collator drops), and how many pairs
    /// lose tokens.
    fn truncated_lengths<'py>(&self, py: Python<'py>, store: PyRef<'py, PyPreferenceStore>) -> PyResult<Bound<'py, PyDict>> {
        let (inner, truncation) = (&store.inner, &self.config.truncation);
        let t = detached(py, move || truncated_lengths(inner, truncation))?;
        let d = PyDict::new(py);
        d.set_item("prompt", vec1(py, t.prompt))?;
        d.set_item("chosen", vec1(py, t.chosen))?;
        d.set_item("rejected", vec1(py, t.rejected))?;
        d.set_item("empty", vec1(py, t.empty))?;
        d.set_item("identical", vec1(py, t.identical))?;
        d.set_item("num_truncated", t.num_truncated)?;
        Ok(d)
    }

    #[getter]
    fn layout(&self) -> &'static str {
        self.config.layout.name()
    }
    /// Rows hold a prompt with two answer branches, the rejected one blind to the chosen one.
    #[getter]
    fn branched(&self) -> bool {
        self.config.layout.branched()
    }
    /// Every row is one sequence then padding: causal attention over whole rows is exact.
    #[getter]
    fn right_padded(&self) -> bool {
        self.config.layout.right_padded()
    }
    /// Rows hold several sequences end to end: a token budget counts tokens, not padded cells.
    #[getter]
    fn packs_rows(&self) -> bool {
        self.config.layout.packs_rows()
    }
    #[getter]
    fn truncation(&self) -> PyTruncation {
        PyTruncation { inner: self.config.truncation }
    }
    #[getter]
    fn pad_token_id(&self) -> u32 {
        self.config.pad_token_id
    }
    #[getter]
    fn pad_to_multiple_of(&self) -> usize {
        self.config.pad_to_multiple_of
    }
    #[getter]
    fn capacity(&self) -> Option<usize> {
        self.config.capacity
    }
    #[getter]
    fn skip_empty(&self) -> bool {
        self.config.skip_empty
    }

    fn __repr__(&self) -> String {
        let c = &self.config;
        format!(
            "Collator(layout={:?}, truncation={}, pad_token_id={}, pad_to_multiple_of={}, capacity={:?}, skip_empty={})",
            c.layout.name(), self.truncation().__repr__(), c.pad_token_id, c.pad_to_multiple_of, c.capacity, c.skip_empty
        )
    }
}
