//! epsdpo-core: the data path and the β bookkeeping of ε-DPO, in pure Rust.
//!
//! - [`store`]: one contiguous token arena for prompt / chosen / rejected spans, validated on
//!   append, saved to one checksummed file and loaded memory-mapped.
//! - [`truncate`]: prompt and completion truncation rules.
//! - [`collate`]: padded, packed and shared-prompt batch layouts.
//! - [`sampler`]: deterministic, resumable, rank-sharded batch sampling.
//! - [`kl`]: the per-pair β controller of ε-DPO (steps, β, ledger, checkpoint state).
//! - [`limits`]: the size limits that truncation, collation and sampling share.
//! - `saved_state`: the checksummed binary format that the sampler and controller states share.

pub mod collate;
pub mod error;
pub mod kl;
pub mod limits;
pub mod sampler;
mod saved_state;
pub mod store;
pub mod truncate;

pub use error::{Error, Result};
