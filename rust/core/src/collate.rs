//! Collate pairs of a [`PreferenceStore`] into one of three batch layouts.
//!
//! Every layout describes the same `2B` sequences (sequence `b` is pair `b`'s chosen answer,
//! sequence `B + b` its rejected answer) and emits the same arrays, so the model side needs one
//! code path:
//!
//! - `input_ids`, `attention_mask`, `position_ids`, `completion_mask`: `[rows, cols]`.
//! - `sequence_index`: which sequence a token belongs to (−1 on padding; in the shared-prompt
//!   layout prompt tokens carry the chosen sequence's index, though the rejected one reads them too).
//! - `segment_ids`, `branch_ids`: the attention rule. Token i may attend token j iff they share a row
//!   and a segment (≥ 0), j is not after i, and `branch[j] == 0 || branch[j] == branch[i]`. The
//!   rule gives a causal mask for `padded`, a block-diagonal one for `packed`, and "rejected never
//!   sees chosen" for `shared_prompt`; `position_ids` alone cannot express the last two.
//! - `logit_index`, `target_ids`, `target_sequence`: one entry per scored (completion) token: the
//!   flat `row * cols + col` position whose logits predict it, the token, and its sequence. The
//!   predictor is explicit because in `shared_prompt` the first rejected token is predicted by the
//!   last prompt token, not by the token to its left.
//! - `cu_seqlens`: boundaries of the runs of equal segment over the flattened rows (padding runs
//!   included, so the offsets tile `rows * cols`), for flash-attention varlen.

use crate::error::{Error, Result};
use crate::limits::{MAX_BATCH_CELLS, MAX_ROW_TOKENS};
use crate::store::{Pair, PreferenceStore};
use crate::truncate::{Truncated, Truncation};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// One row per sequence: `B` chosen rows, then `B` rejected rows, right-padded.
    #[default]
    Padded,
    /// Sequences bin-packed into rows of at most `capacity` tokens: first-fit decreasing sets the
    /// row count, then FFD at the narrowest width that keeps that row count (multifit) evens the rows.
    Packed,
    /// One row per pair: `[prompt | chosen | rejected]`, the prompt computed once.
    SharedPrompt,
}

impl Layout {
    /// Every layout, in the order users see them listed: the one list of layout names.
    pub const ALL: [Layout; 3] = [Layout::Padded, Layout::Packed, Layout::SharedPrompt];

