//! `epsdpo._core`: thin Python bindings over `epsdpo-core`. Arrays cross as numpy, the GIL is
//! released while Rust works, and core errors become typed exceptions.

use pyo3::prelude::*;

mod arrays;
mod collate;
mod errors;
mod kl;
mod sampler;
mod store;
mod truncate;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    m.add_class::<store::PyPreferenceStore>()?;
    m.add("LAYOUTS", pyo3::types::PyTuple::new(m.py(), collate::layout_names())?)?;
    m.add_class::<truncate::PyTruncation>()?;
    m.add_class::<collate::PyCollator>()?;
    m.add_class::<sampler::PyBatchSampler>()?;
    m.add_class::<kl::PyKlController>()?;
    Ok(())
}
