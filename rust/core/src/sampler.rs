//! Deterministic, resumable, rank-sharded batch sampling over preference pairs.
//!
//! Every rank builds the same global batch list from `(seed, epoch)` alone, so ranks agree on
//! the epoch without communicating, and then takes its own stride of that list. The shuffle
//! uses a self-contained SplitMix64 generator and Fisher–Yates so that a seed gives the same
//! batches on every platform and every version of this crate's dependencies.
//!
//! Coverage guarantee: within one epoch, across all ranks, every pair appears exactly once,
//! except for the two documented effects of [`SamplerConfig::drop_last`]:
//! - `drop_last = true` drops a final short batch (Shuffle / LengthGrouped only) and then the
//!   tail batches that do not fill a whole round of `world_size` ranks;
//! - `drop_last = false` keeps the short batch and pads the batch list to a multiple of
//!   `world_size` by repeating batches from the start of the list. These are the only repeats.

use crate::error::{Error, Result};
use crate::limits::MAX_BATCH_CELLS;
use crate::saved_state::{StateReader, StateWriter};

/// More ranks than any job runs; the bound keeps the sharding arithmetic (batches × ranks) far
/// from overflow.
pub const MAX_WORLD_SIZE: usize = 1 << 20;

/// How pairs are grouped into batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerMode {
    /// Shuffled fixed-size batches of `batch_size` pairs.
    Shuffle,
    /// Length-grouped: shuffle, cut into mega-batches of `batch_size * mega_batch_mult` pairs,
    /// sort each mega-batch by length (descending), cut into batches, then shuffle the batch
    /// order. Keeps the randomness of a shuffle while putting similar lengths together, which
    /// cuts padding.
    LengthGrouped { mega_batch_mult: usize },
    /// Token budget: each micro-batch takes as many pairs as fit `max_tokens`, taking pairs
    /// greedily in length-grouped order (mega-batches of `batch_size * mega_batch_mult`) when
    /// `padded`, in shuffled order when packed (a mix of lengths packs rows tighter).
    /// Cost of a candidate batch: `padded` => `2 * n_pairs * max sequence length` (padding
    /// counted); packed => sum of both sequence lengths of every pair. `batch_size` only sizes
    /// the mega-batches here; the batch order is shuffled as in `LengthGrouped`. The number of
    /// batches can differ between epochs.
    TokenBudget {
        max_tokens: usize,
        padded: bool,
        mega_batch_mult: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SamplerConfig {
    pub batch_size: usize,
    pub mode: SamplerMode,
    pub seed: u64,
    pub world_size: usize,
    pub rank: usize,
    /// See the module docs: what is dropped with `true`, what is repeated with `false`.
    pub drop_last: bool,
}

#[derive(Debug, Clone)]
pub struct BatchSampler {
    config: SamplerConfig,
    chosen: Vec<u32>,
    rejected: Vec<u32>,
    fingerprint: u64,
    epoch: u64,
    position: usize,
    /// This rank's batches for `epoch`, cached so that `next_batch` costs one batch, not one epoch.
    batches: Vec<Vec<u32>>,
}

const STATE_MAGIC: &[u8; 8] = b"EDPOSMPL";
const STATE_VERSION: u32 = 1;
/// seed, epoch, position, fingerprint.
const STATE_FIELDS_LEN: usize = 4 * 8;

impl BatchSampler {
    /// `chosen_lengths[i]`, `rejected_lengths[i]`: token lengths (prompt + completion, already
    /// truncated) of pair `i`'s two sequences. A pair's length for grouping is the larger one.
    pub fn new(
        chosen_lengths: Vec<u32>,
        rejected_lengths: Vec<u32>,
        config: SamplerConfig,
    ) -> Result<Self> {
        validate(&chosen_lengths, &rejected_lengths, &config)?;
        let fingerprint = fingerprint(&chosen_lengths, &rejected_lengths, &config);
        let mut sampler = BatchSampler {
            config,
            chosen: chosen_lengths,
            rejected: rejected_lengths,
            fingerprint,
            epoch: 0,
            position: 0,
            batches: Vec::new(),
        };
        sampler.batches = sampler.rank_batches(0);
        // A sampler that yields nothing would make a training loop silently do no work.
        if sampler.batches.is_empty() {
            return Err(Error::arg(format!(
                "sampler yields no batches for rank {}: {} pairs are too few for batch_size {} and world_size {} with drop_last",
                sampler.config.rank,
                sampler.chosen.len(),
                sampler.config.batch_size,
                sampler.config.world_size
            )));
        }
        Ok(sampler)
    }

    /// This rank's batches (pair indices) for `epoch`. Does not move the sampler.
    pub fn epoch_batches(&self, epoch: u64) -> Result<Vec<Vec<u32>>> {
        if epoch == self.epoch {
            return Ok(self.batches.clone());
        }
        Ok(self.rank_batches(epoch))
    }

    /// This rank's batches in the current epoch; the same on every rank. With `TokenBudget` it
    /// can change with the epoch.
    pub fn num_batches(&self) -> usize {
        self.batches.len()
    }

    /// Moves to `epoch` and rewinds to its first batch.
    pub fn set_epoch(&mut self, epoch: u64) {
        if epoch != self.epoch {
            self.batches = self.rank_batches(epoch);
            self.epoch = epoch;
        }
        self.position = 0;
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Batches of the current epoch already handed out by [`next_batch`](Self::next_batch).
    pub fn position(&self) -> usize {
        self.position
    }

    /// The next batch of this epoch, or `None` at its end. The epoch is never advanced here,
    /// because the training loop decides when an epoch ends (and calls `set_epoch`).
    pub fn next_batch(&mut self) -> Option<Vec<u32>> {
        let batch = self.batches.get(self.position)?.clone();
        self.position += 1;
        Some(batch)
    }

    /// Resumable state: seed, epoch, position and a fingerprint of the config and lengths.
    ///
    /// The rank is deliberately left out of the fingerprint: all ranks move in lockstep through
    /// the same number of batches, so the state saved by one rank resumes every rank.
    pub fn state_bytes(&self) -> Vec<u8> {
        let mut w = StateWriter::new(STATE_MAGIC, STATE_VERSION, STATE_FIELDS_LEN);
        w.u64(self.config.seed)
            .u64(self.epoch)
            .u64(self.position as u64)
            .u64(self.fingerprint);
        w.finish()
    }

    /// Restores a state from [`state_bytes`](Self::state_bytes). On error nothing changes.
    pub fn load_state_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let state = SavedState::parse(bytes)?;
        if state.seed != self.config.seed {
            return Err(Error::State(format!(
                "saved with seed {}, this sampler has seed {}",
                state.seed, self.config.seed
            )));
        }
        if state.fingerprint != self.fingerprint {
            return Err(Error::State(
                "saved by a sampler with a different config or different pair lengths".into(),
            ));
        }
        let batches = if state.epoch == self.epoch {
            None
        } else {
            Some(self.rank_batches(state.epoch))
        };
        let available = batches.as_ref().map_or(self.batches.len(), Vec::len);
        let position = usize::try_from(state.position)
            .ok()
            .filter(|&p| p <= available)
            .ok_or_else(|| {
                Error::State(format!(
                    "position {} is past the {} batches of epoch {}",
                    state.position, available, state.epoch
                ))
            })?;
        if let Some(batches) = batches {
            self.batches = batches;
        }
        self.epoch = state.epoch;
        self.position = position;
        Ok(())
    }

    fn rank_batches(&self, epoch: u64) -> Vec<Vec<u32>> {
        let global = self.global_batches(epoch);
        shard(
            &global,
            self.config.world_size,
            self.config.rank,
            self.config.drop_last,
        )
    }

    /// The epoch's batch list before sharding; identical on every rank.
    fn global_batches(&self, epoch: u64) -> Vec<Vec<u32>> {
        let mut rng = SplitMix64::for_epoch(self.config.seed, epoch);
        let mut order: Vec<u32> = (0..self.chosen.len()).map(|i| i as u32).collect();
        shuffle(&mut order, &mut rng);
        let bs = self.config.batch_size;
        let mut batches = match self.config.mode {
            SamplerMode::Shuffle => return cut(&order, bs, self.config.drop_last),
            SamplerMode::LengthGrouped { mega_batch_mult } => {
                self.sort_mega_batches(&mut order, bs * mega_batch_mult);
                // Mega-batches are whole multiples of batch_size, so cutting the whole order
                // equals cutting each mega-batch, and only the last batch can be short.
                cut(&order, bs, self.config.drop_last)
            }
            SamplerMode::TokenBudget {
                max_tokens,
                padded,
                mega_batch_mult,
            } => {
                // Padded batches want similar lengths together; packed rows fill best from a
                // mix of long and short sequences, so the packed budget keeps the shuffle.
                if padded {
                    self.sort_mega_batches(&mut order, bs * mega_batch_mult);
                }
                self.pack_greedy(&order, max_tokens as u128, padded)
            }
        };
        // Without this, every epoch would start with its longest batches (and OOM, if it
        // happens, would always hit the same step).
        shuffle(&mut batches, &mut rng);
        batches
    }

    fn pair_len(&self, i: u32) -> u32 {
        self.chosen[i as usize].max(self.rejected[i as usize])
    }

    fn sort_mega_batches(&self, order: &mut [u32], mega: usize) {
        for chunk in order.chunks_mut(mega) {
            // Stable, so ties keep their shuffled order and the result stays deterministic.
            chunk.sort_by_key(|&i| std::cmp::Reverse(self.pair_len(i)));
        }
    }

    fn pack_greedy(&self, order: &[u32], budget: u128, padded: bool) -> Vec<Vec<u32>> {
        let mut batches = Vec::new();
        let mut current: Vec<u32> = Vec::new();
        let (mut max_len, mut sum) = (0u128, 0u128);
        for &i in order {
            let (c, r) = (
                self.chosen[i as usize] as u128,
                self.rejected[i as usize] as u128,
            );
            let cost = if padded {
                2 * (current.len() as u128 + 1) * max_len.max(c).max(r)
            } else {
                sum + c + r
            };
            if !current.is_empty() && cost > budget {
                batches.push(std::mem::take(&mut current));
                max_len = 0;
                sum = 0;
            }
            // `new` rejected every pair whose own cost exceeds the budget, so a batch that
            // starts with this pair is always within budget.
            current.push(i);
            max_len = max_len.max(c).max(r);
            sum += c + r;
        }
        if !current.is_empty() {
            batches.push(current);
        }
        batches
    }
}

fn validate(chosen: &[u32], rejected: &[u32], config: &SamplerConfig) -> Result<()> {
    if chosen.len() != rejected.len() {
        return Err(Error::arg(format!(
            "chosen_lengths has {} entries but rejected_lengths has {}",
            chosen.len(),
            rejected.len()
        )));
    }
    if chosen.is_empty() {
        return Err(Error::arg("the dataset is empty: no pairs to sample"));
    }
    if chosen.len() - 1 > u32::MAX as usize {
        return Err(Error::arg(format!(
            "{} pairs do not fit u32 pair indices",
            chosen.len()
        )));
    }
    if config.batch_size == 0 {
        return Err(Error::arg("batch_size must be at least 1"));
    }
    if config.world_size == 0 {
        return Err(Error::arg("world_size must be at least 1"));
    }
    if config.world_size > MAX_WORLD_SIZE {
        return Err(Error::arg(format!(
            "world_size = {} is above the limit of {MAX_WORLD_SIZE} ranks",
            config.world_size
        )));
    }
    if config.rank >= config.world_size {
        return Err(Error::arg(format!(
            "rank {} is out of range for world_size {}",
            config.rank, config.world_size
        )));
    }
    let mult = match config.mode {
        SamplerMode::Shuffle => return Ok(()),
        SamplerMode::LengthGrouped { mega_batch_mult } => mega_batch_mult,
        SamplerMode::TokenBudget {
            mega_batch_mult, ..
        } => mega_batch_mult,
    };
    if mult == 0 {
        return Err(Error::arg("mega_batch_mult must be at least 1"));
    }
    if config.batch_size.checked_mul(mult).is_none() {
        return Err(Error::arg(format!(
            "batch_size {} * mega_batch_mult {mult} overflows",
            config.batch_size
        )));
    }
    if let SamplerMode::TokenBudget {
        max_tokens, padded, ..
    } = config.mode
    {
        if max_tokens == 0 {
            return Err(Error::arg("max_tokens must be at least 1"));
        }
        // A budget above what one collated batch may hold would only fail later, in the collator.
        if max_tokens > MAX_BATCH_CELLS {
            return Err(Error::arg(format!(
                "max_tokens = {max_tokens} is above the limit of {MAX_BATCH_CELLS} tokens per batch"
            )));
        }
        for (i, (&c, &r)) in chosen.iter().zip(rejected).enumerate() {
            let cost = if padded {
                2 * c.max(r) as u64
            } else {
                c as u64 + r as u64
            };
            if cost > max_tokens as u64 {
                return Err(Error::pair(
                    i,
                    format!(
                        "costs {cost} tokens alone (chosen {c}, rejected {r}, {}), over max_tokens {max_tokens}",
                        if padded { "padded" } else { "packed" }
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Cuts `order` into batches of `size`; the last one may be short and is dropped on request.
fn cut(order: &[u32], size: usize, drop_short: bool) -> Vec<Vec<u32>> {
    order
        .chunks(size)
        .filter(|b| !(drop_short && b.len() < size))
        .map(<[u32]>::to_vec)
        .collect()
}

/// Rank `rank`'s stride of the global list, after making the list a multiple of `world_size`
/// (drop the tail, or repeat batches from the start, so every rank gets the same count and no
/// rank waits for another at a collective).
fn shard(global: &[Vec<u32>], world_size: usize, rank: usize, drop_last: bool) -> Vec<Vec<u32>> {
    let len = global.len();
    let target = if drop_last {
        len - len % world_size
    } else {
        len.div_ceil(world_size) * world_size
    };
    // `% len` repeats from the start, cyclically if the list is shorter than one round.
    (rank..target)
        .step_by(world_size)
        .map(|k| global[k % len].clone())
        .collect()
}

/// Fingerprint of everything that shapes the batch lists, except the seed (stored and checked
/// on its own, for a clearer message) and the rank (see `state_bytes`). FNV-1a rather than
/// std's hasher, whose output is not promised to be stable across Rust versions.
fn fingerprint(chosen: &[u32], rejected: &[u32], config: &SamplerConfig) -> u64 {
    let mut h = Fnv1a::new();
    h.u64(chosen.len() as u64);
    h.u64(config.batch_size as u64);
    h.u64(config.world_size as u64);
    h.u64(config.drop_last as u64);
    match config.mode {
        SamplerMode::Shuffle => h.u64(0),
        SamplerMode::LengthGrouped { mega_batch_mult } => {
            h.u64(1);
            h.u64(mega_batch_mult as u64);
        }
        SamplerMode::TokenBudget {
            max_tokens,
            padded,
            mega_batch_mult,
        } => {
            h.u64(2);
            h.u64(max_tokens as u64);
            h.u64(padded as u64);
            h.u64(mega_batch_mult as u64);
        }
    }
    for &len in chosen.iter().chain(rejected) {
        h.bytes(&len.to_le_bytes());
    }
    h.0
}

struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
}

struct SavedState {
    seed: u64,
    epoch: u64,
    position: u64,
    fingerprint: u64,
}

impl SavedState {
    fn parse(bytes: &[u8]) -> Result<Self> {
        let mut r = StateReader::open(bytes, "sampler", STATE_MAGIC, STATE_VERSION)?;
        let state = SavedState {
            seed: r.u64()?,
            epoch: r.u64()?,
            position: r.u64()?,
            fingerprint: r.u64()?,
        };
        r.finish()?;
        Ok(state)
    }
}

/// SplitMix64: tiny, well-mixed, and fully specified here, so streams never change under us.
struct SplitMix64(u64);

impl SplitMix64 {
    fn for_epoch(seed: u64, epoch: u64) -> Self {
        // Mix both inputs before combining so that nearby (seed, epoch) pairs such as (1, 0)
        // and (0, 1) do not start from related states.
        let s = SplitMix64(seed).next_u64();
        let e = SplitMix64(epoch ^ 0x6a09_e667_f3bc_c909).next_u64();
        SplitMix64(s ^ e.rotate_left(17))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n >= 1`). Rejection removes the modulo bias.
    fn below(&mut self, n: u64) -> u64 {
        let threshold = n.wrapping_neg() % n;
        loop {
            let x = self.next_u64();
            if x >= threshold {
                return x % n;
            }
        }
    }
}

fn shuffle<T>(items: &mut [T], rng: &mut SplitMix64) {
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// magic, version, the fields, crc32.
    const STATE_LEN: usize = 8 + 4 + STATE_FIELDS_LEN + 4;

    fn cfg(
        mode: SamplerMode,
        batch_size: usize,
        world_size: usize,
        rank: usize,
        drop_last: bool,
    ) -> SamplerConfig {
        SamplerConfig {
            batch_size,
            mode,
            seed: 42,
            world_size,
            rank,
            drop_last,
        }
    }

    fn skewed_lengths(n: usize) -> (Vec<u32>, Vec<u32>) {
        let mut rng = SplitMix64(7);
        let mut draw = || {
            // Mostly short sequences with a long tail, as in real preference data.
            let x = rng.below(100);
            (if x < 80 {
                20 + rng.below(80)
            } else {
                200 + rng.below(800)
            }) as u32
        };
        let chosen = (0..n).map(|_| draw()).collect();
        let rejected = (0..n).map(|_| draw()).collect();
        (chosen, rejected)
    }

    fn modes() -> Vec<SamplerMode> {
        vec![
            SamplerMode::Shuffle,
            SamplerMode::LengthGrouped { mega_batch_mult: 4 },
            SamplerMode::TokenBudget {
                max_tokens: 4096,
                padded: true,
                mega_batch_mult: 4,
            },
            SamplerMode::TokenBudget {
                max_tokens: 4096,
                padded: false,
                mega_batch_mult: 4,
            },
        ]
    }

    fn all_ranks(c: &[u32], r: &[u32], config: &SamplerConfig, epoch: u64) -> Vec<Vec<Vec<u32>>> {
        (0..config.world_size)
            .map(|rank| {
                let s = BatchSampler::new(
                    c.to_vec(),
                    r.to_vec(),
                    SamplerConfig {
                        rank,
                        ..config.clone()
                    },
                )
                .unwrap();
                s.epoch_batches(epoch).unwrap()
            })
            .collect()
    }

    fn padding(batches: &[Vec<u32>], c: &[u32], r: &[u32]) -> u64 {
        batches
            .iter()
            .map(|b| {
                let max = b
                    .iter()
                    .map(|&i| c[i as usize].max(r[i as usize]))
                    .max()
                    .unwrap_or(0) as u64;
                let used: u64 = b
                    .iter()
                    .map(|&i| c[i as usize] as u64 + r[i as usize] as u64)
                    .sum();
                2 * b.len() as u64 * max - used
            })
            .sum()
    }

    /// Rank r's j-th batch must be global batch (j*W + r) mod len: the global list, which must
    /// partition the pairs, plus the documented padding from its start.
    fn check_coverage(c: &[u32], r: &[u32], config: &SamplerConfig, epoch: u64) {
        let s = BatchSampler::new(c.to_vec(), r.to_vec(), config.clone()).unwrap();
        let global = s.global_batches(epoch);
        let mut seen: Vec<u32> = global.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(
            seen,
            (0..c.len() as u32).collect::<Vec<_>>(),
            "global list is not a partition"
        );
        let ranks = all_ranks(c, r, config, epoch);
        let w = config.world_size;
        let per_rank = global.len().div_ceil(w);
        for (rank, batches) in ranks.iter().enumerate() {
            assert_eq!(batches.len(), per_rank, "rank {rank} batch count");
            for (j, b) in batches.iter().enumerate() {
                assert_eq!(b, &global[(j * w + rank) % global.len()]);
            }
        }
    }

    #[test]
    fn every_mode_covers_every_pair_once_across_ranks() {
        let (c, r) = skewed_lengths(203);
        for mode in modes() {
            for w in 1..=4 {
                check_coverage(&c, &r, &cfg(mode, 8, w, 0, false), 3);
            }
        }
    }

    #[test]
    fn drop_last_drops_short_batch_and_tail_without_repeats() {
        let (c, r) = skewed_lengths(203);
        for mode in [
            SamplerMode::Shuffle,
            SamplerMode::LengthGrouped { mega_batch_mult: 3 },
        ] {
            let ranks = all_ranks(&c, &r, &cfg(mode, 8, 3, 0, true), 0);
            // 203 pairs = 25 full batches of 8 + a short one of 3; 25 full batches -> 24 for 3 ranks.
            assert!(ranks.iter().all(|batches| batches.len() == 24 / 3));
            assert!(ranks.iter().flatten().all(|b| b.len() == 8));
            let mut seen: Vec<u32> = ranks.iter().flatten().flatten().copied().collect();
            let n = seen.len();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), n, "drop_last must never repeat a pair");
            assert_eq!(n, 24 * 8);
        }
    }

    #[test]
    fn short_batch_kept_without_drop_last() {
        let (c, r) = skewed_lengths(10);
        let s = BatchSampler::new(c, r, cfg(SamplerMode::Shuffle, 4, 1, 0, false)).unwrap();
        let mut sizes: Vec<usize> = s.epoch_batches(0).unwrap().iter().map(Vec::len).collect();
        sizes.sort_unstable();
        assert_eq!(sizes, vec![2, 4, 4]);
    }

    #[test]
    fn padding_repeats_cyclically_when_fewer_batches_than_ranks() {
        let (c, r) = skewed_lengths(3);
        let config = cfg(SamplerMode::Shuffle, 2, 4, 0, false);
        check_coverage(&c, &r, &config, 0);
        assert!(all_ranks(&c, &r, &config, 0).iter().all(|b| b.len() == 1));
    }

    #[test]
    fn deterministic_per_seed_and_epoch() {
        let (c, r) = skewed_lengths(100);
        for mode in modes() {
            let a = BatchSampler::new(c.clone(), r.clone(), cfg(mode, 8, 2, 1, false)).unwrap();
            let b = BatchSampler::new(c.clone(), r.clone(), cfg(mode, 8, 2, 1, false)).unwrap();
            assert_eq!(a.epoch_batches(5).unwrap(), b.epoch_batches(5).unwrap());
            assert_ne!(a.epoch_batches(5).unwrap(), a.epoch_batches(6).unwrap());
            let other_seed = BatchSampler::new(
                c.clone(),
                r.clone(),
                SamplerConfig {
                    seed: 43,
                    ..cfg(mode, 8, 2, 1, false)
                },
            )
            .unwrap();
            assert_ne!(
                a.epoch_batches(5).unwrap(),
                other_seed.epoch_batches(5).unwrap()
            );
        }
    }

    #[test]
    fn shuffle_is_stable_across_versions() {
        // Pinned output: a change here breaks resumption of every saved run.
        let mut rng = SplitMix64::for_epoch(0, 0);
        let mut v: Vec<u32> = (0..8).collect();
        shuffle(&mut v, &mut rng);
        assert_eq!(v, vec![0, 7, 5, 4, 6, 2, 1, 3]);
        assert_eq!(SplitMix64(0).next_u64(), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn token_budget_respects_max_tokens() {
        let (c, r) = skewed_lengths(300);
        for padded in [true, false] {
            let mode = SamplerMode::TokenBudget {
                max_tokens: 3000,
                padded,
                mega_batch_mult: 8,
            };
            let s = BatchSampler::new(c.clone(), r.clone(), cfg(mode, 4, 1, 0, false)).unwrap();
            for epoch in 0..3 {
                for b in s.epoch_batches(epoch).unwrap() {
                    let cost: u64 = if padded {
                        2 * b.len() as u64
                            * b.iter()
                                .map(|&i| c[i as usize].max(r[i as usize]) as u64)
                                .max()
                                .unwrap()
                    } else {
                        b.iter()
                            .map(|&i| (c[i as usize] + r[i as usize]) as u64)
                            .sum()
                    };
                    assert!(cost <= 3000, "cost {cost} over budget (padded={padded})");
                }
            }
        }
    }

    #[test]
    fn pair_over_budget_is_an_error_naming_it() {
        let c = vec![10, 10, 600, 10];
        let r = vec![10, 10, 10, 10];
        let padded = SamplerMode::TokenBudget {
            max_tokens: 1000,
            padded: true,
            mega_batch_mult: 1,
        };
        match BatchSampler::new(c.clone(), r.clone(), cfg(padded, 2, 1, 0, false)) {
            Err(Error::InvalidPair { pair: 2, .. }) => {}
            other => panic!("expected pair 2 error, got {other:?}"),
        }
        // Packed cost of pair 2 is 610, within budget.
        let packed = SamplerMode::TokenBudget {
            max_tokens: 1000,
            padded: false,
            mega_batch_mult: 1,
        };
        assert!(BatchSampler::new(c, r, cfg(packed, 2, 1, 0, false)).is_ok());
    }

    #[test]
    fn length_grouping_reduces_padding() {
        let (c, r) = skewed_lengths(1000);
        let shuffled = BatchSampler::new(
            c.clone(),
            r.clone(),
            cfg(SamplerMode::Shuffle, 8, 1, 0, false),
        )
        .unwrap();
        let grouped = BatchSampler::new(
            c.clone(),
            r.clone(),
            cfg(
                SamplerMode::LengthGrouped {
                    mega_batch_mult: 16,
                },
                8,
                1,
                0,
                false,
            ),
        )
        .unwrap();
        let p_shuffled = padding(&shuffled.epoch_batches(0).unwrap(), &c, &r);
        let p_grouped = padding(&grouped.epoch_batches(0).unwrap(), &c, &r);
        assert!(
            p_grouped * 2 < p_shuffled,
            "grouped {p_grouped} vs shuffled {p_shuffled}"
        );
    }

    #[test]
    fn config_validation() {
        let (c, r) = skewed_lengths(10);
        let bad = [
            cfg(SamplerMode::Shuffle, 0, 1, 0, false),
            cfg(SamplerMode::Shuffle, 4, 0, 0, false),
            cfg(SamplerMode::Shuffle, 4, 2, 2, false),
            cfg(
                SamplerMode::LengthGrouped { mega_batch_mult: 0 },
                4,
                1,
                0,
                false,
            ),
            cfg(
                SamplerMode::TokenBudget {
                    max_tokens: 0,
                    padded: true,
                    mega_batch_mult: 1,
                },
                4,
                1,
                0,
                false,
            ),
            cfg(
                SamplerMode::LengthGrouped {
                    mega_batch_mult: usize::MAX,
                },
                4,
                1,
                0,
                false,
            ),
            // 10 pairs, batch 16, drop_last: nothing left to sample.
            cfg(SamplerMode::Shuffle, 16, 1, 0, true),
        ];
        for config in bad {
            assert!(
                matches!(
                    BatchSampler::new(c.clone(), r.clone(), config.clone()),
                    Err(Error::InvalidArgument(_))
                ),
                "{config:?}"
            );
        }
        let ok = cfg(SamplerMode::Shuffle, 4, 1, 0, false);
        assert!(matches!(
            BatchSampler::new(c.clone(), r[..9].to_vec(), ok.clone()),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            BatchSampler::new(vec![], vec![], ok),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn next_batch_walks_the_epoch_and_set_epoch_rewinds() {
        let (c, r) = skewed_lengths(50);
        let mut s = BatchSampler::new(c, r, cfg(SamplerMode::Shuffle, 8, 2, 1, false)).unwrap();
        let expected = s.epoch_batches(0).unwrap();
        let got: Vec<_> = std::iter::from_fn(|| s.next_batch()).collect();
        assert_eq!(got, expected);
        assert_eq!(s.position(), s.num_batches());
        assert_eq!(s.next_batch(), None);
        assert_eq!(s.epoch(), 0, "next_batch must not advance the epoch");
        s.set_epoch(1);
        assert_eq!((s.epoch(), s.position()), (1, 0));
        assert_eq!(s.next_batch().as_ref(), s.epoch_batches(1).unwrap().first());
    }

    #[test]
    fn state_round_trip_resumes_exactly() {
        let (c, r) = skewed_lengths(120);
        for mode in modes() {
            let config = cfg(mode, 4, 2, 1, false);
            let mut a = BatchSampler::new(c.clone(), r.clone(), config.clone()).unwrap();
            a.set_epoch(3);
            let uninterrupted = a.epoch_batches(3).unwrap();
            for k in [0, 1, uninterrupted.len() / 2, uninterrupted.len()] {
                a.set_epoch(3);
                for _ in 0..k {
                    a.next_batch();
                }
                let state = a.state_bytes();
                let mut b = BatchSampler::new(c.clone(), r.clone(), config.clone()).unwrap();
                b.load_state_bytes(&state).unwrap();
                assert_eq!((b.epoch(), b.position()), (3, k));
                let rest: Vec<_> = std::iter::from_fn(|| b.next_batch()).collect();
                assert_eq!(rest, uninterrupted[k..]);
            }
        }
    }

    #[test]
    fn state_from_another_rank_loads() {
        let (c, r) = skewed_lengths(60);
        let mut a = BatchSampler::new(
            c.clone(),
            r.clone(),
            cfg(SamplerMode::Shuffle, 4, 2, 0, false),
        )
        .unwrap();
        a.next_batch();
        let mut b = BatchSampler::new(c, r, cfg(SamplerMode::Shuffle, 4, 2, 1, false)).unwrap();
        b.load_state_bytes(&a.state_bytes()).unwrap();
        assert_eq!(b.position(), 1);
    }

    #[test]
    fn state_into_different_sampler_fails() {
        let (c, r) = skewed_lengths(60);
        let base = cfg(
            SamplerMode::LengthGrouped { mega_batch_mult: 2 },
            4,
            2,
            0,
            false,
        );
        let state = BatchSampler::new(c.clone(), r.clone(), base.clone())
            .unwrap()
            .state_bytes();
        let mut other_len = c.clone();
        other_len[5] += 1;
        let others = [
            (
                c.clone(),
                r.clone(),
                SamplerConfig {
                    batch_size: 5,
                    ..base.clone()
                },
            ),
            (
                c.clone(),
                r.clone(),
                SamplerConfig {
                    seed: 1,
                    ..base.clone()
                },
            ),
            (
                c.clone(),
                r.clone(),
                SamplerConfig {
                    world_size: 3,
                    ..base.clone()
                },
            ),
            (
                c.clone(),
                r.clone(),
                SamplerConfig {
                    drop_last: true,
                    ..base.clone()
                },
            ),
            (
                c.clone(),
                r.clone(),
                SamplerConfig {
                    mode: SamplerMode::Shuffle,
                    ..base.clone()
                },
            ),
            (other_len, r.clone(), base.clone()),
        ];
        for (c2, r2, config) in others {
            let mut s = BatchSampler::new(c2, r2, config.clone()).unwrap();
            let before = (s.epoch(), s.position());
            assert!(
                matches!(s.load_state_bytes(&state), Err(Error::State(_))),
                "{config:?}"
            );
            assert_eq!((s.epoch(), s.position()), before);
        }
    }

    #[test]
    fn malformed_state_is_a_state_error() {
        let (c, r) = skewed_lengths(30);
        let mut s = BatchSampler::new(c, r, cfg(SamplerMode::Shuffle, 4, 1, 0, false)).unwrap();
        s.next_batch();
        let good = s.state_bytes();
        for len in 0..good.len() {
            assert!(
                matches!(s.load_state_bytes(&good[..len]), Err(Error::State(_))),
                "truncated at {len}"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(matches!(s.load_state_bytes(&longer), Err(Error::State(_))));

        let mut wrong_version = good.clone();
        wrong_version[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32fast::hash(&wrong_version[..STATE_LEN - 4]);
        wrong_version[STATE_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        match s.load_state_bytes(&wrong_version) {
            Err(Error::State(m)) => assert!(m.contains("version"), "{m}"),
            other => panic!("{other:?}"),
        }

        let mut bad_magic = good.clone();
        bad_magic[0] ^= 1;
        assert!(matches!(
            s.load_state_bytes(&bad_magic),
            Err(Error::State(_))
        ));

        for byte in 12..good.len() {
            let mut flipped = good.clone();
            flipped[byte] ^= 0x10;
            assert!(
                matches!(s.load_state_bytes(&flipped), Err(Error::State(_))),
                "flip at {byte}"
            );
        }

        // A well-formed state whose position is past the epoch's end.
        let mut past_end = good.clone();
        past_end[28..36].copy_from_slice(&1_000u64.to_le_bytes());
        let crc = crc32fast::hash(&past_end[..STATE_LEN - 4]);
        past_end[STATE_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            s.load_state_bytes(&past_end),
            Err(Error::State(_))
        ));
        assert_eq!(s.position(), 1, "failed loads must change nothing");
    }

    fn mode_strategy() -> impl Strategy<Value = SamplerMode> {
        prop_oneof![
            Just(SamplerMode::Shuffle),
            (1usize..5).prop_map(|m| SamplerMode::LengthGrouped { mega_batch_mult: m }),
            (1usize..5, any::<bool>()).prop_map(|(m, padded)| SamplerMode::TokenBudget {
                max_tokens: 2000,
                padded,
                mega_batch_mult: m
            }),
        ]
    }

    proptest! {
        #[test]
        fn prop_coverage(
            lens in prop::collection::vec((0u32..1000, 0u32..1000), 1..150),
            mode in mode_strategy(),
            batch_size in 1usize..12,
            world_size in 1usize..=4,
            seed in any::<u64>(),
            epoch in 0u64..1000,
        ) {
            let (c, r): (Vec<u32>, Vec<u32>) = lens.into_iter().unzip();
            let config = SamplerConfig { batch_size, mode, seed, world_size, rank: 0, drop_last: false };
            check_coverage(&c, &r, &config, epoch);
        }

        #[test]
        fn prop_drop_last_never_repeats(
            lens in prop::collection::vec((0u32..1000, 0u32..1000), 1..150),
            mode in mode_strategy(),
            batch_size in 1usize..12,
            world_size in 1usize..=4,
            epoch in 0u64..1000,
        ) {
            let (c, r): (Vec<u32>, Vec<u32>) = lens.into_iter().unzip();
            let config = SamplerConfig { batch_size, mode, seed: 9, world_size, rank: 0, drop_last: true };
            if BatchSampler::new(c.clone(), r.clone(), config.clone()).is_err() {
                return Ok(()); // too few pairs for drop_last: covered by config_validation
            }
            let ranks = all_ranks(&c, &r, &config, epoch);
            let counts: Vec<usize> = ranks.iter().map(Vec::len).collect();
            prop_assert!(counts.iter().all(|&n| n == counts[0]));
            let mut seen: Vec<u32> = ranks.iter().flatten().flatten().copied().collect();
            let n = seen.len();
            seen.sort_unstable();
            seen.dedup();
            prop_assert_eq!(seen.len(), n);
        }

        #[test]
        fn prop_garbage_state_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..80)) {
            let mut s = BatchSampler::new(vec![5; 10], vec![5; 10], cfg(SamplerMode::Shuffle, 3, 1, 0, false)).unwrap();
            prop_assert!(matches!(s.load_state_bytes(&bytes), Err(Error::State(_))));
        }

        #[test]
        fn prop_resume_anywhere(k in 0usize..40, epoch in 0u64..50, mode in mode_strategy()) {
            let (c, r) = skewed_lengths(90);
            let c: Vec<u32> = c.iter().map(|&x| x.min(900)).collect();
            let r: Vec<u32> = r.iter().map(|&x| x.min(900)).collect();
            let config = cfg(mode, 3, 2, 0, false);
            let mut a = BatchSampler::new(c.clone(), r.clone(), config.clone()).unwrap();
            a.set_epoch(epoch);
            let all = a.epoch_batches(epoch).unwrap();
            let k = k.min(all.len());
            for _ in 0..k { a.next_batch(); }
            let mut b = BatchSampler::new(c, r, config).unwrap();
            b.load_state_bytes(&a.state_bytes()).unwrap();
            let rest: Vec<_> = std::iter::from_fn(|| b.next_batch()).collect();
            prop_assert_eq!(&rest[..], &all[k..]);
        }
    }
}
