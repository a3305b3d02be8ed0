//! Layout invariants, checked on random stores: every layout carries each sequence's truncated
//! tokens exactly once, its attention rule shows each token exactly its own sequence's prefix, and
//! every scored token is predicted by its true predecessor.

use epsdpo_core::collate::{collate, truncated_lengths, Batch, CollateConfig, Layout};
use epsdpo_core::store::PreferenceStore;
use epsdpo_core::truncate::{PromptTruncation, Truncation};
use epsdpo_core::Error;
use proptest::prelude::*;

const LAYOUTS: [Layout; 3] = Layout::ALL;

/// The sequences a batch should carry, written the obvious way.
fn expected_sequences(store: &PreferenceStore, indices: &[u32], t: &Truncation) -> Vec<(Vec<u32>, usize)> {
    let mut chosen = Vec::new();
    let mut rejected = Vec::new();
    for &i in indices {
        let pair = store.get(i as usize).unwrap();
        let mut prompt = pair.prompt.to_vec();
        if let Some(m) = t.max_prompt_length {
            if prompt.len() > m {
                prompt = match t.prompt_mode {
                    PromptTruncation::KeepEnd => prompt[prompt.len() - m..].to_vec(),
                    PromptTruncation::KeepStart => prompt[..m].to_vec(),
                };
            }
        }
        for (completion, out) in [(pair.chosen, &mut chosen), (pair.rejected, &mut rejected)] {
            let mut seq = prompt.clone();
            seq.extend_from_slice(&completion[..t.max_completion_length.map_or(completion.len(), |m| m.min(completion.len()))]);
            if let Some(m) = t.max_length {
                seq.truncate(m);
            }
            out.push((seq, prompt.len()));
        }
    }
    chosen.into_iter().chain(rejected).collect()
}

fn visible(b: &Batch, i: usize) -> Vec<usize> {
    let row = i / b.cols;
    (row * b.cols..=i)
        .filter(|&j| {
            b.segment_ids[j] >= 0
                && b.segment_ids[j] == b.segment_ids[i]
                && (b.branch_ids[j] == 0 || b.branch_ids[j] == b.branch_ids[i])
        })
        .collect()
}

fn check_batch(b: &Batch, expected: &[(Vec<u32>, usize)], config: &CollateConfig) -> Result<(), TestCaseError> {
    let n = b.rows * b.cols;
    prop_assert_eq!(b.num_sequences(), expected.len());
    for a in [b.input_ids.len(), b.attention_mask.len(), b.position_ids.len(), b.sequence_index.len(), b.segment_ids.len()] {
        prop_assert_eq!(a, n);
    }
    prop_assert_eq!(b.cols % config.pad_to_multiple_of, 0);
    // The shared-prompt layout stores each prompt once, for both of its pair's sequences.
    let all: usize = expected.iter().map(|(s, _)| s.len()).sum();
    let shared: usize = if b.layout == Layout::SharedPrompt { expected[expected.len() / 2..].iter().map(|(_, p)| p).sum() } else { 0 };
    prop_assert_eq!(b.num_real_tokens(), all - shared);

    // Every completion token is scored exactly once, in order, by its sequence.
    let scored: usize = expected.iter().map(|(s, p)| s.len() - p).sum();
    prop_assert_eq!(b.completion_mask.iter().filter(|&&m| m).count(), scored);
    prop_assert_eq!(b.target_ids.len(), scored);
    for (s, (seq, p)) in expected.iter().enumerate() {
        let targets: Vec<u32> = (0..scored).filter(|&k| b.target_sequence[k] == s as i64).map(|k| b.target_ids[k] as u32).collect();
        prop_assert_eq!(&targets[..], &seq[*p..]);
    }

    // Walking back from each sequence's last token through the attention rule recovers the whole
    // sequence at consecutive positions; each scored token's predictor is its predecessor.
    for (s, (seq, p)) in expected.iter().enumerate() {
        let last = (0..n).filter(|&f| b.sequence_index[f] == s as i32 && b.completion_mask[f]).max().unwrap();
        let seen = visible(b, last);
        let tokens: Vec<u32> = seen.iter().map(|&f| b.input_ids[f] as u32).collect();
        prop_assert_eq!(&tokens, seq);
        let positions: Vec<i64> = seen.iter().map(|&f| b.position_ids[f]).collect();
        prop_assert_eq!(positions, (0..seq.len() as i64).collect::<Vec<_>>());
        let ks: Vec<usize> = (0..scored).filter(|&k| b.target_sequence[k] == s as i64).collect();
        for (j, &k) in ks.iter().enumerate() {
            prop_assert_eq!(b.logit_index[k] as usize, seen[p + j - 1]);
            prop_assert!(b.completion_mask[seen[p + j]]);
        }
    }

    // cu_seqlens tiles the flattened rows; no run crosses a row or a segment boundary.
    prop_assert_eq!(b.cu_seqlens.first().copied(), Some(0));
    prop_assert_eq!(*b.cu_seqlens.last().unwrap() as usize, n);
    for w in b.cu_seqlens.windows(2) {
        let (a, z) = (w[0] as usize, w[1] as usize);
        prop_assert!(a < z);
        prop_assert_eq!(a / b.cols, (z - 1) / b.cols);
        prop_assert!(b.segment_ids[a..z].iter().all(|&g| g == b.segment_ids[a]));
        prop_assert!(z - a <= b.max_seqlen);
    }
    check_layout_properties(b)?;
    if b.layout == Layout::Packed {
        let capacity = config.capacity.or(config.truncation.max_length).unwrap_or(usize::MAX);
        for row in 0..b.rows {
            let used = b.attention_mask[row * b.cols..(row + 1) * b.cols].iter().filter(|&&m| m != 0).count();
            prop_assert!(used <= capacity);
        }
    }
    Ok(())
}

