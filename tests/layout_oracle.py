"""A slow, obvious pure-Python statement of truncation and the three batch layouts.

It follows the collator's documented contract token by token, so the Rust output can be compared
with it array for array.
"""

from __future__ import annotations

import numpy as np


def truncate(prompt, chosen, rejected, max_length=None, max_prompt_length=None, mode="keep_end",
             max_completion_length=None):
    """Returns (prompt, chosen, rejected) after truncation, or None when a completion empties."""
    prompt = list(prompt)
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length :] if mode == "keep_end" else prompt[:max_prompt_length]
    out = []
    for completion in (chosen, rejected):
        completion = list(completion)
        if max_completion_length is not None:
            completion = completion[:max_completion_length]
        if max_length is not None:
            completion = completion[: max(0, max_length - len(prompt))]
        if not completion:
            return None
        out.append(completion)
    return prompt, out[0], out[1]


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def collate(pairs, layout, max_length=None, max_prompt_length=None, mode="keep_end", pad=0, multiple=1, capacity=None,
            max_completion_length=None):
    """pairs: list of (prompt, chosen, rejected) token lists (already chosen from the store)."""
    kept = [truncate(*p, max_length, max_prompt_length, mode, max_completion_length) for p in pairs]
    assert all(k is not None for k in kept), "oracle is only asked about pairs that survive truncation"
    b = len(kept)
    # Sequence s < b is pair s's chosen answer, s >= b pair s-b's rejected one.
    seqs = [(k[0], k[1]) for k in kept] + [(k[0], k[2]) for k in kept]

    if layout == "padded":
        rows = [[(s, 0)] for s in range(2 * b)]  # per row: (sequence, column where it starts)
        cols = _round_up(max(len(p) + len(c) for p, c in seqs), multiple)
    elif layout == "packed":
        cap = capacity or max_length or max(len(p) + len(c) for p, c in seqs)
        order = sorted(range(2 * b), key=lambda s: (-(len(seqs[s][0]) + len(seqs[s][1])), s))
        length = lambda s: len(seqs[s][0]) + len(seqs[s][1])  # noqa: E731
        def first_fit(width):
            bins = []
            for s in order:
                for row in bins:
                    if sum(map(length, row)) + length(s) <= width:
                        row.append(s)
                        break
                else:
                    bins.append([s])
            return bins

        n_rows = len(first_fit(cap))  # first-fit decreasing at full capacity decides the row count
        # ...then the narrowest width that keeps it (multifit's binary search: FFD's row count is
        # not strictly monotone in the width, so the search itself is part of the contract).
        lo, hi = max(-(-sum(map(length, order)) // n_rows), max(map(length, order))), cap
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if len(first_fit(mid)) <= n_rows else (mid + 1, hi)
        width = hi
        chosen_rows = first_fit(width)
        rows, fill = [], []
        for row in chosen_rows:
            col, placed = 0, []
            for s in row:
                placed.append((s, col))
                col += length(s)
            rows.append(placed)
            fill.append(col)
        cols = _round_up(max(fill), multiple)
    else:
        cols = _round_up(max(len(k[0]) + len(k[1]) + len(k[2]) for k in kept), multiple)

    n_rows = b if layout == "shared_prompt" else len(rows)
    shape = (n_rows, cols)
    out = {
        "input_ids": np.full(shape, pad, np.int64),
        "attention_mask": np.zeros(shape, np.int64),
        "position_ids": np.zeros(shape, np.int64),
        "completion_mask": np.zeros(shape, bool),
        "sequence_index": np.full(shape, -1, np.int32),
        "segment_ids": np.full(shape, -1, np.int32),
        "branch_ids": np.zeros(shape, np.int8),
    }
    targets = []  # (sequence, flat predictor, token) in write order

    def put(r, c, tokens, pos, seq, seg, branch, first_pred=None):
        for k, t in enumerate(tokens):
            out["input_ids"][r, c + k] = t
            out["attention_mask"][r, c + k] = 1
            out["position_ids"][r, c + k] = pos + k
            out["sequence_index"][r, c + k] = seq
            out["segment_ids"][r, c + k] = seg
            out["branch_ids"][r, c + k] = branch
            if first_pred is not None:
                out["completion_mask"][r, c + k] = True
                pred = first_pred if k == 0 else r * cols + c + k - 1
                targets.append((seq, pred, t))

    if layout == "shared_prompt":
        for i, (p, ch, rj) in enumerate(kept):
            last_prompt = i * cols + len(p) - 1
            put(i, 0, p, 0, i, i, 0)
            put(i, len(p), ch, len(p), i, i, 1, last_prompt)
            put(i, len(p) + len(ch), rj, len(p), b + i, i, 2, last_prompt)
    else:
        placed = sorted((s, r, c) for r, row in enumerate(rows) for s, c in row)
        for s, r, c in placed:
            p, comp = seqs[s]
            seg = r if layout == "padded" else s
            put(r, c, p, 0, s, seg, 0)
            put(r, c + len(p), comp, len(p), s, seg, 0, r * cols + c + len(p) - 1)

    out["target_sequence"] = np.array([t[0] for t in targets], np.int64)
    out["logit_index"] = np.array([t[1] for t in targets], np.int64)
    out["target_ids"] = np.array([t[2] for t in targets], np.int64)
    out["sequence_lengths"] = np.array([len(p) + len(c) for p, c in seqs], np.int32)
    return out