    /// The name a configuration file or a command line uses.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Padded => "padded",
            Layout::Packed => "packed",
            Layout::SharedPrompt => "shared_prompt",
        }
    }

    pub fn from_name(name: &str) -> Result<Layout> {
        Layout::ALL.into_iter().find(|l| l.name() == name).ok_or_else(|| {
            let names: Vec<String> = Layout::ALL.iter().map(|l| format!("'{}'", l.name())).collect();
            let (last, rest) = names.split_last().expect("there is at least one layout");
            Error::arg(format!("layout must be {} or {last}, got {name:?}", rest.join(", ")))
        })
    }

    /// Rows hold branches (`branch_ids` ≠ 0): two answers after one prompt, where the rejected one
    /// must not see the chosen one. Neither a causal mask nor varlen boundaries express that.
    pub fn branched(self) -> bool {
        matches!(self, Layout::SharedPrompt)
    }

    /// Every row is one sequence followed by padding, so plain causal attention over the whole row
    /// is exact for its real tokens.
    pub fn right_padded(self) -> bool {
        matches!(self, Layout::Padded)
    }

    /// Rows hold several sequences end to end, so the batch's cells are (nearly) all real tokens:
    /// a token budget counts tokens, not rows × the longest sequence.
    pub fn packs_rows(self) -> bool {
        matches!(self, Layout::Packed)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollateConfig {
    pub layout: Layout,
    pub truncation: Truncation,
    pub pad_token_id: u32,
    /// Round the row length up to a multiple of this (1: no rounding).
    pub pad_to_multiple_of: usize,
    /// Packed row capacity; `None` uses `max_length`, or the longest sequence when that is unset too.
    pub capacity: Option<usize>,
    /// Drop (and report) pairs whose completion truncation empties, instead of failing the batch.
    pub skip_empty: bool,
}

impl Default for CollateConfig {
    fn default() -> Self {
        CollateConfig {
            layout: Layout::Padded,
            truncation: Truncation::default(),
            pad_token_id: 0,
            pad_to_multiple_of: 1,
            capacity: None,
            skip_empty: false,
        }
    }
}

impl CollateConfig {
    pub fn validate(&self) -> Result<()> {
        self.truncation.validate()?;
        if self.pad_to_multiple_of == 0 {
            return Err(Error::arg("pad_to_multiple_of must be at least 1"));
        }
        if self.capacity == Some(0) {
            return Err(Error::arg("capacity must be at least 1"));
        }
        for (name, value) in [("pad_to_multiple_of", Some(self.pad_to_multiple_of)), ("capacity", self.capacity)] {
            if let Some(v) = value.filter(|&v| v > MAX_ROW_TOKENS) {
                return Err(Error::arg(format!("{name} = {v} is above the limit of {MAX_ROW_TOKENS} tokens per row")));
            }
        }
        Ok(())
    }
}

/// A collated batch; every `[rows, cols]` array is row-major.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    pub layout: Layout,
    pub rows: usize,
    pub cols: usize,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub position_ids: Vec<i64>,
    pub completion_mask: Vec<bool>,
    pub sequence_index: Vec<i32>,
    pub segment_ids: Vec<i32>,
    pub branch_ids: Vec<i8>,
    pub cu_seqlens: Vec<i32>,
    pub max_seqlen: usize,
    pub logit_index: Vec<i64>,
    pub target_ids: Vec<i64>,
    pub target_sequence: Vec<i64>,
    /// Store indices of the pairs in the batch, in sequence order (after skips).
    pub pair_indices: Vec<i64>,
    pub pair_ids: Vec<u64>,
    /// Store indices dropped because truncation emptied a completion (`skip_empty`).
    pub skipped: Vec<i64>,
    /// Store indices dropped, always, because their chosen and rejected completions are the same
    /// tokens after truncation: such a pair trains on nothing but rounding noise.
    pub identical: Vec<i64>,
    /// How many of the batch's pairs lost tokens to truncation.
    pub num_truncated: usize,
    /// Length (prompt + completion) of each of the `2B` sequences after truncation.
    pub sequence_lengths: Vec<i32>,
}

impl Batch {
    pub fn num_pairs(&self) -> usize {
        self.pair_indices.len()
    }
    pub fn num_sequences(&self) -> usize {
        2 * self.num_pairs()
    }
    /// Tokens that are not padding.
    pub fn num_real_tokens(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m != 0).count()
    }
}

/// Truncated span lengths of every pair, for samplers and data statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TruncatedLengths {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    /// Pairs whose completion truncation would empty (lengths reported as 0 for them).
    pub empty: Vec<u32>,
    /// Pairs whose chosen and rejected completions are the same tokens after truncation; the
    /// collator drops them (their lengths are reported as they are, so samplers see the same
    /// lengths whether or not a pair is dropped).
    pub identical: Vec<u32>,
    /// Pairs that lose at least one token.
    pub num_truncated: usize,
}

