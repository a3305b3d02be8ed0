//! `Collator` for Python: configured once, called per batch.

use epsdpo_core::collate::{collate, truncated_lengths, Batch, CollateConfig, Layout};
use epsdpo_core::truncate::{PromptTruncation, Truncation};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::{indices, vec1, vec2};
use crate::errors::{detached, guarded, opt_size, size, ConfigError};
use crate::store::PyPreferenceStore;

/// Turns a list of pair indices into one batch layout (a dict of numpy arrays).
#[pyclass(module = "epsdpo._core", name = "Collator", frozen)]
pub struct PyCollator {
    config: CollateConfig,
}

fn parse_layout(layout: &str) -> PyResult<Layout> {
    match layout {
        "padded" => Ok(Layout::Padded),
        "packed" => Ok(Layout::Packed),
        "shared_prompt" => Ok(Layout::SharedPrompt),
        other => Err(ConfigError::new_err(format!("layout must be 'padded', 'packed' or 'shared_prompt', got {other:?}"))),
    }
}

fn layout_name(layout: Layout) -> &'static str {
    match layout {
        Layout::Padded => "padded",
        Layout::Packed => "packed",
        Layout::SharedPrompt => "shared_prompt",
    }
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
    d.set_item("layout", layout_name(b.layout))?;
    Ok(d)
}

#[pymethods]
impl PyCollator {
    #[new]
    #[pyo3(signature = (layout="padded", *, max_length=None, max_prompt_length=None, max_completion_length=None, prompt_truncation_mode="keep_end", pad_token_id=0, pad_to_multiple_of=1, capacity=None, skip_empty=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        layout: &str,
        max_length: Option<i64>,
        max_prompt_length: Option<i64>,
        max_completion_length: Option<i64>,
        prompt_truncation_mode: &str,
        pad_token_id: i64,
        pad_to_multiple_of: i64,
        capacity: Option<i64>,
        skip_empty: bool,
    ) -> PyResult<Self> {
        let max_length = opt_size(max_length, "max_length")?;
        let max_prompt_length = opt_size(max_prompt_length, "max_prompt_length")?;
        let max_completion_length = opt_size(max_completion_length, "max_completion_length")?;
        let pad_to_multiple_of = size(pad_to_multiple_of, "pad_to_multiple_of")?;
        let capacity = opt_size(capacity, "capacity")?;
        let pad_token_id = u32::try_from(pad_token_id)
            .map_err(|_| ConfigError::new_err(format!("pad_token_id must be a token id between 0 and {} (got {pad_token_id})", u32::MAX)))?;
        let prompt_mode = match prompt_truncation_mode {
            "keep_end" => PromptTruncation::KeepEnd,
            "keep_start" => PromptTruncation::KeepStart,
            other => return Err(ConfigError::new_err(format!("prompt_truncation_mode must be 'keep_end' or 'keep_start', got {other:?}"))),
        };
        let config = CollateConfig {
            layout: parse_layout(layout)?,
            truncation: Truncation { max_length, max_prompt_length, max_completion_length, prompt_mode },
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
        layout_name(self.config.layout)
    }
    #[getter]
    fn max_length(&self) -> Option<usize> {
        self.config.truncation.max_length
    }
    #[getter]
    fn max_prompt_length(&self) -> Option<usize> {
        self.config.truncation.max_prompt_length
    }
    #[getter]
    fn max_completion_length(&self) -> Option<usize> {
        self.config.truncation.max_completion_length
    }
    #[getter]
    fn prompt_truncation_mode(&self) -> &'static str {
        match self.config.truncation.prompt_mode {
            PromptTruncation::KeepEnd => "keep_end",
            PromptTruncation::KeepStart => "keep_start",
        }
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
            "Collator(layout={:?}, max_length={:?}, max_prompt_length={:?}, max_completion_length={:?}, prompt_truncation_mode={:?}, pad_token_id={}, pad_to_multiple_of={}, capacity={:?}, skip_empty={})",
            layout_name(c.layout), c.truncation.max_length, c.truncation.max_prompt_length, c.truncation.max_completion_length, self.prompt_truncation_mode(),
            c.pad_token_id, c.pad_to_multiple_of, c.capacity, c.skip_empty
        )
    }
}
