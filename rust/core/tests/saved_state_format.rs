//! The saved-state bytes are a file format: checkpoints written by earlier builds must keep
//! loading, and a build must keep writing what earlier builds can read. These tests pin the
//! exact bytes of one KL controller state and one sampler state, field by field, so a change
//! to either format (or to the code that writes it) fails here before it reaches a checkpoint.

use epsdpo_core::kl::KlController;
use epsdpo_core::sampler::{BatchSampler, SamplerConfig, SamplerMode};

fn unhex(fields: &[&str]) -> Vec<u8> {
    let hex: String = fields.concat();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// Little-endian throughout; the CRC-32 covers every byte before it.
#[rustfmt::skip] // one ledger entry per line
const KL_STATE: &[&str] = &[
    "4544504f4b4c4354", // magic "EDPOKLCT"
    "01000000",         // version 1
    "9ed8899dd889dd3f", // beta 0.5 / (1 + 0.25 * 1/3)
    "000000000000d03f", // epsilon 0.25
    "0000000000000000", // cycle sum 0
    "0200000000000000", // cycle count 2
    "0200000000000000", // history: 2 values
    "000000000000e03f", //   0.5
    "9ed8899dd889dd3f", //   0.46153846153846156
    "0400000000000000", // ledger: 4 entries, sorted by id; each id, plus, zero, minus, last step, last beta
    "0200000000000000", "0000000000000000", "0000000000000000", "0100000000000000", "ff", "555555555555e53f",
    "0500000000000000", "0100000000000000", "0000000000000000", "0000000000000000", "01", "9a9999999999d93f",
    "0900000000000000", "0100000000000000", "0100000000000000", "0000000000000000", "01", "187aa1177aa1d73f",
    "0b00000000000000", "0000000000000000", "0000000000000000", "0100000000000000", "ff", "143bb1133bb1e33f",
    "c7f2eea7", // CRC-32
];

const SAMPLER_STATE: &[&str] = &[
    "4544504f534d504c", // magic "EDPOSMPL"
    "01000000",         // version 1
    "d204000000000000", // seed 1234
    "0300000000000000", // epoch 3
    "0100000000000000", // position 1
    "9a6ff9d99bcb8790", // fingerprint of the config and the pair lengths
    "94906f76",         // CRC-32
];

fn kl_controller() -> KlController {
    let mut k = KlController::new(0.5, 0.25).unwrap();
    k.record(&[5, 9, 2], &[1, 0, -1]).unwrap();
    k.apply_update(1, 3).unwrap();
    k.record(&[9, 11], &[1, -1]).unwrap();
    k
}

fn sampler() -> BatchSampler {
    let config = SamplerConfig {
        batch_size: 2,
        mode: SamplerMode::LengthGrouped { mega_batch_mult: 2 },
        seed: 1234,
        world_size: 2,
        rank: 1,
        drop_last: false,
    };
    BatchSampler::new(
        vec![3, 5, 2, 7, 4, 6, 9, 1],
        vec![4, 1, 6, 2, 5, 3, 2, 8],
        config,
    )
    .unwrap()
}

#[test]
fn kl_state_bytes_are_pinned() {
    assert_eq!(kl_controller().state_bytes(), unhex(KL_STATE));
}

#[test]
fn pinned_kl_state_loads() {
    let loaded = KlController::from_state_bytes(&unhex(KL_STATE)).unwrap();
    assert_eq!(loaded, kl_controller());
    assert_eq!(loaded.beta_history(), &[0.5, 0.5 / (1.0 + 0.25 / 3.0)]);
    assert_eq!(loaded.local_sums(), (0, 2));
}

#[test]
fn sampler_state_bytes_are_pinned() {
    let mut s = sampler();
    s.set_epoch(3);
    s.next_batch();
    assert_eq!(s.state_bytes(), unhex(SAMPLER_STATE));
}

#[test]
fn pinned_sampler_state_loads() {
    let mut s = sampler();
    s.load_state_bytes(&unhex(SAMPLER_STATE)).unwrap();
    assert_eq!((s.epoch(), s.position()), (3, 1));
    assert_eq!(s.next_batch().as_ref(), s.epoch_batches(3).unwrap().get(1));
}
