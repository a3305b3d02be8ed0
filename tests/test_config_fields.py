"""Each `TrainConfig` field's bound is declared once, with the field: the check and the help text are
both made from it, so they cannot disagree; a refusal is a `ConfigFieldError` whose parts (field,
value, allowed) the CLI reads instead of its text."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import typing

import pytest

import epsdpo
from epsdpo.cli import main
from epsdpo.config import TrainConfig
from epsdpo.config_fields import ConfigFieldError, OneOf, Range, rule_of

DECLARED = [f for f in dataclasses.fields(TrainConfig) if rule_of(f) is not None]
RANGES = [f for f in DECLARED if isinstance(rule_of(f), Range)]


def _outside(rule: Range) -> list[float]:
    """Values just past each end of the range (the end itself where it is open)."""
    step = (lambda x, d: x + d) if rule.whole else (lambda x, d: math.nextafter(x, d * math.inf))
    values = []
    if rule.low is not None:
        values.append(rule.low if rule.low_open else step(rule.low, -1))
    if rule.high is not None:
        values.append(rule.high if rule.high_open else step(rule.high, 1))
    return [v for v in values if v != rule.unset]


def _inside(rule: Range) -> list[float]:
    """Each closed end of the range, and the unset value and None where they are accepted."""
    values = [end for end, is_open in ((rule.low, rule.low_open), (rule.high, rule.high_open))
              if end is not None and not is_open]
    return values + [v for v in (rule.unset,) if v is not None] + ([None] if rule.optional else [])


def test_most_bounded_fields_declare_their_bound():
    """The declared rules cover the numeric fields that have a bound (a guard against a refactor that
    moves them back into hand-written checks)."""
    assert len(RANGES) >= 35 and {f.name for f in DECLARED} >= {
        "beta", "epsilon", "seed", "ddp_timeout", "max_steps", "optim", "label_smoothing", "push_to_hub"}


@pytest.mark.parametrize("f", DECLARED, ids=lambda f: f.name)
def test_help_ends_with_the_words_of_the_check(f):
    rule = rule_of(f)
    assert f.metadata["help"].endswith(f" Must be {rule.words()}."), f.metadata["help"]
    assert set(f.metadata) == {"help"}, "HfArgumentParser passes every metadata key to argparse"


@pytest.mark.parametrize("f", RANGES, ids=lambda f: f.name)
def test_a_range_accepts_its_closed_ends_and_refuses_just_past_them(f):
    rule = rule_of(f)
    for value in _inside(rule):
        assert getattr(TrainConfig(**{f.name: value}), f.name) == value
    for value in _outside(rule):
        with pytest.raises(ConfigFieldError) as refused:
            TrainConfig(**{f.name: value})
        error = refused.value
        assert (error.field, error.value) == (f.name, value)
        # an integer beyond what the core holds is refused by the type check, in its own words
        if not (rule.whole and value > 2**31 - 1):
            assert error.allowed == rule.words() and str(error) == f"{f.name}={error.value!r} is invalid: must be {rule.words()}"


@pytest.mark.parametrize("f", RANGES, ids=lambda f: f.name)
def test_a_range_accepts_none_exactly_when_the_annotation_does(f):
    hint = typing.get_type_hints(TrainConfig)[f.name]
    assert rule_of(f).optional == (type(None) in typing.get_args(hint))


def test_a_one_of_rule_refuses_what_it_does_not_list():
    for f in (f for f in DECLARED if isinstance(rule_of(f), OneOf)):
        rule = rule_of(f)
        with pytest.raises(ConfigFieldError, match=rf"^{f.name}=.* is invalid: must be ") as refused:
            listed = rule.values[0]
            TrainConfig(**{f.name: "something else" if isinstance(listed, str) else
                           not listed if isinstance(listed, bool) else 0.5})
        assert refused.value.field == f.name and refused.value.allowed == rule.words()


def test_lora_alpha_is_refused_by_its_own_name():
    """lora_r and lora_alpha were checked together and both reported as lora_r."""
    with pytest.raises(ConfigFieldError, match=r"^lora_alpha=0 is invalid: must be an integer >= 1$") as refused:
        TrainConfig(lora_alpha=0)
    assert refused.value.field == "lora_alpha"


def test_the_error_is_a_value_error_and_one_of_epsdpos_config_errors_with_its_parts():
    with pytest.raises(ValueError) as refused:
        TrainConfig(epsilon=2)
    error = refused.value
    assert isinstance(error, epsdpo.ConfigError) and isinstance(error, epsdpo.ConfigFieldError)
    assert (error.field, error.value, error.allowed) == ("epsilon", 2.0, "in [0, 1)")
    for copied in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert (type(copied), copied.field, copied.value, copied.allowed, str(copied)) == \
               (type(error), error.field, error.value, error.allowed, str(error))
    assert "ConfigFieldError" in epsdpo.__all__ and "UnknownConfigKeysError" in epsdpo.__all__


def test_unknown_keys_error_lists_the_keys_and_what_was_meant():
    with pytest.raises(epsdpo.UnknownConfigKeysError) as refused:
        TrainConfig.from_dict({"betta": 0.2})
    assert refused.value.keys == ["betta"] and "beta" in refused.value.known
    assert refused.value.summary == "unknown config keys ['betta'] (did you mean 'beta'?)"


def _usage_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        main(["train", *argv])
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_the_cli_names_the_flag_from_the_errors_field(capsys):
    """The flag is the error's field, not the text before its first '='."""
    line = _usage_error(capsys, "--model", "m", "--train_data", "d", "--lora_alpha", "0")
    assert line.endswith("error: argument --lora_alpha: lora_alpha=0 is invalid: must be an integer >= 1")


def test_the_cli_keeps_a_value_that_looks_like_its_own_text(capsys):
    """A value holding "; known keys: " is shown whole, not cut where an unknown-keys error would be."""
    line = _usage_error(capsys, "--model", "m", "--train_data", "d", "--optim", "sgd; known keys: x")
    assert line.endswith("error: argument --optim: optim='sgd; known keys: x' is invalid: must be adamw_torch or "
                         "adamw_torch_fused: AdamW is the one optimizer implemented")
