"""Raw preference rows → a validated, cached :class:`~epsdpo.PreferenceStore` in one call.

The path a row takes:

1. **Read** (:mod:`epsdpo.data.sources`), a batch at a time: a ``datasets.Dataset`` /
   ``DatasetDict`` split, an ``IterableDataset`` (streaming), a list or generator of row dicts, a
   local ``.jsonl`` / ``.json`` / ``.parquet`` file (optionally ``.gz``), a ``save_to_disk`` folder,
   a folder of such files split by file name, or a hub id.
2. **Validate** (`_normalize_rows`): every bad row gets a reason code; nothing is dropped silently.
   A row whose texts together exceed the row limit (`sources.row_byte_limit`, from ``max_length`` or
   ``max_row_bytes``) is ``row_too_large`` before it reaches the template or the tokenizer.
3. **Render** (`_render`): conversational rows go through the chat template once per text —
   prompt with the generation prompt, prompt + chosen, prompt + rejected — in bulk.
4. **Tokenize** (`_split_tokenize`, :mod:`epsdpo.data.encoder`): each prompt is tokenized once,
   in batches, with exactly the fast tokenizer's ids; completions are tokenized joined to the short tail of the prompt after its last
   special token, which yields exactly the tokens of ``tokenize(prompt + completion)`` (see
   `_split_tokenize`) at a fraction of the cost, and proves the prompt's tokens are a prefix.
5. **Store**: each batch's flat numpy arrays go into the store by one ``store.append`` and are freed,
   so memory holds the tokens and one batch, never the rows; pair ids are the source row indices.

Formats, as TRL users know them:

- *standard*: ``prompt``, ``chosen``, ``rejected`` strings (the tokenizer's BOS, if it adds one,
  goes before the prompt; EOS is appended to completions that lack it);
- *conversational*: the same columns as lists of ``{"role", "content"}`` messages; the prompt may
  be multi-turn with a system message;
- *implicit prompt*: no ``prompt`` column; ``chosen`` and ``rejected`` are whole conversations (or
  strings) sharing a prefix, which becomes the prompt.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Literal

import numpy as np

from epsdpo._core import PreferenceStore, Truncation
from epsdpo.data import cache as _cache
from epsdpo.data.encoder import BatchEncoder
from epsdpo.data.sources import (
    COLUMNS,
    DataSourceError,
    UnreadableRow,
    check_columns,
    open_source,
    row_byte_limit,
    too_large_message,
)
from epsdpo.data.stats import DataReport, compute_stats

__all__ = ["DataSourceError", "InvalidRowError", "load_preferences"]

Format = Literal["standard", "conversational"]
NO_TRUNCATION = Truncation()  # frozen, so one shared default is safe

# Rows kept with their reason in the report, so a huge broken dataset does not bloat the JSON.
MAX_LISTED_ROWS = 100


class InvalidRowError(ValueError):
    """A source row cannot become a preference pair.

    ``row`` and ``reason`` name the first bad row; ``bad_rows`` lists every ``(row, reason)``
    found in the same batch, so one run shows more than one problem. ``source`` names the file
    (or dataset) the rows came from; ``locate`` maps a row to its place there (``"line 7"`` in a
    JSON Lines file), when that is not its number.
    """

    def __init__(
        self, bad_rows: Sequence[tuple[int, str]], source: str | None = None, locate: Callable[[int], str | None] | None = None
    ) -> None:
        self.bad_rows = list(bad_rows)
        self.row, self.reason = self.bad_rows[0]
        self.source = source

        def where(row: int) -> str:
            place = locate(row) if locate is not None else None
            return f"row {row} ({place})" if place else f"row {row}"

        more = ""
        if len(self.bad_rows) > 1:
            shown = "; ".join(f"{where(r)}: {why}" for r, why in self.bad_rows[1:6])
            extra = len(self.bad_rows) - 6
            more = f" (also {shown}{f'; and {extra} more' if extra > 0 else ''})"
        prefix = f"{source}: " if source else ""
        super().__init__(
            f"{prefix}{where(self.row)}: {self.reason}{more}. Fix the data, or pass skip_invalid=True to skip "
            "bad rows and count them in the report."
        )


# --------------------------------------------------------------------------------------------
# Validating rows
# --------------------------------------------------------------------------------------------


@dataclass
class _Rows:
    """The valid rows of one batch, normalized to (prompt, chosen, rejected) of one format."""

    index: list[int] = field(default_factory=list)  # source row index = pair id
    prompt: list[Any] = field(default_factory=list)
    chosen: list[Any] = field(default_factory=list)
    rejected: list[Any] = field(default_factory=list)


class _Bad(Exception):
    """Internal: one row's reason, raised from the validators."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _detect_format(batch: dict[str, list[Any]]) -> Format:
    """Conversational if the first row with a chosen value holds a list (of messages)."""
    for value in batch.get("chosen", []):
        if value is not None and not isinstance(value, UnreadableRow):
            return "conversational" if isinstance(value, (list, tuple)) else "standard"
    return "standard"


