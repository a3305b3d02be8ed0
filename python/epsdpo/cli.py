"""The `epsdpo` command: `train`, `prepare`, `demo`.

`epsdpo train [CONFIG.yaml | --config CONFIG.yaml] [--key value | --key=value ...]` parses its flags
with transformers' `HfArgumentParser`, as TRL's scripts do: every `TrainConfig` field and every
`RunArguments` field is a `--key` flag (underscores; the dashed spelling works too), every boolean
has its `--no_key`, and a flag overrides the YAML's value; without a YAML the flags alone say
everything (TRL's `dpo.py` commands). The YAML and the flags are merged and validated by
`TrainConfig.from_yaml`; every mistake is a one-line usage error naming the key (exit code 2).

A TRL YAML's keys that are not epsdpo settings are each in `epsdpo.trl_keys`: refused with the
reason at a value that asks for what epsdpo does not do, or accepted without effect and said so
once. TRL's own parser keys work as there: `env` (a mapping of environment variables set before the
run) and `resume_from_checkpoint`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import sys
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epsdpo import __version__, trl_keys
from epsdpo.config_fields import ConfigFieldError, UnknownConfigKeysError
from epsdpo.safe_yaml import shown


@dataclass
class RunArguments:
    """What `epsdpo train` trains on: the keys of a train YAML (or flags) that are not TrainConfig fields."""

    _argument_group_name = "what to train on (YAML keys or flags)"  # HfArgumentParser's help group; not a field

    model: str | None = field(default=None, metadata={"help": (
        "Policy to train: a model directory, a .gguf file or a hub id. Required, here or in the YAML.")})
    tokenizer: str | None = field(default=None, metadata={"help": (
        "Tokenizer directory, .gguf file or hub id. None: the model's own.")})
    ref_model: str | None = field(default=None, metadata={"help": (
        "Frozen reference model, in the same forms as model. None: a frozen copy of the initial policy.")})
    train_data: str | None = field(default=None, metadata={"help": (
        "Training pairs: a .jsonl/.json/.parquet file in TRL's preference formats, a .store written by "
        "`epsdpo prepare --output` or an .epsdpo cache file, or a hub dataset id (with train_split). Required, here or in the YAML.")})
    eval_data: str | None = field(default=None, metadata={"help": (
        "Evaluation pairs, in the same forms as train_data. None: no evaluation (but see dataset_test_split).")})
    train_split: str | None = field(default=None, metadata={"help": (
        "Split of a hub dataset or save_to_disk folder given as train_data, e.g. train. Ignored for a local "
        "file.")})
    eval_split: str | None = field(default=None, metadata={"help": (
        "Split of a hub dataset or save_to_disk folder given as eval_data, e.g. test. Ignored for a local file.")})
    model_name_or_path: str | None = field(default=None, metadata={"help": (
        "TRL's name for model (a local path here, or a hub id where a hub is reachable). Give one of the two.")})
    dataset_name: str | None = field(default=None, metadata={"help": (
        "TRL's name for train_data (a local file here, or a hub dataset id). Give one of the two.")})
    dataset_config: str | None = field(default=None, metadata={"help": (
        "Configuration (subset) of a hub dataset given as train_data or eval_data, passed to "
        "datasets.load_dataset as name (TRL's meaning). Ignored for a local file or folder.")})
    dataset_train_split: str | None = field(default=None, metadata={"help": (
        "TRL's name for train_split: the split of the training dataset to train on (a hub id or a save_to_disk "
        "folder). Give one of the two.")})
    dataset_test_split: str | None = field(default=None, metadata={"help": (
        "The split of the training dataset to evaluate on, as in TRL's dpo script: used when evaluation is asked "
        "for (eval_strategy steps or epoch, or eval_steps) and eval_data is unset; None: test, TRL's default. A "
        "training dataset without that split is then an error. With eval_data set, its split (TRL's name for "
        "eval_split).")})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and not isinstance(value, str):
                raise ConfigFieldError(f.name, value, "a path or hub id (a string)")
        # TRL's spellings fill ours; both at once would leave it unclear which one trains
        for trl_name, name in (("model_name_or_path", "model"), ("dataset_name", "train_data"),
                               ("dataset_train_split", "train_split")):
            given = getattr(self, trl_name)
            if given is not None and getattr(self, name) is not None and given != getattr(self, name):
                raise ConfigFieldError(trl_name, given, f"unset when {name} is set ({shown(getattr(self, name))}); "
                                                        "they are two names for one thing")
            if given is not None:
                setattr(self, name, given)


# Keys of a train YAML that say what to train on; everything else is a TrainConfig field.
RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunArguments))

# The words transformers' `string_to_bool` reads as a boolean flag's value.
BOOL_WORDS = frozenset({"yes", "no", "true", "false", "t", "f", "y", "n", "1", "0"})
NONE_WORDS = frozenset({"none", "null", "~"})

TRAIN_USAGE = ("epsdpo train [CONFIG.yaml | --config CONFIG.yaml] [--key value | --key=value ...] "
               "[--resume | --resume_from_checkpoint PATH]")
# Keys of TRL's parser itself (TrlParser) that a YAML may hold besides the dataclass fields
ENV_KEY, RESUME_KEY = "env", "resume_from_checkpoint"
GIVEN_NOWHERE = object()  # an `extras` value from_yaml did not fill: the key is in neither the YAML nor the flags


def _load_data(source: Any, split: str | None, config: str | None = None) -> Any:
    """A local file or store as given; `split` picks a split of a save_to_disk folder or of a hub
    dataset (of its configuration `config`), loaded as `load_preferences` loads one (offline, at once
    with the hint instead of after a minute of retries)."""
    from epsdpo.data.sources import FolderSplit, is_store_path, load_hub_dataset, pick_split

    path = Path(source)
    if path.is_dir() and split is not None:
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:  # a folder of data files: the loader picks the split by file name, and streams it
            return FolderSplit(source, split)
        return pick_split(loaded, split, str(source))[0] if isinstance(loaded, datasets.DatasetDict) else loaded
    if (split is None and config is None) or path.exists() or is_store_path(source):
        return source
    return load_hub_dataset(source, split, config)[0]


DEFAULT_TEST_SPLIT = "test"  # TRL's ScriptArguments.dataset_test_split default


def _asks_for_evaluation(config: Any) -> str | None:
    """The setting that asks for evaluation during training, named as the user wrote it; None if none does."""
    if config.eval_strategy in ("steps", "epoch"):
        return f"eval_strategy={config.eval_strategy!r}"
    if config.eval_strategy is None and config.eval_steps is not None:
        return f"eval_steps={config.eval_steps}"
    return None


def _eval_source(run: RunArguments, config: Any) -> tuple[Any, str | None, bool]:
    """The eval data, its split, and whether that is a split of the training dataset. As in TRL's dpo
    script: when evaluation is asked for (eval_strategy steps or epoch, or eval_steps alone) and
    eval_data is unset, the eval pairs are dataset_test_split of the training dataset, `test` unless
    set (TRL's default); a training dataset without that split is then an error, never a run that
    silently does not evaluate."""
    split = run.eval_split
    if run.dataset_test_split is not None:
        if split is not None and split != run.dataset_test_split:
            raise ConfigFieldError("dataset_test_split", run.dataset_test_split,
                                   f"unset when eval_split is set ({split!r}); they are two names for one thing")
        split = run.dataset_test_split
    asked = _asks_for_evaluation(config)
    if run.eval_data is not None or asked is None:
        return run.eval_data, split, False
    if Path(run.train_data).is_file():
        if run.dataset_test_split is not None:
            raise ConfigFieldError("dataset_test_split", split, "unset", reason=f"the training data {run.train_data} "
                                   "is one file, without splits; give the eval pairs as eval_data")
        raise ValueError(f"{asked} asks for evaluation, but there is no eval data: the training data "
                         f"{run.train_data} is one file, without a {DEFAULT_TEST_SPLIT!r} split (dataset_test_split's "
                         "default); set eval_data, or eval_strategy: no")
    return run.train_data, split or DEFAULT_TEST_SPLIT, True


def _load_test_split(source: str, split: str, config: str | None) -> Any:
    """`split` of the training dataset (a save_to_disk folder or a hub id), which must have it: a
    folder holding one dataset without splits would otherwise evaluate on the training pairs."""
    import datasets

    from epsdpo.data.sources import DataSourceError, FolderSplit, load_hub_dataset, open_source

    path = Path(source)
    where = f"dataset_test_split={split!r}"
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:  # a folder of data files: opening the split checks that the folder has it
            try:
                open_source(FolderSplit(source, split), None)
            except DataSourceError as error:
                raise DataSourceError(f"{where} (the split evaluated on): {error}") from None
            return FolderSplit(source, split)
        if not isinstance(loaded, datasets.DatasetDict) or split not in loaded:
            names = list(loaded.keys()) if isinstance(loaded, datasets.DatasetDict) else []
            raise DataSourceError(f"{where}: the training dataset {source} has no split {split!r} "
                                  f"({'its splits: ' + ', '.join(names) if names else 'it has no splits'}) to evaluate "
                                  "on; set eval_data or dataset_test_split, or eval_strategy: no")
        return loaded[split]
    try:
        return load_hub_dataset(source, split, config)[0]
    except DataSourceError as error:
        raise DataSourceError(f"{where} (the split evaluated on): {error}") from None


def _train_fields() -> dict[str, Any]:
    """Every `epsdpo train` key (run keys first) → its type hint."""
    from epsdpo.config import TrainConfig

    return {**typing.get_type_hints(RunArguments), **{
        k: v for k, v in typing.get_type_hints(TrainConfig).items() if k in TrainConfig.__dataclass_fields__}}


def _bool_flags() -> set[str]:
    names = [name for name, hint in _train_fields().items() if hint is bool]
    names += [name for name in trl_keys.KEYS if isinstance(trl_keys.trl_default(name), bool)]
    return {flag for name in names for flag in (f"--{name}", f"--{name.replace('_', '-')}")}


def _bare_bool_flags(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """`--bf16 c.yaml`: a boolean flag takes the next word as its value only when that word is a
    boolean, so it never swallows the config path. Returns the arguments and, for each word that
    followed a bare flag, that flag (to explain the word if it turns out to be a mistyped value)."""
    flags, out, after = _bool_flags(), [], {}
    for i, arg in enumerate(args):
        if arg == "--":
            out += args[i:]
            break
        following = args[i + 1] if i + 1 < len(args) else None
        if arg in flags and following is not None and not following.startswith("-") \
                and following.lower() not in BOOL_WORDS:
            out.append(f"{arg}=true")
            after[following] = arg
        else:
            out.append(arg)
    return out, after


def _bool_value_error(flag: str, word: str) -> str:
    return f"argument {flag}: {_expected_bool(word)}"


def _expected_bool(word: str) -> str:
    return f"expected a boolean (true/false, yes/no, 1/0), got {word!r}"


def _to_bool(text: str) -> bool:
    """A boolean flag's value, as transformers' `string_to_bool` reads it, with a shorter error."""
    from transformers.hf_argparser import string_to_bool

    try:
        return string_to_bool(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(_expected_bool(text)) from None


def _or_none(convert: Any) -> Any:
    """A flag's type that also reads none/null/~ as None (for fields typed `X | None`)."""
    def parse(text: str) -> Any:
        return None if text.strip().lower() in NONE_WORDS else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its errors
    return parse


@contextlib.contextmanager
def _field_types_kept(*classes: type) -> Iterator[None]:
    """`HfArgumentParser` overwrites each dataclass field's `.type` with the resolved hint (and
    `X | None` with `X`); put the declared ones back."""
    saved = [(f, f.type) for cls in classes for f in dataclasses.fields(cls)]
    try:
        yield
    finally:
        for f, kind in saved:
            f.type = kind


def _add_train_parser(sub: Any) -> argparse.ArgumentParser:
    from epsdpo.config import TrainConfig

    class TrainConfigArguments(TrainConfig):  # the same fields, under their own heading in --help
        _argument_group_name = "TrainConfig fields (YAML keys or flags; TRL's names where TRL has the concept)"

    with _field_types_kept(RunArguments, TrainConfig):
        train = sub.add_parser(
            "train", dataclass_types=[RunArguments, TrainConfigArguments], allow_abbrev=False,
            formatter_class=argparse.RawDescriptionHelpFormatter, usage=TRAIN_USAGE,
            help="train from a YAML config (TRL-style flags override it)",
            description="Train from CONFIG.yaml (positional or --config, TRL's spelling) or from flags alone: a\n"
                        "mapping of the keys below, what to train on (model and train_data, or TRL's\n"
                        "model_name_or_path and dataset_name, are required) and TrainConfig fields. TRL keys that\n"
                        "are no setting here are refused with the reason or accepted without effect (listed last).\n"
                        "Each key is also a flag, --key value or --key=value (underscores; the dashed spelling\n"
                        "works too), that overrides the YAML. A boolean flag alone means true (--bf16) and also\n"
                        "takes a value (--bf16 false, --bf16=no); --no_KEY sets it to false. For a key that allows\n"
                        "None, none (or null) sets it to None.",
            epilog="examples:\n"
                   "  epsdpo train run.yaml --learning_rate 1e-6 --layout=packed --bf16\n"
                   "  epsdpo train --config run.yaml --no_gradient_checkpointing\n"
                   "  epsdpo train --model_name_or_path M --dataset_name pairs.jsonl --output_dir out\n"
                   "  epsdpo train run.yaml --resume                      # newest checkpoint in output_dir\n"
                   "  epsdpo train run.yaml --resume_from_checkpoint out/checkpoint-200\n"
                   "  epsdpo train run.yaml --resume_from_checkpoint auto   # resume if there is a checkpoint, else start\n"
                   "  torchrun --nproc_per_node 8 -m epsdpo train run.yaml --fsdp",
        )
    hints = _train_fields()
    for action in train._actions:
        if action.dest not in hints:
            continue
        if action.option_strings[0].startswith("--no_"):  # HfArgumentParser's complement of a True default
            action.help = f"Set {action.dest} to false."
        else:
            if action.default is not None:  # the help says what None means
                action.help = f"{action.help} (default: {action.default})".replace("%", "%%")
            if hints[action.dest] is bool:
                action.type = _to_bool
            elif type(None) in typing.get_args(hints[action.dest]) and action.type is not None:
                action.type = _or_none(action.type)
                if action.choices is not None:
                    action.choices = (*action.choices, None)
        # Only the flags given reach the namespace, so they and only they override the YAML.
        action.default = argparse.SUPPRESS
    negations = train.add_argument_group("--no_KEY for each boolean without one above (as TRL's flags)")
    for name, hint in hints.items():
        if hint is bool and f"--no_{name}" not in train._option_string_actions:  # TRL has one for each of its booleans
            negations.add_argument(f"--no_{name}", f"--no-{name.replace('_', '-')}", dest=name, action="store_const",
                               const=False, default=argparse.SUPPRESS, help=f"Set {name} to false.")
    _add_trl_key_flags(train)
    train.add_argument("config", metavar="CONFIG.yaml", nargs="?", default=None,
                       help="the run's YAML: keys as listed below (none: the flags say everything)")
    train.add_argument("--config", dest="config_flag", metavar="CONFIG.yaml", default=None,
                       help="the run's YAML, in TRL's spelling (trl dpo --config CONFIG.yaml)")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="resume from the newest complete checkpoint in output_dir")
    resume.add_argument("--resume_from_checkpoint", "--resume-from-checkpoint", metavar="PATH", default=None,
                        help="resume from this checkpoint directory (TRL's name); 'auto': the newest complete "
                             "checkpoint in output_dir, or a fresh start when there is none (one command for "
                             "torchrun --max-restarts, which does this by itself on a restart)")
    train.set_defaults(func=cmd_train, parser=train)
    return train


