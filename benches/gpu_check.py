"""One-command check of epsdpo where users train: a GPU, in bf16 mixed precision.

    python benches/gpu_check.py                         # one CUDA GPU, stops by --deadline (540 s); writes docs/gpu_check.md
    python benches/gpu_check.py --device cpu --tiny     # the same checks at toy sizes (CI runs this form)

Sections, cheapest and most informative first; each writes docs/gpu_check.md and its JSON when it
ends, so a run that is killed, runs out of time or crashes keeps every section done before:

0. preflight: is there a C toolchain, and do a trivial Triton function and flex_attention compile
   (CUDA only; without them the flex rows are recorded as not run, with the reason);
1. the fused kernel against full logits (float64 oracle on the same operands), fp32 and bf16, at the
   vocabularies of Llama 3 (128,256) and Qwen2 (151,936): log-probs, gradients and peak memory;
2. packed == padded (and shared-prompt == padded) per-sequence log-probs and gradients on every
   attention path, with the calls to the kernel each row names counted: a row naming torch's varlen
   kernel or flex_attention fails when that kernel did not run (a row that cannot run on this
   machine says "not run" and why);
3. which attention path a bf16 mixed-precision training step takes (the trainer's own path);
4. bf16 mixed precision at lr 5e-7 moving the weights like fp32 (and the same update rounding away
   in bf16-stored weights, which shows the check can fail);
5. benches/train_compare.py with TRL and epsdpo in the same bf16 mixed precision, ~0.5B and ~1.5B
   random Qwen2 models: tokens/s, peak memory, MFU, the GPU targets (the × TRL rows need trl, from
   the `bench` extra; without it they are skipped with that reason).

Every row runs in its own try/except (the failure is recorded as its type and one line, and the run
moves on); past `--deadline` seconds the running section is stopped and the rest recorded as not run;
every subprocess has a timeout. Exit status 1 when a check failed or raised, else 3 when the deadline
left a chosen section unfinished; the speed targets are reported, not enforced.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

import train_compare  # noqa: E402  (benches/ is not a package)

# the page's hand-written verdict, under its title, survives a rerun (examples/report_page.py)
sys.path.insert(0, str(ROOT / "examples"))
from report_page import kept_verdict, with_verdict  # noqa: E402

import epsdpo  # noqa: E402
import epsdpo.attention as attention  # noqa: E402
from epsdpo.attention import use_segment_attention  # noqa: E402
from epsdpo.scoring import batch_logps  # noqa: E402
from epsdpo.ops import perturbed_logps  # noqa: E402

EPSILON = 0.01
# Tolerances: fp32 agrees to rounding; bf16 rounds the GEMM operands and is compared with the same
# rounded operands, so only accumulation order and the tile-wise log-sum-exp differ.
KERNEL_TOL = {"float32": 1e-3, "bfloat16": 2e-2}
GRAD_TOL = {"float32": 1e-4, "bfloat16": 2e-2}
# Packed vs padded (the same model, precision and tokens): relative to 1 + |log-prob| of a sequence
LAYOUT_TOL = {"float32": 1e-4, "bfloat16": 2e-2}
# One device command may run 10 minutes and a lent GPU gives 15 minutes in all, start-up included:
# 540 s leaves the run a minute to write its page inside one command.
DEFAULT_DEADLINE_S = 540.0
SUBPROCESS_MARGIN_S = 5.0  # a subprocess is stopped this long before the deadline, so its failure is recorded
TRL_INSTALL = "pip install 'epsdpo[bench]'"
VARLEN, FLEX = "varlen", "flex"
KERNEL_NAMES = {VARLEN: "torch varlen_attn", FLEX: "flex_attention"}
CUDA_ONLY = {VARLEN: "torch's varlen kernel runs on CUDA only", FLEX: "flex_attention has no CPU backward (CUDA only)"}


# --------------------------------------------------------------------------------------------------
# running checks so that none can lose the others


class DeadlineReached(Exception):
    """The run's --deadline passed (raised from SIGALRM in the middle of whatever was running)."""


@dataclass
class Context:
    """What every section reads: where it runs, at which sizes, and what earlier sections found."""

    device: torch.device
    spec: dict[str, Any]
    tiny: bool
    case_timeout: float
    deadline_at: float  # time.perf_counter() value
    flex_skip: str | None = None  # why the flex rows cannot run here (set by the preflight)
    progress: Callable[[dict[str, Any]], None] = lambda partial: None  # rewrites the page with the rows done so far

    def seconds_left(self) -> float:
        return self.deadline_at - time.perf_counter()


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    run: Callable[[Context], dict[str, Any]]
    render: Callable[[dict[str, Any]], list[str]]
    cpu_tiny_s: float | None  # measured wall time of `--device cpu --tiny` on 2 shared CPU cores
    gpu_estimate: str  # estimated wall time on one H100 at full size


