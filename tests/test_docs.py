"""The manual says what the code does and what the committed pages measured.

Generated pages equal a fresh generation; every config field, public name, CLI option, logged metric
and output file is in the reference; every figure the README quotes is on the page it links; the
example rows of the data-format page load as the formats they illustrate; versions and licence
agree wherever they are written.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

import epsdpo

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text(encoding="utf-8")


def pyproject(key: str) -> str:
    """A top-level string value of pyproject.toml's [project] table (tomllib is Python 3.11+)."""
    found = re.search(rf'^{re.escape(key)} = "([^"]*)"$', (ROOT / "pyproject.toml").read_text(), flags=re.MULTILINE)
    assert found, f"pyproject.toml has no {key} = \"...\""
    return found[1]


def report_page() -> ModuleType:
    sys.path.insert(0, str(ROOT / "examples"))
    import report_page

    return report_page


def script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def headings(page: Path) -> list[str]:
    return re.findall(r"^### `([^`]+)`$", page.read_text(encoding="utf-8"), flags=re.MULTILINE)


# ------------------------------------------------------------------ generated pages cannot drift
def test_config_reference_equals_a_fresh_generation() -> None:
    generator = script("make_config_reference")
    assert generator.PAGE.read_text(encoding="utf-8") == generator.render(), (
        "docs/reference/config.md is stale: run python scripts/make_config_reference.py")


def test_config_reference_has_every_field_once() -> None:
    from epsdpo.cli import RunArguments
    from epsdpo.config import TrainConfig

    listed = headings(DOCS / "reference" / "config.md")
    expected = [f.name for f in dataclasses.fields(RunArguments)] + [f.name for f in dataclasses.fields(TrainConfig)]
    assert listed == expected


def test_config_reference_groups_follow_the_source_comments() -> None:
    from epsdpo.config import TrainConfig

    where = script("make_config_reference")._sections(TrainConfig)
    assert where["output_dir"] == "Output"
    assert where["epsilon"] == "ε-DPO" and where["beta"] == "ε-DPO"
    assert where["learning_rate"] == "Optimisation"
    assert where["layout"] == "Data"
    # a comment block of two lines explains its field and is no heading
    assert where["lora_target_modules"] == where["lora_r"]


def test_trl_page_equals_the_readme_section() -> None:
    generator = script("make_trl_page")
    page = generator.PAGE.read_text(encoding="utf-8")
    assert page == generator.render(README), "docs/how-to/trl.md is stale: run python scripts/make_trl_page.py"
    assert "from epsdpo import DPOConfig, DPOTrainer" in page  # the drop-in, as the README shows it
    assert "](docs/" not in page  # links rewritten to work from docs/how-to/


def test_trl_page_needs_the_section() -> None:
    generator = script("make_trl_page")
    with pytest.raises(generator.MissingSectionError, match="Coming from TRL"):
        generator.render("# epsdpo\n\n## Something else\n")