def _yaml_value(text: str) -> Any:
    """A TRL-only key's flag value, read as a YAML scalar (7 → 7, true → True, null → None), as the
    same key in the YAML would be."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _add_trl_key_flags(train: argparse.ArgumentParser) -> None:
    """Every key of `epsdpo.trl_keys` as a flag, in the form TRL's parser gives it (booleans with their
    `--no_key` where TRL's default is true, lists one word per item), so TRL's commands parse; what the
    value means is decided with the YAML's."""
    group = train.add_argument_group("TRL keys that are other names, refused, or without effect here (each says why)")
    for name in trl_keys.KEYS:
        default = trl_keys.trl_default(name)
        spellings = dict.fromkeys((f"--{name}", f"--{name.replace('_', '-')}"))
        if name in trl_keys.OTHER_NAMES:
            about = f"TRL's name for {trl_keys.OTHER_NAMES[name][1]}"
        elif name in trl_keys.REFUSED:
            about = f"TRL's {name}: refused unless TRL's default: {trl_keys.REFUSED[name].reason}"
        else:
            about = f"TRL's {name}: accepted, without effect: {trl_keys.WITHOUT_EFFECT[name].reason}"
        common = dict(dest=name, default=argparse.SUPPRESS, help=f"{about}.".replace("%", "%%"))
        if isinstance(default, bool) or name in trl_keys.OTHER_NAMES:
            group.add_argument(*spellings, type=_to_bool, nargs="?", const=True, metavar="BOOL", **common)
            if default:
                group.add_argument(f"--no_{name}", f"--no-{name.replace('_', '-')}", action="store_const",
                                   const=False, **{**common, "help": f"Set {name} to false."})
        elif isinstance(default, list):
            group.add_argument(*spellings, type=_yaml_value, nargs="+", **common)
        else:
            group.add_argument(*spellings, type=_yaml_value, **common)


