"""Every rank of a run trains the same run, or none trains: the ranks compare their settings and
data at start-up, and agree on the checkpoint a resume reads.

Under `torchrun` each process reads its own config, data and output_dir (on several nodes: its own
node's copies). A stale YAML on one node would otherwise train its pairs with another β, learning
rate or dataset while the logs and model card are rank 0's, or hang in collectives that only some
ranks enter (another `max_steps`, `save_steps` or `fsdp`); a resume that each rank resolves on its
own view of output_dir would load different checkpoints on different nodes.

- `check_settings_agree`: in `Trainer.__init__`, once the data is loaded and before the first
  collective whose schedule depends on the settings (DDP's or FSDP's wrapping, precomputed reference
  log-probs, training), every rank gathers every rank's settings — each TrainConfig field but those
  in `PER_NODE`, and fingerprints of the tokenized training and eval pairs and of the tokenizer — and
  all stop together with one `RanksDisagreeError` naming each differing field and which ranks hold
  which value.
- `agree_on_checkpoint`: rank 0 resolves the checkpoint to resume and broadcasts it; every rank
  checks that it sees that checkpoint, with the same manifest, and all stop together naming the
  ranks that do not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from epsdpo.checkpoint import MANIFEST, MAX_MANIFEST_BYTES, list_checkpoints, resolve_checkpoint
from epsdpo.distributed import DistInfo, broadcast_from_main, gather_from_all
from epsdpo.run_identity import store_fingerprint, tokenizer_fingerprint
from epsdpo.safe_files import FileRefused, read_regular_file

# Fields that say where this node keeps things or how it shows progress, never what is trained or
# when the ranks communicate: they may differ between nodes. (Only rank 0 shows progress; the other
# fields are paths or worker counts of this node; the template chat_template_path names is compared
# as part of the tokenizer's fingerprint.)
PER_NODE = frozenset({"output_dir", "device", "dataset_cache_dir", "dataset_num_proc", "progress",
                      "chat_template_path"})

# `resume_from_checkpoint` value: resume the newest complete checkpoint, or start fresh when there is none
AUTO = "auto"


class RanksDisagreeError(RuntimeError):
    """The ranks of one run were given different settings, data or checkpoints; raised on every rank."""


def run_settings(config: Any, train_store: Any, eval_store: Any, tokenizer: Any) -> dict[str, Any]:
    """What every rank must agree on, as JSON values: the config's fields but `PER_NODE`, and the
    fingerprints of the inputs (`train_data`, `eval_data`, `tokenizer`)."""
    values = {k: v for k, v in config.to_dict().items() if k not in PER_NODE}
    values.update(train_data=store_fingerprint(train_store),
                  eval_data=None if eval_store is None else store_fingerprint(eval_store),
                  tokenizer=tokenizer_fingerprint(tokenizer))
    return values


def check_settings_agree(settings: dict[str, Any], dist: DistInfo) -> None:
    """One gather of every rank's settings (their digests, and short forms to name them); raises
    `RanksDisagreeError` on every rank when any field differs between ranks."""
    if not dist.enabled:
        return
    mine = {key: _digest(value) for key, value in settings.items()}
    everyone = gather_from_all({"digests": mine, "shown": {k: _shown(v) for k, v in settings.items()}}, dist)
    differing = sorted({key for rank in everyone for key in rank["digests"]
                        if any(other["digests"].get(key) != rank["digests"][key] for other in everyone)})
    if not differing:
        return
    parts = [f"{key} ({_by_value(key, everyone)})" for key in differing[:8]]
    more = f" and {len(differing) - 8} more" if len(differing) > 8 else ""
    raise RanksDisagreeError(
        f"the ranks of this run were given different settings: {'; '.join(parts)}{more}; every rank must get the "
        "same config, data and tokenizer (a stale copy on one node?): only "
        f"{', '.join(sorted(PER_NODE))} may differ between nodes")


def agree_on_checkpoint(output_dir: Path, resume: str | Path | bool, dist: DistInfo) -> Path | None:
    """The checkpoint this run resumes, as rank 0 resolves `resume` (True: the newest complete one in
    output_dir; "auto": the same, or None to start fresh when there is none; else a checkpoint
    folder), after every rank has confirmed it sees that checkpoint with rank 0's manifest. Raises on
    every rank: rank 0's FileNotFoundError when it finds nothing to resume, RanksDisagreeError when
    a rank lacks the checkpoint or holds another version of it."""
    choice: tuple[str | None, str | None]  # (the checkpoint, or rank 0's error)
    if dist.is_main:
        try:
            choice = (_resolve(output_dir, resume), None)
        except OSError as error:  # the others wait in the broadcast: they must learn of it
            choice = (None, str(error))
    chosen, error = broadcast_from_main(choice if dist.is_main else None, dist)
    if error is not None:
        raise FileNotFoundError(error if dist.is_main else f"rank 0: {error}")
    if chosen is None:
        return None
    # A checkpoint found in output_dir is looked for in this rank's output_dir (node-local disks); a
    # folder named by the user, at that path.
    path = output_dir / chosen if resume is True or resume == AUTO else Path(chosen)
    if not dist.enabled:
        return path
    seen = gather_from_all((_manifest_digest(path), [p.name for p in list_checkpoints(output_dir)]), dist)
    wanted = seen[0][0]
    lacking = [rank for rank, (digest, _) in enumerate(seen) if digest is None]
    other = [rank for rank, (digest, _) in enumerate(seen) if digest is not None and digest != wanted]
    if not lacking and not other:
        return path
    problems = []
    if lacking:
        problems.append("; ".join(f"rank {rank} has no complete {chosen} in its output_dir (its newest: "
                                  f"{seen[rank][1][-1] if seen[rank][1] else 'none'})" for rank in lacking[:4]))
    if other:
        problems.append(f"rank(s) {', '.join(map(str, other[:8]))} hold a different {chosen} (another manifest)")
    raise RanksDisagreeError(
        f"rank 0 resumes {chosen}, but {'; '.join(problems)}: every rank must see the same checkpoint (a shared "
        "output_dir, or the checkpoint copied whole to every node)")


def _resolve(output_dir: Path, resume: str | Path | bool) -> str | None:
    """Rank 0's choice: the checkpoint's folder name (found in output_dir) or path (named), or None."""
    if resume == AUTO:
        found = list_checkpoints(output_dir)
        return found[-1].name if found else None
    path = resolve_checkpoint(output_dir, resume)
    return path.name if resume is True else str(path)


def _manifest_digest(path: Path) -> str | None:
    """A digest of the checkpoint's manifest, read as a bounded regular file (a FIFO or a link to
    /dev/zero there would block or exhaust memory: resume_run's verification then names it); None
    when it is missing."""
    try:
        return hashlib.blake2b(read_regular_file(path / MANIFEST, MAX_MANIFEST_BYTES), digest_size=16).hexdigest()
    except FileRefused as refused:
        return f"refused: {refused.reason}"
    except OSError:
        return None


def _digest(value: Any) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def _shown(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _by_value(key: str, everyone: list[dict[str, Any]]) -> str:
    """'0.1 on rank 0, 0.2 on rank 1' (ranks grouped by value, in rank order)."""
    groups: dict[str | None, tuple[str, list[int]]] = {}
    for rank, settings in enumerate(everyone):
        digest = settings["digests"].get(key)
        groups.setdefault(digest, (settings["shown"].get(key, "(absent)"), []))[1].append(rank)
    return ", ".join(f"{shown} on rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks[:8]))}"
                     f"{'...' if len(ranks) > 8 else ''}" for shown, ranks in groups.values())
