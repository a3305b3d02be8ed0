//! `BatchSampler` for Python: an iterator of pair-index arrays.

use epsdpo_core::sampler::{BatchSampler, SamplerConfig, SamplerMode};
use numpy::PyArray1;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::arrays::{lengths, vec1};
use crate::errors::{detached, guarded, infallible, opt_size, size, ConfigError};

/// Deterministic, resumable, rank-sharded batches of pair indices.
#[pyclass(module = "epsdpo._core", name = "BatchSampler")]
pub struct PyBatchSampler {
    inner: BatchSampler,
}

#[pymethods]
impl PyBatchSampler {
    /// `mode`: "shuffle", "length_grouped" or "token_budget" (then `max_tokens` is required and
    /// `padded` says whether padding counts against it).
    #[new]
    #[pyo3(signature = (chosen_lengths, rejected_lengths, batch_size=8, *, mode="shuffle", seed=0, world_size=1, rank=0, drop_last=false, mega_batch_mult=50, max_tokens=None, padded=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        chosen_lengths: &Bound<'_, PyAny>,
        rejected_lengths: &Bound<'_, PyAny>,
        batch_size: i64,
        mode: &str,
        seed: u64,
        world_size: i64,
        rank: i64,
        drop_last: bool,
        mega_batch_mult: i64,
        max_tokens: Option<i64>,
        padded: bool,
    ) -> PyResult<Self> {
        let batch_size = size(batch_size, "batch_size")?;
        let world_size = size(world_size, "world_size")?;
        let rank = size(rank, "rank")?;
        let mega_batch_mult = size(mega_batch_mult, "mega_batch_mult")?;
        let max_tokens = opt_size(max_tokens, "max_tokens")?;
        let mode = match (mode, max_tokens) {
            ("shuffle", _) => SamplerMode::Shuffle,
            ("length_grouped", _) => SamplerMode::LengthGrouped { mega_batch_mult },
            ("token_budget", Some(max_tokens)) => SamplerMode::TokenBudget { max_tokens, padded, mega_batch_mult },
            ("token_budget", None) => return Err(ConfigError::new_err("mode 'token_budget' needs max_tokens")),
            (other, _) => {
                return Err(ConfigError::new_err(format!("mode must be 'shuffle', 'length_grouped' or 'token_budget', got {other:?}")))
            }
        };
        let chosen = lengths(chosen_lengths, "chosen_lengths")?;
        let rejected = lengths(rejected_lengths, "rejected_lengths")?;
        let config = SamplerConfig { batch_size, mode, seed, world_size, rank, drop_last };
        let inner = detached(py, move || BatchSampler::new(chosen, rejected, config))?;
        Ok(PyBatchSampler { inner })
    }

    /// Batches this rank gets per epoch (the same on every rank).
    fn __len__(&self) -> usize {
        self.inner.num_batches()
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// The next batch of this epoch; stops at the epoch's end (call `set_epoch` for the next).
    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyArray1<u32>>>> {
        let inner = &mut self.inner;
        Ok(infallible(|| inner.next_batch())?.map(|b| vec1(py, b)))
    }

    /// Every batch of `epoch` for this rank, without moving the position.
    fn epoch_batches<'py>(&self, py: Python<'py>, epoch: u64) -> PyResult<Vec<Bound<'py, PyArray1<u32>>>> {
        let inner = &self.inner;
        let batches = detached(py, move || inner.epoch_batches(epoch))?;
        Ok(batches.into_iter().map(|b| vec1(py, b)).collect())
    }

    /// Start `epoch` from its first batch.
    fn set_epoch(&mut self, py: Python<'_>, epoch: u64) -> PyResult<()> {
        let inner = &mut self.inner;
        detached(py, move || {
            inner.set_epoch(epoch);
            Ok(())
        })
    }

    #[getter]
    fn epoch(&self) -> u64 {
        self.inner.epoch()
    }

    /// Batches already taken in the current epoch.
    #[getter]
    fn position(&self) -> usize {
        self.inner.position()
    }

    /// `{"state": bytes}`: seed, epoch, position and a fingerprint of the configuration.
    fn state_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let d = pyo3::types::PyDict::new(py);
        d.set_item("state", PyBytes::new(py, &self.inner.state_bytes()))?;
        Ok(d)
    }

    /// Resume from `state_dict()`; raises `StateError` if it came from a different sampler.
    fn load_state_dict(&mut self, py: Python<'_>, state: &Bound<'_, pyo3::types::PyDict>) -> PyResult<()> {
        let bytes: Vec<u8> = state
            .get_item("state")?
            .ok_or_else(|| crate::errors::StateError::new_err("sampler state has no 'state' entry"))?
            .extract()?;
        let inner = &mut self.inner;
        guarded(py, || inner.load_state_bytes(&bytes))
    }
}
