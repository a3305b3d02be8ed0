"""Peak memory and time of one ε-DPO / DPO training step on CPU, side by side (issue 3).

    python benches/bench_loss_memory.py [--vocab 49152 128256] [--out docs/loss_memory.md]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the result page's hand-written verdict, under its title, survives a rerun (examples/report_page.py)
sys.path.insert(0, str(ROOT / "examples"))
from report_page import kept_verdict, with_verdict  # noqa: E402
CASES = {
    "a": "epsdpo ε-DPO",
    "b": "epsdpo DPO",
    "c": "naive ε-DPO (official style)",
    "d": "TRL DPO (fused LM head)",
}
SETUP = """\
One step = reference forward (no grad) + policy forward + loss + backward, on a 2-layer Llama with
hidden size 256 (where the LM head dominates), 2 pairs × 1,024 tokens (256 prompt + 768 completion
tokens per sequence), at two vocabulary sizes:

    (a) epsdpo, ε-DPO        epsdpo.scoring.batch_logps (token-chunked head) + epsdpo.loss
    (b) epsdpo, DPO          the same with ε = 0 (no perturbation work)
    (c) naive ε-DPO          official-code style: full [B, T, V] logits, log-softmax of policy,
                             reference and both perturbed logits with autograd on
    (d) TRL DPO              trl.trainer.utils.add_fused_lm_head on both models and the sigmoid loss,
                             called as DPOTrainer._compute_loss calls them (TRL's chunked LM head,
                             with the per-token outputs DPOTrainer requests); off Triton devices
                             it projects every position, not only completion tokens

All cases see the same models (untied head, sdpa attention) and the same four 1,024-token rows;
(a) and (b) get them from epsdpo's Rust collator (padded layout), (c) uses tests/naive_epsdpo.py.

