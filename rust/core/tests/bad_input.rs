//! Input no caller should send, and files changed behind a loaded store: each is a typed error
//! that names the argument, the path or the pair, never a panic or an attempt at an impossible
//! allocation.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use epsdpo_core::collate::{collate, truncated_lengths, CollateConfig, Layout};
use epsdpo_core::limits::{MAX_BATCH_CELLS, MAX_ROW_TOKENS};
use epsdpo_core::sampler::{BatchSampler, SamplerConfig, SamplerMode, MAX_WORLD_SIZE};
use epsdpo_core::store::PreferenceStore;
use epsdpo_core::truncate::Truncation;
use epsdpo_core::Error;

fn small_store(vocab: Option<u32>) -> PreferenceStore {
    let mut store = PreferenceStore::new(vocab).unwrap();
    for k in 0..4u32 {
        store.add_pair(&[1u32, 2, 3], &[4, 5 + k], &[6], None).unwrap();
    }
    store
}

fn argument_error(result: epsdpo_core::Result<impl std::fmt::Debug>, names: &[&str]) {
    match result {
        Err(Error::InvalidArgument(m)) => {
            for name in names {
                assert!(m.contains(name), "{m:?} does not name {name}");
            }
        }
        other => panic!("expected an InvalidArgument naming {names:?}, got {other:?}"),
    }
}

#[test]
fn vocab_size_zero_is_refused() {
    argument_error(PreferenceStore::new(Some(0)), &["vocab_size"]);
}

#[test]
fn sizes_above_the_limits_are_refused_before_allocating() {
    let store = small_store(None);
    let huge = 1usize << 33;
    for (config, name) in [
        (CollateConfig { pad_to_multiple_of: huge, ..Default::default() }, "pad_to_multiple_of"),
        (CollateConfig { layout: Layout::Packed, capacity: Some(huge), ..Default::default() }, "capacity"),
        (CollateConfig { truncation: Truncation { max_length: Some(huge), ..Default::default() }, ..Default::default() }, "max_length"),
        (
            CollateConfig { truncation: Truncation { max_prompt_length: Some(huge), ..Default::default() }, ..Default::default() },
            "max_prompt_length",
        ),
        (
            CollateConfig { truncation: Truncation { max_completion_length: Some(huge), ..Default::default() }, ..Default::default() },
            "max_completion_length",
        ),
    ] {
        argument_error(config.validate(), &[name]);
        argument_error(collate(&store, &[0], &config), &[name, &huge.to_string()]);
    }
    // Each limit on its own is fine, but 18 rows (9 pairs) of the widest padding multiple exceed
    // the cells one batch may hold: refused, naming the padding, before anything is allocated.
    let wide = CollateConfig { pad_to_multiple_of: MAX_ROW_TOKENS, ..Default::default() };
    const _: () = assert!(18 * MAX_ROW_TOKENS > MAX_BATCH_CELLS);
    argument_error(collate(&store, &[0; 9], &wide), &["pad_to_multiple_of", "18 rows"]);
    let one = collate(&store, &[0], &CollateConfig { pad_to_multiple_of: 1 << 10, ..Default::default() }).unwrap();
    assert_eq!((one.rows, one.cols), (2, 1 << 10));
}

#[test]
fn sampler_limits_name_the_argument() {
    let config = |mode, world_size| SamplerConfig { batch_size: 2, mode, seed: 0, world_size, rank: 0, drop_last: false };
    let lens = || (vec![3u32; 4], vec![3u32; 4]);
    let (c, r) = lens();
    argument_error(BatchSampler::new(c, r, config(SamplerMode::Shuffle, MAX_WORLD_SIZE + 1)), &["world_size"]);
    let (c, r) = lens();
    let budget = SamplerMode::TokenBudget { max_tokens: MAX_BATCH_CELLS + 1, padded: true, mega_batch_mult: 1 };
    argument_error(BatchSampler::new(c, r, config(budget, 1)), &["max_tokens"]);
    let (c, r) = lens();
    let mult = SamplerMode::LengthGrouped { mega_batch_mult: usize::MAX };
    argument_error(BatchSampler::new(c, r, config(mult, 1)), &["mega_batch_mult"]);
}

