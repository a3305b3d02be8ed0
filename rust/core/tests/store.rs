//! PreferenceStore: validation leaves the store untouched on error, and files round-trip or fail
//! loudly.

use epsdpo_core::store::{PairColumns, PreferenceStore};
use epsdpo_core::Error;
use proptest::prelude::*;

type Pairs = Vec<(Vec<u32>, Vec<u32>, Vec<u32>)>;

fn flat<T: Copy>(spans: &[Vec<T>]) -> (Vec<T>, Vec<u64>) {
    let mut tokens = Vec::new();
    let mut offsets = vec![0u64];
    for s in spans {
        tokens.extend_from_slice(s);
        offsets.push(tokens.len() as u64);
    }
    (tokens, offsets)
}

fn append_all(store: &mut PreferenceStore, pairs: &Pairs, ids: Option<&[u64]>) -> epsdpo_core::Result<std::ops::Range<usize>> {
    let p = flat(&pairs.iter().map(|x| x.0.clone()).collect::<Vec<_>>());
    let c = flat(&pairs.iter().map(|x| x.1.clone()).collect::<Vec<_>>());
    let r = flat(&pairs.iter().map(|x| x.2.clone()).collect::<Vec<_>>());
    store.append(PairColumns { prompt: (&p.0, &p.1), chosen: (&c.0, &c.1), rejected: (&r.0, &r.1), ids })
}

fn contents(store: &PreferenceStore) -> (Vec<u32>, Vec<u64>, Vec<u64>) {
    (store.tokens().to_vec(), store.bounds().to_vec(), store.ids().to_vec())
}

fn sample_pairs() -> Pairs {
    vec![(vec![1, 2], vec![3], vec![4, 5]), (vec![6], vec![7, 8, 9], vec![10])]
}

#[test]
fn append_then_read_back() {
    let mut store = PreferenceStore::new(Some(100)).unwrap();
    assert_eq!(append_all(&mut store, &sample_pairs(), None).unwrap(), 0..2);
    let pair = store.get(1).unwrap();
    assert_eq!((pair.prompt, pair.chosen, pair.rejected), (&[6][..], &[7, 8, 9][..], &[10][..]));
    assert_eq!(store.ids(), &[0, 1]);
    let i = store.add_pair(&[11i64], &[12], &[13], Some(40)).unwrap();
    assert_eq!((i, store.get(2).unwrap().id), (2, 40));
    // Auto ids continue after the largest id in use.
    store.add_pair(&[1u32], &[2], &[3], None).unwrap();
    assert_eq!(store.get(3).unwrap().id, 41);
    assert_eq!(store.lengths(), (vec![2, 1, 1, 1], vec![1, 3, 1, 1], vec![2, 1, 1, 1]));
    assert!(matches!(store.get(4), Err(Error::InvalidPair { pair: 4, .. })));
}

#[test]
fn every_invalid_append_names_the_pair_and_changes_nothing() {
    let mut store = PreferenceStore::new(Some(50)).unwrap();
    append_all(&mut store, &sample_pairs(), Some(&[10, 11])).unwrap();
    let before = contents(&store);
    let ok = (vec![1u32], vec![2u32], vec![3u32]);
    let cases: Vec<(Pairs, Option<Vec<u64>>, usize)> = vec![
        (vec![ok.clone(), (vec![1], vec![], vec![3])], None, 1),           // empty chosen
        (vec![ok.clone(), ok.clone(), (vec![1], vec![2], vec![])], None, 2), // empty rejected
        (vec![(vec![], vec![2], vec![3])], None, 0),                        // empty prompt
        (vec![ok.clone(), (vec![1], vec![50], vec![3])], None, 1),          // id == vocab
        (vec![ok.clone(), ok.clone()], Some(vec![11, 12]), 0),              // id already in store
        (vec![ok.clone(), ok.clone()], Some(vec![12, 12]), 1),              // id repeated in batch
    ];
    for (pairs, ids, bad) in cases {
        match append_all(&mut store, &pairs, ids.as_deref()) {
            Err(Error::InvalidPair { pair, .. }) => assert_eq!(pair, bad, "{pairs:?}"),
            other => panic!("expected InvalidPair for {pairs:?}, got {other:?}"),
        }
        assert_eq!(contents(&store), before);
    }
    // Offsets out of order and out of bounds, and negative ids in a signed array.
    let toks = [1i64, 2, 3, 4];
    let bad_order = PairColumns { prompt: (&toks[..], &[0, 2, 1][..]), chosen: (&toks[..], &[0, 1, 2][..]), rejected: (&toks[..], &[0, 1, 2][..]), ids: None };
    assert!(matches!(store.append(bad_order), Err(Error::InvalidPair { pair: 1, .. })));
    let past_end = PairColumns { prompt: (&toks[..], &[0, 1][..]), chosen: (&toks[..], &[0, 9][..]), rejected: (&toks[..], &[0, 1][..]), ids: None };
    assert!(matches!(store.append(past_end), Err(Error::InvalidPair { pair: 0, .. })));
    let neg = [1i64, -3];
    let negative = PairColumns { prompt: (&toks[..], &[0, 1, 2][..]), chosen: (&neg[..], &[0, 1, 2][..]), rejected: (&toks[..], &[0, 1, 2][..]), ids: None };
    assert!(matches!(store.append(negative), Err(Error::InvalidPair { pair: 1, .. })));
    assert_eq!(contents(&store), before);
}

