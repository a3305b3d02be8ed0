//! `KlController` for Python: per-pair β from steps, the accumulation-cycle sums, the β update.

use epsdpo_core::kl::KlController;
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::arrays::{slice, vec1};
use crate::errors::{guarded, ConfigError, StateError};

/// The β bookkeeping of ε-DPO (steps in {-1, 0, +1} as int8 arrays; pair ids as uint64).
#[pyclass(module = "epsdpo._core", name = "KlController")]
pub struct PyKlController {
    inner: KlController,
}

#[pymethods]
impl PyKlController {
    /// `beta_min`: an opt-in floor under the base β (None: the paper's rule, no floor).
    #[new]
    #[pyo3(signature = (beta, epsilon, beta_min=None))]
    fn new(py: Python<'_>, beta: f64, epsilon: f64, beta_min: Option<f64>) -> PyResult<Self> {
        guarded(py, || KlController::new(beta, epsilon)?.with_beta_min(beta_min)).map(|inner| PyKlController { inner })
    }

    /// The base β every micro-batch of the current accumulation cycle uses.
    #[getter]
    fn beta(&self) -> f64 {
        self.inner.beta()
    }

    #[getter]
    fn epsilon(&self) -> f64 {
        self.inner.epsilon()
    }

    /// The floor under the base β, or None.
    #[getter]
    fn beta_min(&self) -> Option<f64> {
        self.inner.beta_min()
    }

    /// β_i = β / (1 + ε·s_i) without recording anything (evaluation).
    fn betas_for<'py>(&self, py: Python<'py>, steps: PyReadonlyArray1<'py, i8>) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let inner = &self.inner;
        let betas = guarded(py, || inner.betas_for(&slice(&steps)))?;
        Ok(vec1(py, betas))
    }

    /// Record a micro-batch's steps (cycle sums and ledger); returns its per-pair β_i.
    fn record<'py>(&mut self, py: Python<'py>, pair_ids: PyReadonlyArray1<'py, u64>, steps: PyReadonlyArray1<'py, i8>) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let inner = &mut self.inner;
        let betas = guarded(py, || inner.record(&slice(&pair_ids), &slice(&steps)))?;
        Ok(vec1(py, betas))
    }

    /// `(sum of steps, number of pairs)` recorded since the last update: all-reduce these.
    fn local_sums(&self) -> (i64, u64) {
        self.inner.local_sums()
    }

    /// β ← β / (1 + ε·sum/count), once per optimizer step; returns the new β. Refuses (with a
    /// `ConfigError` naming both values, β unchanged) a negative count or `|sum| > count`, which
    /// only a corrupted all-reduce produces.
    fn apply_update(&mut self, py: Python<'_>, global_sum: &Bound<'_, PyAny>, global_count: &Bound<'_, PyAny>) -> PyResult<f64> {
        // Any Python int is taken, so that a negative or huge value gets this message naming
        // both, not pyo3's bare OverflowError; a non-integer is still a TypeError.
        let (sum, count) = match (int_in::<i64>(global_sum, "global_sum")?, int_in::<u64>(global_count, "global_count")?) {
            (Some(s), Some(c)) => (s, c),
            _ => {
                return Err(ConfigError::new_err(format!(
                    "apply_update: global_sum = {global_sum}, global_count = {global_count}: the count must be between 0 and 2^64 - 1 and |sum| at most the count; the all-reduced sums are corrupted (beta left unchanged)"
                )))
            }
        };
        let inner = &mut self.inner;
        guarded(py, || inner.apply_update(sum, count))
    }

    /// β before the first update, then after each update.
    fn beta_history<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        vec1(py, self.inner.beta_history().to_vec())
    }

    /// The per-pair ledger as arrays sorted by pair id: ids, plus, zero, minus, last_step, last_beta.
    fn ledger<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let l = self.inner.ledger_arrays();
        let d = PyDict::new(py);
        d.set_item("pair_ids", vec1(py, l.ids))?;
        d.set_item("plus", vec1(py, l.plus))?;
        d.set_item("zero", vec1(py, l.zero))?;
        d.set_item("minus", vec1(py, l.minus))?;
        d.set_item("last_step", vec1(py, l.last_step))?;
        d.set_item("last_beta", vec1(py, l.last_beta))?;
        Ok(d)
    }

    /// `{"state": bytes}` for checkpoints.
    fn state_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("state", PyBytes::new(py, &self.inner.state_bytes()))?;
        Ok(d)
    }

    fn load_state_dict(&mut self, py: Python<'_>, state: &Bound<'_, PyDict>) -> PyResult<()> {
        let bytes: Vec<u8> = state
            .get_item("state")?
            .ok_or_else(|| StateError::new_err("controller state has no 'state' entry"))?
            .extract()?;
        // The floor is this run's setting, not saved state: kept, and applied from the next update
        // (refused when the restored β is already below it, as a fresh run's β below it would be).
        let beta_min = self.inner.beta_min();
        self.inner = guarded(py, || KlController::from_state_bytes(&bytes)?.with_beta_min(beta_min))?;
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!("KlController(beta={}, epsilon={}, updates={})", self.inner.beta(), self.inner.epsilon(), self.inner.beta_history().len().saturating_sub(1))
    }
}

/// `obj` as a `T` when it is an int in `T`'s range, `None` when it is an int outside it, a
/// `TypeError` naming `what` when it is no int at all.
fn int_in<T: for<'a, 'py> FromPyObject<'a, 'py>>(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Option<T>> {
    let index = obj
        .call_method0("__index__")
        .map_err(|_| pyo3::exceptions::PyTypeError::new_err(format!("{what} must be an int, got {}", obj.get_type().name().map(|n| n.to_string()).unwrap_or_default())))?;
    Ok(index.extract::<T>().ok())
}