/// What a layout says of itself (`branched`, `right_padded`, `packs_rows`) holds in its batches:
/// the model side picks its attention path from these properties, not from the layout's name.
fn check_layout_properties(b: &Batch) -> Result<(), TestCaseError> {
    let rows: Vec<&[i32]> = if b.cols == 0 { Vec::new() } else { b.segment_ids.chunks_exact(b.cols).collect() };
    prop_assert_eq!(b.branch_ids.iter().any(|&g| g != 0), b.layout.branched(), "branched, {:?}", b.layout);
    if b.layout.right_padded() {
        // One sequence per row, then padding only: causal attention over the whole row is exact.
        prop_assert_eq!(b.rows, b.num_sequences());
        for row in &rows {
            let real = row.iter().take_while(|&&g| g >= 0).count();
            prop_assert!(real > 0 && row[..real].iter().all(|&g| g == row[0]) && row[real..].iter().all(|&g| g < 0));
        }
    }
    if !b.layout.packs_rows() {
        // Without packing a row holds one segment at most (a sequence, or a pair's branches).
        for row in &rows {
            let mut segments: Vec<i32> = row.iter().copied().filter(|&g| g >= 0).collect();
            segments.dedup();
            prop_assert!(segments.len() <= 1, "{:?} row with segments {:?}", b.layout, segments);
        }
    }
    Ok(())
}

fn arb_store() -> impl Strategy<Value = PreferenceStore> {
    let span = |max: usize| prop::collection::vec(0u32..500, 1..max);
    prop::collection::vec((span(12), span(16), span(16)), 1..12).prop_map(|pairs| {
        let mut store = PreferenceStore::new(Some(500)).unwrap();
        for (p, c, r) in pairs {
            store.add_pair(&p, &c, &r, None).unwrap();
        }
        store
    })
}

