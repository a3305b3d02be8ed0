//! The per-pair β bookkeeping of ε-DPO (docs/algorithm.md, 'The β update').
//!
//! Each training micro-batch reports the step `s_i ∈ {+1, 0, −1}` of its pairs; the pair is
//! trained with `β_i = β / (1 + ε·s_i)`. Once per optimizer step the base β moves by the mean
//! step over every pair of that step (all micro-batches, all ranks): `β ← β / (1 + ε·s̄)`.
//! Ranks all-reduce the *sum and count* from [`KlController::local_sums`], never a mean of
//! means, so unequal micro-batch sizes weigh each pair equally.
//!
//! The whole controller (β, its history and the per-pair ledger) goes into checkpoints so a
//! resumed run continues from the current β, not the initial one.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::saved_state::{StateReader, StateWriter};

#[derive(Debug, Clone, Copy, PartialEq)]
struct LedgerEntry {
    plus: u64,
    zero: u64,
    minus: u64,
    last_step: i8,
    last_beta: f64,
}

/// The ledger as parallel arrays sorted by pair id, ready to become numpy columns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LedgerArrays {
    pub ids: Vec<u64>,
    pub plus: Vec<u64>,
    pub zero: Vec<u64>,
    pub minus: Vec<u64>,
    pub last_step: Vec<i8>,
    pub last_beta: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KlController {
    beta: f64,
    epsilon: f64,
    /// The opt-in floor under the base β (`TrainConfig.beta_min`; `None` is the paper's rule). A
    /// setting of the run, not of its state: it is not saved, and a resumed run takes its own.
    beta_min: Option<f64>,
    cycle_sum: i64,
    cycle_count: u64,
    /// BTreeMap so that arrays and saved state come out sorted by id without a sort.
    ledger: BTreeMap<u64, LedgerEntry>,
    beta_history: Vec<f64>,
}

const STATE_MAGIC: &[u8; 8] = b"EDPOKLCT";
const STATE_VERSION: u32 = 1;
/// id, plus, zero, minus, last_step, last_beta.
const LEDGER_ENTRY_LEN: usize = 8 * 4 + 1 + 8;

impl KlController {
    /// `beta > 0` and `0 <= epsilon < 1`, both finite; `epsilon = 0` is plain DPO.
    pub fn new(beta: f64, epsilon: f64) -> Result<Self> {
        check_beta_epsilon(beta, epsilon).map_err(Error::InvalidArgument)?;
        Ok(KlController {
            beta,
            epsilon,
            beta_min: None,
            cycle_sum: 0,
            cycle_count: 0,
            ledger: BTreeMap::new(),
            beta_history: vec![beta],
        })
    }

    /// The same controller with the base β floored at `beta_min` by every later update (`None`:
    /// no floor, the paper's rule). A departure from the paper (docs/algorithm.md): the update is
    /// `β ← max(β / (1 + ε·s̄), beta_min)`, applied here so the history, the ledger and the β
    /// pairs train with all agree. `beta_min` must be finite, > 0 and at most the current β (on a resumed run,
    /// the restored one).
    pub fn with_beta_min(mut self, beta_min: Option<f64>) -> Result<Self> {
        if let Some(m) = beta_min {
            if !(m.is_finite() && m > 0.0) {
                return Err(Error::arg(format!("beta_min must be finite and > 0, got {m}")));
            }
            if m > self.beta {
                return Err(Error::arg(format!("beta_min = {m} is above beta = {}: the floor must be at most the current beta", self.beta)));
            }
        }
        self.beta_min = beta_min;
        Ok(self)
    }

    pub fn beta(&self) -> f64 {
        self.beta
    }

    pub fn beta_min(&self) -> Option<f64> {
        self.beta_min
    }

    pub fn epsilon(&self) -> f64 {
        self.epsilon
    }

    /// `β / (1 + ε·s)` for each step, recording nothing, so evaluation can use it without
    /// moving β or the ledger.
    pub fn betas_for(&self, steps: &[i8]) -> Result<Vec<f64>> {
        check_steps(steps)?;
        Ok(steps.iter().map(|&s| self.pair_beta(s)).collect())
    }