#[test]
fn file_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such.store");
    match PreferenceStore::load(&missing) {
        Err(e @ Error::File { .. }) => {
            let m = e.to_string();
            assert!(m.contains(&missing.display().to_string()) && m.contains("open"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    let unwritable = dir.path().join("no-such-dir").join("pairs.store");
    match small_store(None).save(&unwritable) {
        Err(e @ Error::File { .. }) => assert!(e.to_string().contains(&unwritable.display().to_string()), "{e}"),
        other => panic!("{other:?}"),
    }
    // A header declaring a vocabulary of 0 tokens is a damaged file, like any other bad header.
    let path = dir.path().join("pairs.store");
    small_store(Some(10)).save(&path).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[16..20].copy_from_slice(&0u32.to_le_bytes());
    let body = bytes.len() - 4;
    let crc = crc32fast::hash(&bytes[..body]);
    bytes[body..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(PreferenceStore::load(&path), Err(Error::StoreFile { reason, .. }) if reason.contains("vocab_size 0")));
}

/// Overwrite `bytes` at `at` in place (same inode). With `keep_mtime` the modification time is
/// put back, so only the content checks can notice; without, it is moved on by a second (a write
/// alone may not move it on a file system with coarse timestamps).
fn rewrite_in_place(path: &Path, at: u64, bytes: &[u8], keep_mtime: bool) {
    let modified = std::fs::metadata(path).unwrap().modified().unwrap();
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
    let later = modified + std::time::Duration::from_secs(1);
    f.set_modified(if keep_mtime { modified } else { later }).unwrap();
}

/// Byte offset of the token array in a saved store of `n` pairs (see the format in store.rs).
fn tokens_at(n: u64) -> u64 {
    40 + 8 * (3 * n + 1) + 8 * n
}

#[test]
fn a_mapped_file_changed_in_place_is_an_error_not_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pairs.store");
    small_store(Some(10)).save(&path).unwrap();

    // Rewritten in place (new modification time): refused before reading a token.
    let loaded = PreferenceStore::load(&path).unwrap();
    rewrite_in_place(&path, tokens_at(4), &7u32.to_le_bytes(), false);
    assert!(matches!(collate(&loaded, &[0], &CollateConfig::default()), Err(Error::StoreFile { reason, .. }) if reason.contains("modified")));
    assert!(matches!(loaded.get(0), Err(Error::StoreFile { .. })));
    assert!(matches!(loaded.save(&dir.path().join("copy.store")), Err(Error::StoreFile { .. })));

    // Truncated: an error, where reading the lost pages would be a SIGBUS.
    small_store(Some(10)).save(&path).unwrap();
    let loaded = PreferenceStore::load(&path).unwrap();
    OpenOptions::new().write(true).open(&path).unwrap().set_len(10).unwrap();
    assert!(matches!(collate(&loaded, &[0], &CollateConfig::default()), Err(Error::StoreFile { reason, .. }) if reason.contains("truncated")));
    assert!(matches!(truncated_lengths(&loaded, &Truncation::default()), Err(Error::StoreFile { .. })));

    // Same size, modification time put back: the token of pair 2 above vocab_size names the pair.
    small_store(Some(10)).save(&path).unwrap();
    let loaded = PreferenceStore::load(&path).unwrap();
    rewrite_in_place(&path, tokens_at(4) + 4 * (2 * 6 + 3), &99u32.to_le_bytes(), true);
    match collate(&loaded, &[0, 2], &CollateConfig::default()) {
        Err(e @ Error::MappedPair { pair: 2, .. }) => assert!(e.to_string().contains("99") && e.to_string().contains("vocab_size 10"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(collate(&loaded, &[0, 1, 3], &CollateConfig::default()).is_ok(), "other pairs are still readable");

    // Bounds rewritten to point past the tokens: an error naming the pair, not a panic.
    small_store(None).save(&path).unwrap();
    let loaded = PreferenceStore::load(&path).unwrap();
    rewrite_in_place(&path, 40 + 8 * 4, &u64::MAX.to_le_bytes(), true);
    assert!(matches!(collate(&loaded, &[1], &CollateConfig::default()), Err(Error::MappedPair { pair: 1, .. })));
    assert!(matches!(loaded.get(1), Err(Error::MappedPair { pair: 1, .. })));
    assert!(matches!(truncated_lengths(&loaded, &Truncation::default()), Err(Error::MappedPair { pair: 1, .. })));
    let (p, _, _) = loaded.lengths();
    assert_eq!(p.len(), 4, "lengths of a damaged map come out wrong, but do not panic");
}

#[test]
fn saving_over_a_loaded_store_is_safe() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pairs.store");
    small_store(Some(10)).save(&path).unwrap();
    let loaded = PreferenceStore::load(&path).unwrap();
    // save writes a new file and renames it: the mapped inode is untouched.
    let mut other = small_store(Some(10));
    other.add_pair(&[1u32], &[2], &[3], None).unwrap();
    other.save(&path).unwrap();
    assert_eq!(collate(&loaded, &[0, 1, 2, 3], &CollateConfig::default()).unwrap().num_pairs(), 4);
    loaded.save(&path).unwrap();
    assert_eq!(PreferenceStore::load(&path).unwrap().len(), 4);
}
