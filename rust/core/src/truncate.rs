//! Truncation of one pair to `max_prompt_length` / `max_completion_length` / `max_length`.
//!
//! The prompt is cut first (by default losing its start, so the end nearest the answer survives),
//! then each completion loses its end until it fits `max_completion_length` and prompt + completion
//! fits `max_length`. Chosen and
//! rejected share the truncated prompt, which the shared-prompt layout relies on.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::limits::MAX_ROW_TOKENS;
use crate::store::Pair;

/// Which end of an over-long prompt survives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PromptTruncation {
    /// Keep the prompt's last tokens (nearest the answer). The default: what a prompt cut to
    /// `max_prompt_length` most needs is the context just before the answer.
    #[default]
    KeepEnd,
    /// Keep the prompt's first tokens.
    KeepStart,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Truncation {
    /// Longest sequence (prompt + one completion); `None` for no limit.
    pub max_length: Option<usize>,
    /// Longest prompt; `None` for no limit.
    pub max_prompt_length: Option<usize>,
    /// Longest completion (each of chosen and rejected), cut keeping its start; `None` for no limit.
    pub max_completion_length: Option<usize>,
    pub prompt_mode: PromptTruncation,
}

/// Where a truncated pair's spans lie inside the original spans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncated {
    pub prompt: Range<usize>,
    /// Completions always keep their start; only their length changes.
    pub chosen_len: usize,
    pub rejected_len: usize,
}

impl Truncated {
    pub fn chosen_seq_len(&self) -> usize {
        self.prompt.len() + self.chosen_len
    }
    pub fn rejected_seq_len(&self) -> usize {
        self.prompt.len() + self.rejected_len
    }
    pub fn was_truncated(&self, pair: &Pair<'_>) -> bool {
        self.prompt.len() < pair.prompt.len() || self.chosen_len < pair.chosen.len() || self.rejected_len < pair.rejected.len()
    }
    /// Whether the truncated chosen and rejected completions are the same tokens. Such a pair has
    /// nothing to learn: its log-ratio gap is zero by construction, so its loss is ln 2 and its
    /// gradient is rounding noise. The prompt is shared, so only the completions are compared.
    pub fn completions_identical(&self, pair: &Pair<'_>) -> bool {
        self.chosen_len == self.rejected_len && pair.chosen[..self.chosen_len] == pair.rejected[..self.rejected_len]
    }
}

impl Truncation {
    pub fn validate(&self) -> Result<()> {
        let limits = [
            ("max_length", self.max_length),
            ("max_prompt_length", self.max_prompt_length),
            ("max_completion_length", self.max_completion_length),
        ];
        for (name, value) in limits {
            if let Some(v) = value.filter(|&v| v > MAX_ROW_TOKENS) {
                return Err(Error::arg(format!("{name} = {v} is above the limit of {MAX_ROW_TOKENS} tokens per row; pass None for no limit")));
            }
        }
        if matches!(self.max_length, Some(m) if m < 2) {
            return Err(Error::arg("max_length must be at least 2 (one prompt and one completion token)"));
        }
        if self.max_prompt_length == Some(0) {
            return Err(Error::arg("max_prompt_length must be at least 1: the first completion token needs a prompt token to predict it"));
        }
        if self.max_completion_length == Some(0) {
            return Err(Error::arg("max_completion_length must be at least 1: a completion cut to nothing has no token to score"));
        }
        if let (Some(m), Some(p)) = (self.max_length, self.max_prompt_length) {
            if p >= m {
                return Err(Error::arg(format!(
                    "max_prompt_length ({p}) must be below max_length ({m}), or every completion would be cut to nothing"
                )));
            }
        }
        Ok(())
    }