    /// Records one training micro-batch: adds its steps to the current accumulation cycle and
    /// to each pair's ledger entry (counts accumulate across epochs), and returns the per-pair
    /// β. Everything is validated before anything is written, so an error changes nothing.
    pub fn record(&mut self, pair_ids: &[u64], steps: &[i8]) -> Result<Vec<f64>> {
        if pair_ids.len() != steps.len() {
            return Err(Error::arg(format!(
                "{} pair ids but {} steps",
                pair_ids.len(),
                steps.len()
            )));
        }
        let betas = self.betas_for(steps)?;
        for ((&id, &s), &beta_i) in pair_ids.iter().zip(steps).zip(&betas) {
            // Saturating: counts come back from checkpoints, which we do not fully trust.
            self.cycle_sum = self.cycle_sum.saturating_add(s as i64);
            self.cycle_count = self.cycle_count.saturating_add(1);
            let entry = self.ledger.entry(id).or_insert(LedgerEntry {
                plus: 0,
                zero: 0,
                minus: 0,
                last_step: 0,
                last_beta: beta_i,
            });
            let counter = match s {
                1 => &mut entry.plus,
                0 => &mut entry.zero,
                _ => &mut entry.minus,
            };
            *counter = counter.saturating_add(1);
            entry.last_step = s;
            entry.last_beta = beta_i;
        }
        Ok(betas)
    }

    /// This rank's (sum of steps, number of pairs) since the last update: the values to
    /// all-reduce before [`apply_update`](Self::apply_update).
    pub fn local_sums(&self) -> (i64, u64) {
        (self.cycle_sum, self.cycle_count)
    }

    /// Once per optimizer step, with the all-reduced sum and count: `β ← β / (1 + ε·mean)`.
    /// Appends the new β to the history and starts a new cycle. A count of 0 (a step with no
    /// pairs) leaves β unchanged but still appends, so `beta_history()[k]` is always β after
    /// `k` optimizer steps.
    ///
    /// Every step is −1, 0 or +1, so an honest sum satisfies `|sum| <= count`. Anything else
    /// comes from a corrupted all-reduce (or a caller mixing up the two values) and is refused,
    /// naming both, with nothing changed: moving β by a clamped guess would hide the fault.
    /// Within the bound the mean lies in [−1, 1], so with ε < 1 `1 + ε·mean > 0` and β stays
    /// positive and finite.
    pub fn apply_update(&mut self, global_sum: i64, global_count: u64) -> Result<f64> {
        if global_sum.unsigned_abs() > global_count {
            return Err(Error::arg(format!(
                "apply_update: |global_sum| = |{global_sum}| exceeds global_count = {global_count}; every step is -1, 0 or +1, so the all-reduced sums are corrupted (beta left unchanged)"
            )));
        }
        if global_count > 0 {
            let mean = global_sum as f64 / global_count as f64;
            self.beta /= 1.0 + self.epsilon * mean;
            if let Some(floor) = self.beta_min {
                self.beta = self.beta.max(floor);
            }
        }
        self.beta_history.push(self.beta);
        self.cycle_sum = 0;
        self.cycle_count = 0;
        Ok(self.beta)
    }

    /// β after each optimizer step, starting with the initial β.
    pub fn beta_history(&self) -> &[f64] {
        &self.beta_history
    }

    pub fn ledger_arrays(&self) -> LedgerArrays {
        let mut out = LedgerArrays::default();
        for (&id, e) in &self.ledger {
            out.ids.push(id);
            out.plus.push(e.plus);
            out.zero.push(e.zero);
            out.minus.push(e.minus);
            out.last_step.push(e.last_step);
            out.last_beta.push(e.last_beta);
        }
        out
    }