def _check_unicode(text: str, what: str) -> None:
    """Python strings may hold lone surrogates (JSON's ``"\\ud800"`` decodes to one); no
    tokenizer can encode them, and the batch call would fail for every row, naming none."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Bad(
            "invalid_text",
            f"{what} holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}), which is not valid Unicode text",
        ) from None


def _check_messages(value: Any, name: str) -> list[dict[str, str]]:
    if value is None:
        raise _Bad("missing_field", f"'{name}' is missing")
    if isinstance(value, str):
        raise _Bad("mixed_formats", f"'{name}' is a string but the dataset is conversational (lists of messages)")
    if not isinstance(value, (list, tuple)):
        raise _Bad("non_string_content", f"'{name}' is a {type(value).__name__}, not a list of messages")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise _Bad("bad_message", f"'{name}' message {k} is a {type(m).__name__}, not a {{role, content}} dict")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise _Bad("bad_message", f"'{name}' message {k} has no role")
        if not isinstance(content, str):
            got = "missing" if content is None else f"a {type(content).__name__}"
            raise _Bad("non_string_content", f"'{name}' message {k} ({role}) content is {got}, not a string")
        _check_unicode(content, f"'{name}' message {k} ({role}) content")
        if len(m) == 2:
            out.append({"role": role, "content": content})
        else:  # keep keys the template may read (name, tool_calls, ...), drop Arrow's None fill-ins
            out.append({key: v for key, v in m.items() if v is not None})
    return out


def _check_text(value: Any, name: str) -> str:
    if value is None:
        raise _Bad("missing_field", f"'{name}' is missing")
    if isinstance(value, (list, tuple)):
        raise _Bad("mixed_formats", f"'{name}' is a list but the dataset is in the standard format (strings)")
    if not isinstance(value, str):
        raise _Bad("non_string_content", f"'{name}' is a {type(value).__name__}, not a string")
    _check_unicode(value, f"'{name}'")
    return value


def _is_empty_completion(messages: list[dict[str, str]]) -> bool:
    return not any(m["content"].strip() for m in messages if m["role"] == "assistant")


def _split_implicit_messages(chosen: list[dict[str, str]], rejected: list[dict[str, str]]) -> tuple[list, list, list]:
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    # The prompt ends before the first differing message; an assistant turn both share stays prompt.
    return chosen[:n], chosen[n:], rejected[n:]


def _split_implicit_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    n = len(os.path.commonprefix([chosen, rejected]))
    # As TRL does: a space right before the split belongs to the completions, not the prompt.
    if 0 < n and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _normalize_row(prompt: Any, chosen: Any, rejected: Any, fmt: Format, implicit: bool) -> tuple[Any, Any, Any]:
    if fmt == "conversational":
        c = _check_messages(chosen, "chosen")
        r = _check_messages(rejected, "rejected")
        if implicit:
            p, c, r = _split_implicit_messages(c, r)
            if not p:
                raise _Bad("no_shared_prompt", "'chosen' and 'rejected' share no leading messages, so there is no prompt")
        else:
            p = _check_messages(prompt, "prompt")
            if not p:
                raise _Bad("empty_prompt", "'prompt' has no messages")
        for name, comp in (("chosen", c), ("rejected", r)):
            if not any(m["role"] == "assistant" for m in comp):
                raise _Bad("no_assistant_turn", f"'{name}' has no assistant turn after the prompt")
            if _is_empty_completion(comp):
                raise _Bad("empty_completion", f"'{name}' is empty")
        if c == r:
            raise _Bad("identical_completions", "'chosen' and 'rejected' are identical")
        return p, c, r
    c = _check_text(chosen, "chosen")
    r = _check_text(rejected, "rejected")
    if implicit:
        p, c, r = _split_implicit_text(c, r)
    else:
        p = _check_text(prompt, "prompt")
    for name, comp in (("chosen", c), ("rejected", r)):
        if not comp.strip():
            raise _Bad("empty_completion", f"'{name}' is empty")
    if c == r:
        raise _Bad("identical_completions", "'chosen' and 'rejected' are identical")
    return p, c, r


def _text_size(value: Any) -> int:
    """Characters of a row's value: a string, or every string field of its messages (what the
    template may render)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(len(v) for m in value if isinstance(m, Mapping) for v in m.values() if isinstance(v, str))
    return 0