    /// Truncate pair `index`. A completion left with zero tokens is an error naming the pair;
    /// callers that skip such pairs match on [`Error::EmptyAfterTruncation`].
    pub fn apply(&self, index: usize, pair: &Pair<'_>) -> Result<Truncated> {
        let p = pair.prompt.len();
        let keep = self.max_prompt_length.map_or(p, |m| m.min(p));
        let prompt = match self.prompt_mode {
            PromptTruncation::KeepEnd => p - keep..p,
            PromptTruncation::KeepStart => 0..keep,
        };
        let room = self.max_length.map_or(usize::MAX, |m| m.saturating_sub(keep)).min(self.max_completion_length.unwrap_or(usize::MAX));
        let (chosen_len, rejected_len) = (pair.chosen.len().min(room), pair.rejected.len().min(room));
        for (which, len) in [("chosen", chosen_len), ("rejected", rejected_len)] {
            if len == 0 {
                return Err(Error::EmptyAfterTruncation {
                    pair: index,
                    which,
                    prompt_len: keep,
                    max_length: self.max_length.unwrap_or(usize::MAX),
                });
            }
        }
        Ok(Truncated { prompt, chosen_len, rejected_len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair<'a>(p: &'a [u32], c: &'a [u32], r: &'a [u32]) -> Pair<'a> {
        Pair { id: 0, prompt: p, chosen: c, rejected: r }
    }

    #[test]
    fn no_limits_keep_everything() {
        let t = Truncation::default().apply(0, &pair(&[1, 2, 3], &[4, 5], &[6])).unwrap();
        assert_eq!(t, Truncated { prompt: 0..3, chosen_len: 2, rejected_len: 1 });
    }

    #[test]
    fn prompt_keeps_end_by_default_then_completion_loses_end() {
        let tr = Truncation { max_length: Some(5), max_prompt_length: Some(2), prompt_mode: PromptTruncation::KeepEnd, ..Default::default() };
        let t = tr.apply(0, &pair(&[1, 2, 3, 4], &[5, 6, 7, 8, 9], &[10])).unwrap();
        assert_eq!(t, Truncated { prompt: 2..4, chosen_len: 3, rejected_len: 1 });
        let tr = Truncation { prompt_mode: PromptTruncation::KeepStart, ..tr };
        assert_eq!(tr.apply(0, &pair(&[1, 2, 3, 4], &[5], &[6])).unwrap().prompt, 0..2);
    }

    #[test]
    fn completions_keep_their_start_within_max_completion_length() {
        let tr = Truncation { max_completion_length: Some(2), ..Default::default() };
        assert_eq!(tr.apply(0, &pair(&[1, 2, 3], &[4, 5, 6], &[7])).unwrap(), Truncated { prompt: 0..3, chosen_len: 2, rejected_len: 1 });
        // max_length still binds when it leaves less room than max_completion_length
        let tr = Truncation { max_length: Some(4), max_completion_length: Some(3), ..Default::default() };
        assert_eq!(tr.apply(0, &pair(&[1, 2, 3], &[4, 5, 6], &[7, 8])).unwrap(), Truncated { prompt: 0..3, chosen_len: 1, rejected_len: 1 });
        assert!(Truncation { max_completion_length: Some(0), ..Default::default() }.validate().is_err());
    }

    #[test]
    fn completion_cut_to_nothing_names_the_pair() {
        let tr = Truncation { max_length: Some(3), ..Default::default() };
        match tr.apply(7, &pair(&[1, 2, 3], &[4], &[5])) {
            Err(Error::EmptyAfterTruncation { pair: 7, which: "chosen", .. }) => {}
            other => panic!("expected an empty-completion error, got {other:?}"),
        }
    }

    #[test]
    fn identical_completions_are_found_after_truncation_only() {
        let p = pair(&[1, 2], &[4, 5, 6], &[4, 5, 7]);
        assert!(!Truncation::default().apply(0, &p).unwrap().completions_identical(&p));
        let cut = Truncation { max_completion_length: Some(2), ..Default::default() };
        assert!(cut.apply(0, &p).unwrap().completions_identical(&p));
        // Same first tokens but different lengths still differ
        let p = pair(&[1, 2], &[4, 5], &[4, 5, 6]);
        assert!(!Truncation::default().apply(0, &p).unwrap().completions_identical(&p));
    }

    #[test]
    fn inconsistent_limits_are_rejected() {
        assert!(Truncation { max_length: Some(4), max_prompt_length: Some(4), ..Default::default() }.validate().is_err());
        assert!(Truncation { max_prompt_length: Some(0), ..Default::default() }.validate().is_err());
        assert!(Truncation { max_length: Some(4), max_prompt_length: Some(3), ..Default::default() }.validate().is_ok());
    }
}