pub fn truncated_lengths(store: &PreferenceStore, truncation: &Truncation) -> Result<TruncatedLengths> {
    truncation.validate()?;
    store.check_file()?;
    let n = store.len();
    let mut out = TruncatedLengths {
        prompt: Vec::with_capacity(n),
        chosen: Vec::with_capacity(n),
        rejected: Vec::with_capacity(n),
        ..Default::default()
    };
    for i in 0..n {
        let pair = store.pair_checked(i)?;
        match truncation.apply(i, &pair) {
            Ok(t) => {
                out.num_truncated += t.was_truncated(&pair) as usize;
                if t.completions_identical(&pair) {
                    out.identical.push(i as u32);
                }
                out.prompt.push(t.prompt.len() as u32);
                out.chosen.push(t.chosen_len as u32);
                out.rejected.push(t.rejected_len as u32);
            }
            Err(Error::EmptyAfterTruncation { .. }) => {
                out.empty.push(i as u32);
                out.prompt.push(0);
                out.chosen.push(0);
                out.rejected.push(0);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// One sequence of the batch after truncation.
struct Seq<'a> {
    index: usize,
    prompt: &'a [u32],
    completion: &'a [u32],
}

impl Seq<'_> {
    fn len(&self) -> usize {
        self.prompt.len() + self.completion.len()
    }
}

pub fn collate(store: &PreferenceStore, indices: &[u32], config: &CollateConfig) -> Result<Batch> {
    config.validate()?;
    store.check_indices(indices)?;
    store.check_file()?;
    let mut kept: Vec<(usize, Pair<'_>, Truncated)> = Vec::with_capacity(indices.len());
    let mut batch = Batch { layout: config.layout, ..Default::default() };
    for &i in indices {
        let i = i as usize;
        let pair = store.pair_checked(i)?;
        match config.truncation.apply(i, &pair) {
            Ok(t) if t.completions_identical(&pair) => batch.identical.push(i as i64),
            Ok(t) => {
                batch.num_truncated += t.was_truncated(&pair) as usize;
                kept.push((i, pair, t));
            }
            Err(Error::EmptyAfterTruncation { .. }) if config.skip_empty => batch.skipped.push(i as i64),
            Err(e) => return Err(e),
        }
    }
    let b = kept.len();
    batch.pair_indices = kept.iter().map(|(i, _, _)| *i as i64).collect();
    batch.pair_ids = kept.iter().map(|(_, p, _)| p.id).collect();
    let seqs: Vec<Seq<'_>> = (0..2 * b)
        .map(|s| {
            let (_, pair, t) = &kept[s % b.max(1)];
            let completion = if s < b { &pair.chosen[..t.chosen_len] } else { &pair.rejected[..t.rejected_len] };
            Seq { index: s, prompt: &pair.prompt[t.prompt.clone()], completion }
        })
        .collect();
    batch.sequence_lengths = seqs.iter().map(|s| s.len() as i32).collect();
    match config.layout {
        Layout::Padded => padded(&mut batch, &seqs, config)?,
        Layout::Packed => packed(&mut batch, &seqs, config)?,
        Layout::SharedPrompt => shared_prompt(&mut batch, &seqs, b, config)?,
    }
    batch.set_cu_seqlens();
    Ok(batch)
}

/// `n` rounded up to a multiple of `multiple` (both bounded by `validate`, so no overflow).
fn round_up(n: usize, multiple: usize) -> usize {
    n.div_ceil(multiple) * multiple
}

/// `n` copies of `value`, or an error instead of the abort an impossible allocation would be.
fn filled<T: Clone>(n: usize, value: T) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|e| Error::arg(format!("cannot allocate a batch array of {n} entries: {e}")))?;
    v.resize(n, value);
    Ok(v)
}

fn reserved<T>(n: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|e| Error::arg(format!("cannot allocate a batch array of {n} entries: {e}")))?;
    Ok(v)
}

