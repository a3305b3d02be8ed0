//! Size limits that more than one module enforces. They live apart from the modules that check
//! them so that truncation, collation and sampling all depend on this one module and never on
//! each other.

/// The most tokens one row may span (a sequence, a packed row, a padding multiple, a length
/// limit): far above any context length in use, far below what exhausts memory, so that a typo
/// such as `pad_to_multiple_of=2**33` is an error naming the argument, not an aborted process.
pub const MAX_ROW_TOKENS: usize = 1 << 24;

/// The most cells (rows × columns) one batch may hold. Each cell costs 34 bytes over the seven
/// `[rows, cols]` arrays, so this caps a batch near 9 GB: no real batch comes close, and nothing
/// derived from user input can ask the allocator for more (an allocation failure aborts the
/// process; Rust cannot turn it into an error after the fact). It also keeps every flat index
/// exact in the `i32` of `cu_seqlens`.
pub const MAX_BATCH_CELLS: usize = 1 << 28;
