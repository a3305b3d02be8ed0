"""How to keep fp32 master weights under bf16 compute: measured, so the choice is not a guess.

    python benches/bench_precision.py                  # CPU, a ~50M-parameter Llama
    python benches/bench_precision.py --device cuda    # one GPU, a ~0.5B Qwen2-shaped Llama

Modes, each in a fresh subprocess (so peak memory is its own), on the same model, data and AdamW:

- `fp32`: fp32 weights and compute (the reference);
- `autocast`: fp32 weights, forward and backward under torch.autocast(bf16): what epsdpo's and
  TRL's `bf16=True` do;
- `master_copy`: bf16 weights compute directly; an fp32 master copy of every weight takes the AdamW
  step and is rounded back into the bf16 weights (the Megatron/DeepSpeed scheme);
- `pure_bf16`: bf16 weights and AdamW on them (what `dtype="bfloat16"` used to do), for contrast.

Each mode runs a causal-LM loss with gradient accumulation over `--micro` micro-batches per step at
lr 5e-7, and reports step time, peak memory and the fraction of the optimizer's weights (the fp32
master copy where there is one) that the steps moved. Note what each mode computes in: autocast
keeps norms, softmax and the loss in fp32; the master-copy and pure-bf16 modes run every op in bf16.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

MODES = ("fp32", "autocast", "master_copy", "pure_bf16")


def _peak_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child(mode: str, args: argparse.Namespace) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    shape = (dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, vocab_size=32000)
             if args.device == "cpu" else
             dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa")).to(device)
    if mode in ("master_copy", "pure_bf16"):
        model = model.to(torch.bfloat16)
    params = [p for p in model.parameters()]
    master = [p.detach().float().clone().requires_grad_() for p in params] if mode == "master_copy" else params
    optimizer = torch.optim.AdamW(master, lr=5e-7)
    initial = [p.detach().float().clone() for p in master]  # the weights the optimizer owns
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, shape["vocab_size"], (args.rows, args.length), generator=g) for _ in range(args.micro)]
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps + 1):
        started = time.perf_counter()
        for ids in data:
            ids = ids.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "autocast"):
                loss = model(input_ids=ids, labels=ids).loss / args.micro
            loss.backward()
        if mode == "master_copy":
            for p, m in zip(params, master):
                m.grad = p.grad.float()
                p.grad = None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if mode == "master_copy":
            with torch.no_grad():
                for p, m in zip(params, master):
                    p.copy_(m)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    moved = sum(int((p.detach().float() != q).sum()) for p, q in zip(master, initial))
    total = sum(p.numel() for p in params)
    return dict(mode=mode, step_s=sum(times[1:]) / args.steps, peak_gb=_peak_bytes(args.device) / 1e9,
                moved=moved / total, params_m=total / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--micro", type=int, default=4, help="micro-batches per step (gradient accumulation)")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    rows = []
    for mode in MODES:
        command = [sys.executable, __file__, "--child", mode] + [
            f"--{k}={v}" for k, v in vars(args).items() if k != "child" and v is not None]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr, flush=True)
    base = next(r for r in rows if r["mode"] == "fp32")
    print(f"{rows[0]['params_m']:.0f}M parameters, {args.micro} micro-batches of {args.rows} × {args.length} tokens per step")
    print("| mode | step (s) | × fp32 | peak memory (GB) | × fp32 | optimizer's weights moved at lr 5e-7 |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['step_s']:.2f} | {r['step_s'] / base['step_s']:.2f} | {r['peak_gb']:.2f} | "
              f"{r['peak_gb'] / base['peak_gb']:.2f} | {r['moved']:.3f} |")


if __name__ == "__main__":
    main()
