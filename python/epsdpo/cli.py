"""The `epsdpo` command: `train`, `prepare`, `demo`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# Keys of a train YAML that say what to train on; everything else is a TrainConfig field.
RUN_KEYS = ("model", "tokenizer", "ref_model", "train_data", "eval_data", "train_split", "eval_split")


def _load_data(source: Any, split: str | None) -> Any:
    """A local file as given; `split` picks a split of a hub dataset."""
    if split is None or Path(source).exists():
        return source
    import datasets

    return datasets.load_dataset(source, split=split)


def cmd_train(args: argparse.Namespace) -> int:
    import yaml

    from epsdpo.config import TrainConfig
    from epsdpo.trainer import Trainer

    data = yaml.safe_load(Path(args.config).read_text()) or {}
    run = {k: data.pop(k) for k in RUN_KEYS if k in data}
    for override in args.overrides:
        key, _, raw = override.removeprefix("--").partition("=")
        if key.replace("-", "_") in RUN_KEYS:
            run[key.replace("-", "_")] = raw
        else:
            try:
                key, value = TrainConfig.parse_override(override)
            except ValueError as error:
                raise SystemExit(f"epsdpo train: {error}") from None
            data[key] = value
    missing = [k for k in ("model", "train_data") if k not in run]
    if missing:
        raise SystemExit(f"{args.config}: missing {missing} (the model and the training data to use)")
    try:
        config = TrainConfig.from_dict(data)
    except ValueError as error:  # a usage error names the key; no traceback
        raise SystemExit(f"epsdpo train: {args.config}: {error}") from None
    trainer = Trainer(
        run["model"], config, _load_data(run["train_data"], run.get("train_split")),
        tokenizer=run.get("tokenizer"), ref_model=run.get("ref_model"),
        eval_dataset=_load_data(run["eval_data"], run.get("eval_split")) if "eval_data" in run else None,
    )
    trainer.train(resume_from_checkpoint=args.resume if args.resume != "latest" else True)
    if trainer.dist.is_main:
        print(f"done: {trainer.state.global_step} steps, β {trainer.kl.beta:.6g}; outputs in {config.output_dir}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from epsdpo.data import load_preferences
    from epsdpo.models import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    store, report = load_preferences(
        _load_data(args.data, args.split), tokenizer, max_length=args.max_length,
        max_prompt_length=args.max_prompt_length, cache_dir=args.cache_dir, skip_invalid=args.skip_invalid,
    )
    print(report)
    if args.output:
        store.save(args.output)
        print(f"store written to {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from epsdpo.recipes.demo import DemoOptions, run_demo

    options = DemoOptions(**{k: v for k, v in vars(args).items() if k in DemoOptions.__dataclass_fields__ and v is not None})
    run_demo(options)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epsdpo", description="ε-DPO preference training with a Rust data core.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train from a YAML config",
                           description="Train from CONFIG.yaml: TrainConfig fields plus model, train_data "
                                       "(and optionally tokenizer, ref_model, eval_data). --key=value overrides any of them.")
    train.add_argument("config")
    train.add_argument("--resume", nargs="?", const="latest", default=None,
                       help="resume from a checkpoint directory, or the latest one in output_dir")
    train.set_defaults(func=cmd_train)

    prepare = sub.add_parser("prepare", help="tokenize and cache a preference dataset; print its report")
    prepare.add_argument("data", help="a .jsonl/.json/.parquet file or a hub id")
    prepare.add_argument("--tokenizer", required=True, help="tokenizer directory, .gguf file or hub id")
    prepare.add_argument("--split", default=None)
    prepare.add_argument("--max-length", type=int, default=None)
    prepare.add_argument("--max-prompt-length", type=int, default=None)
    prepare.add_argument("--cache-dir", default=None)
    prepare.add_argument("--skip-invalid", action="store_true")
    prepare.add_argument("--output", help="also save the store to this file")
    prepare.set_defaults(func=cmd_prepare)

    demo = sub.add_parser("demo", help="ε-DPO on SmolLM2-135M-Instruct with the bundled demo data (CPU, minutes)")
    demo.add_argument("--output-dir", default=None)
    demo.add_argument("--max-steps", type=int, default=None)
    demo.add_argument("--batch-size", type=int, default=None)
    demo.add_argument("--learning-rate", type=float, default=None)
    demo.add_argument("--beta", type=float, default=None)
    demo.add_argument("--epsilon", type=float, default=None)
    demo.add_argument("--layout", choices=["padded", "packed", "shared_prompt"], default=None)
    demo.add_argument("--eval-prompts", type=int, default=None)
    demo.add_argument("--threads", type=int, default=None)
    demo.add_argument("--bf16", action="store_true", default=None,
                      help="compute in bf16 (autocast) over fp32 master weights, as training on a GPU does")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "train":
        args.overrides = unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