impl Batch {
    fn allocate(&mut self, rows: usize, cols: usize, config: &CollateConfig, scored: usize) -> Result<()> {
        let n = rows.checked_mul(cols).filter(|&n| n <= MAX_BATCH_CELLS).ok_or_else(|| {
            Error::arg(format!(
                "a batch of {rows} rows × {cols} columns (pad_to_multiple_of {}) is above the limit of {MAX_BATCH_CELLS} cells; use fewer pairs per batch or a smaller pad_to_multiple_of",
                config.pad_to_multiple_of
            ))
        })?;
        self.rows = rows;
        self.cols = cols;
        self.input_ids = filled(n, config.pad_token_id as i64)?;
        self.attention_mask = filled(n, 0)?;
        self.position_ids = filled(n, 0)?;
        self.completion_mask = filled(n, false)?;
        self.sequence_index = filled(n, -1)?;
        self.segment_ids = filled(n, -1)?;
        self.branch_ids = filled(n, 0)?;
        self.logit_index = reserved(scored)?;
        self.target_ids = reserved(scored)?;
        self.target_sequence = reserved(scored)?;
        Ok(())
    }

    /// Write `tokens` at `start` (a flat index) with consecutive positions from `position`.
    /// When `completion` is set each token is scored; the first one is predicted by `first_predictor`
    /// and every later one by its left neighbour.
    #[allow(clippy::too_many_arguments)]
    fn put(&mut self, start: usize, tokens: &[u32], position: usize, sequence: usize, segment: i32, branch: i8, completion: Option<usize>) {
        let end = start + tokens.len();
        for (slot, &t) in self.input_ids[start..end].iter_mut().zip(tokens) {
            *slot = t as i64;
        }
        self.attention_mask[start..end].fill(1);
        for (k, slot) in self.position_ids[start..end].iter_mut().enumerate() {
            *slot = (position + k) as i64;
        }
        self.sequence_index[start..end].fill(sequence as i32);
        self.segment_ids[start..end].fill(segment);
        self.branch_ids[start..end].fill(branch);
        if let Some(first_predictor) = completion {
            self.completion_mask[start..end].fill(true);
            self.logit_index.push(first_predictor as i64);
            self.logit_index.extend((start..end - 1).map(|f| f as i64));
            self.target_ids.extend(tokens.iter().map(|&t| t as i64));
            self.target_sequence.extend(std::iter::repeat(sequence as i64).take(tokens.len()));
        }
    }

    /// Write one whole sequence (prompt then completion) at `start`.
    fn put_sequence(&mut self, start: usize, seq: &Seq<'_>, segment: i32) {
        let p = seq.prompt.len();
        self.put(start, seq.prompt, 0, seq.index, segment, 0, None);
        self.put(start + p, seq.completion, p, seq.index, segment, 0, Some(start + p - 1));
    }

    fn set_cu_seqlens(&mut self) {
        let mut cu = vec![0i32];
        let mut longest = 0;
        if self.cols > 0 {
            for (r, row) in self.segment_ids.chunks_exact(self.cols).enumerate() {
                let base = r * self.cols;
                let mut start = 0;
                for c in 1..row.len() {
                    if row[c] != row[c - 1] {
                        longest = longest.max(c - start);
                        cu.push((base + c) as i32);
                        start = c;
                    }
                }
                longest = longest.max(row.len() - start);
                cu.push((base + row.len()) as i32);
            }
        }
        self.cu_seqlens = cu;
        self.max_seqlen = longest;
    }
}