    /// Fields, in the `saved_state` framing (magic, version, CRC-32): β, ε, cycle sum, cycle
    /// count, history (count, values), ledger (count, entries sorted by id).
    pub fn state_bytes(&self) -> Vec<u8> {
        // Six 8-byte scalars (β, ε, cycle sum and count, the two counts), then the arrays.
        let fields_len =
            8 * 6 + 8 * self.beta_history.len() + LEDGER_ENTRY_LEN * self.ledger.len();
        let mut w = StateWriter::new(STATE_MAGIC, STATE_VERSION, fields_len);
        w.f64(self.beta)
            .f64(self.epsilon)
            .i64(self.cycle_sum)
            .u64(self.cycle_count);
        w.u64(self.beta_history.len() as u64);
        for &b in &self.beta_history {
            w.f64(b);
        }
        w.u64(self.ledger.len() as u64);
        for (&id, e) in &self.ledger {
            w.u64(id)
                .u64(e.plus)
                .u64(e.zero)
                .u64(e.minus)
                .i8(e.last_step)
                .f64(e.last_beta);
        }
        w.finish()
    }

    /// Restores a controller from [`state_bytes`](Self::state_bytes). Anything malformed,
    /// including values the controller could never have produced, is an `Error::State`.
    pub fn from_state_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = StateReader::open(bytes, "KL controller", STATE_MAGIC, STATE_VERSION)?;
        let beta = r.f64()?;
        let epsilon = r.f64()?;
        check_beta_epsilon(beta, epsilon).map_err(Error::State)?;
        let cycle_sum = r.i64()?;
        let cycle_count = r.u64()?;
        if cycle_sum.unsigned_abs() > cycle_count {
            return Err(bad(format!(
                "cycle sum {cycle_sum} exceeds cycle count {cycle_count}"
            )));
        }

        let n_history = r.count(8)?;
        let mut beta_history = Vec::with_capacity(n_history);
        for _ in 0..n_history {
            let b = r.f64()?;
            if !(b.is_finite() && b > 0.0) {
                return Err(bad(format!("history holds an invalid beta {b}")));
            }
            beta_history.push(b);
        }
        if beta_history.last().map(|b| b.to_bits()) != Some(beta.to_bits()) {
            return Err(bad("beta history does not end with the current beta"));
        }

        let n_ledger = r.count(LEDGER_ENTRY_LEN)?;
        let mut ledger = BTreeMap::new();
        let mut previous: Option<u64> = None;
        for _ in 0..n_ledger {
            let id = r.u64()?;
            if previous.is_some_and(|p| p >= id) {
                return Err(bad(format!(
                    "ledger ids not strictly increasing at id {id}"
                )));
            }
            previous = Some(id);
            let entry = LedgerEntry {
                plus: r.u64()?,
                zero: r.u64()?,
                minus: r.u64()?,
                last_step: r.i8()?,
                last_beta: r.f64()?,
            };
            if !(-1..=1).contains(&entry.last_step) {
                return Err(bad(format!(
                    "pair {id}: invalid last step {}",
                    entry.last_step
                )));
            }
            if !(entry.last_beta.is_finite() && entry.last_beta > 0.0) {
                return Err(bad(format!(
                    "pair {id}: invalid last beta {}",
                    entry.last_beta
                )));
            }
            ledger.insert(id, entry);
        }
        r.finish()?;
        Ok(KlController {
            beta,
            epsilon,
            beta_min: None,
            cycle_sum,
            cycle_count,
            ledger,
            beta_history,
        })
    }

    fn pair_beta(&self, step: i8) -> f64 {
        self.beta / (1.0 + self.epsilon * step as f64)
    }
}

fn check_beta_epsilon(beta: f64, epsilon: f64) -> std::result::Result<(), String> {
    if !(beta.is_finite() && beta > 0.0) {
        return Err(format!("beta must be finite and > 0, got {beta}"));
    }
    // ε < 1 keeps 1 − ε > 0, so the tightened β/(1 − ε) stays finite and positive.
    if !(epsilon.is_finite() && (0.0..1.0).contains(&epsilon)) {
        return Err(format!(
            "epsilon must be finite and in [0, 1), got {epsilon}"
        ));
    }
    Ok(())
}

fn check_steps(steps: &[i8]) -> Result<()> {
    match steps.iter().position(|s| !(-1..=1).contains(s)) {
        Some(i) => Err(Error::arg(format!(
            "step {} at index {i} is not -1, 0 or 1",
            steps[i]
        ))),
        None => Ok(()),
    }
}

