"""chat_template_path (TRL's name): a .jinja file whose template replaces the tokenizer's, for
conversational data whose tokenizer has none. Before, the error for such data advised
`chat_template=...`, which neither Trainer, TrainConfig nor the CLI accepted; a file that is no
readable template (missing, a FIFO, a directory, huge, not UTF-8) is refused naming the field."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from epsdpo.cli import main
from epsdpo.config import TrainConfig
from epsdpo.data import DataSourceError, load_preferences
from epsdpo.models import ChatTemplateError
from epsdpo.trainer import Trainer
from hostile_files import HOSTILE_KINDS, finishes_within, make_hostile
from test_data import TEMPLATE, build_tokenizer
from tiny import tiny_llama


def conversations(path: Path, n: int = 4) -> Path:
    rows = [{"prompt": [{"role": "user", "content": f"what is {i}?"}],
             "chosen": [{"role": "assistant", "content": f"it is {i}"}],
             "rejected": [{"role": "assistant", "content": "no idea"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def untemplated() -> Any:
    return build_tokenizer(template=None)


def config(tmp_path: Path, **overrides: Any) -> TrainConfig:
    return TrainConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2, max_length=64,
                       dataset_cache_dir="disabled", progress=False, plots=False, **overrides)


def test_the_error_for_untemplated_conversations_names_a_setting_that_exists(tmp_path, untemplated):
    data = conversations(tmp_path / "conv.jsonl")
    with pytest.raises(DataSourceError, match="conv.jsonl: the data is conversational but the tokenizer has no chat "
                                              "template: set chat_template_path"):
        Trainer(tiny_llama(0, vocab=len(untemplated)), config(tmp_path), data, tokenizer=untemplated)
    assert "chat_template_path" in {f for f in TrainConfig.__dataclass_fields__}


def test_chat_template_path_reaches_the_data_as_the_template(tmp_path, untemplated):
    data = conversations(tmp_path / "conv.jsonl")
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    trainer = Trainer(tiny_llama(0, vocab=len(untemplated)), config(tmp_path, chat_template_path=str(tmp_path / "chat.jinja")),
                      data, tokenizer=untemplated)
    expected, _ = load_preferences(data, build_tokenizer(template=None), chat_template=TEMPLATE, cache_dir=None,
                                   progress=False)
    assert trainer.tokenizer.chat_template == TEMPLATE  # and so the tokenizer saved with the model has it
    assert len(trainer.train_store) == len(expected) == 4
    for i in range(4):
        assert [t.tolist() for t in trainer.train_store[i]] == [t.tolist() for t in expected[i]]


def bad_template(kind: str, tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "chat.jinja"
    if kind in HOSTILE_KINDS:
        return path, make_hostile(kind, path)
    if kind == "missing":
        return path, "no such file"
    if kind == "huge":
        path.write_bytes(b"x" * ((1 << 20) + 1))
        return path, "is over 1,048,576 bytes"
    path.write_bytes(b"{{ bos_token }}\xff")
    return path, "not UTF-8 text (byte 0xff"


BAD_TEMPLATES = ["missing", *HOSTILE_KINDS, "huge", "not UTF-8"]


@pytest.mark.parametrize("kind", BAD_TEMPLATES)
def test_a_template_file_that_cannot_be_read_is_refused_naming_the_field(kind, tmp_path, untemplated):
    path, reason = bad_template(kind, tmp_path)
    data = conversations(tmp_path / "conv.jsonl")
    with pytest.raises(ChatTemplateError, match=rf"^chat_template_path='{path}': {re.escape(reason)}"):
        finishes_within(60, lambda: Trainer(tiny_llama(0, vocab=len(untemplated)),
                                            config(tmp_path, chat_template_path=str(path)), data, tokenizer=untemplated),
                        fifo=path if kind == "fifo" else None)


@pytest.mark.parametrize("kind", BAD_TEMPLATES)
def test_prepare_takes_chat_template_path_and_refuses_a_bad_one_in_one_line(kind, tmp_path, untemplated, capsys):
    tokenizer_dir = tmp_path / "tok"
    untemplated.save_pretrained(tokenizer_dir)
    data = conversations(tmp_path / "conv.jsonl")
    argv = ["prepare", str(data), "--tokenizer", str(tokenizer_dir), "--cache_dir", "disabled"]
    with pytest.raises(SystemExit, match="^epsdpo prepare: conv.jsonl: the data is conversational but the tokenizer "
                                         "has no chat template: set chat_template_path"):
        main(argv)
    good = tmp_path / "good.jinja"
    good.write_text(TEMPLATE)
    assert main([*argv, "--chat_template_path", str(good)]) == 0
    assert "conversational" in capsys.readouterr().out  # the report of the prepared data
    path, reason = bad_template(kind, tmp_path)
    with pytest.raises(SystemExit, match=rf"^epsdpo prepare: chat_template_path='{path}': {re.escape(reason)}"):
        finishes_within(60, lambda: main([*argv, "--chat_template_path", str(path)]), fifo=path if kind == "fifo" else None)