def _normalize_rows(batch: dict[str, list[Any]], first_row: int, fmt: Format, implicit: bool, bad: list[tuple[int, str, str]],
                    max_chars: int | None = None) -> _Rows:
    n = len(batch["chosen"])
    prompts = batch.get("prompt", [None] * n)
    rows = _Rows()
    for k in range(n):
        row = first_row + k
        unreadable = batch["chosen"][k]
        if isinstance(unreadable, UnreadableRow):
            bad.append((row, unreadable.code, unreadable.message))
            continue
        if max_chars is not None:  # a JSON Lines line is bounded in bytes before parsing; every source here
            size = sum(_text_size(v) for v in (prompts[k], batch["chosen"][k], batch["rejected"][k]))
            if size > max_chars:
                bad.append((row, "row_too_large", too_large_message(size, max_chars, "characters of text")))
                continue
        try:
            p, c, r = _normalize_row(prompts[k], batch["chosen"][k], batch["rejected"][k], fmt, implicit)
        except _Bad as e:
            bad.append((row, e.code, e.message))
            continue
        except Exception as e:  # a value no validator foresaw: still this row's failure, not the run's
            bad.append((row, "invalid_row", f"{type(e).__name__}: {e}"))
            continue
        rows.index.append(row)
        rows.prompt.append(p)
        rows.chosen.append(c)
        rows.rejected.append(r)
    return rows


# --------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------


class _TemplateFailure(str):
    """A render that raised; carries the message in place of the text."""


class _Templater:
    """Renders conversations with the chat template, as ``apply_chat_template(tokenize=False)``.

    ``apply_chat_template`` deep-copies and sanitizes every message on every call, which costs
    more than the render itself. Validated rows hold plain ``{role, content}`` string dicts, for
    which that work is a no-op, so they are rendered with the compiled template directly, with the
    same variables transformers passes. The first render is compared with
    ``apply_chat_template``; on any difference (or a transformers without the helpers), every row
    goes through ``apply_chat_template``.
    """

    def __init__(self, tokenizer: Any, chat_template: str | None, kwargs: Mapping[str, Any]) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.kwargs = dict(kwargs)
        self._compiled: Any = None
        self._variables: dict[str, Any] = {}
        self._verified = False
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template, _plain_template_data

            template = _chat_template_of(tokenizer, chat_template)
            self._compiled = _compile_jinja_template(template)
            self._variables = _plain_template_data({**tokenizer.special_tokens_map, **self.kwargs})
        except Exception:  # another transformers version: the public path still works
            self._compiled = None

    def _slow(self, conv: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            conv,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            chat_template=self.chat_template,
            **self.kwargs,
        )

    def _fast(self, conv: list[dict[str, str]], generation_prompt: bool) -> str:
        return self._compiled.render(
            messages=conv, tools=None, documents=None, add_generation_prompt=generation_prompt, **self._variables
        )

    def render_one(self, conv: list[dict[str, str]], generation_prompt: bool) -> str:
        plain = self._compiled is not None and all(len(m) == 2 for m in conv)  # only role + content
        if plain and not self._verified:
            self._verified = True
            try:
                same = self._fast(conv, generation_prompt) == self._slow(conv, generation_prompt)
            except Exception:
                same = False
            if not same:
                self._compiled = None
                plain = False
        return self._fast(conv, generation_prompt) if plain else self._slow(conv, generation_prompt)

    def render(self, conversations: list[list[dict[str, str]]], generation_prompt: bool) -> list[str]:
        """Render each conversation; one whose render raises (jinja ``raise_exception``, ...)
        yields a `_TemplateFailure` so only that row fails."""
        out: list[str] = []
        for conv in conversations:
            try:
                out.append(self.render_one(conv, generation_prompt))
            except Exception as e:
                out.append(_TemplateFailure(f"{type(e).__name__}: {e}"))
        return out