#[test]
fn save_load_is_memory_mapped_and_appendable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pairs.store");
    let mut store = PreferenceStore::new(Some(100)).unwrap();
    append_all(&mut store, &sample_pairs(), None).unwrap();
    store.save(&path).unwrap();
    let mut loaded = PreferenceStore::load(&path).unwrap();
    assert!(loaded.is_memory_mapped());
    assert_eq!(contents(&loaded), contents(&store));
    assert_eq!(loaded.vocab_size(), Some(100));
    // Ids stay unique across a load, and appending copies the map into memory.
    assert!(loaded.add_pair(&[1u32], &[2], &[3], Some(1)).is_err());
    loaded.add_pair(&[1u32], &[2], &[3], Some(7)).unwrap();
    assert!(!loaded.is_memory_mapped());
    assert_eq!(loaded.len(), 3);
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn damaged_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pairs.store");
    let mut store = PreferenceStore::new(None).unwrap();
    append_all(&mut store, &sample_pairs(), None).unwrap();
    store.save(&path).unwrap();
    let good = std::fs::read(&path).unwrap();
    let damaged = dir.path().join("damaged.store");
    let expect_store_error = |bytes: &[u8], what: &str| {
        std::fs::write(&damaged, bytes).unwrap();
        match PreferenceStore::load(&damaged) {
            Err(Error::StoreFile { .. }) => {}
            Err(other) => panic!("{what}: expected StoreFile, got {other:?}"),
            Ok(_) => panic!("{what}: a damaged file loaded"),
        }
    };
    for cut in 0..good.len() {
        expect_store_error(&good[..cut], &format!("truncated to {cut}"));
    }
    for byte in 0..good.len() {
        let mut flipped = good.clone();
        flipped[byte] ^= 0x40;
        expect_store_error(&flipped, &format!("byte {byte} flipped"));
    }
    let mut version = good.clone();
    version[8] = 2;
    std::fs::write(&damaged, &version).unwrap();
    let message = PreferenceStore::load(&damaged).err().unwrap().to_string();
    assert!(message.contains("version 2"), "{message}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn any_store_round_trips(pairs in prop::collection::vec(
        (prop::collection::vec(0u32..1000, 1..20), prop::collection::vec(0u32..1000, 1..20), prop::collection::vec(0u32..1000, 1..20)),
        0..30,
    )) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.store");
        let mut store = PreferenceStore::new(Some(1000)).unwrap();
        append_all(&mut store, &pairs, None).unwrap();
        store.save(&path).unwrap();
        let loaded = PreferenceStore::load(&path).unwrap();
        prop_assert_eq!(contents(&loaded), contents(&store));
        for (i, (p, c, r)) in pairs.iter().enumerate() {
            let pair = loaded.get(i).unwrap();
            prop_assert_eq!((pair.prompt, pair.chosen, pair.rejected), (&p[..], &c[..], &r[..]));
        }
    }
}

fn store_of(pairs: usize, first_token: u32) -> PreferenceStore {
    let mut store = PreferenceStore::new(Some(1 << 20)).unwrap();
    let pairs: Pairs = (0..pairs as u32)
        .map(|i| (vec![first_token + i; 40], vec![first_token + 1; 30], vec![first_token + 2; 30]))
        .collect();
    append_all(&mut store, &pairs, None).unwrap();
    store
}

#[test]
fn concurrent_saves_to_one_path_leave_one_whole_store() {
    // Two threads of one process save different stores over one path, again and again, while a
    // valid file is already there: every save must succeed, and after each round the path holds one
    // of the two stores whole (a shared temporary file used to tear it: one writer truncating
    // the file the other was about to rename into place).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pairs.store");
    let stores = [store_of(3000, 10), store_of(2000, 50_000)];
    stores[0].save(&path).unwrap();
    for _ in 0..10 {
        std::thread::scope(|scope| {
            for store in &stores {
                let path = &path;
                scope.spawn(move || {
                    for _ in 0..5 {
                        store.save(path).unwrap();
                    }
                });
            }
        });
        let loaded = PreferenceStore::load(&path).unwrap();
        assert!(stores.iter().any(|s| contents(s) == contents(&loaded)), "the saved file is neither store");
    }
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("pairs.store")], "a temporary file was left behind");
}