def _with_other_names(config: Any, values: dict[str, Any]) -> Any:
    """`config` with what TRL's other names of its settings ask for (use_cpu: device, disable_tqdm:
    progress); a device other than the CPU beside use_cpu true is an error naming both."""
    changes: dict[str, Any] = {}
    for name, value in values.items():
        changes.update(trl_keys.as_settings(name, value))
    if changes.get("device") and config.device not in (None, "cpu"):
        raise ConfigFieldError("use_cpu", True, f"false with device={config.device!r} (choose one)")
    return dataclasses.replace(config, **changes) if changes else config


def _apply_env(env: Any, source: str) -> None:
    """TRL's `env:` mapping: each variable set before anything runs, as TrlParser sets it."""
    import os

    if not isinstance(env, dict) or not all(isinstance(k, str) and k for k in env):
        raise ValueError(f"{source}: env={shown(env)} is invalid: must be a mapping of environment variable names "
                         "to values (TRL's meaning)")
    for name, value in env.items():
        os.environ[name] = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _resume_choice(args: argparse.Namespace, from_yaml: Any) -> bool | str | None:
    """What to resume from: the flags, else the YAML's resume_from_checkpoint (TRL's key: a path,
    `auto`, or true for the newest checkpoint)."""
    if args.resume:
        return True
    if args.resume_from_checkpoint is not None:
        return args.resume_from_checkpoint
    if from_yaml is GIVEN_NOWHERE or from_yaml is None or from_yaml is False:
        return None
    if from_yaml is True or isinstance(from_yaml, str) and from_yaml:
        return from_yaml
    raise ConfigFieldError("resume_from_checkpoint", from_yaml,
                           "a checkpoint path, auto or true (the newest checkpoint in output_dir)")


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _usage_message(error: Exception, config: str, given: dict[str, Any]) -> str:
    """One line naming the key, and where its value came from: the flag when the error's field was
    given as one, else the YAML (or the command line as a whole)."""
    if isinstance(error, UnknownConfigKeysError):  # the summary: every known key is what --help lists
        return f"{config}: {error.summary}; `epsdpo train --help` lists the keys"
    text = " ".join(str(error).split())
    if isinstance(error, ConfigFieldError) and error.field in given:
        return f"argument --{error.field}: {text}"
    return text if text.startswith(f"{config}:") else f"{config}: {text}"