fn bad(reason: impl Into<String>) -> Error {
    Error::State(reason.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn constructor_validates() {
        for (beta, eps) in [
            (0.0, 0.1),
            (-1.0, 0.1),
            (f64::NAN, 0.1),
            (f64::INFINITY, 0.1),
            (0.1, -0.01),
            (0.1, 1.0),
            (0.1, f64::NAN),
        ] {
            assert!(
                matches!(KlController::new(beta, eps), Err(Error::InvalidArgument(_))),
                "{beta} {eps}"
            );
        }
        let k = KlController::new(0.1, 0.0).unwrap();
        assert_eq!(
            (k.beta(), k.epsilon(), k.beta_history()),
            (0.1, 0.0, &[0.1][..])
        );
    }

    #[test]
    fn betas_by_hand() {
        let k = KlController::new(0.1, 0.25).unwrap();
        let betas = k.betas_for(&[1, 0, -1]).unwrap();
        assert_eq!(betas, vec![0.1 / 1.25, 0.1, 0.1 / 0.75]);
        assert!(
            (betas[0] - 0.08).abs() < 1e-15 && (betas[2] - 0.133_333_333_333_333_33).abs() < 1e-15
        );
        assert!(
            k.ledger_arrays().ids.is_empty(),
            "betas_for must record nothing"
        );
        assert_eq!(k.local_sums(), (0, 0));
    }

    #[test]
    fn invalid_step_names_its_index() {
        let k = KlController::new(0.1, 0.1).unwrap();
        match k.betas_for(&[0, 1, 2]) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("index 2"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn epsilon_zero_is_dpo() {
        let mut k = KlController::new(0.05, 0.0).unwrap();
        for _ in 0..5 {
            let betas = k.record(&[1, 2, 3], &[1, -1, 0]).unwrap();
            assert!(betas.iter().all(|&b| b == 0.05));
            let (s, n) = k.local_sums();
            assert_eq!(k.apply_update(s, n).unwrap(), 0.05);
        }
        assert!(k.beta_history().iter().all(|&b| b == 0.05));
    }

    #[test]
    fn apply_update_arithmetic() {
        let mut k = KlController::new(0.1, 0.1).unwrap();
        let new = k.apply_update(3, 4).unwrap();
        assert!((new - 0.1 / 1.075).abs() < 1e-16, "{new}");
        assert_eq!(k.beta_history(), &[0.1, new]);
        assert_eq!(k.apply_update(0, 0).unwrap(), new, "count 0 leaves beta unchanged");
        assert_eq!(
            k.beta_history().len(),
            3,
            "but still appends to the history"
        );
        // Mean step +1 ten times: beta / 1.1^10.
        for _ in 0..10 {
            k.apply_update(7, 7).unwrap();
        }
        assert!((k.beta() - new / 1.1f64.powi(10)).abs() < 1e-15);
    }

    #[test]
    fn beta_min_floors_every_update_and_the_pairs_beta() {
        let mut k = KlController::new(0.1, 0.5).unwrap().with_beta_min(Some(0.05)).unwrap();
        for _ in 0..5 {
            k.record(&[1, 2], &[1, 1]).unwrap();
            k.apply_update(2, 2).unwrap();
        }
        assert_eq!(k.beta(), 0.05, "0.1 / 1.5^5 would be 0.013");
        assert_eq!(k.beta_history(), &[0.1, 0.1 / 1.5, 0.05, 0.05, 0.05, 0.05]);
        assert_eq!(k.record(&[1], &[0]).unwrap(), vec![0.05], "pairs train with the floored beta");
        // Without a floor the paper's rule: no clamp.
        let mut paper = KlController::new(0.1, 0.5).unwrap();
        paper.apply_update(2, 2).unwrap();
        paper.apply_update(2, 2).unwrap();
        assert!(paper.beta() < 0.05);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 0.2] {
            assert!(matches!(KlController::new(0.1, 0.5).unwrap().with_beta_min(Some(bad)), Err(Error::InvalidArgument(_))), "{bad}");
        }
    }

    #[test]
    fn apply_update_refuses_impossible_sums_and_changes_nothing() {
        let mut k = KlController::new(0.1, 0.9).unwrap();
        k.record(&[1], &[1]).unwrap();
        let before = k.clone();
        for (sum, count) in [(-100, 1), (2, 1), (1, 0), (i64::MIN, u64::MAX >> 1), (i64::MAX, 3)] {
            match k.apply_update(sum, count) {
                Err(Error::InvalidArgument(m)) => {
                    assert!(m.contains(&sum.to_string()) && m.contains(&count.to_string()), "{m}")
                }
                other => panic!("({sum}, {count}): {other:?}"),
            }
            assert_eq!(k, before, "a refused update changes nothing");
        }
        // The extremes an honest all-reduce can produce are accepted, and beta stays positive.
        assert!(k.apply_update(-7, 7).unwrap() > 0.0);
        assert!(k.apply_update(i64::MIN + 1, i64::MAX as u64).unwrap().is_finite());
    }

    #[test]
    fn record_updates_cycle_and_ledger() {
        let mut k = KlController::new(0.1, 0.1).unwrap();
        let betas = k.record(&[7, 3], &[1, -1]).unwrap();
        assert_eq!(betas, vec![0.1 / 1.1, 0.1 / 0.9]);
        assert_eq!(k.local_sums(), (0, 2));
        k.apply_update(0, 2).unwrap();
        // Same pair again in a later epoch: counts accumulate, last step/beta move.
        k.record(&[3, 3], &[0, 1]).unwrap();
        assert_eq!(k.local_sums(), (1, 2));
        let l = k.ledger_arrays();
        assert_eq!(l.ids, vec![3, 7]);
        assert_eq!(
            (l.plus, l.zero, l.minus),
            (vec![1, 1], vec![1, 0], vec![1, 0])
        );
        assert_eq!(l.last_step, vec![1, 1]);
        assert_eq!(l.last_beta, vec![0.1 / 1.1, 0.1 / 1.1]);
    }

    #[test]
    fn grad_accumulation_invariance() {
        let ids_a = [1u64, 2, 3];
        let steps_a = [1i8, 1, 0];
        let ids_b = [4u64, 5];
        let steps_b = [-1i8, 1];
        let mut split = KlController::new(0.1, 0.05).unwrap();
        split.record(&ids_a, &steps_a).unwrap();
        split.record(&ids_b, &steps_b).unwrap();
        let mut whole = KlController::new(0.1, 0.05).unwrap();
        whole
            .record(
                &[ids_a.as_slice(), &ids_b].concat(),
                &[steps_a.as_slice(), &steps_b].concat(),
            )
            .unwrap();
        assert_eq!(split.local_sums(), whole.local_sums());
        let (s, n) = split.local_sums();
        split.apply_update(s, n).unwrap();
        whole.apply_update(s, n).unwrap();
        assert_eq!(split, whole);
    }

    #[test]
    fn failed_record_changes_nothing() {
        let mut k = KlController::new(0.1, 0.1).unwrap();
        k.record(&[1], &[1]).unwrap();
        let before = k.clone();
        assert!(k.record(&[2, 3], &[1]).is_err());
        assert!(k.record(&[2, 3, 4], &[1, 0, -2]).is_err());
        assert_eq!(k, before);
    }

    fn sample_controller() -> KlController {
        let mut k = KlController::new(0.01, 0.01).unwrap();
        k.record(&[5, 9, 2], &[1, 0, -1]).unwrap();
        k.apply_update(0, 3).unwrap();
        k.record(&[9, 11], &[1, 1]).unwrap();
        k
    }

    #[test]
    fn state_round_trip() {
        let k = sample_controller();
        let back = KlController::from_state_bytes(&k.state_bytes()).unwrap();
        assert_eq!(back, k);
        assert_eq!(back.state_bytes(), k.state_bytes());
    }

    #[test]
    fn malformed_state_is_a_state_error() {
        let good = sample_controller().state_bytes();
        for len in 0..good.len() {
            assert!(
                matches!(
                    KlController::from_state_bytes(&good[..len]),
                    Err(Error::State(_))
                ),
                "truncated at {len}"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(matches!(
            KlController::from_state_bytes(&longer),
            Err(Error::State(_))
        ));

        let mut bad_magic = good.clone();
        bad_magic[3] ^= 0xff;
        assert!(matches!(
            KlController::from_state_bytes(&bad_magic),
            Err(Error::State(_))
        ));

        let mut wrong_version = good.clone();
        wrong_version[8..12].copy_from_slice(&99u32.to_le_bytes());
        match KlController::from_state_bytes(&wrong_version) {
            Err(Error::State(m)) => assert!(m.contains("version"), "{m}"),
            other => panic!("{other:?}"),
        }

        for byte in 12..good.len() {
            let mut flipped = good.clone();
            flipped[byte] ^= 0x04;
            assert!(
                matches!(
                    KlController::from_state_bytes(&flipped),
                    Err(Error::State(_))
                ),
                "flip at {byte}"
            );
        }
    }

    /// Re-seals a hand-edited body with a valid checksum, to reach the semantic checks.
    fn reseal(mut body: Vec<u8>) -> Vec<u8> {
        let crc = crc32fast::hash(&body);
        body.extend_from_slice(&crc.to_le_bytes());
        body
    }

    #[test]
    fn semantically_invalid_state_is_rejected() {
        let good = sample_controller().state_bytes();
        let body = &good[..good.len() - 4];
        let edits: Vec<(usize, Vec<u8>)> = vec![
            (12, (-1.0f64).to_le_bytes().to_vec()), // beta
            (20, 1.5f64.to_le_bytes().to_vec()),    // epsilon
            (28, 5i64.to_le_bytes().to_vec()),      // cycle sum > count (2)
            (44, u64::MAX.to_le_bytes().to_vec()),  // history count
        ];
        for (at, value) in edits {
            let mut b = body.to_vec();
            b[at..at + value.len()].copy_from_slice(&value);
            assert!(
                matches!(
                    KlController::from_state_bytes(&reseal(b)),
                    Err(Error::State(_))
                ),
                "edit at {at}"
            );
        }
        // The last history entry must equal beta.
        let mut b = body.to_vec();
        b[60..68].copy_from_slice(&0.5f64.to_le_bytes());
        assert!(matches!(
            KlController::from_state_bytes(&reseal(b)),
            Err(Error::State(_))
        ));
        // An invalid last step in the first ledger entry (after 2 history values and a count).
        let step_at = 68 + 8 + 32;
        let mut b = body.to_vec();
        b[step_at] = 3;
        assert!(matches!(
            KlController::from_state_bytes(&reseal(b)),
            Err(Error::State(_))
        ));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Record(Vec<(u64, i8)>),
        Update,
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => prop::collection::vec((0u64..20, -1i8..=1), 0..8).prop_map(Op::Record),
            1 => Just(Op::Update),
        ]
    }

    proptest! {
        #[test]
        fn prop_state_round_trip(
            beta in 1e-4f64..10.0,
            epsilon in 0.0f64..0.99,
            ops in prop::collection::vec(op_strategy(), 0..30),
        ) {
            let mut k = KlController::new(beta, epsilon).unwrap();
            for op in ops {
                match op {
                    Op::Record(pairs) => {
                        let (ids, steps): (Vec<u64>, Vec<i8>) = pairs.into_iter().unzip();
                        k.record(&ids, &steps).unwrap();
                    }
                    Op::Update => {
                        let (s, n) = k.local_sums();
                        k.apply_update(s, n).unwrap();
                    }
                }
            }
            let back = KlController::from_state_bytes(&k.state_bytes()).unwrap();
            prop_assert_eq!(back.ledger_arrays(), k.ledger_arrays());
            prop_assert_eq!(back.beta_history(), k.beta_history());
            prop_assert_eq!(back.local_sums(), k.local_sums());
            prop_assert_eq!(back, k);
        }

        #[test]
        fn prop_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            prop_assert!(matches!(KlController::from_state_bytes(&bytes), Err(Error::State(_))));
        }

        #[test]
        fn prop_garbage_after_header_never_panics(tail in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut bytes = STATE_MAGIC.to_vec();
            bytes.extend_from_slice(&STATE_VERSION.to_le_bytes());
            bytes.extend_from_slice(&tail);
            let _ = KlController::from_state_bytes(&reseal(bytes));
        }
    }
}