fn arb_truncation() -> impl Strategy<Value = Truncation> {
    (prop::option::of(8usize..40), prop::option::of(1usize..8), prop::option::of(1usize..20), any::<bool>()).prop_map(|(max_length, max_prompt_length, max_completion_length, keep_start)| Truncation {
        max_length,
        max_prompt_length,
        max_completion_length,
        prompt_mode: if keep_start { PromptTruncation::KeepStart } else { PromptTruncation::KeepEnd },
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn layouts_carry_each_truncated_sequence_exactly_once(
        store in arb_store(),
        truncation in arb_truncation(),
        multiple in 1usize..5,
        pick in prop::collection::vec(any::<prop::sample::Index>(), 1..8),
    ) {
        let indices: Vec<u32> = pick.iter().map(|ix| ix.index(store.len()) as u32).collect();
        // Pairs whose completion would be emptied, or whose completions are identical (always
        // dropped), are not this property's business.
        let lengths = truncated_lengths(&store, &truncation).unwrap();
        let indices: Vec<u32> =
            indices.into_iter().filter(|i| !lengths.empty.contains(i) && !lengths.identical.contains(i)).collect();
        prop_assume!(!indices.is_empty());
        let expected = expected_sequences(&store, &indices, &truncation);
        for layout in LAYOUTS {
            let config = CollateConfig { layout, truncation, pad_to_multiple_of: multiple, pad_token_id: 7, ..Default::default() };
            let batch = collate(&store, &indices, &config).unwrap();
            check_batch(&batch, &expected, &config)?;
            let lens: Vec<i32> = expected.iter().map(|(s, _)| s.len() as i32).collect();
            prop_assert_eq!(&batch.sequence_lengths, &lens);
            prop_assert_eq!(batch.pair_indices.iter().map(|&i| i as u32).collect::<Vec<_>>(), indices.clone());
        }
    }
}

#[test]
fn packing_uses_ffd_rows_at_the_narrowest_width() {
    let mut store = PreferenceStore::new(None).unwrap();
    // Sequence lengths: chosen 6, 3, 5; rejected 4, 2, 2. FFD into capacity 8 needs 3 rows
    // ([6,2] [5,3] [4,2]); 22 tokens over 3 rows already need width 8, so those rows stand.
    store.add_pair(&[1u32, 2], &[3, 4, 5, 6], &[7, 8], None).unwrap();
    store.add_pair(&[1u32], &[2, 3], &[4], None).unwrap();
    store.add_pair(&[1u32], &[2, 3, 4, 5], &[6], None).unwrap();
    let config = CollateConfig { layout: Layout::Packed, capacity: Some(8), ..Default::default() };
    let batch = collate(&store, &[0, 1, 2], &config).unwrap();
    assert_eq!((batch.rows, batch.cols), (3, 8));
    let fills: Vec<usize> = (0..3).map(|r| batch.attention_mask[r * 8..(r + 1) * 8].iter().sum::<i64>() as usize).collect();
    assert_eq!(fills, vec![8, 8, 6]);
    // Sequences 6, 5, 4, 3 into capacity 10: FFD needs 2 rows ([6,4] [5,3]); width 9 keeps 2 rows
    // ([6,3] [5,4]) and saves a padded column.
    let mut even = PreferenceStore::new(None).unwrap();
    even.add_pair(&[1u32], &[2, 3, 4, 5, 6], &[7, 8, 9], None).unwrap();
    even.add_pair(&[1u32], &[2, 3, 4, 5], &[6, 7], None).unwrap();
    let batch = collate(&even, &[0, 1], &CollateConfig { layout: Layout::Packed, capacity: Some(10), ..Default::default() }).unwrap();
    assert_eq!((batch.rows, batch.cols), (2, 9));
    assert_eq!(batch.num_real_tokens(), 18);
    // A sequence longer than the capacity is an error naming its pair.
    let tight = CollateConfig { capacity: Some(5), ..config };
    assert!(matches!(collate(&store, &[1, 0], &tight), Err(Error::InvalidPair { pair: 0, .. })));
}

#[test]
fn emptied_completions_fail_or_are_skipped_and_counted() {
    let mut store = PreferenceStore::new(None).unwrap();
    store.add_pair(&[1u32, 2, 3, 4], &[5], &[6], None).unwrap();
    store.add_pair(&[1u32], &[2], &[3], None).unwrap();
    let truncation = Truncation { max_length: Some(4), ..Default::default() };
    let config = CollateConfig { truncation, ..Default::default() };
    assert!(matches!(collate(&store, &[1, 0], &config), Err(Error::EmptyAfterTruncation { pair: 0, .. })));
    let skipping = CollateConfig { skip_empty: true, ..config };
    let batch = collate(&store, &[1, 0], &skipping).unwrap();
    assert_eq!((batch.pair_indices.clone(), batch.skipped.clone()), (vec![1], vec![0]));
    assert_eq!(truncated_lengths(&store, &truncation).unwrap().empty, vec![0]);
}

#[test]
fn identical_completions_after_truncation_are_always_dropped_and_counted() {
    let mut store = PreferenceStore::new(None).unwrap();
    store.add_pair(&[1u32, 2], &[5, 6, 7], &[5, 6, 8], None).unwrap(); // identical once cut to 2
    store.add_pair(&[1u32], &[2], &[3], None).unwrap();
    store.add_pair(&[1u32], &[4, 4], &[4, 4], None).unwrap(); // identical as stored
    let whole = Truncation::default();
    assert_eq!(truncated_lengths(&store, &whole).unwrap().identical, vec![2]);
    let cut = Truncation { max_completion_length: Some(2), ..Default::default() };
    let lengths = truncated_lengths(&store, &cut).unwrap();
    assert_eq!(lengths.identical, vec![0, 2]);
    assert_eq!((lengths.chosen.clone(), lengths.rejected.clone()), (vec![2, 1, 2], vec![2, 1, 2]), "lengths kept");
    for layout in LAYOUTS {
        let config = CollateConfig { layout, truncation: cut, ..Default::default() };
        let batch = collate(&store, &[2, 1, 0], &config).unwrap();
        assert_eq!((batch.pair_indices.clone(), batch.identical.clone()), (vec![1], vec![2, 0]), "{layout:?}");
        assert!(batch.skipped.is_empty());
        let none_left = collate(&store, &[0, 2], &config).unwrap();
        assert_eq!((none_left.num_pairs(), none_left.rows), (0, 0));
    }
}

#[test]
fn out_of_range_index_names_it() {
    let mut store = PreferenceStore::new(None).unwrap();
    store.add_pair(&[1u32], &[2], &[3], None).unwrap();
    assert!(matches!(collate(&store, &[0, 5], &CollateConfig::default()), Err(Error::InvalidPair { pair: 5, .. })));
}