def cmd_train(args: argparse.Namespace) -> int:
    import yaml

    from epsdpo.config import TrainConfig

    parser: argparse.ArgumentParser = args.parser
    given = {k: v for k, v in vars(args).items() if k in _train_fields() or k in trl_keys.KEYS}
    if args.config is not None and args.config_flag is not None:
        parser.error(f"the YAML is given twice ({args.config} and --config {args.config_flag}): give it once")
    path = args.config if args.config is not None else args.config_flag
    source = path or "the command line"  # where a key without its own flag came from
    if path is not None and not Path(path).is_file():
        flag = getattr(args, "bool_flag_before", {}).get(path)
        parser.error(_bool_value_error(flag, path) if flag else f"{path}: no such file")
    run = dict.fromkeys(RUN_KEYS)
    extra = {**run, **dict.fromkeys((*trl_keys.KEYS, ENV_KEY, RESUME_KEY), GIVEN_NOWHERE)}
    try:
        config = TrainConfig.from_yaml(path, given, extras=extra)
        run_args = RunArguments(**{k: extra[k] for k in RUN_KEYS})
        notes = trl_keys.check({k: extra[k] for k in trl_keys.KEYS if extra[k] is not GIVEN_NOWHERE})
        config = _with_other_names(config, {k: extra[k] for k in trl_keys.OTHER_NAMES if extra[k] is not GIVEN_NOWHERE})
        resume = _resume_choice(args, extra[RESUME_KEY])
        if extra[ENV_KEY] is not GIVEN_NOWHERE:
            _apply_env(extra[ENV_KEY], source)
    except (ValueError, OSError) as error:
        parser.error(_usage_message(error, source, given))
    except yaml.YAMLError as error:
        parser.error(f"{path}: not valid YAML: {' '.join(str(error).split())}")
    missing = [k for k in ("model", "train_data") if getattr(run_args, k) is None]
    if missing:
        trl_names = {"model": "model_name_or_path", "train_data": "dataset_name"}
        parser.error(f"{' and '.join(missing)} required (the model and the training data to use): "
                     + (f"set {'them' if len(missing) > 1 else 'it'} in {path} or pass " if path else "pass ")
                     + " and ".join(f"--{trl_names[k]} (or --{k})" for k in missing))
    if _is_main_process():
        for note in notes:  # said once, by one process
            print(f"epsdpo train: {note}", file=sys.stderr)

    from epsdpo.checkpoint import CheckpointError
    from epsdpo.data.sources import DataSourceError
    from epsdpo.distributed import PeerTimeoutError
    from epsdpo.interrupt import TrainingInterrupted
    from epsdpo.launcher import LauncherSettingError
    from epsdpo.models import ChatTemplateError
    from epsdpo.rank_agreement import RanksDisagreeError
    from epsdpo.run_lock import OutputDirBusyError
    from epsdpo.trainer import Trainer

    try:
        eval_data, eval_split, of_training_data = _eval_source(run_args, config)
    except ValueError as error:
        parser.error(_usage_message(error, source, given))

    try:
        if of_training_data:
            eval_dataset = _load_test_split(eval_data, eval_split, run_args.dataset_config)
        else:
            eval_dataset = None if eval_data is None else _load_data(eval_data, eval_split, run_args.dataset_config)
        trainer = Trainer(
            run_args.model, config, _load_data(run_args.train_data, run_args.train_split, run_args.dataset_config),
            tokenizer=run_args.tokenizer, ref_model=run_args.ref_model, eval_dataset=eval_dataset,
        )
        trainer.train(resume_from_checkpoint=resume)
    except ConfigFieldError as error:  # a setting refused once the data or model is known: still a usage error
        parser.error(_usage_message(error, source, given))
    except (FileExistsError, FileNotFoundError, CheckpointError, DataSourceError, LauncherSettingError,
            ChatTemplateError, OutputDirBusyError, RanksDisagreeError, PeerTimeoutError) as error:
        # What the user fixes by choosing another folder, checkpoint, launcher config or template, by
        # giving every node the same settings, or a rank that stopped answering: one line, no traceback
        raise SystemExit(f"epsdpo train: {error}") from None
    except TrainingInterrupted as stopped:
        # Preempted (SIGTERM) or Ctrl-C: the checkpoint is written; the exit code says which signal,
        # as a process killed by it would (128 + its number), so schedulers see a job that did not finish
        if trainer.dist.is_main:
            print(f"epsdpo train: {stopped}", file=sys.stderr)
        return stopped.exit_code
    if trainer.dist.is_main:
        print(f"done: {trainer.state.global_step} steps, β {trainer.kl.beta:.6g}; outputs in {config.output_dir}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from epsdpo._core import Truncation
    from epsdpo.config import MAX_INT
    from epsdpo.data import DataSourceError, InvalidRowError, load_preferences
    from epsdpo.data.cache import DEFAULT, resolve_cache_dir
    from epsdpo.models import ChatTemplateError, load_tokenizer, read_chat_template

    cache_dir = DEFAULT if args.cache_dir is None else args.cache_dir
    try:
        resolve_cache_dir(cache_dir)  # a word like "none" is refused before any work
    except ValueError as error:
        args.parser.error(f"argument --cache_dir: {error}")
    for name in ("max_length", "max_prompt_length", "max_completion_length", "max_row_bytes"):
        value = getattr(args, name)
        if value is not None and not 1 <= value <= MAX_INT:  # before the Rust core sees it, as TrainConfig checks
            args.parser.error(f"argument --{name}: {name}={value} is invalid: must be an integer in [1, {MAX_INT}]")
    try:
        chat_template = None if args.chat_template_path is None else read_chat_template(args.chat_template_path)
        tokenizer = load_tokenizer(args.tokenizer)
        truncation = Truncation(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                                max_completion_length=args.max_completion_length,
                                prompt_truncation_mode=args.prompt_truncation_mode)
        store, report = load_preferences(
            _load_data(args.data, args.split, args.dataset_config), tokenizer, truncation=truncation,
            cache_dir=cache_dir, skip_invalid=args.skip_invalid, max_row_bytes=args.max_row_bytes,
            chat_template=chat_template,
        )
    except (DataSourceError, InvalidRowError, OSError, ChatTemplateError) as error:
        # What the user fixes in the data, the path or the network: one line, no traceback
        raise SystemExit(f"epsdpo prepare: {error}") from None
    print(report)  # it names the cache file, which train_data may name too
    if args.output:
        store.save(args.output)
        print(f"store written to {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from epsdpo.recipes.demo import DemoOptions, run_demo

    options = DemoOptions(**{k: v for k, v in vars(args).items() if k in DemoOptions.__dataclass_fields__ and v is not None})
    run_demo(options)
    return 0


def _option(parser: argparse.ArgumentParser, name: str, *aliases: str, **kwargs: Any) -> None:
    """`--name_with_underscores`, its dashed spelling, and each alias (the same key's name in `train`)
    in both spellings."""
    spellings = list(dict.fromkeys(f"--{spelling}" for n in (name, *aliases) for spelling in (n, n.replace("_", "-"))))
    parser.add_argument(*spellings, dest=name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from transformers import HfArgumentParser

    parser = argparse.ArgumentParser(prog="epsdpo", description="ε-DPO preference training with a Rust data core.",
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"epsdpo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=HfArgumentParser)
    _add_train_parser(sub)

    plain = dict(dataclass_types=(), allow_abbrev=False, formatter_class=argparse.HelpFormatter)
    prepare = sub.add_parser("prepare", help="tokenize and cache a preference dataset; print its report", **plain)
    prepare.add_argument("data", help="a .jsonl/.json/.parquet file or a hub id")
    _option(prepare, "tokenizer", required=True, help="tokenizer directory, .gguf file or hub id")
    _option(prepare, "split", "train_split", "dataset_train_split", default=None,
            help="split of a hub dataset or save_to_disk folder (train's train_split)")
    _option(prepare, "dataset_config", default=None, help="configuration (subset) of a hub dataset")
    _option(prepare, "max_length", type=int, default=None,
            help="longest prompt + completion in tokens (default: no limit)")
    _option(prepare, "max_prompt_length", type=int, default=None, help="longest prompt in tokens (default: no limit)")
    _option(prepare, "max_completion_length", type=int, default=None,
            help="longest completion in tokens, cut keeping its start (default: no limit)")
    _option(prepare, "prompt_truncation_mode", choices=("keep_end", "keep_start"), default="keep_end",
            help="which end of a prompt over max_prompt_length survives, as the training run's setting "
                 "(the cache entry is found only when the two agree)")
    _option(prepare, "cache_dir", "dataset_cache_dir", default=None,
            help="cache the tokenized store here; 'disabled': no caching (default: $EPSDPO_CACHE, else "
                 "$XDG_CACHE_HOME/epsdpo, else ~/.cache/epsdpo)")
    _option(prepare, "chat_template_path", default=None,
            help="a .jinja chat template file that replaces the tokenizer's, for conversational data (TRL's name)")
    _option(prepare, "max_row_bytes", type=int, default=None,
            help="largest raw row in bytes; a larger one is a bad row (default: 1 KiB per token of max_length, at "
                 "least 1 MiB; 64 MiB without max_length)")
    _option(prepare, "skip_invalid", action="store_true", help="skip and count rows that cannot become pairs")
    _option(prepare, "output", help="also save the store to this file (train on it with train_data: FILE.store)")
    prepare.set_defaults(func=cmd_prepare, parser=prepare)

    from epsdpo._core import LAYOUTS
    from epsdpo.recipes.demo_options import FIXED_SETTINGS, DemoOptions

    shown_default = DemoOptions()
    fixed = ", ".join(f"{k}={v}" for k, v in FIXED_SETTINGS.items())
    demo = sub.add_parser("demo", help="ε-DPO on SmolLM2-135M-Instruct with the bundled demo data (CPU, minutes)",
                          description=f"ε-DPO on SmolLM2-135M-Instruct with the bundled demo data. Fixed: {fixed}.",
                          **plain)

    def demo_option(name: str, what: str, **kwargs: Any) -> None:
        # default=None keeps an option not given out of DemoOptions(...), so the dataclass's default is the
        # one that runs; the help shows it
        _option(demo, name, default=None, help=f"{what} (default: {getattr(shown_default, name)})", **kwargs)

    demo_option("output_dir", "where metrics, plots and the model go")
    demo_option("max_steps", "optimizer steps", type=int)
    demo_option("batch_size", "preference pairs per step", type=int)
    demo_option("learning_rate", "peak learning rate of the cosine schedule", type=float)
    demo_option("beta", "initial KL penalty β", type=float)
    demo_option("epsilon", "ε-DPO step size ε", type=float)
    demo_option("layout", "batch layout", choices=LAYOUTS)
    demo_option("eval_prompts", "held-out prompts scored before and after training", type=int)
    demo_option("max_new_tokens", "longest answer generated per held-out prompt, in tokens", type=int)
    demo_option("threads", "torch CPU threads; None: torch's choice", type=int)
    demo_option("bf16", "compute in bf16 (autocast) over fp32 master weights, as training on a GPU does",
                action="store_true")
    demo.set_defaults(func=cmd_demo, parser=demo)
    return parser


def _unrecognized(parser: argparse.ArgumentParser, unknown: list[str], bool_flag_before: dict[str, str]) -> str:
    """argparse's message, with the likely meant flag for a mistyped one."""
    for word in unknown:
        if word in bool_flag_before:
            return _bool_value_error(bool_flag_before[word], word)
    flags = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    hints = []
    for word in unknown:
        key = word.split("=", 1)[0]
        close = difflib.get_close_matches(key, flags, n=1) if key.startswith("--") else []
        if close:
            hints.append(f"{close[0]} for {key}" if len(unknown) > 1 else close[0])
    return f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {', '.join(hints)}?)" if hints else "")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bool_flag_before: dict[str, str] = {}
    if argv[:1] == ["train"]:
        argv[1:], bool_flag_before = _bare_bool_flags(argv[1:])
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.parser.error(_unrecognized(args.parser, unknown, bool_flag_before))
    args.bool_flag_before = bool_flag_before
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
