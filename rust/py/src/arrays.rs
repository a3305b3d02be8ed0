//! numpy at the boundary: integer arrays of any common dtype in (borrowed, no copy when
//! contiguous), owned vectors out (handed to numpy without a copy).

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use std::borrow::Cow;

/// A 1-D integer array as it arrives from Python.
pub enum IntArray<'py> {
    I64(PyReadonlyArray1<'py, i64>),
    I32(PyReadonlyArray1<'py, i32>),
    U32(PyReadonlyArray1<'py, u32>),
    U64(PyReadonlyArray1<'py, u64>),
    U16(PyReadonlyArray1<'py, u16>),
}

impl<'py> IntArray<'py> {
    pub fn extract(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Self> {
        if let Ok(a) = obj.extract() {
            return Ok(IntArray::I64(a));
        }
        if let Ok(a) = obj.extract() {
            return Ok(IntArray::I32(a));
        }
        if let Ok(a) = obj.extract() {
            return Ok(IntArray::U32(a));
        }
        if let Ok(a) = obj.extract() {
            return Ok(IntArray::U64(a));
        }
        if let Ok(a) = obj.extract() {
            return Ok(IntArray::U16(a));
        }
        let found = match obj.cast::<numpy::PyUntypedArray>() {
            Ok(arr) => format!("a {}-D array of dtype {}", arr.ndim(), arr.dtype()),
            Err(_) => format!("{}", obj.get_type().name()?),
        };
        Err(PyTypeError::new_err(format!("{what} must be a 1-D integer numpy array, got {found}")))
    }
}

/// Borrow as a contiguous slice, copying only for strided input.
pub fn slice<'a, T: numpy::Element + Copy>(a: &'a PyReadonlyArray1<'_, T>) -> Cow<'a, [T]> {
    match a.as_slice() {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(a.as_array().iter().copied().collect()),
    }
}

/// Offsets must be non-negative; converted once to the core's u64.
pub fn offsets(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u64>> {
    let arr = IntArray::extract(obj, what)?;
    let bad = || crate::errors::ConfigError::new_err(format!("{what} holds a negative offset"));
    macro_rules! conv {
        ($a:expr) => {
            slice($a).iter().map(|&v| u64::try_from(v).map_err(|_| bad())).collect()
        };
    }
    match &arr {
        IntArray::I64(a) => conv!(a),
        IntArray::I32(a) => conv!(a),
        IntArray::U32(a) => Ok(slice(a).iter().map(|&v| v as u64).collect()),
        IntArray::U64(a) => Ok(slice(a).into_owned()),
        IntArray::U16(a) => Ok(slice(a).iter().map(|&v| v as u64).collect()),
    }
}

/// Pair indices (for the collator): any integer array or a Python sequence of ints.
pub fn indices(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    u32s(obj, "indices", |x| crate::errors::InvalidPairError::new_err(format!("index {x} is not a valid pair index")))
}

/// Token lengths (for the sampler): as `indices`, errors named after the argument.
pub fn lengths(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u32>> {
    u32s(obj, what, |x| crate::errors::ConfigError::new_err(format!("{what} holds {x}, not a length between 0 and {}", u32::MAX)))
}

fn u32s(obj: &Bound<'_, PyAny>, what: &str, bad: impl Fn(String) -> PyErr) -> PyResult<Vec<u32>> {
    let arr = match IntArray::extract(obj, what) {
        Ok(arr) => arr,
        Err(e) => return obj.extract::<Vec<i64>>().map_err(|_| e).and_then(|v| to_u32(&v, &bad)),
    };
    match &arr {
        IntArray::U32(a) => Ok(slice(a).into_owned()),
        IntArray::I64(a) => to_u32(&slice(a), &bad),
        IntArray::I32(a) => to_u32(&slice(a), &bad),
        IntArray::U64(a) => to_u32(&slice(a), &bad),
        IntArray::U16(a) => Ok(slice(a).iter().map(|&v| v as u32).collect()),
    }
}

fn to_u32<T: Copy + TryInto<u32> + std::fmt::Display>(v: &[T], bad: &impl Fn(String) -> PyErr) -> PyResult<Vec<u32>> {
    v.iter().map(|&x| x.try_into().map_err(|_| bad(x.to_string()))).collect()
}

pub fn vec1<'py, T: numpy::Element>(py: Python<'py>, v: Vec<T>) -> Bound<'py, PyArray1<T>> {
    PyArray1::from_vec(py, v)
}

/// A row-major `[rows, cols]` array owning `v` (one numpy object, no reshape view on top).
pub fn vec2<'py, T: numpy::Element>(py: Python<'py>, v: Vec<T>, rows: usize, cols: usize) -> PyResult<Bound<'py, PyAny>> {
    let array = numpy::ndarray::Array2::from_shape_vec((rows, cols), v)
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(format!("batch array shape: {e}")))?;
    Ok(array.into_pyarray(py).into_any())
}