def _invalid_unicode(*texts: str) -> str | None:
    """Why the first of ``texts`` that is not valid Unicode is not, or None."""
    try:
        for text in texts:
            _check_unicode(text, "")
    except _Bad as e:
        return e.message.lstrip()
    return None


def _render(rows: _Rows, templater: _Templater, bad: list[tuple[int, str, str]]) -> tuple[list[str], list[str], list[str], list[bool]]:
    """Render prompt (with generation prompt), prompt + chosen, prompt + rejected; return the
    prompt text and the two completion suffixes. A completion suffix exists only when the
    prompt render is a string prefix of the full render — else the row is a prefix mismatch."""
    p_txt = templater.render(rows.prompt, True)
    pc_txt = templater.render([p + c for p, c in zip(rows.prompt, rows.chosen)], False)
    pr_txt = templater.render([p + r for p, r in zip(rows.prompt, rows.rejected)], False)
    ok: list[bool] = []
    c_out: list[str] = []
    r_out: list[str] = []
    for k, (p, pc, pr) in enumerate(zip(p_txt, pc_txt, pr_txt)):
        failure = next((t for t in (p, pc, pr) if isinstance(t, _TemplateFailure)), None)
        invalid = None if failure is not None else _invalid_unicode(p, pc, pr)
        if failure is not None:
            bad.append((rows.index[k], "chat_template_error", f"the chat template failed: {failure}"))
            ok.append(False)
        elif invalid is not None:  # a message field besides the content (a name, a tool call) carried it
            bad.append((rows.index[k], "invalid_text", f"the rendered conversation {invalid}"))
            ok.append(False)
        elif not (pc.startswith(p) and pr.startswith(p)):
            where = pc if not pc.startswith(p) else pr
            at = len(os.path.commonprefix([p, where]))
            bad.append((
                rows.index[k],
                "prefix_mismatch",
                "the chat template renders the prompt differently when a completion follows "
                f"(first difference at character {at}: prompt has {p[at:at + 30]!r}, prompt + completion has "
                f"{where[at:at + 30]!r}); pass a chat_template that renders the prompt the same way",
            ))
            ok.append(False)
        else:
            c, r = pc[len(p) :], pr[len(p) :]
            if not c or not r:
                which = "chosen" if not c else "rejected"
                bad.append((rows.index[k], "empty_completion", f"the chat template renders '{which}' as nothing"))
                ok.append(False)
            else:
                ok.append(True)
        c_out.append(pc[len(p) :] if ok[-1] else "")
        r_out.append(pr[len(p) :] if ok[-1] else "")
    return [p if ok[k] else "" for k, p in enumerate(p_txt)], c_out, r_out, ok


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------