Each case runs in a fresh subprocess. "Added" memory is the peak RSS during the step minus the RSS
with both models and the batch loaded (the peak is reset through /proc/self/clear_refs just before
the step). Memory is taken from a first, cold step, so no allocator cache from an earlier step hides
anything; time is the fastest of two further, warm steps. Every case runs twice per vocabulary, in
the order abcd then dcba; the table keeps the larger memory and the faster time of the two.
"""
PAIRS, PROMPT, COMPLETION = 2, 256, 768
BETA, EPSILON = 0.1, 0.01
# Step time is the fastest of these warm steps, which damps interference from other work on the machine
WARM_STEPS = 2


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _models(vocab: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    reference.load_state_dict(policy.state_dict())
    with torch.no_grad():  # the policy has moved a little away from the reference
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    reference.requires_grad_(False)
    return policy.train(), reference.eval()


def _pairs(vocab: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return [
        (rng.integers(0, vocab, PROMPT).tolist(), rng.integers(0, vocab, COMPLETION).tolist(),
         rng.integers(0, vocab, COMPLETION).tolist())
        for _ in range(PAIRS)
    ]


def _step_epsdpo(policy, reference, batch, epsilon: float):
    from epsdpo.loss import epsilon_dpo_loss, kl_steps, pair_betas, pair_log_ratio
    from epsdpo.scoring import batch_logps

    out = batch_logps(policy, reference, batch, epsilon)
    if epsilon:
        steps = kl_steps(*(pair_log_ratio(x.detach()) for x in (out.policy, out.relaxed, out.tightened)))
    else:
        steps = out.policy.new_zeros(PAIRS, dtype=int)
    policy_c, policy_r = out.policy.chunk(2)
    ref_c, ref_r = out.reference.chunk(2)
    losses, _, _ = epsilon_dpo_loss(policy_c, policy_r, ref_c, ref_r, pair_betas(BETA, epsilon, steps))
    losses.mean().backward()


def _step_naive(policy, reference, tensors):
    import torch
    from naive_epsdpo import loss, token_logps

    ids, mask, labels, scored = tensors
    with torch.no_grad():
        ref_logits = reference(input_ids=ids, attention_mask=mask).logits
    logits = policy(input_ids=ids, attention_mask=mask).logits
    vocab = logits.shape[-1]
    # Like the official code: score every position against the next token, then mask (no slicing copy)
    per_token = token_logps(logits.reshape(-1, vocab), ref_logits.reshape(-1, vocab), labels.reshape(-1), EPSILON)
    per_seq = {k: (v.view(labels.shape) * scored).sum(1) for k, v in per_token.items()}
    mean_loss, _ = loss(per_seq["policy"], per_seq["reference"].detach(), per_seq["relaxed"].detach(),
                        per_seq["tightened"].detach(), BETA, EPSILON)
    mean_loss.backward()


def _step_trl(policy, reference, tensors):
    import torch
    import torch.nn.functional as F

    ids, mask, completion_mask = tensors
    labels = ids.masked_fill(completion_mask == 0, -100)
    with torch.no_grad():
        ref_out = reference(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        ref_logps = ref_out.log_probs.sum(1)
    logps = policy(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs.sum(1)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    losses = -F.logsigmoid(BETA * ((chosen - ref_chosen) - (rejected - ref_rejected)))
    losses.mean().backward()


def child(case: str, vocab: int) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    policy, reference = _models(vocab)
    pairs = _pairs(vocab)
    # Every case sees the same 4 rows: chosen 0, chosen 1, rejected 0, rejected 1, no padding
    rows = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    ids = torch.tensor(rows)
    ones = torch.ones_like(ids)
    completion_mask = torch.zeros_like(ids)
    completion_mask[:, PROMPT:] = 1
    if case in "ab":
        import epsdpo

        store = epsdpo.PreferenceStore(vocab_size=vocab)
        for p, c, r in pairs:
            store.add_pair(p, c, r)
        batch = epsdpo.Collator("padded")(store, np.arange(PAIRS))
        assert np.array_equal(batch["input_ids"], ids.numpy())
        step = lambda: _step_epsdpo(policy, reference, batch, EPSILON if case == "a" else 0.0)  # noqa: E731
    elif case == "c":
        next_ids = torch.roll(ids, shifts=-1, dims=1)
        scored = torch.roll(completion_mask, shifts=-1, dims=1)
        scored[:, -1] = 0
        tensors = (ids, ones, next_ids, scored)
        step = lambda: _step_naive(policy, reference, tensors)  # noqa: E731
    else:
        from trl.trainer.utils import add_fused_lm_head

        # The outputs DPOTrainer requests for the policy and for the reference (TRL 1.16)
        add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        add_fused_lm_head(reference)
        tensors = (ids, ones, completion_mask)
        step = lambda: _step_trl(policy, reference, tensors)  # noqa: E731

    gc.collect()
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = time.perf_counter()
    step()
    cold = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    warm = []
    for _ in range(WARM_STEPS):
        policy.zero_grad(set_to_none=True)
        gc.collect()
        start = time.perf_counter()
        step()
        warm.append(time.perf_counter() - start)
    added_gb = (peak - base) * 1024 / 1e9
    return {"case": case, "vocab": vocab, "added_gb": added_gb, "cold_s": cold, "warm_s": min(warm)}


def _versions() -> str:
    import torch
    import transformers
    import trl

    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, trl {trl.__version__}, Python {platform.python_version()}")


def table(results: list[dict]) -> str:
    by = {(r["vocab"], r["case"]): r for r in results}
    lines = [
        "| vocab | case | added peak RSS (GB) | × (d) | × (c) | step time (s) | × (b) | × (d) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (vocab, case), r in sorted(by.items()):
        d, c, b = by.get((vocab, "d")), by.get((vocab, "c")), by.get((vocab, "b"))

        def ratio(x: float, other: dict | None, key: str) -> str:
            return f"{x / other[key]:.2f}" if other else "–"

        lines.append(
            f"| {vocab:,} | ({case}) {CASES[case]} | {r['added_gb']:.2f} | {ratio(r['added_gb'], d, 'added_gb')} "
            f"| {ratio(r['added_gb'], c, 'added_gb')} | {r['warm_s']:.2f} | {ratio(r['warm_s'], b, 'warm_s')} "
            f"| {ratio(r['warm_s'], d, 'warm_s')} |"
        )
    return "\n".join(lines)


def verdict(results: list[dict]) -> str:
    """Issue 3's targets, checked at the largest vocabulary measured with all four cases."""
    by = {(r["vocab"], r["case"]): r for r in results}
    full = [v for v in sorted({r["vocab"] for r in results}) if all((v, c) in by for c in "abcd")]
    if not full:
        return ""
    v = full[-1]
    a, b, c, d = (by[(v, k)] for k in "abcd")
    checks = [
        ("(a) adds ≤ 0.5× what (d) adds", a["added_gb"] / d["added_gb"], 0.5),
        ("(a) adds ≤ 0.2× what (c) adds", a["added_gb"] / c["added_gb"], 0.2),
        ("(a) step time ≤ 1.15× (b)", a["warm_s"] / b["warm_s"], 1.15),
        ("(a) step time ≤ (d)", a["warm_s"] / d["warm_s"], 1.0),
    ]
    lines = [f"Targets at vocab {v:,}:", ""]
    lines += [f"- {name}: {x:.2f} — {'met' if x <= limit else 'NOT met'}" for name, x, limit in checks]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__ + "\n" + SETUP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    parser.add_argument("--cases", default="abcd")
    parser.add_argument("--out", type=Path, help="also write the table, with this command, to this markdown file")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    load_before = os.getloadavg()[0]
    runs = []
    for vocab in args.vocab:
        # Forward then backward order, so a change in other load on the machine hits every case alike
        for case in args.cases + args.cases[::-1]:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", case, str(vocab)],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                sys.exit(f"case ({case}) at vocab {vocab} failed:\n{proc.stderr}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), file=sys.stderr)
    results = []
    for key in dict.fromkeys((r["vocab"], r["case"]) for r in runs):
        same = [r for r in runs if (r["vocab"], r["case"]) == key]
        results.append({**same[0], "added_gb": max(r["added_gb"] for r in same),
                        "warm_s": min(r["warm_s"] for r in same)})
    text = table(results)
    print(text)
    print(verdict(results))
    if args.out:
        command = "python benches/bench_loss_memory.py " + " ".join(sys.argv[1:])
        page = (
            "# Memory and time of one ε-DPO step: epsdpo vs a naive ε-DPO vs TRL DPO\n\n"
            f"{SETUP}\nCommand (from the repository root):\n\n    {command}\n\n"
            f"Machine: {_versions()}. One-minute load average {load_before:.1f} before the run and "
            f"{os.getloadavg()[0]:.1f} after it.\n\n{text}\n\n{verdict(results)}"
        )
        old = args.out.read_text() if args.out.is_file() else ""
        args.out.write_text(with_verdict(page, kept_verdict(old)))


if __name__ == "__main__":
    main()