# ------------------------------------------------------------------ the reference is complete
def test_every_public_name_is_in_the_api_reference() -> None:
    page = (DOCS / "reference" / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: epsdpo\.[\w.]*\.(\w+)$", page, flags=re.MULTILINE))
    missing = [name for name in epsdpo.__all__
               if name not in documented and f"`epsdpo.{name}`" not in page]
    assert not missing, f"public names missing from docs/reference/api.md: {missing}"
    # each documented object is the public one, not a namesake
    for path in re.findall(r"^::: (epsdpo\.[\w.]+)$", page, flags=re.MULTILINE):
        module, name = path.rsplit(".", 1)
        if name in epsdpo.__all__:
            assert getattr(__import__(module, fromlist=[name]), name) is getattr(epsdpo, name), path


def test_cli_reference_lists_every_prepare_and_demo_option() -> None:
    from epsdpo.cli import build_parser

    page = (DOCS / "reference" / "cli.md").read_text(encoding="utf-8")
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for command in ("prepare", "demo"):
        for action in commands[command]._actions:
            if action.option_strings and action.dest != "help":
                assert f"`--{action.dest}`" in page, f"epsdpo {command} --{action.dest} is not in docs/reference/cli.md"


def test_demo_help_shows_every_default_the_demo_runs_with(capsys: pytest.CaptureFixture[str]) -> None:
    from epsdpo.cli import main
    from epsdpo.recipes.demo_options import FIXED_SETTINGS, DemoOptions

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for field in dataclasses.fields(DemoOptions):
        assert f"--{field.name}" in shown, field.name
        assert f"(default: {getattr(DemoOptions(), field.name)})" in shown, field.name
    for name, value in FIXED_SETTINGS.items():
        assert f"{name}={value}" in shown, name


def test_metrics_and_output_files_reference_lists_what_a_run_writes(tmp_path: Path) -> None:
    from test_trainer import config
    from tiny import tiny_llama, toy_store

    from epsdpo.trainer import Trainer

    page = (DOCS / "reference" / "outputs.md").read_text(encoding="utf-8")
    Trainer(tiny_llama(0), config(tmp_path, max_steps=1, save_steps=1, per_device_train_batch_size=4),
            toy_store(4), eval_dataset=toy_store(4, seed=1)).train()
    out = tmp_path / "run"
    logged = {key for line in (out / "metrics.jsonl").read_text().splitlines() for key in json.loads(line)}
    assert {"loss", "kl/beta", "eval_loss"} <= logged  # a train row and an eval row were both seen
    assert not [k for k in sorted(logged) if f"`{k}`" not in page], "logged metrics missing from outputs.md"
    from epsdpo.plots import PANELS

    plots = {"training.png", *(f"{name}.png" for name in PANELS)}  # what plot_run writes, without drawing them
    written = {re.sub(r"-\d+$", "-N", p.name) for p in out.iterdir()} | plots | {
        p.name for folder in ("checkpoint-1", "final") for p in (out / folder).iterdir()}
    assert not [n for n in sorted(written) if n not in page], "output files missing from outputs.md"
    with np.load(out / "beta_ledger.npz") as ledger:
        assert not [n for n in ledger.files if f"`{n}`" not in page], "beta_ledger.npz arrays missing"


# ------------------------------------------------------------------ the examples are true
def test_every_data_format_example_row_loads_as_written(tmp_path: Path) -> None:
    from test_data import build_tokenizer, load

    page = (DOCS / "how-to" / "data-formats.md").read_text(encoding="utf-8")
    rows = [json.loads(block) for block in re.findall(r"```json\n(.*?)\n```", page, flags=re.DOTALL)]
    assert len(rows) == 4  # standard, conversational, and implicit prompt in both forms
    tokenizer = build_tokenizer()
    for number, row in enumerate(rows):
        path = tmp_path / f"row{number}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        store, report = load(str(path), tokenizer)
        assert len(store) == 1, row
        prompt, chosen, rejected = (tokenizer.decode(ids.tolist()) for ids in store[0])
        assert "capital of France" in prompt and "Paris" in chosen and "Lyon" in rejected, (prompt, chosen, rejected)
        assert "Paris" not in prompt and "Lyon" not in prompt


# ------------------------------------------------------------------ the README's figures are the pages'
def _numbers(text: str) -> list[str]:
    return re.findall(r"\d[\d,]*(?:\.\d+)?", text)


def _on_page(number: str, page: str) -> bool:
    return re.search(rf"(?<![\d.,]){re.escape(number)}(?![\d])", page) is not None


def readme_results(readme: str = README) -> list[tuple[str, str, Path]]:
    """(what, figure, page) of each row of the README's results table (the one headed what | figure | page)."""
    table = readme.split("| what | figure | page |", 1)[1].split("\n\n", 1)[0]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        link = re.search(r"\]\((docs/[^)#]+)", cells[-1]) if len(cells) == 3 else None
        if link:
            rows.append((cells[0], cells[1], ROOT / link[1]))
    return rows


def test_every_figure_in_the_readme_results_is_on_its_page() -> None:
    rows = readme_results()
    assert len(rows) >= 6
    for what, figure, page in rows:
        text = page.read_text(encoding="utf-8")
        missing = [n for n in _numbers(figure) if not _on_page(n, text)]
        assert not missing, f"README row '{what}' quotes {missing}, not on {page.relative_to(ROOT)}"


def test_figure_check_catches_a_figure_not_on_the_page() -> None:
    page = "padding 38.9% and 52.6× TRL"
    assert _on_page("52.6", page) and _on_page("38.9", page)
    assert not _on_page("53", page) and not _on_page("2.6", page) and not _on_page("8.9", page)


def test_readme_demo_figures_are_the_recorded_demo_run() -> None:
    from epsdpo.recipes.demo_options import FIXED_SETTINGS, DemoOptions

    summary = json.loads((DOCS / "demo_summary.json").read_text())
    found = re.search(r"([\d.]+) s wall time; gold score ([\d.]+) → ([\d.]+), win rate ([\d.]+) against the "
                      r"untrained model, β ([\d.]+) → ([\d.]+)", " ".join(README.split()))
    assert found, "the README's demo sentence changed: update this test with it"
    seconds, before, after, win, beta_start, beta_end = found.groups()
    assert seconds == f"{summary['wall_seconds']:.0f}"
    assert before == f"{summary['gold_score_before']:.3f}" and after == f"{summary['gold_score_after']:.3f}"
    assert win == f"{summary['win_rate_after_vs_before']:.2f}"
    assert beta_start == f"{summary['beta_start']:.3f}" and beta_end == f"{summary['beta_end']:.3f}"
    options = DemoOptions()
    assert summary["steps"] == options.max_steps and summary["learning_rate"] == options.learning_rate
    demo_line = " ".join(README.split())
    assert (f"{options.max_steps} ε-DPO steps (batch {options.batch_size}, {options.layout}, ε {options.epsilon}, "
            f"learning rate {options.learning_rate:g}".replace("e-06", "e-6")) in demo_line
    assert f"{FIXED_SETTINGS['warmup_ratio']:.0%} warm-up" in demo_line


# ------------------------------------------------------------------ the README's commands
def test_ci_extracts_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    awk = re.search(r"test_command=\$\((awk .*? README\.md)\)", ci)
    assert awk, ".ci/run no longer extracts the test command with awk"
    command = subprocess.run(["bash", "-c", awk[1]], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert command == ('python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && cargo test '
                       "&& pytest")
    assert "mkdocs build --strict" in ci


# ------------------------------------------------------------------ licence, citation, package page
def test_license_is_apache_and_declared_for_wheel_and_sdist() -> None:
    assert pyproject("license") == "Apache-2.0"
    assert 'license-files = ["LICENSE"]' in (ROOT / "pyproject.toml").read_text()
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_citations_agree_with_the_version_and_each_other() -> None:
    cff = (ROOT / "CITATION.cff").read_text()
    assert f'version: "{epsdpo.__version__}"' in cff and "arXiv:2502.13177" in cff
    bibtex = re.search(r"```bibtex\n.*?```", README, flags=re.DOTALL)
    assert bibtex and f"version = {{{epsdpo.__version__}}}" in bibtex[0] and "eprint        = {2502.13177}" in bibtex[0]
    assert bibtex[0] in (DOCS / "citing.md").read_text()


def test_package_description_stands_alone_on_a_package_index() -> None:
    text = (ROOT / pyproject("readme")).read_text()
    targets = re.findall(r"\]\(([^)]+)\)", text)
    assert not [t for t in targets if not t.startswith("https://")], "relative links break on a package index"
    assert "![" not in text and "<img" not in text


# ------------------------------------------------------------------ result pages keep their verdict
def test_a_rerun_keeps_the_hand_written_verdict_and_reading(tmp_path: Path) -> None:
    pages = report_page()
    READING_MARKER, VERDICT_MARKER, write_page_keeping_reading = (
        pages.READING_MARKER, pages.VERDICT_MARKER, pages.write_page_keeping_reading)

    page = tmp_path / "result.md"
    write_page_keeping_reading(page, "# Result\n\nnumbers 1\n")
    page.write_text(page.read_text().replace("# Result\n", f"# Result\n\n**Verdict:** yes.\n{VERDICT_MARKER}\n")
                    .replace("(not written yet)", "A reading."))
    write_page_keeping_reading(page, "# Result\n\nnumbers 2\n")
    text = page.read_text()
    assert text.startswith(f"# Result\n\n**Verdict:** yes.\n{VERDICT_MARKER}\n\nnumbers 2\n")
    assert "numbers 1" not in text and text.count("**Verdict:**") == 1
    assert text.endswith(f"{READING_MARKER}\n\n## Reading\n\nA reading.\n")


def test_every_result_page_opens_with_its_verdict() -> None:
    VERDICT_MARKER = report_page().VERDICT_MARKER
    nav = (ROOT / "mkdocs.yml").read_text()
    results = nav.split("  - Results:\n", 1)[1].split("\n  - ", 1)[0]
    pages = re.findall(r":\s*(\S+\.md)$", results, flags=re.MULTILINE)
    assert len(pages) >= 5
    for name in pages:
        lines = (DOCS / name).read_text().splitlines()
        assert lines[2].startswith("**Verdict"), name
        assert VERDICT_MARKER in lines[3], name



# ------------------------------------------------------------------ the quick starts are valid configs
def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


@pytest.mark.parametrize("page", ["README.md", "docs/getting-started.md", "package_description.md"])
def test_quick_start_configs_are_valid(page: str) -> None:
    import yaml

    from epsdpo.cli import RUN_KEYS
    from epsdpo.config import TrainConfig

    text = (ROOT / page).read_text(encoding="utf-8")
    python = [b for b in _blocks(text, "python") if "epsdpo.TrainConfig(" in b]
    yamls = _blocks(text, "yaml")
    assert python or yamls, f"{page} has no quick start"
    for block in python:
        # the config line(s) run as written; the Trainer line needs a real model
        config_source = block.split("trainer =", 1)[0]
        namespace: dict = {}
        exec(config_source, namespace)  # noqa: S102 - a committed page's example, the point of the test
        assert isinstance(namespace["config"], TrainConfig)
    for block in yamls:
        keys = yaml.safe_load(block)
        assert {"model", "train_data"} <= set(keys), page
        TrainConfig.from_dict({k: v for k, v in keys.items() if k not in RUN_KEYS})