def _flatten(lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(flat uint32 tokens, per-row lengths)."""
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    flat = np.fromiter(chain.from_iterable(lists), dtype=np.uint32, count=int(lengths.sum()))
    return flat, lengths


def _split_tokenize(
    enc: BatchEncoder, prompts: list[str], completions: list[list[str]]
) -> tuple[list[list[int]], list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Tokenize each prompt once and each completion as it follows its prompt.

    Why this is exact: a fast tokenizer first splits the text on added tokens (``<|im_start|>``
    and the like) and tokenizes the pieces in between independently. So with ``s`` the offset of
    the prompt's last added token, ``tokens(P + C) = tokens(P[:s]) + tokens(P[s:] + C)``, and
    ``tokens(P[:s])`` is the start of ``tokens(P)``. We tokenize ``P`` once and only the short
    tail ``P[s:] + C`` per completion (for chat templates the tail is ``<|im_start|>assistant\\n``).
    The prompt's tokens are a prefix of ``tokens(P + C)`` exactly when the tail's own tokens
    (the end of ``tokens(P)``) start ``tokens(P[s:] + C)``; rows where they do not (a token
    merging across the boundary) come back with ``ok = False``. Prompts with no added token are
    tokenized whole with each completion: correct, just without the saving.

    Returns the prompt ids, each completion set as (flat tokens, lengths), and ``ok`` per row.
    """
    p_ids = enc.encode(prompts)
    cut_char: list[int] = []
    cut_tok: list[int] = []
    mask, content = enc.added_mask, enc.added_content
    for text, ids in zip(prompts, p_ids):
        # The last added token sits near the end of a rendered chat prompt: scan back for it.
        j = len(ids) - 1
        while j >= 0 and not mask[ids[j]]:
            j -= 1
        s = text.rfind(content[ids[j]]) if j >= 0 else -1
        if s < 0:  # no added token (plain text): the whole prompt is the tail
            j, s = 0, 0
        cut_tok.append(j)
        cut_char.append(s)
    tails = [text[s:] for text, s in zip(prompts, cut_char)]
    heads = [ids[j:] for ids, j in zip(p_ids, cut_tok)]
    n_head = np.fromiter(map(len, heads), dtype=np.int64, count=len(heads))
    ok = np.ones(len(prompts), dtype=bool)
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for comps in completions:
        joint = enc.encode([t + c for t, c in zip(tails, comps)])
        for k, (ids, head) in enumerate(zip(joint, heads)):
            if ids[: len(head)] != head:
                ok[k] = False
        flat, lengths = _flatten(joint)
        # Drop each row's first n_head tokens (the prompt tail) in one vectorized pass.
        pos = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        keep = pos >= np.repeat(n_head, lengths)
        out.append((flat[keep], np.maximum(lengths - n_head, 0)))
    return p_ids, out, ok


def _select(flat: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a (flat, lengths) ragged array where the boolean ``rows`` is set."""
    return flat[np.repeat(rows, lengths)], lengths[rows]


# --------------------------------------------------------------------------------------------
# Building the arrays
# --------------------------------------------------------------------------------------------


@dataclass
class _Counts:
    """What the tokenization fixed, summed over the batches."""

    doubled_bos: int = 0
    eos_appended: int = 0


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.uint64)
    np.cumsum(lengths, out=out[1:])
    return out


def _fix_bos(enc: BatchEncoder, p_ids: list[list[int]], add_bos: bool) -> tuple[list[list[int]], int]:
    """Put the tokenizer's BOS in front when it adds one by itself, without doubling a BOS the
    text already starts with (``tokenizer(text)`` would give two), and collapse repeated leading
    BOS tokens, so each prompt starts with one. Returns the prompts and how many were fixed."""
    if enc.bos_id is None:
        return p_ids, 0
    bos, doubled, out = enc.bos_id, 0, []
    for ids in p_ids:
        fixed = False
        if add_bos:
            if ids and ids[0] == bos:
                fixed = True
            else:
                ids = [bos, *ids]
        if len(ids) >= 2 and ids[1] == bos and ids[0] == bos:
            k = 1
            while k < len(ids) and ids[k] == bos:
                k += 1
            ids = ids[k - 1 :]
            fixed = True
        doubled += fixed
        out.append(ids)
    return out, doubled


def _append_eos(enc: BatchEncoder, flat: np.ndarray, lengths: np.ndarray, anywhere: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Append EOS to completions that lack it. ``anywhere``: a chat template that ends the turn
    with EOS may add text after it (SmolLM2 renders ``<|im_end|>\\n``), so any EOS counts."""
    if enc.eos_id is None or len(lengths) == 0:
        return flat, lengths, 0
    ends = np.cumsum(lengths)
    if anywhere:
        row_of = np.repeat(np.arange(len(lengths)), lengths)
        missing = np.bincount(row_of[flat == enc.eos_id], minlength=len(lengths)) == 0
    else:
        last = flat[np.maximum(ends - 1, 0)] if len(flat) else np.zeros(len(lengths), dtype=flat.dtype)
        missing = (lengths == 0) | (last != enc.eos_id)
    n = int(missing.sum())
    if n:
        flat = np.insert(flat, ends[missing], np.uint32(enc.eos_id))
        lengths = lengths + missing
    return flat, lengths, n


def _rows_refused_by_tokenizer(enc: BatchEncoder, prompts: list[str], chosen: list[str], rejected: list[str]) -> dict[int, str]:
    """Row by row, the rows whose texts the tokenizer raises on, with the reason."""
    refused = {}
    for k in range(len(prompts)):
        try:
            _split_tokenize(enc, [prompts[k]], [[chosen[k]], [rejected[k]]])
        except Exception as e:
            refused[k] = f"{type(e).__name__}: {e}"
    return refused


def _tokenize_batch(rows: _Rows, fmt: Format, enc: BatchEncoder, templater: _Templater | None, store: PreferenceStore,
                    counts: _Counts, bad: list[tuple[int, str, str]]) -> None:
    """Tokenize one batch's valid rows and append their pairs to `store` (the batch's arrays are
    freed with it: a dataset costs its tokens, not its batches' Python objects)."""
    if fmt == "conversational":
        assert templater is not None
        prompts, chosen, rejected, rendered = _render(rows, templater, bad)
        add_bos = False  # the rendered template carries its own BOS, as apply_chat_template(tokenize=True) sees it
        keep = [k for k, fine in enumerate(rendered) if fine]
        if len(keep) < len(prompts):
            prompts, chosen, rejected = ([x[k] for k in keep] for x in (prompts, chosen, rejected))
        index = [rows.index[k] for k in keep]
    else:
        prompts, chosen, rejected, index = rows.prompt, rows.chosen, rows.rejected, rows.index
        add_bos = enc.adds_bos
    if not index:
        return
    try:
        p_ids, ((c_flat, c_len), (r_flat, r_len)), ok = _split_tokenize(enc, prompts, [chosen, rejected])
    except Exception:
        # One text the tokenizer refuses fails the whole batch call: find it, report it as its
        # row's failure, and tokenize the rest. If no single row fails, the fault is not the data.
        refused = _rows_refused_by_tokenizer(enc, prompts, chosen, rejected)
        if not refused:
            raise
        for k, why in refused.items():
            bad.append((index[k], "tokenizer_error", f"the tokenizer refused this row ({why})"))
        keep = [k for k in range(len(index)) if k not in refused]
        prompts, chosen, rejected, index = ([x[k] for k in keep] for x in (prompts, chosen, rejected, index))
        if not index:
            return
        p_ids, ((c_flat, c_len), (r_flat, r_len)), ok = _split_tokenize(enc, prompts, [chosen, rejected])
    p_ids, doubled = _fix_bos(enc, p_ids, add_bos)
    p_flat, p_len = _flatten(p_ids)
    for k in np.flatnonzero(~ok):
        bad.append((index[k], "prefix_mismatch", "the prompt's tokens are not a prefix of the tokens of prompt + completion (a token spans the boundary); end the prompt on a token boundary, e.g. with whitespace or a newline"))
    for k in np.flatnonzero(ok & (p_len == 0)):
        bad.append((index[k], "empty_prompt", "the prompt has no tokens"))
    good = ok & (p_len > 0)
    if not good.all():
        (p_flat, p_len), (c_flat, c_len), (r_flat, r_len) = (
            _select(f, n, good) for f, n in ((p_flat, p_len), (c_flat, c_len), (r_flat, r_len))
        )
        index = [i for i, g in zip(index, good) if g]
    if not index:
        return
    anywhere = fmt == "conversational"
    c_flat, c_len, c_eos = _append_eos(enc, c_flat, c_len, anywhere)
    r_flat, r_len, r_eos = _append_eos(enc, r_flat, r_len, anywhere)
    store.append(
        p_flat, _offsets(p_len), c_flat, _offsets(c_len), r_flat, _offsets(r_len),
        ids=np.asarray(index, dtype=np.uint64),
    )  # fmt: skip
    counts.doubled_bos += doubled
    counts.eos_appended += c_eos + r_eos


# --------------------------------------------------------------------------------------------
# The public entry point
# --------------------------------------------------------------------------------------------


def _resolve_tokenizer(tokenizer: Any) -> Any:
    if isinstance(tokenizer, (str, os.PathLike)):
        from epsdpo.models import load_tokenizer  # a hub id offline fails at once, with the hint

        return load_tokenizer(os.fspath(tokenizer))
    return tokenizer


def _chat_template_of(tokenizer: Any, chat_template: str | None) -> str | None:
    if chat_template is not None:
        return chat_template
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: apply_chat_template uses "default"
        template = template.get("default")
    return template


def load_preferences(
    source: Any,
    tokenizer: Any,
    *,
    split: str | None = None,
    truncation: Truncation = NO_TRUNCATION,
    chat_template: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    max_row_bytes: int | None = None,
    cache_dir: str | os.PathLike[str] | None | Any = _cache.DEFAULT,
    skip_invalid: bool = False,
    batch_size: int = 1000,
    progress: bool = True,
) -> tuple[PreferenceStore, DataReport]:
    """Turn raw preference rows into a validated :class:`~epsdpo.PreferenceStore` and a report.

    Args:
        source: a ``datasets.Dataset``, a ``DatasetDict`` (with ``split``), an ``IterableDataset``
            or ``IterableDatasetDict`` (streaming, read once), a list or any iterable of row dicts
            (a generator, read once), a local ``.jsonl`` / ``.json`` / ``.parquet`` file (``.gz``
            allowed for JSON), a ``save_to_disk`` folder, a folder of such files (``split`` picked
            by file name, as ``datasets.load_dataset(folder)`` does), or a Hugging Face Hub dataset
            id. A stream is fingerprinted as it is read: its cache entry is written, never hit
            before reading it.
        tokenizer: a fast transformers tokenizer (or a name/path to load one). Conversational
            rows go through its chat template (or ``chat_template``).
        truncation: the :class:`~epsdpo.Truncation` training will apply (the Rust collator
            truncates; the store keeps full sequences). It drives the report's truncation and
            padding figures and is part of the cache key. ``TrainConfig.truncation`` is a run's.
        chat_template_kwargs: extra variables for the template (e.g. ``enable_thinking``).
        max_row_bytes: the largest raw row: a JSON Lines line over it (or, from any source, a row
            whose texts hold more characters) is the bad row ``row_too_large``, never parsed nor
            tokenized. None: 1 KiB per token of ``truncation.max_length``, at least 1 MiB (64 MiB
            without ``max_length``).
        cache_dir: where the tokenized store and its report are cached. Default:
            ``$EPSDPO_CACHE``, else ``$XDG_CACHE_HOME/epsdpo``, else ``~/.cache/epsdpo``.
            ``None`` or ``"disabled"`` turns caching off (``TrainConfig.dataset_cache_dir=None``
            instead means the default; see :func:`epsdpo.feed.as_store`).
        skip_invalid: skip bad rows and count them in the report instead of raising
            :class:`InvalidRowError`.
        batch_size: rows rendered and tokenized per batch.
        progress: show a progress bar.

    Returns:
        ``(store, report)``; pair ids in the store are the source row indices.
    """
    t0 = time.perf_counter()
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if not isinstance(truncation, Truncation):  # its settings were checked when it was built
        raise TypeError(f"truncation must be an epsdpo.Truncation, got {type(truncation).__name__}")
    root = _cache.resolve_cache_dir(cache_dir)  # likewise a cache_dir that is no directory
    tokenizer = _resolve_tokenizer(tokenizer)
    row_limit = row_byte_limit(truncation.max_length, max_row_bytes)
    src = open_source(source, split, row_limit)
    implicit = check_columns(src)
    template = _chat_template_of(tokenizer, chat_template)
    kwargs = dict(chat_template_kwargs or {})
    settings = {
        "max_length": truncation.max_length,
        "max_prompt_length": truncation.max_prompt_length,
        "truncation_mode": truncation.prompt_truncation_mode,  # the key's old name, so that existing cache entries stay valid
        "skip_invalid": skip_invalid,
    }
    if truncation.max_completion_length is not None:  # only when set, so that entries cached before it existed stay valid
        settings["max_completion_length"] = truncation.max_completion_length
    if max_row_bytes is not None:  # likewise; the default limit follows max_length, already in the key
        settings["max_row_bytes"] = max_row_bytes
    used = [c for c in COLUMNS if c in src.column_names]

    def cache_key() -> str:
        return _cache.fingerprint(
            data=src.content_hash(used),
            tokenizer=_cache.tokenizer_hash(tokenizer),
            chat_template=template,
            chat_template_kwargs=kwargs,
            settings=settings,
        )

    key = None
    if root is not None and not src.hashed_while_read:
        key = cache_key()
        hit = _cache.load(root, key)
        if hit is not None:
            store, report = hit
            report.cache_hit = True
            report.cache_path = str(_cache.store_path(root, key))
            report.seconds = time.perf_counter() - t0
            return store, report

    from tqdm.auto import tqdm

    enc = BatchEncoder(tokenizer)
    # Each batch's pairs go into the store as soon as they are tokenized, so memory holds the
    # tokens and one batch, whatever the size of the source.
    store = PreferenceStore(vocab_size=enc.vocab_size)
    counts = _Counts()
    skipped: dict[str, int] = {}
    listed: list[tuple[int, str, str]] = []  # the first MAX_LISTED_ROWS bad rows, in row order
    fmt: Format | None = None
    templater: _Templater | None = None

    with tqdm(total=src.num_rows, desc="Tokenizing preference pairs", unit="rows", disable=not progress) as bar:
        row = 0
        for batch in src.batches(batch_size):
            n = len(batch["chosen"])
            if fmt is None:
                fmt = _detect_format(batch)
                if fmt == "conversational":
                    if template is None:
                        raise DataSourceError(  # the data and the tokenizer do not fit: one line from the CLI
                            f"{src.description}: the data is conversational but the tokenizer has no chat template: set "
                            "chat_template_path to a .jinja template file (TrainConfig, `epsdpo train` and "
                            "`epsdpo prepare`), or pass chat_template=... to load_preferences"
                        )
                    templater = _Templater(tokenizer, chat_template, kwargs)
            bad: list[tuple[int, str, str]] = []  # (row, reason code, message) of this batch
            rows = _normalize_rows(batch, row, fmt, implicit, bad, row_limit)
            _tokenize_batch(rows, fmt, enc, templater, store, counts, bad)
            if bad and not skip_invalid:
                raise InvalidRowError(sorted((r, msg) for r, _, msg in bad), src.description, src.locate)
            # Batches come in row order, so sorting each batch's bad rows sorts them all.
            bad.sort()
            for _, code, _ in bad:
                skipped[code] = skipped.get(code, 0) + 1
            listed.extend(bad[: MAX_LISTED_ROWS - len(listed)])
            row += n
            bar.update(n)
    if len(store) == 0:
        invalid = sum(skipped.values())
        what = f"all {invalid} rows are invalid" if invalid else "the source has no rows"
        raise DataSourceError(f"{src.description}: no preference pairs to train on ({what})")
    if root is not None and key is None:  # a stream: its content is known now that it has been read
        key = cache_key()
    report = compute_stats(store, truncation=truncation)
    report.source = src.description
    report.format = fmt or "standard"
    report.implicit_prompt = implicit
    report.num_rows = row
    report.skipped = skipped
    report.skipped_rows = [[r, code, msg] for r, code, msg in listed]
    report.doubled_bos = counts.doubled_bos
    report.eos_appended = counts.eos_appended
    report.fingerprint = key
    report.seconds = time.perf_counter() - t0
    if root is not None and key is not None:
        saved = _cache.save(root, key, store, report)  # None: the cache dir is not writable (warned)
        report.cache_path = str(saved) if saved is not None else None
    return store, report
