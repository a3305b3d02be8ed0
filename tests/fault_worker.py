"""Subprocess entry point for tests/test_fault_injection.py: tiny training runs that can be killed with
SIGKILL at a chosen point inside a checkpoint write.

    python fault_worker.py run JOB.json   one job in this (fresh) interpreter
    python fault_worker.py serve          read one job per stdin line, run each in a forked child and
                                          answer one JSON line per job: {"code": exit code or None,
                                          "signal": the killing signal or None}

`serve` pays for the torch/transformers imports once; every job still runs in a process of its own
(forked from a server that never trained), so a killed job dies with everything it held and a resumed
job starts from the files on disk alone.

A job is a JSON object: {"config": TrainConfig keyword arguments, "resume": a checkpoint path, true
or null, "fault": null or {"point": ..., "k": ...}, "result": path of a JSON file for the run's
history, "log": path the job's stdout and stderr go to}. The fault kills the process (SIGKILL, no
cleanup, no flush) during the k-th checkpoint write of the job, at `point`:

- "weights":        model.safetensors half written
- "training_state": training_state.pt half written
- "manifest":       manifest.json half written (every other file complete)
- "before_rename":  the staging directory complete, manifest included, not yet renamed into place
- "after_rename":   just after the rename, before older checkpoints are pruned
- "rmtree":         while an existing `checkpoint-N` directory is removed (one data file gone, the
                    rest, manifest included, still there), as overwriting or pruning does
- "final_card":     at the end of the run, as final/'s model card is about to be written (the
                    weights and config of final/ written); k is unused
- "ledger":         at the end of the run, beta_ledger.npz half written; k is unused

Not a kill: {"point": "signal", "k": k, "signals": ["SIGTERM", ...]} sends the process itself those
signals (real ones, through the kernel) at the start of optimizer step k, as a cluster preempting
the job does. A job that `train()` ends with `TrainingInterrupted` exits as `epsdpo train` does,
with its `exit_code` (128 + the signal's number).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

POINTS = ("weights", "training_state", "manifest", "before_rename", "after_rename", "rmtree", "final_card", "ledger",
          "root_model", "signal")


def _die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _truncate_half(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)


def install_fault(point: str, k: int, signals: list[str] | None = None) -> None:
    """Arm `point` for the k-th checkpoint write (1-based) of this process."""
    import shutil

    import epsdpo.checkpoint as ckpt
    import epsdpo.run_checkpoints as run_checkpoints

    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}")
    writes = {"n": 0}
    armed = lambda: writes["n"] == k  # noqa: E731

    real_save_checkpoint = run_checkpoints.save_checkpoint

    def counting_save_checkpoint(*args, **kwargs):
        writes["n"] += 1
        return real_save_checkpoint(*args, **kwargs)

    run_checkpoints.save_checkpoint = counting_save_checkpoint

    if point == "weights":
        real_save_model = ckpt.save_model

        def save_model(model, filename, *args, **kwargs):
            real_save_model(model, filename, *args, **kwargs)
            if armed() and Path(filename).name == "model.safetensors":
                _truncate_half(Path(filename))
                _die()

        ckpt.save_model = save_model
    elif point == "training_state":
        real_write = ckpt.write_file

        def write(path, writer):
            real_write(path, writer)
            if armed() and Path(path).name == "training_state.pt":
                _truncate_half(Path(path))
                _die()

        ckpt.write_file = write
    elif point == "manifest":
        real_write_manifest = ckpt._write_manifest

        def write_manifest(root):
            real_write_manifest(root)
            if armed():
                _truncate_half(Path(root) / ckpt.MANIFEST)
                _die()

        ckpt._write_manifest = write_manifest
    elif point == "final_card":
        import epsdpo.model_card as model_card

        def write_model_card(folder, *args, **kwargs):
            _die()

        model_card.write_model_card = write_model_card
    elif point == "ledger":
        import numpy as np

        real_savez = np.savez

        def savez(file, *args, **kwargs):
            real_savez(file, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)):
                _truncate_half(Path(file))
            else:  # an open file (of a descriptor: it has no name to truncate by)
                file.flush()
                os.ftruncate(file.fileno(), os.fstat(file.fileno()).st_size // 2)
            _die()

        np.savez = savez
    elif point == "root_model":  # the final model's files going into output_dir itself: one renamed in, the rest not
        import epsdpo.trainer as trainer_module

        real_publish = trainer_module.publish_files

        def publish_files(source, into, markers):
            real_replace, renamed = os.replace, {"n": 0}

            def replace(src, dst, *args, **kwargs):
                real_replace(src, dst, *args, **kwargs)
                renamed["n"] += 1
                if renamed["n"] == 2:
                    _die()

            os.replace = replace
            real_publish(source, into, markers)

        trainer_module.publish_files = publish_files
    elif point == "signal":
        from epsdpo.trainer import Trainer

        real_train_step = Trainer._train_step
        steps = {"n": 0}

        def train_step(self, batches):
            steps["n"] += 1
            if steps["n"] == k:
                for name in signals or ["SIGTERM"]:
                    os.kill(os.getpid(), getattr(signal, name))
            return real_train_step(self, batches)

        Trainer._train_step = train_step
    elif point in ("before_rename", "after_rename"):
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            hit = armed() and re.fullmatch(r"checkpoint-\d+", Path(dst).name) is not None
            if hit and point == "before_rename":
                _die()
            real_replace(src, dst, *args, **kwargs)
            if hit:
                _die()

        os.replace = replace
    else:  # rmtree
        real_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            path = Path(path)
            # a live checkpoint, or one already renamed out of the way for removal
            if armed() and re.fullmatch(r"\.?checkpoint-\d+(\.trash)?", path.name) and path.is_dir():
                # an interrupted rmtree: some files are gone, the others (manifest.json here) remain
                victim = sorted(p for p in path.rglob("*") if p.is_file() and p.name != ckpt.MANIFEST)[0]
                victim.unlink()
                _die()
            return real_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree


def run_job(job: dict) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from epsdpo.config import TrainConfig
    from epsdpo.trainer import Trainer
    from tiny import tiny_llama, toy_store

    if job.get("fault"):
        install_fault(job["fault"]["point"], int(job["fault"]["k"]), job["fault"].get("signals"))
    trainer = Trainer(tiny_llama(0), TrainConfig(**job["config"]), toy_store())
    state = trainer.train(resume_from_checkpoint=job.get("resume"))
    if job.get("result"):
        Path(job["result"]).write_text(json.dumps({
            "global_step": state.global_step,
            "log_history": state.log_history,
            "beta_history": np.asarray(trainer.kl.beta_history()).tolist(),
        }))


def _redirect(log: str | None) -> None:
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)


def serve() -> None:
    # the heavy imports, once; every job forks from here
    import epsdpo.trainer  # noqa: F401
    import torch
    from epsdpo.interrupt import TrainingInterrupted
    import transformers.models.llama.modeling_llama  # noqa: F401

    torch.set_num_threads(1)
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints must not corrupt the answers
    print(json.dumps({"ready": True}), file=protocol, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _redirect(job.get("log"))
                run_job(job)
                code = 0
            except TrainingInterrupted as stopped:
                print(stopped, file=sys.stderr)
                code = stopped.exit_code
            except BaseException:  # noqa: BLE001 - the job's failure is reported by its exit code and log
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        answer = {"code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                  "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}
        print(json.dumps(answer), file=protocol, flush=True)


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        serve()
    elif sys.argv[1:2] == ["run"] and len(sys.argv) == 3:
        run_job(json.loads(Path(sys.argv[2]).read_text()))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