fn padded(batch: &mut Batch, seqs: &[Seq<'_>], config: &CollateConfig) -> Result<()> {
    let cols = round_up(seqs.iter().map(Seq::len).max().unwrap_or(0), config.pad_to_multiple_of);
    let scored = seqs.iter().map(|s| s.completion.len()).sum();
    batch.allocate(seqs.len(), cols, config, scored)?;
    for (row, seq) in seqs.iter().enumerate() {
        batch.put_sequence(row * cols, seq, row as i32);
    }
    Ok(())
}

fn packed(batch: &mut Batch, seqs: &[Seq<'_>], config: &CollateConfig) -> Result<()> {
    let longest = seqs.iter().map(Seq::len).max().unwrap_or(0);
    let capacity = config.capacity.or(config.truncation.max_length).unwrap_or(longest);
    if let Some(seq) = seqs.iter().find(|s| s.len() > capacity) {
        return Err(Error::pair(
            batch.pair_indices[seq.index % batch.pair_indices.len()] as usize,
            format!("a sequence of {} tokens does not fit the packing capacity {capacity}", seq.len()),
        ));
    }
    // First-fit decreasing finds how many rows the batch needs; ties broken by sequence index so
    // the layout is deterministic.
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&s| (std::cmp::Reverse(seqs[s].len()), s));
    let lens: Vec<usize> = order.iter().map(|&s| seqs[s].len()).collect();
    let (fill, _) = first_fit(&lens, capacity);
    // The array is as wide as its fullest row, so FFD's partly empty last row would be padding.
    // Multifit: binary-search the narrowest width at which FFD still needs no more rows, which
    // spreads the same sequences evenly over (at most) the same rows.
    let rows = fill.len();
    let (mut lo, mut hi) = (lens.iter().sum::<usize>().div_ceil(rows.max(1)).max(longest), capacity);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if first_fit(&lens, mid).0.len() <= rows {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let (fill, slots) = first_fit(&lens, hi);
    let mut placement = vec![(0usize, 0usize); seqs.len()];
    for (k, &s) in order.iter().enumerate() {
        placement[s] = slots[k];
    }
    // Rows are as long as the fullest one, never longer than capacity (before rounding), so a
    // small batch does not pay for an empty tail.
    let cols = round_up(fill.iter().copied().max().unwrap_or(0), config.pad_to_multiple_of);
    let scored = seqs.iter().map(|s| s.completion.len()).sum();
    batch.allocate(fill.len(), cols, config, scored)?;
    for (seq, &(row, col)) in seqs.iter().zip(&placement) {
        batch.put_sequence(row * cols + col, seq, seq.index as i32);
    }
    Ok(())
}

/// First-fit decreasing over lengths sorted longest first: (row fills, (row, column) per item).
fn first_fit(lens: &[usize], capacity: usize) -> (Vec<usize>, Vec<(usize, usize)>) {
    let mut fill: Vec<usize> = Vec::new();
    let slots = lens
        .iter()
        .map(|&len| {
            let row = fill.iter().position(|&used| used + len <= capacity).unwrap_or_else(|| {
                fill.push(0);
                fill.len() - 1
            });
            fill[row] += len;
            (row, fill[row] - len)
        })
        .collect();
    (fill, slots)
}

fn shared_prompt(batch: &mut Batch, seqs: &[Seq<'_>], b: usize, config: &CollateConfig) -> Result<()> {
    let row_len = |i: usize| seqs[i].prompt.len() + seqs[i].completion.len() + seqs[b + i].completion.len();
    let cols = round_up((0..b).map(row_len).max().unwrap_or(0), config.pad_to_multiple_of);
    let scored = seqs.iter().map(|s| s.completion.len()).sum();
    batch.allocate(b, cols, config, scored)?;
    for i in 0..b {
        let (chosen, rejected) = (&seqs[i], &seqs[b + i]);
        let start = i * cols;
        let p = chosen.prompt.len();
        let c = chosen.completion.len();
        let last_prompt = start + p - 1;
        batch.put(start, chosen.prompt, 0, chosen.index, i as i32, 0, None);
        batch.put(start + p, chosen.completion, p, chosen.index, i as i32, 1, Some(last_prompt));
        batch.put(start + p + c, rejected.completion, p, rejected.index, i as i32, 2, Some(last_prompt));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layout_name_round_trips_and_an_unknown_one_lists_them_all() {
        for layout in Layout::ALL {
            assert_eq!(Layout::from_name(layout.name()).unwrap(), layout);
        }
        let message = Layout::from_name("diagonal").unwrap_err().to_string();
        assert!(message.contains("layout must be 'padded', 'packed' or 'shared_prompt', got \"diagonal\""), "{message}");
    }
}