def one_line(error: BaseException) -> str:
    """`Type: first line of the message`, as every failure is recorded."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def guarded(row: dict[str, Any], check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`row` updated with what `check` returns, or with its failure; a deadline still stops the run."""
    try:
        return {**row, **check()}
    except DeadlineReached:
        raise
    except Exception as error:  # noqa: BLE001  (any failure of one check is recorded and the run goes on)
        return {**row, "ok": False, "error": one_line(error)}


@contextmanager
def hard_deadline(deadline_at: float, deadline_s: float) -> Iterator[None]:
    """Raise DeadlineReached in the main thread when `deadline_at` (perf_counter) passes."""
    left = deadline_at - time.perf_counter()
    if left <= 0:
        raise DeadlineReached(f"the --deadline of {deadline_s:.0f} s had passed")

    def stop(signum: int, frame: Any) -> None:
        raise DeadlineReached(f"stopped at the --deadline of {deadline_s:.0f} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, left)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_subprocess(command: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `command`, killed with its whole process group when `timeout`
    passes or the run is interrupted (train_compare starts a process per case)."""
    if timeout <= 0:
        raise TimeoutError(f"no time left to start {Path(command[1]).name}")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise SubprocessTimeout(f"{Path(command[1]).name} timed out after {timeout:.0f} s", err) from None
    except BaseException:
        _kill_group(proc)
        proc.communicate()
        raise
    return proc.returncode, out, err


class SubprocessTimeout(TimeoutError):
    def __init__(self, message: str, stderr: str) -> None:
        super().__init__(message)
        self.stderr = stderr


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` whole: a run killed while writing leaves the previous complete page."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


# --------------------------------------------------------------------------------------------------
# sizes


def sizes(tiny: bool) -> dict[str, Any]:
    if tiny:
        return dict(vocabs=(1_000, 1_500), rows=64, hidden=32, layout_model=dict(hidden=32, layers=2, vocab=200),
                    layout_pairs=6, master_steps=8)
    return dict(vocabs=(128_256, 151_936), rows=2048, hidden=2048, layout_model=dict(hidden=256, layers=2, vocab=4096),
                layout_pairs=16, master_steps=8)


# --------------------------------------------------------------------------------------------------
# 0. preflight: flex/Triton compile


def c_toolchain() -> tuple[str | None, str | None]:
    """(C compiler, "Python.h") as Triton looks for them to build its launcher; None where missing.
    Names only: the page is committed, and paths would name the machine."""
    compiler = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return compiler, header.name if header.is_file() else None


def check_preflight(context: Context) -> dict[str, Any]:
    compiler, header = c_toolchain()
    result: dict[str, Any] = dict(compiler=compiler or "none found", python_header=header or "none found")
    if context.device.type != "cuda":
        result["skip"] = context.flex_skip = CUDA_ONLY[FLEX]
        return result
    missing = [what for what, found in (("a C compiler (cc, gcc or clang)", compiler),
                                        ("the Python headers (Python.h, e.g. the python3-dev package)", header))
               if not found]
    if missing:
        result["skip"] = context.flex_skip = f"no C toolchain: Triton needs {' and '.join(missing)}"
        return result
    try:
        from torch.nn.attention.flex_attention import flex_attention

        x = torch.randn(64, device=context.device)
        torch.compile(lambda t: t.sin() + 1)(x)
        q = torch.randn(1, 1, 128, 16, device=context.device, requires_grad=True)
        torch.compile(flex_attention)(q, q, q).sum().backward()
        torch.cuda.synchronize()
        result["compiled"] = "a Triton function and flex_attention (forward and backward)"
    except DeadlineReached:
        raise
    except Exception as error:  # noqa: BLE001
        result["skip"] = context.flex_skip = f"flex/Triton preflight compile failed: {one_line(error)}"
    return result


def render_preflight(result: dict[str, Any]) -> list[str]:
    lines = [f"C compiler: `{result['compiler']}`; Python headers: `{result['python_header']}`.", ""]
    if "compiled" in result:
        lines.append(f"Compiled: {result['compiled']}.")
    else:
        lines.append(f"The flex/Triton rows below are not run: {result['skip']}.")
    return lines + [""]


# --------------------------------------------------------------------------------------------------
# 1. kernel accuracy


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _oracle(hidden, weight, ref_hidden, ref_weight, labels, upstream):
    """Full-logits ε-DPO log-probs and gradients in float64 from the same operands."""
    h, w = hidden.double().detach().requires_grad_(), weight.double().detach().requires_grad_()
    f = h @ w.t()
    r = ref_hidden.double() @ ref_weight.double().t()

    def at(logits):
        return logits.log_softmax(-1).gather(1, labels[:, None]).squeeze(1)

    policy = at(f)
    (policy * upstream.double()).sum().backward()
    with torch.no_grad():
        out = [policy.detach(), at(r), at(f + EPSILON * (f - r)), at(f - EPSILON * (f - r))]
    return out, h.grad, w.grad


def kernel_row(device: torch.device, spec: dict[str, Any], vocab: int, dtype_name: str) -> dict[str, Any]:
    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device="cpu").manual_seed(vocab)
    n, h = spec["rows"], spec["hidden"]
    hidden = (torch.randn(n, h, generator=g)).to(device, dtype)
    weight = (torch.randn(vocab, h, generator=g) * (2.0 / h**0.5)).to(device, dtype)
    ref_hidden = (hidden.float() + 0.1 * torch.randn(n, h, generator=g).to(device)).to(dtype)
    ref_weight = (weight.float() + 0.01 * torch.randn(vocab, h, generator=g).to(device)).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=g).to(device)
    upstream = torch.randn(n, generator=g).to(device)
    hidden.requires_grad_()
    weight.requires_grad_()
    _reset_peak(device)
    got = perturbed_logps(hidden, weight, labels, ref_hidden, ref_weight, EPSILON)
    (got.policy * upstream).sum().backward()
    kernel_gb = _peak(device)
    _reset_peak(device)
    want, grad_h, grad_w = _oracle(hidden, weight, ref_hidden, ref_weight, labels, upstream)
    errors = {name: float((a.double() - b).abs().max()) for name, a, b in zip(
        ("policy", "reference", "relaxed", "tightened"), got, want)}
    grad_error = max(float((hidden.grad.double() - grad_h).norm() / grad_h.norm()),
                     float((weight.grad.double() - grad_w).norm() / grad_w.norm()))
    ok = max(errors.values()) <= KERNEL_TOL[dtype_name] and grad_error <= GRAD_TOL[dtype_name]
    return dict(max_logp_error=max(errors.values()), errors=errors, grad_rel_error=grad_error,
                kernel_peak_gb=kernel_gb, full_logits_gb=n * vocab * torch.finfo(dtype).bits / 8 / 1e9, ok=ok)


def check_kernel(context: Context) -> dict[str, Any]:
    spec = context.spec
    rows = []
    for vocab in spec["vocabs"]:
        for dtype_name in ("float32", "bfloat16"):
            row = dict(vocab=vocab, dtype=dtype_name, rows=spec["rows"], hidden=spec["hidden"])
            rows.append(guarded(row, lambda: kernel_row(context.device, spec, vocab, dtype_name)))
            context.progress(dict(rows=rows))
    return dict(rows=rows)


# --------------------------------------------------------------------------------------------------
# 2. packed == padded on every attention path, and which kernel each path ran


class KernelSpy:
    """Counts the calls epsdpo.attention makes to torch's varlen kernel and to flex_attention, and the
    `window_size` of each varlen call, by wrapping the two names it looks up at call time
    (`_varlen_attn`, which hands out the kernel, and `_flex_attention`). A row naming a kernel then
    knows whether that kernel ran instead of trusting the path's name; a renamed function fails the
    row (AttributeError) rather than letting it pass unwatched."""

    def __init__(self) -> None:
        self.calls = {VARLEN: 0, FLEX: 0}
        self.windows: list[tuple[int, ...]] = []

    @contextmanager
    def watching(self) -> Iterator[KernelSpy]:
        hand_out_kernel, flex = attention._varlen_attn, attention._flex_attention

        def counted_kernel() -> Callable[..., Any] | None:
            kernel = hand_out_kernel()
            if kernel is None:
                return None

            @functools.wraps(kernel)
            def counted(*args: Any, **kwargs: Any) -> Any:
                self.calls[VARLEN] += 1
                self.windows.append(tuple(kwargs.get("window_size", (-1, -1))))
                return kernel(*args, **kwargs)

            return counted

        @functools.wraps(flex)
        def counted_flex(*args: Any, **kwargs: Any) -> Any:
            self.calls[FLEX] += 1
            return flex(*args, **kwargs)

        attention._varlen_attn, attention._flex_attention = counted_kernel, counted_flex
        try:
            yield self
        finally:
            attention._varlen_attn, attention._flex_attention = hand_out_kernel, flex


def path_problems(expects: str | None, calls: dict[str, int], windows: Sequence[tuple[int, ...]],
                  window: int | None, longest_sequence: int) -> list[str]:
    """Why a row did not run the path it names (empty when it did). A row naming a kernel needs calls
    to it; a row naming none needs none; a sliding-window row on the varlen kernel needs every call to
    pass transformers' convention, (W − 1, 0), with sequences longer than W so the window cuts."""
    problems = []
    if expects is None:
        problems += [f"{KERNEL_NAMES[k]} ran {n} times on a path that names no kernel" for k, n in calls.items() if n]
    elif calls[expects] == 0:
        problems.append(f"{KERNEL_NAMES[expects]} ran 0 times: the path this row names did not run")
    if expects == VARLEN and window is not None:
        wanted = (window - 1, 0)
        other = sorted({w for w in windows if w != wanted})
        if other:
            problems.append(f"varlen window_size {other}, not ({window} − 1, 0) = {wanted}")
        if longest_sequence <= window:
            problems.append(f"no sequence is longer than the window of {window} tokens ({longest_sequence})")
    return problems


@contextmanager
def _without_varlen_kernel() -> Iterator[None]:
    """Force segment attention's per-segment sdpa loop instead of torch's varlen kernel."""
    saved = attention._varlen_attn
    attention._varlen_attn = lambda: None
    try:
        yield
    finally:
        attention._varlen_attn = saved


@contextmanager
def _without_flex() -> Iterator[None]:
    import epsdpo.scoring as scoring

    saved = scoring.flex_attention_available
    scoring.flex_attention_available = lambda device: False
    try:
        yield
    finally:
        scoring.flex_attention_available = saved


def _layout_model(spec: dict[str, Any], device: torch.device, attn: str, window: int | None = None):
    """A random Llama, or with `window` a Mistral attending through a sliding window of that many
    tokens (shorter than the sequences, so the window's convention matters)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    m = spec["layout_model"]
    shape = dict(vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=2 * m["hidden"],
                 num_hidden_layers=m["layers"], num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=1024)
    config = LlamaConfig(**shape) if window is None else MistralConfig(**shape, sliding_window=window)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).to(device)
    if attn == "sdpa":
        use_segment_attention(model)
    return model


def _layout_store(spec: dict[str, Any]):
    import numpy as np

    rng = np.random.default_rng(1)
    vocab = spec["layout_model"]["vocab"]
    store = epsdpo.PreferenceStore(vocab_size=vocab)
    for _ in range(spec["layout_pairs"]):
        store.add_pair(*(rng.integers(3, vocab, rng.integers(lo, hi)).tolist() for lo, hi in ((4, 40), (2, 30), (2, 30))))
    return store


def _score(model, reference, batch, precision: str):
    model.zero_grad(set_to_none=True)
    with torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        seq = batch_logps(model, reference, batch, EPSILON)
    seq.policy.sum().backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return seq.policy.detach().double(), grad.double()


@dataclass(frozen=True)
class AttentionPath:
    name: str
    attn: str  # attn_implementation
    layouts: tuple[str, ...]  # compared with padded
    forcing: Callable[[], Any] = nullcontext  # a context that makes the model take this path
    window: int | None = None  # sliding window, or None
    expects: str | None = None  # the kernel this path runs (VARLEN, FLEX), None for none
    precisions: tuple[str, ...] = ("float32", "bfloat16")
    not_run: str | None = None  # why this machine cannot run the path


def attention_paths(device: torch.device, flex_skip: str | None) -> list[AttentionPath]:
    """Every path, the ones this machine cannot run included (recorded as not run, with the reason).
    The varlen kernel runs in half precision only, so its rows are bf16 autocast over fp32 weights:
    the normal mixed-precision mode."""
    cuda = device.type == "cuda"
    no_varlen = (None if cuda and attention._varlen_attn() is not None else
                 CUDA_ONLY[VARLEN] if not cuda else "this torch has no varlen_attn with window_size and enable_gqa")
    no_flash = None if cuda and importlib.util.find_spec("flash_attn") is not None else (
        "flash-attention runs on CUDA only" if not cuda else "flash_attn is not installed")
    return [
        AttentionPath("segment sdpa (per-segment loop)", "sdpa", ("packed",), _without_varlen_kernel),
        AttentionPath("segment sdpa (per-segment loop), sliding window 6", "sdpa", ("packed",), _without_varlen_kernel,
                      window=6),
        AttentionPath("torch varlen_attn", "sdpa", ("packed",), expects=VARLEN, precisions=("bfloat16",),
                      not_run=no_varlen),
        AttentionPath("torch varlen_attn, sliding window 6", "sdpa", ("packed",), window=6, expects=VARLEN,
                      precisions=("bfloat16",), not_run=no_varlen),
        AttentionPath("4-D mask (shared prompt)", "sdpa", ("shared_prompt",), _without_flex),
        AttentionPath("flex_attention (shared prompt)", "sdpa", ("shared_prompt",), expects=FLEX,
                      not_run=flex_skip if cuda else CUDA_ONLY[FLEX]),
        AttentionPath("flash_attention_2 varlen", "flash_attention_2", ("packed",), precisions=("bfloat16",),
                      not_run=no_flash),
    ]


def layout_rows(path: AttentionPath, device: torch.device, spec: dict[str, Any], precision: str,
                store: Any) -> list[dict[str, Any]]:
    """One path in one precision: each of its layouts against padded, with the kernel calls counted."""
    import numpy as np

    index = np.arange(len(store), dtype=np.uint32)
    model = _layout_model(spec, device, path.attn, path.window)
    reference = _layout_model(spec, device, path.attn, path.window).requires_grad_(False).eval()
    padded = epsdpo.Collator("padded")(store, index)
    longest_sequence = int((np.asarray(padded["segment_ids"]) >= 0).sum(1).max())
    rows = []
    with path.forcing():
        want, want_grad = _score(model, reference, padded, precision)
        for layout in path.layouts:
            spy = KernelSpy()
            with spy.watching():
                got, got_grad = _score(model, reference, epsdpo.Collator(layout, capacity=256)(store, index), precision)
            error = float(((got - want).abs() / (1 + want.abs())).max())
            grad_error = float((got_grad - want_grad).norm() / want_grad.norm())
            tol = LAYOUT_TOL[precision]
            problems = path_problems(path.expects, spy.calls, spy.windows, path.window, longest_sequence)
            rows.append(dict(layout=layout, logp_rel_error=error, grad_rel_error=grad_error, calls=dict(spy.calls),
                             windows=sorted(set(spy.windows)), problems=problems,
                             ok=error <= tol and grad_error <= 10 * tol and not problems))
    return rows


def check_layouts(context: Context, paths: Sequence[AttentionPath] | None = None) -> dict[str, Any]:
    device, spec = context.device, context.spec
    store = _layout_store(spec)
    precisions = ("float32", "bfloat16") if device.type == "cuda" else ("float32",)
    rows: list[dict[str, Any]] = []
    for path in paths if paths is not None else attention_paths(device, context.flex_skip):
        if path.not_run:
            rows.append(dict(path=path.name, layout=", ".join(path.layouts), precision=", ".join(path.precisions),
                             expects=path.expects, not_run=path.not_run))
            continue
        for precision in (p for p in path.precisions if p in precisions):
            base = dict(path=path.name, layout=", ".join(path.layouts), precision=precision, expects=path.expects)
            found = guarded(base, lambda: {"rows": layout_rows(path, device, spec, precision, store)})
            rows += [{**base, **row} for row in found.pop("rows", [])] or [found]
            context.progress(dict(rows=rows))
    return dict(rows=rows)


def _calls(row: dict[str, Any]) -> str:
    calls = row.get("calls")
    if calls is None:
        return "–"
    text = f"varlen {calls[VARLEN]}, flex {calls[FLEX]}"
    return text + "".join(f"; window {tuple(w)}" for w in row.get("windows", []) if tuple(w) != (-1, 0))


def render_layouts(result: dict[str, Any]) -> list[str]:
    lines = ["Per-sequence policy log-probs and the parameter gradient of a batch in each layout, against the padded "
             "layout on the same path and precision (log-prob error relative to 1 + |log-prob|). `kernel calls` "
             "counts the calls epsdpo.attention made to torch's varlen kernel and to flex_attention during the row: "
             "a row naming a kernel fails when it did not run, a row naming none fails when one did.", "",
             "| path | layout vs padded | compute | kernel calls | log-prob rel. error | grad rel. error | |",
             "|---|---|---|---|---:|---:|---|"]
    for r in result["rows"]:
        if "not_run" in r:
            lines.append(f"| {r['path']} | {r['layout']} | {r['precision']} | – | – | – | not run: {r['not_run']} |")
            continue
        lines.append(f"| {r['path']} | {r['layout']} | {r['precision']} | {_calls(r)} | {_e(r.get('logp_rel_error'))} | "
                     f"{_e(r.get('grad_rel_error'))} | {_verdict(r)} |")
    return lines + [""]


# --------------------------------------------------------------------------------------------------
# 3. which attention path a training step takes


def _train(workdir: Path, device: torch.device, steps: int, **config: Any) -> Any:
    from tiny import tiny_llama, toy_store

    from epsdpo.config import TrainConfig
    from epsdpo.trainer import Trainer

    settings = dict(output_dir=str(workdir), learning_rate=5e-7, per_device_train_batch_size=8, max_steps=steps,
                    warmup_ratio=0.0, lr_scheduler_type="constant", max_length=32, max_prompt_length=16,
                    progress=False, plots=False, report_to="none", seed=3, device=str(device))
    trainer = Trainer(tiny_llama(0), TrainConfig(**{**settings, **config}), toy_store())
    trainer.train()
    return trainer


def check_training_path(context: Context) -> dict[str, Any]:
    """One epsdpo.Trainer step with bf16=True (autocast over fp32 master weights, the normal mode) per
    layout, counting the kernel calls: the path a user's run takes, not one set up by hand."""
    rows = []
    for layout, expects in (("packed", VARLEN), ("shared_prompt", FLEX)):
        base = dict(layout=layout, expects=expects)
        if context.device.type != "cuda":
            rows.append({**base, "not_run": CUDA_ONLY[expects]})
            continue
        if expects == FLEX and context.flex_skip:
            rows.append({**base, "not_run": context.flex_skip})
            continue

        def step() -> dict[str, Any]:
            spy = KernelSpy()
            with tempfile.TemporaryDirectory() as tmp, spy.watching():
                _train(Path(tmp), context.device, 1, bf16=True, layout=layout)
            problems = path_problems(expects, spy.calls, spy.windows, None, 0)
            return dict(calls=dict(spy.calls), problems=problems, ok=not problems)

        rows.append(guarded(base, step))
        context.progress(dict(rows=rows))
    return dict(rows=rows)


def render_training_path(result: dict[str, Any]) -> list[str]:
    lines = ["One `epsdpo.Trainer` step of a tiny Llama with `bf16=True` (autocast over fp32 master weights) per "
             "layout, counting the calls to the kernel that layout should reach on a GPU.", "",
             "| layout | should run | kernel calls | |", "|---|---|---|---|"]
    for r in result["rows"]:
        verdict = f"not run: {r['not_run']}" if "not_run" in r else _verdict(r)
        lines.append(f"| {r['layout']} | {KERNEL_NAMES[r['expects']]} | {_calls(r)} | {verdict} |")
    return lines + [""]


# --------------------------------------------------------------------------------------------------
# 4. mixed precision moves the weights


def check_master_weights(context: Context) -> dict[str, Any]:
    def update(workdir: Path, **precision: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from tiny import tiny_llama

        initial = torch.cat([p.detach().double().flatten().clone() for p in tiny_llama(0).parameters()])
        trainer = _train(workdir, context.device, context.spec["master_steps"], **precision)
        final = torch.cat([p.detach().double().cpu().flatten() for p in trainer.model.parameters()])
        return initial, final - initial

    with tempfile.TemporaryDirectory() as tmp:
        initial, fp32 = update(Path(tmp) / "fp32")
        _, bf16 = update(Path(tmp) / "bf16", bf16=True)
    stored = initial.to(torch.bfloat16)
    row = dict(
        moved_fp32=float((fp32 != 0).double().mean()), moved_bf16_mixed=float((bf16 != 0).double().mean()),
        cosine=float(torch.nn.functional.cosine_similarity(bf16, fp32, dim=0)),
        kept_if_bf16_stored=float(((stored + fp32.to(torch.bfloat16)) != stored).double().mean()),
        steps=context.spec["master_steps"],
    )
    row["ok"] = row["moved_bf16_mixed"] > 0.95 and row["cosine"] > 0.9 and row["kept_if_bf16_stored"] < 0.2
    return dict(rows=[row])


def render_master(result: dict[str, Any]) -> list[str]:
    m = result["rows"][0]
    return [f"A tiny Llama, {m['steps']} steps at lr 5e-7, fp32 vs `bf16=True` (autocast over fp32 master weights).", "",
            "| weights moved, fp32 | weights moved, bf16 mixed | cosine(bf16 update, fp32 update) | "
            "fp32 update kept by bf16-stored weights | |",
            "|---:|---:|---:|---:|---|",
            f"| {m['moved_fp32']:.3f} | {m['moved_bf16_mixed']:.3f} | {m['cosine']:.4f} | {m['kept_if_bf16_stored']:.3f} | "
            f"{_verdict(m)} |", "",
            "The last column shows what pure bf16 training would keep of the same update: the check can fail.", ""]


# --------------------------------------------------------------------------------------------------
# 5. training side by side


def compare_args(tiny: bool, with_trl: bool) -> list[list[str]]:
    """train_compare's arguments per run; the TRL case only where trl is importable."""
    trl = ["trl"] if with_trl else []
    if tiny:
        return [["--config", "tiny", "--device", "cpu", "--vocab", "512", "--hidden", "64", "--intermediate", "128",
                 "--steps", "2", "--pairs", "32", "--precision", "bf16", "--cases", ",".join(trl + ["dpo_packed", "eps_packed"])]]
    return [["--config", "gpu", "--cases", ",".join(trl + ["dpo", "eps_padded", "dpo_packed", "eps_packed"])],
            ["--config", "gpu_1p5b", "--cases", ",".join(trl + ["dpo_packed", "eps_packed"])]]


def trl_missing() -> str | None:
    return None if importlib.util.find_spec("trl") else f"the × TRL rows are not run: trl is not installed ({TRL_INSTALL})"


def compare_run(run: int) -> Callable[[Context], dict[str, Any]]:
    def check(context: Context) -> dict[str, Any]:
        skip_trl = trl_missing()
        args = compare_args(context.tiny, skip_trl is None)[run]
        result: dict[str, Any] = dict(args=args, trl_skipped=skip_trl)
        left = context.seconds_left() - SUBPROCESS_MARGIN_S
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            command = [sys.executable, str(ROOT / "benches" / "train_compare.py"), *args, "--no-docs", "--json", str(out),
                       "--case-timeout", f"{min(context.case_timeout, max(left, 1.0)):.0f}"]
            print("$", shlex.join(command[1:]), file=sys.stderr, flush=True)
            try:
                code, _, stderr = run_subprocess(command, left)
            except SubprocessTimeout as timeout:
                return {**result, "ok": False, "error": one_line(timeout), "stderr": timeout.stderr[-3000:]}
            if code != 0 or not out.exists():
                return {**result, "ok": False, "error": f"train_compare.py exited with code {code}",
                        "stderr": stderr[-3000:]}
            entry = json.loads(out.read_text())
        # train_compare's temporary files and its --json path are gone with the run: keep no paths
        entry.pop("command", None)
        for key in ("store", "order"):
            entry["data"].pop(key, None)
        failed = [r["case"] for r in entry["results"] if "error" in r]
        return {**result, **entry, "ok": not failed, **({"error": f"cases failed: {', '.join(failed)}"} if failed else {})}

    return check


def render_compare(result: dict[str, Any]) -> list[str]:
    shown = shlex.join(result["args"])  # the temporary --json path is left out
    lines = [f"`python benches/train_compare.py {shown}`", ""]
    if result.get("trl_skipped"):
        lines += [result["trl_skipped"][0].upper() + result["trl_skipped"][1:] + ".", ""]
    if "results" not in result:
        return lines + [f"**FAIL** ({result.get('error', 'no result')}):", "", "```", result.get("stderr", ""), "```", ""]
    return lines + [train_compare.config_table(result["spec"], result["data"], result["results"]), "",
                    train_compare.table(result["results"], result["spec"]["device"]), "",
                    train_compare.verdict(result["results"], result["spec"]), ""]


# --------------------------------------------------------------------------------------------------
# the sections, in the order they run


def sections(tiny: bool) -> list[Section]:
    """Cheapest and most informative first; the timings, which take most of the time, last."""
    runs = [Section("compare", "Training side by side, same precision (~0.5B Qwen2)" if not tiny else
                    "Training side by side, same precision", compare_run(0), render_compare, CPU_TINY_S["compare"],
                    "~4 min (15 s clock warm-up, one untimed case, then 5 cases)")]
    if not tiny:
        runs.append(Section("compare_1p5b", "Training side by side, same precision (~1.5B Qwen2)", compare_run(1),
                            render_compare, None, "~3 min (3 cases)"))
    return [
        Section("preflight", "Preflight: flex/Triton compile", check_preflight, render_preflight, CPU_TINY_S["preflight"],
                "~30 s (compiles flex forward and backward)"),
        Section("kernel", "Fused kernel vs full logits", check_kernel, render_kernel, CPU_TINY_S["kernel"], "~10 s"),
        Section("layouts", "Packed == padded on each attention path, kernel calls counted", check_layouts,
                render_layouts, CPU_TINY_S["layouts"], "~1 min (flex compiles once per shape)"),
        Section("training_path", "Which attention path a bf16 training step takes", check_training_path,
                render_training_path, CPU_TINY_S["training_path"], "~30 s"),
        Section("master", "bf16 mixed precision moves the weights", check_master_weights, render_master,
                CPU_TINY_S["master"], "~15 s"),
        *runs,
    ]


# Measured: `python benches/gpu_check.py --device cpu --tiny` on 2 CPU cores shared with other work
# (3.6 min in all; train_compare starts a process per case, each importing torch, transformers and TRL)
CPU_TINY_S = {"preflight": 1, "kernel": 4, "layouts": 17, "training_path": 0, "master": 19, "compare": 162}


# --------------------------------------------------------------------------------------------------
# report


def _machine(device: torch.device) -> str:
    parts = [f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"]
    if device.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
    import transformers

    parts.append(f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
                 f"{transformers.__version__}, epsdpo {epsdpo.__version__}")
    return "; ".join(parts)


def _gb(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _e(x: float | None) -> str:
    return "–" if x is None else f"{x:.1e}"


def _verdict(row: dict[str, Any]) -> str:
    if "not_run" in row:
        return f"not run: {row['not_run']}"
    if row.get("ok"):
        return "pass"
    why = [row["error"]] if "error" in row else []
    why += row.get("problems", [])
    return "**FAIL**" + (f" ({'; '.join(why)})" if why else "")


def render_kernel(result: dict[str, Any]) -> list[str]:
    lines = [f"Per-token log-probs (policy, reference, relaxed, tightened at ε = {EPSILON}) and the policy gradient, "
             "against a float64 full-logits oracle on the same operands.", "",
             "| vocab | dtype | rows × hidden | max log-prob error | grad rel. error | kernel peak (GB) | one full logits tensor (GB) | |",
             "|---:|---|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['vocab']:,} | {r['dtype']} | {r['rows']} × {r['hidden']} | {_e(r.get('max_logp_error'))} | "
                     f"{_e(r.get('grad_rel_error'))} | {_gb(r.get('kernel_peak_gb'))} | {_gb(r.get('full_logits_gb'))} | "
                     f"{_verdict(r)} |")
    return lines + [""]


def failed_checks(record: dict[str, Any]) -> list[str]:
    """The rows (or the whole section) of one section's record that failed or raised."""
    if record["status"] == "failed":
        return [record["error"]]
    return [_verdict(r) for r in record.get("result", {}).get("rows", [record.get("result", {})]) if r.get("ok") is False]


def report(run: dict[str, Any], plan: Sequence[Section], device: torch.device) -> str:
    records = run["sections"]
    lines = ["# GPU check", "",
             "Generated by `benches/gpu_check.py` (do not edit by hand); rewritten after every section, so a run that "
             "was stopped shows what it finished.", "",
             f"Command (from the repository root): `{run['command']}`", "",
             f"Machine: {_machine(device)}. Run on {run['date']}, {run['wall_s'] / 60:.1f} min "
             f"{'in all' if run['finished'] else 'so far'}, "
             f"deadline {run['deadline_s']:.0f} s.", ""]
    if run["tiny"]:
        lines += ["**Toy sizes** (`--tiny`): this run proves the script works; its figures say nothing about GPUs.", ""]
    lines += ["| section | status | this run (s) | CPU `--tiny`, measured (s) | one H100, estimated |", "|---|---|---:|---:|---|"]
    for number, section in enumerate(plan):
        record = records[section.key]
        wall = record.get("wall_s")
        lines.append(f"| {number}. {section.title} | {_status(record)} | {'–' if wall is None else f'{wall:.0f}'} | "
                     f"{'–' if section.cpu_tiny_s is None else f'{section.cpu_tiny_s:.0f}'} | {section.gpu_estimate} |")
    lines.append("")
    for number, section in enumerate(plan):
        record = records[section.key]
        lines += [f"## {number}. {section.title}", ""]
        if record.get("result"):  # a stopped section keeps the rows it finished
            lines += section.render(record["result"])
        if record["status"] != "done":
            lines += [_status(record) + ".", ""]
    failed = [f"{section.key} ({'; '.join(failed_checks(records[section.key]))})" for section in plan
              if failed_checks(records[section.key])]
    unfinished = [s.key for s in plan if records[s.key]["status"] in ("not run", "running")]
    lines += ["## Summary", "", "Checks: " + (f"**failed: {', '.join(failed)}**." if failed else "none failed.")
              + (f" Not run: {', '.join(unfinished)}." if unfinished else " Every section ran."), ""]
    return "\n".join(lines)


def _status(record: dict[str, Any]) -> str:
    status = record["status"]
    if status == "failed":
        return f"**FAIL** ({record['error']})"
    if status == "not run":
        return f"not run: {record['reason']}"
    if status == "running":
        return "running (the run stopped before this section ended)"
    return "**FAIL**" if failed_checks(record) else "done"


# --------------------------------------------------------------------------------------------------
# the run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (minutes on CPU); CI runs this form")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "gpu_check.md")
    parser.add_argument("--sections", help="comma list of the sections to run (default: all); the rest are "
                                           "recorded as not run")
    parser.add_argument("--skip-compare", action="store_true", help="leave out the train_compare sections")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S,
                        help=f"seconds after which the running section is stopped and the rest recorded as not run "
                             f"(default {DEFAULT_DEADLINE_S:.0f}: inside one 10-minute device command and the "
                             "15-minute device budget, start-up included)")
    parser.add_argument("--case-timeout", type=float, default=150.0, help="seconds per train_compare case")
    args = parser.parse_args(argv)
    if args.deadline <= 0:
        parser.error("--deadline must be a positive number of seconds")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible (use --device cpu --tiny for the toy form)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "tests"))  # tiny random models
    device = torch.device(args.device)
    plan = sections(args.tiny)
    chosen = set(args.sections.split(",")) if args.sections else {s.key for s in plan}
    unknown = chosen - {s.key for s in plan}
    if unknown:
        print(f"--sections: no section {', '.join(sorted(unknown))} (sections: {', '.join(s.key for s in plan)})",
              file=sys.stderr)
        return 2
    if args.skip_compare:
        chosen -= {s.key for s in plan if s.key.startswith("compare")}
    started = time.perf_counter()
    context = Context(device=device, spec=sizes(args.tiny), tiny=args.tiny, case_timeout=args.case_timeout,
                      deadline_at=started + args.deadline)
    run: dict[str, Any] = dict(command="python benches/gpu_check.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                               tiny=args.tiny, device=args.device, deadline_s=args.deadline,
                               date=time.strftime("%Y-%m-%d"), wall_s=0.0, finished=False,
                               sections={s.key: dict(status="not run", reason="not reached") for s in plan})

    verdict = kept_verdict(args.out.read_text()) if args.out.is_file() else ""

    def save() -> None:
        run["wall_s"] = time.perf_counter() - started
        write_atomically(args.out, with_verdict(report(run, plan, device), verdict))
        write_atomically(args.out.with_suffix(".json"), json.dumps(run, indent=1, default=str))

    for section in plan:
        record = run["sections"][section.key]
        if section.key not in chosen:
            record.update(reason="not selected (--sections / --skip-compare)")
            continue
        if context.seconds_left() <= 0:
            record.update(reason=f"the --deadline of {args.deadline:.0f} s had passed")
            continue
        print(f"[{section.key}] ...", file=sys.stderr, flush=True)
        section_started = time.perf_counter()
        record.clear()
        record.update(status="running")

        def progress(partial: dict[str, Any]) -> None:
            record["result"] = partial
            record["wall_s"] = time.perf_counter() - section_started
            save()

        context.progress = progress
        save()
        try:
            with hard_deadline(context.deadline_at, args.deadline):
                record["result"] = section.run(context)
            record["status"] = "done"
        except DeadlineReached as stop:
            record.update(status="not run", reason=str(stop))
        except Exception as error:  # noqa: BLE001  (one section's failure must not lose the others)
            record.update(status="failed", error=one_line(error))
        if not record.get("result"):
            record.pop("result", None)
        record["wall_s"] = time.perf_counter() - section_started
        save()
        print(f"[{section.key}] {_status(record)} ({record['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    context.progress = lambda partial: None
    run["finished"] = True
    save()
    print(args.out.read_text())
    if any(failed_checks(run["sections"][s.key]) for s in plan):
        return 1
    stopped = [s.key for s in plan if s.key in chosen and run["sections"][s.key]["status"] != "done"]
    return 3 if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
