//! `PreferenceStore` for Python.

use std::path::PathBuf;

use epsdpo_core::store::{PairColumns, PreferenceStore as CoreStore, TokenId};
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::arrays::{offsets, slice, vec1, IntArray};
use crate::errors::{detached, guarded, ConfigError};

/// Tokenized preference pairs in one contiguous token arena (see the Rust docs of
/// `epsdpo_core::store` for the layout and file format).
#[pyclass(module = "epsdpo._core", name = "PreferenceStore")]
pub struct PyPreferenceStore {
    pub inner: CoreStore,
}

impl PyPreferenceStore {
    fn append_typed<T: TokenId + Sync>(&mut self, py: Python<'_>, toks: [&[T]; 3], offs: [&[u64]; 3], ids: Option<&[u64]>) -> PyResult<(usize, usize)> {
        let columns = PairColumns { prompt: (toks[0], offs[0]), chosen: (toks[1], offs[1]), rejected: (toks[2], offs[2]), ids };
        let inner = &mut self.inner;
        let range = detached(py, move || inner.append(columns))?;
        Ok((range.start, range.end))
    }
}

#[pymethods]
impl PyPreferenceStore {
    #[new]
    #[pyo3(signature = (vocab_size=None))]
    fn new(py: Python<'_>, vocab_size: Option<i64>) -> PyResult<Self> {
        let vocab_size = vocab_size
            .map(|v| u32::try_from(v).map_err(|_| ConfigError::new_err(format!("vocab_size must be between 1 and {} (got {v})", u32::MAX))))
            .transpose()?;
        guarded(py, || CoreStore::new(vocab_size)).map(|inner| PyPreferenceStore { inner })
    }

    /// Append many pairs from flat token arrays and `n + 1` offsets each. Validates everything
    /// first: on error nothing is appended. Returns the `(start, stop)` indices of the new pairs.
    #[pyo3(signature = (prompt_tokens, prompt_offsets, chosen_tokens, chosen_offsets, rejected_tokens, rejected_offsets, ids=None))]
    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        py: Python<'_>,
        prompt_tokens: &Bound<'_, PyAny>,
        prompt_offsets: &Bound<'_, PyAny>,
        chosen_tokens: &Bound<'_, PyAny>,
        chosen_offsets: &Bound<'_, PyAny>,
        rejected_tokens: &Bound<'_, PyAny>,
        rejected_offsets: &Bound<'_, PyAny>,
        ids: Option<PyReadonlyArray1<'_, u64>>,
    ) -> PyResult<(usize, usize)> {
        let offs = [
            offsets(prompt_offsets, "prompt_offsets")?,
            offsets(chosen_offsets, "chosen_offsets")?,
            offsets(rejected_offsets, "rejected_offsets")?,
        ];
        let offs = [&offs[0][..], &offs[1][..], &offs[2][..]];
        let ids = ids.as_ref().map(slice);
        let ids = ids.as_deref();
        let p = IntArray::extract(prompt_tokens, "prompt_tokens")?;
        let c = IntArray::extract(chosen_tokens, "chosen_tokens")?;
        let r = IntArray::extract(rejected_tokens, "rejected_tokens")?;
        macro_rules! same {
            ($($v:ident),*) => {
                match (&p, &c, &r) {
                    $((IntArray::$v(p), IntArray::$v(c), IntArray::$v(r)) => {
                        let (p, c, r) = (slice(p), slice(c), slice(r));
                        return self.append_typed(py, [&p, &c, &r], offs, ids);
                    })*
                    _ => {}
                }
            };
        }
        same!(I64, I32, U32, U64, U16);
        // Mixed dtypes: widen all three to i64 once.
        let wide = [&p, &c, &r].map(|a| match a {
            IntArray::I64(a) => slice(a).into_owned(),
            IntArray::I32(a) => slice(a).iter().map(|&v| v as i64).collect(),
            IntArray::U32(a) => slice(a).iter().map(|&v| v as i64).collect(),
            IntArray::U16(a) => slice(a).iter().map(|&v| v as i64).collect(),
            IntArray::U64(a) => slice(a).iter().map(|&v| i64::try_from(v).unwrap_or(-1)).collect(),
        });
        self.append_typed(py, [&wide[0], &wide[1], &wide[2]], offs, ids)
    }

    /// Append one pair (any integer sequences); returns its index.
    #[pyo3(signature = (prompt, chosen, rejected, id=None))]
    fn add_pair(&mut self, py: Python<'_>, prompt: Vec<i64>, chosen: Vec<i64>, rejected: Vec<i64>, id: Option<u64>) -> PyResult<usize> {
        let inner = &mut self.inner;
        guarded(py, || inner.add_pair(&prompt, &chosen, &rejected, id))
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    #[getter]
    fn num_tokens(&self) -> usize {
        self.inner.num_tokens()
    }

    #[getter]
    fn vocab_size(&self) -> Option<u32> {
        self.inner.vocab_size()
    }

    #[getter]
    fn is_memory_mapped(&self) -> bool {
        self.inner.is_memory_mapped()
    }

    /// Per-pair `(prompt, chosen, rejected)` lengths as uint32 arrays.
    #[allow(clippy::type_complexity)]
    fn lengths<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyArray1<u32>>, Bound<'py, PyArray1<u32>>, Bound<'py, PyArray1<u32>>)> {
        let inner = &self.inner;
        let (p, c, r) = detached(py, || {
            inner.check_file()?;
            Ok(inner.lengths())
        })?;
        Ok((vec1(py, p), vec1(py, c), vec1(py, r)))
    }

    /// Pair ids, uint64, in store order.
    fn ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let inner = &self.inner;
        let ids = guarded(py, || {
            inner.check_file()?;
            Ok(inner.ids().to_vec())
        })?;
        Ok(vec1(py, ids))
    }

    /// `(prompt, chosen, rejected)` token arrays of pair `index` (negative counts from the end).
    fn __getitem__<'py>(&self, py: Python<'py>, index: isize) -> PyResult<Bound<'py, PyTuple>> {
        let n = self.inner.len() as isize;
        let i = if index < 0 { index.saturating_add(n) } else { index };
        let inner = &self.inner;
        let spans = guarded(py, || {
            let pair = inner.get(usize::try_from(i).unwrap_or(usize::MAX))?;
            Ok([pair.prompt, pair.chosen, pair.rejected].map(<[u32]>::to_vec))
        })?;
        PyTuple::new(py, spans.map(|s| vec1(py, s)))
    }

    /// Id of pair `index`.
    fn pair_id(&self, py: Python<'_>, index: usize) -> PyResult<u64> {
        let inner = &self.inner;
        guarded(py, || inner.get(index).map(|p| p.id))
    }

    /// Save to one checksummed file, atomically (temporary file + rename); errors are `OSError`
    /// subclasses naming the path.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let inner = &self.inner;
        detached(py, move || inner.save(&path))
    }

    /// Load a saved store, memory-mapped; damaged files raise `StoreFileError`, a missing or
    /// unreadable one an `OSError` subclass naming the path. The file must not be truncated or
    /// rewritten in place while loaded (see the stub's docstring).
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        detached(py, move || CoreStore::load(&path)).map(|inner| PyPreferenceStore { inner })
    }

    fn __repr__(&self) -> String {
        let vocab = self.inner.vocab_size().map_or("None".to_string(), |v| v.to_string());
        format!(
            "PreferenceStore(pairs={}, tokens={}, vocab_size={vocab}, memory_mapped={})",
            self.inner.len(),
            self.inner.num_tokens(),
            self.inner.is_memory_mapped()
        )
    }
}
