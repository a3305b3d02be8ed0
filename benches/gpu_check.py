"""One-command check of epsdpo where users train: a GPU, in bf16 mixed precision.

    python benches/gpu_check.py                         # one CUDA GPU, at most ~8 minutes; writes docs/gpu_check.md
    python benches/gpu_check.py --device cpu --tiny     # the same checks at toy sizes (CI runs this form)

It checks, and writes every figure with the command and the machine:

1. the fused kernel against full logits (float64 oracle on the same operands), fp32 and bf16, at the
   vocabularies of Llama 3 (128,256) and Qwen2 (151,936): log-probs, gradients and peak memory;
2. packed == padded (and shared-prompt == padded) per-sequence log-probs and gradients on every
   attention path this machine can run: segment-wise sdpa, torch's varlen kernel, flex_attention,
   flash-attention when installed;
3. bf16 mixed precision at lr 5e-7 moving the weights like fp32 (and the same update rounding away
   in bf16-stored weights, which shows the check can fail);
4. benches/train_compare.py with TRL and epsdpo in the same bf16 mixed precision, ~0.5B and ~1.5B
   random Qwen2 models: tokens/s, peak memory, MFU, the GPU targets.

Exit status 1 when a correctness check (1–3) fails; the speed targets are reported, not enforced.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

import train_compare  # noqa: E402  (benches/ is not a package)

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


# --------------------------------------------------------------------------------------------------
# sizes


def sizes(tiny: bool) -> dict[str, Any]:
    if tiny:
        return dict(vocabs=(1_000, 1_500), rows=64, hidden=32, layout_model=dict(hidden=32, layers=2, vocab=200),
                    layout_pairs=6, master_steps=8)
    return dict(vocabs=(128_256, 151_936), rows=2048, hidden=2048, layout_model=dict(hidden=256, layers=2, vocab=4096),
                layout_pairs=16, master_steps=8)


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


def check_kernel(device: torch.device, spec: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for vocab in spec["vocabs"]:
        for dtype_name in ("float32", "bfloat16"):
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
            rows.append(dict(vocab=vocab, dtype=dtype_name, rows=n, hidden=h, max_logp_error=max(errors.values()),
                             errors=errors, grad_rel_error=grad_error, kernel_peak_gb=kernel_gb,
                             full_logits_gb=n * vocab * torch.finfo(dtype).bits / 8 / 1e9, ok=ok))
            del hidden, weight, ref_hidden, ref_weight, got, want, grad_h, grad_w
    return rows


# --------------------------------------------------------------------------------------------------
# 2. packed == padded on every attention path


@contextmanager
def _without_varlen_kernel():
    """Force segment attention's per-segment sdpa loop instead of torch's varlen kernel."""
    saved = attention._varlen_attn
    attention._varlen_attn = lambda: None
    try:
        yield
    finally:
        attention._varlen_attn = saved


@contextmanager
def _without_flex():
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


def _paths(device: torch.device) -> list[tuple[str, str, list[str], Any, int | None]]:
    """(path name, attn_implementation, layouts compared with padded, context forcing the path,
    sliding window or None)."""
    from contextlib import nullcontext

    paths = [("segment sdpa (per-segment loop)", "sdpa", ["packed"], _without_varlen_kernel, None),
             ("segment sdpa (per-segment loop), sliding window 6", "sdpa", ["packed"], _without_varlen_kernel, 6)]
    if device.type == "cuda" and attention._varlen_attn() is not None:
        paths.append(("torch varlen_attn", "sdpa", ["packed"], nullcontext, None))
        paths.append(("torch varlen_attn, sliding window 6", "sdpa", ["packed"], nullcontext, 6))
    if attention.flex_attention_available(device):
        paths.append(("flex_attention (shared prompt)", "sdpa", ["shared_prompt"], nullcontext, None))
    else:
        paths.append(("4-D mask (shared prompt)", "sdpa", ["shared_prompt"], _without_flex, None))
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        paths.append(("flash_attention_2 varlen", "flash_attention_2", ["packed"], nullcontext, None))
    return paths


def check_layouts(device: torch.device, spec: dict[str, Any]) -> list[dict[str, Any]]:
    import numpy as np

    store = _layout_store(spec)
    index = np.arange(len(store), dtype=np.uint32)
    rows = []
    precisions = ["float32", "bfloat16"] if device.type == "cuda" else ["float32"]
    for name, attn, layouts, forcing, window in _paths(device):
        for precision in precisions:
            if "varlen" in name and precision == "float32":
                continue  # the varlen kernels run in half precision only
            model = _layout_model(spec, device, attn, window)
            reference = _layout_model(spec, device, attn, window).requires_grad_(False).eval()
            with forcing():
                want, want_grad = _score(model, reference, epsdpo.Collator("padded")(store, index), precision)
                for layout in layouts:
                    got, got_grad = _score(model, reference, epsdpo.Collator(layout, capacity=256)(store, index),
                                           precision)
                    error = float(((got - want).abs() / (1 + want.abs())).max())
                    grad_error = float((got_grad - want_grad).norm() / want_grad.norm())
                    tol = LAYOUT_TOL[precision]
                    rows.append(dict(path=name, layout=layout, precision=precision, logp_rel_error=error,
                                     grad_rel_error=grad_error, ok=error <= tol and grad_error <= 10 * tol))
    return rows


# --------------------------------------------------------------------------------------------------
# 3. mixed precision moves the weights


def check_master_weights(device: torch.device, spec: dict[str, Any]) -> dict[str, Any]:
    from tiny import tiny_llama, toy_store

    from epsdpo.config import TrainConfig
    from epsdpo.trainer import Trainer

    def update(workdir: Path, **precision: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model = tiny_llama(0)
        initial = torch.cat([p.detach().double().flatten().clone() for p in model.parameters()])
        config = TrainConfig(output_dir=str(workdir), learning_rate=5e-7, per_device_train_batch_size=8,
                             max_steps=spec["master_steps"], warmup_ratio=0.0, lr_scheduler_type="constant",
                             max_length=32, max_prompt_length=16, progress=False, plots=False, report_to="none",
                             seed=3, device=str(device), **precision)
        trainer = Trainer(model, config, toy_store())
        trainer.train()
        final = torch.cat([p.detach().double().cpu().flatten() for p in trainer.model.parameters()])
        return initial, final - initial

    with tempfile.TemporaryDirectory() as tmp:
        initial, fp32 = update(Path(tmp) / "fp32")
        _, bf16 = update(Path(tmp) / "bf16", bf16=True)
    stored = initial.to(torch.bfloat16)
    result = dict(
        moved_fp32=float((fp32 != 0).double().mean()), moved_bf16_mixed=float((bf16 != 0).double().mean()),
        cosine=float(torch.nn.functional.cosine_similarity(bf16, fp32, dim=0)),
        kept_if_bf16_stored=float(((stored + fp32.to(torch.bfloat16)) != stored).double().mean()),
        steps=spec["master_steps"],
    )
    result["ok"] = result["moved_bf16_mixed"] > 0.95 and result["cosine"] > 0.9 and result["kept_if_bf16_stored"] < 0.2
    return result


# --------------------------------------------------------------------------------------------------
# 4. training side by side


def compare_runs(device: torch.device, tiny: bool, timeout: float) -> list[dict[str, Any]]:
    if tiny:
        cases = ",".join((["trl"] if importlib.util.find_spec("trl") else []) + ["dpo_packed", "eps_packed"])
        runs = [["--config", "tiny", "--device", "cpu", "--vocab", "512", "--hidden", "64", "--intermediate", "128",
                 "--steps", "2", "--pairs", "32", "--precision", "bf16", "--cases", cases]]
    else:
        runs = [["--config", "gpu", "--cases", "trl,dpo,eps_padded,dpo_packed,eps_packed"],
                ["--config", "gpu_1p5b", "--cases", "trl,dpo_packed,eps_packed"]]
    entries = []
    for args in runs:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            command = [sys.executable, str(ROOT / "benches" / "train_compare.py"), *args, "--no-docs", "--json", str(out),
                       "--case-timeout", str(timeout)]
            print("$", shlex.join(command[1:]), file=sys.stderr, flush=True)
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0 or not out.exists():
                entries.append(dict(args=args, error=f"exit code {done.returncode}", stderr=done.stderr[-3000:]))
                continue
            entry = json.loads(out.read_text())
            entry["args"] = args
            entries.append(entry)
    return entries


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


def _mark(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


def report(command: str, device: torch.device, results: dict[str, Any], wall_s: float) -> str:
    lines = ["# GPU check", "",
             "Generated by `benches/gpu_check.py` (do not edit by hand).", "",
             f"Command (from the repository root): `{command}`", "",
             f"Machine: {_machine(device)}. Run on {time.strftime('%Y-%m-%d')}, {wall_s / 60:.1f} min in all.", ""]
    if results["tiny"]:
        lines += ["**Toy sizes** (`--tiny`): this run proves the script works; its figures say nothing about GPUs.", ""]
    lines += ["## 1. Fused kernel vs full logits", "",
              f"Per-token log-probs (policy, reference, relaxed, tightened at ε = {EPSILON}) and the policy gradient, "
              "against a float64 full-logits oracle on the same operands.", "",
              "| vocab | dtype | rows × hidden | max log-prob error | grad rel. error | kernel peak (GB) | one full logits tensor (GB) | |",
              "|---:|---|---|---:|---:|---:|---:|---|"]
    for r in results["kernel"]:
        lines.append(f"| {r['vocab']:,} | {r['dtype']} | {r['rows']} × {r['hidden']} | {r['max_logp_error']:.1e} | "
                     f"{r['grad_rel_error']:.1e} | {_gb(r['kernel_peak_gb'])} | {r['full_logits_gb']:.2f} | {_mark(r['ok'])} |")
    lines += ["", "## 2. Packed == padded on each attention path", "",
              "Per-sequence policy log-probs and the parameter gradient of a batch in each layout, against the padded "
              "layout on the same path and precision (log-prob error relative to 1 + |log-prob|).", "",
              "| path | layout vs padded | compute | log-prob rel. error | grad rel. error | |",
              "|---|---|---|---:|---:|---|"]
    for r in results["layouts"]:
        lines.append(f"| {r['path']} | {r['layout']} | {r['precision']} | {r['logp_rel_error']:.1e} | "
                     f"{r['grad_rel_error']:.1e} | {_mark(r['ok'])} |")
    m = results["master"]
    lines += ["", "## 3. bf16 mixed precision moves the weights", "",
              f"A tiny Llama, {m['steps']} steps at lr 5e-7, fp32 vs `bf16=True` (autocast over fp32 master weights).", "",
              "| weights moved, fp32 | weights moved, bf16 mixed | cosine(bf16 update, fp32 update) | "
              "fp32 update kept by bf16-stored weights | |",
              "|---:|---:|---:|---:|---|",
              f"| {m['moved_fp32']:.3f} | {m['moved_bf16_mixed']:.3f} | {m['cosine']:.4f} | {m['kept_if_bf16_stored']:.3f} | "
              f"{_mark(m['ok'])} |", "",
              "The last column shows what pure bf16 training would keep of the same update: the check can fail.", "",
              "## 4. Training side by side, same precision", ""]
    for entry in results["compare"]:
        if "error" in entry:
            lines += [f"`train_compare.py {shlex.join(entry['args'])}` failed ({entry['error']}):", "", "```",
                      entry.get("stderr", ""), "```", ""]
            continue
        shown = shlex.join(entry["args"])  # the temporary --json path is left out
        lines += [f"`python benches/train_compare.py {shown}`", "", train_compare.config_table(entry["spec"], entry["data"], entry["results"]),
                  "", train_compare.table(entry["results"], entry["spec"]["device"]), "",
                  train_compare.verdict(entry["results"], entry["spec"]), ""]
    failed = [k for k in ("kernel", "layouts") if not all(r["ok"] for r in results[k])] + ([] if m["ok"] else ["master"])
    lines += ["## Summary", "", "Correctness checks: " + ("all pass." if not failed else f"**failed: {', '.join(failed)}**."), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (minutes on CPU); CI runs this form")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "gpu_check.md")
    parser.add_argument("--skip-compare", action="store_true", help="leave out section 4 (train_compare)")
    parser.add_argument("--case-timeout", type=float, default=150.0, help="seconds per train_compare case")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible (use --device cpu --tiny for the toy form)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "tests"))  # tiny random models
    device = torch.device(args.device)
    spec = sizes(args.tiny)
    started = time.perf_counter()
    results: dict[str, Any] = {"tiny": args.tiny}
    for key, check in (("kernel", check_kernel), ("layouts", check_layouts), ("master", check_master_weights)):
        print(f"[{key}] ...", file=sys.stderr, flush=True)
        results[key] = check(device, spec)
    results["compare"] = [] if args.skip_compare else compare_runs(device, args.tiny, args.case_timeout)
    command = "python benches/gpu_check.py " + shlex.join(sys.argv[1:])
    page = report(command, device, results, time.perf_counter() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    print(page)
    ok = all(r["ok"] for r in results["kernel"] + results["layouts"]) and results["master"]["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
