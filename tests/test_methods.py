"""A method is one unit (`epsdpo.methods`): the config's names are the registry's, every method
answers the whole protocol, nothing outside the registry and the config compares method names, and
IPO's loss, settings and refusals are what docs/algorithm.md says."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch

import epsdpo
from epsdpo._core import KlController
from epsdpo.beta_rules import PairLogps
from epsdpo.config import TrainConfig
from epsdpo.distributed import DistInfo
from epsdpo.methods import METHOD_NAMES, build_method, method_class
from epsdpo.methods.ipo import ipo_loss
from name_scan import compared_names
from tiny import tiny_llama

PACKAGE = Path(epsdpo.__file__).parent
# Where a method's name may be read: the registry and the config that takes its names from it
NAME_READERS = {PACKAGE / "config.py", *(PACKAGE / "methods").glob("*.py")}


def config_for(name: str, **overrides) -> TrainConfig:
    return TrainConfig(**{"method": name, "loss_type": method_class(name).loss_type, "progress": False, **overrides})


def test_the_configs_method_names_are_the_registrys():
    assert typing.get_args(typing.get_type_hints(TrainConfig)["method"]) == METHOD_NAMES


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_answers_the_whole_protocol(name):
    config = config_for(name)
    cls = method_class(name)
    assert cls.title and cls.loss_type and isinstance(cls.own_fields, tuple)
    assert set(cls.own_fields) <= {f.name for f in config.__dataclass_fields__.values()}
    assert (cls.step_epsilon(config), cls.check_epsilon(config)) == (config.step_epsilon, config.check_epsilon)
    assert cls.reference_moves(config) == config.moves_reference
    assert all(holds for holds, *_ in cls.checks(config))
    assert [key for key, _ in cls.card_rows(config)] == ["ε"]
    policy = tiny_llama(0)
    method = build_method(config, KlController(config.beta, config.step_epsilon, config.beta_min), DistInfo(),
                          torch.device("cpu"), policy, tiny_llama(0))
    assert method.moves_reference == config.moves_reference
    assert len(method.after_step) == int(config.moves_reference)
    assert isinstance(method.beta_rule.state_dict(), dict)


def _compared_method_names(source: str) -> list[int]:
    return compared_names(source, METHOD_NAMES, "method")


def test_no_method_name_is_compared_outside_the_registry_and_the_config():
    found = [f"{path.relative_to(PACKAGE)}:{line}" for path in sorted(PACKAGE.rglob("*.py"))
             if path not in NAME_READERS for line in _compared_method_names(path.read_text(encoding="utf-8"))]
    assert found == []


def test_the_name_check_finds_each_kind_of_comparison():
    source = ('def f(config, name):\n'
              '    a = config.method == "tr_dpo"\n'
              '    b = name in ("ipo", "dpo")\n'
              '    c = config.method != name\n'
              '    d = name == "padded"\n')
    assert _compared_method_names(source) == [2, 3, 4]


def test_ipo_worked_example():
    # chosen: log-ratio +2 over 4 tokens, rejected: −1 over 2 tokens → Δ = 0.5 + 0.5 = 1; β = 0.1: target 5
    logps = PairLogps(torch.tensor([-8.0]), torch.tensor([-12.0]), torch.tensor([-10.0]), torch.tensor([-11.0]),
                      torch.zeros(1, dtype=torch.long))
    losses, chosen, rejected = ipo_loss(logps, torch.tensor([0.1], dtype=torch.float64), torch.tensor([4]),
                                        torch.tensor([2]))
    torch.testing.assert_close(losses, torch.tensor([16.0]))  # (1 − 1/(2·0.1))² = (1 − 5)²
    torch.testing.assert_close((chosen, rejected), (torch.tensor([0.2]), torch.tensor([-0.1])))  # β × summed ratios


@pytest.mark.parametrize("loss_type", ["ipo", ["ipo"]])
def test_ipo_is_method_ipo_with_trls_loss_type(loss_type):
    config = TrainConfig(method="ipo", loss_type=loss_type, precompute_ref_log_probs=True, sync_ref_model=False)
    assert (config.loss_type, config.step_epsilon, config.check_epsilon, config.moves_reference) == ("ipo", 0, 0, False)


@pytest.mark.parametrize(("settings", "refusal"), [
    (dict(loss_type="ipo"), r"^loss_type='ipo' is invalid: must be 'sigmoid' for method='epsilon_dpo'; .*ipo: 'ipo'\)$"),
    (dict(method="ipo"), r"^loss_type='sigmoid' is invalid: must be 'ipo' for method='ipo'; "),
    (dict(method="ipo", loss_type="ipo", cdpo_smoothing=0.1), r"^cdpo_smoothing=0.1 is invalid: must be 0 with "
                                                               r"method='ipo'"),
])
def test_ipo_combinations_it_would_not_honour_are_refused_in_one_line(settings, refusal):
    with pytest.raises(ValueError, match=refusal):
        TrainConfig(**settings)


def test_the_progress_bar_names_the_method(tmp_path, capsys):
    from epsdpo.trainer import Trainer
    from tiny import toy_store

    config = config_for("ipo", output_dir=str(tmp_path / "run"), max_steps=1, max_length=32, plots=False,
                        report_to="none", progress=True)
    Trainer(tiny_llama(0), config, toy_store(8)).train()
    assert "IPO: 100%" in capsys.readouterr().err
