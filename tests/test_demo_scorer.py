"""The demo dataset's programmatic scorer, and the bundled data it produced."""

from __future__ import annotations

import json
import random

import pytest

from epsdpo.data import demo_scorer as s
from epsdpo.data.demo import DEMO_DIR, demo_rows


def test_counts() -> None:
    assert s.count_words("Hello, world! It's a test-case.") == 5
    assert s.count_words("") == 0
    assert s.count_bullets("- one\n* two\n• three\n1. four\n2) five\nnot -a bullet\n-no space") == 5
    assert s.count_sentences("One. Two! Three? four") == 4
    assert s.count_sentences("Version 2.5 is out. Yes.") == 2  # "2.5" does not end a sentence
    assert s.count_sentences("...") == 0


@pytest.mark.parametrize(
    ("constraint", "good", "bad"),
    [
        ({"type": "max_words", "n": 3}, "one two three", "one two three four five six"),
        ({"type": "min_words", "n": 4}, "one two three four", "one two"),
        ({"type": "include_words", "words": ["river", "light"]}, "The River has light.", "The lake is dark."),
        ({"type": "exclude_words", "words": ["river"]}, "A lake, rivers aside.", "The river flows."),
        ({"type": "keyword_frequency", "word": "green", "n": 2}, "Green grass, green trees.", "Green grass."),
        ({"type": "bullets", "n": 2}, "- a\n- b", "- a\n- b\n- c\n- d"),
        ({"type": "sentences", "n": 2}, "It rains. It pours.", "It rains. It pours. It stops. Sun."),
        ({"type": "lowercase"}, "all quiet here.", "Not quiet."),
        ({"type": "no_commas"}, "No commas here.", "One, two."),
        ({"type": "starts_with", "word": "Sure"}, "Sure! Here it is.", "Here it is. Sure."),
        ({"type": "ends_with", "phrase": "the end"}, "And that was it. The end.", "The end is near, they said."),
        ({"type": "title", }, "<<A Title>>\nText.", "A Title\nText."),
    ],
)
def test_each_constraint(constraint: dict, good: str, bad: str) -> None:
    assert s.check(good, constraint) == 1.0
    assert s.check(bad, constraint) < 1.0
    assert 0.0 <= s.check(bad, constraint) <= 1.0
    assert s.describe(constraint)  # every type has an instruction sentence


def test_partial_credit_falls_with_distance() -> None:
    c = {"type": "max_words", "n": 10}
    scores = [s.check(" ".join(["w"] * n), c) for n in (10, 12, 15, 20, 30)]
    assert scores == sorted(scores, reverse=True) and scores[0] == 1.0 and scores[-1] == 0.0
    b = {"type": "bullets", "n": 3}
    assert s.check("- a\n- b", b) == pytest.approx(2 / 3)
    assert s.check("- a\n- b\n- c\n- d", b) == pytest.approx(2 / 3)
    assert s.check("no bullets", b) == 0.0
    assert s.check("Red.", {"type": "include_words", "words": ["red", "blue"]}) == 0.5


def test_score_is_the_mean_and_accepts_json() -> None:
    spec = [{"type": "lowercase"}, {"type": "max_words", "n": 2}]
    assert s.score("hello there", spec) == 1.0
    assert s.score("Hello there", spec) == 0.5
    assert s.score("Hello there", json.dumps(spec)) == 0.5
    assert s.score_details("Hello there", spec) == [0.0, 1.0]
    assert s.follows_all("hello there", spec) and not s.follows_all("Hello there", spec)
    with pytest.raises(ValueError, match="unknown constraint"):
        s.score("x", [{"type": "rhymes"}])
    with pytest.raises(ValueError, match="at least one"):
        s.score("x", [])


def test_instruction_text() -> None:
    spec = [{"type": "include_words", "words": ["a", "b"]}, {"type": "sentences", "n": 1}]
    assert s.instruction_text(spec) == 'Include the words "a" and "b". Answer in exactly 1 sentence.'


def test_sampled_instructions_are_seeded_compatible_and_varied() -> None:
    draws = [s.sample_instructions(random.Random(seed)) for seed in range(400)]
    assert draws == [s.sample_instructions(random.Random(seed)) for seed in range(400)]
    seen = set()
    for spec in draws:
        types = [c["type"] for c in spec]
        assert 1 <= len(types) <= 3 and len(set(types)) == len(types)
        for i, a in enumerate(types):
            for b in types[i + 1 :]:
                assert frozenset({a, b}) not in s._CLASHES
        assert s.parse_instructions(json.dumps(spec)) == spec
        seen.update(types)
    assert seen == set(s.CONSTRAINT_TYPES)


def test_a_perfect_answer_exists_for_sampled_specs() -> None:
    """Specs the generator draws are attainable: build an answer that meets each one alone."""
    answers = {
        "max_words": lambda c: "short answer.",
        "min_words": lambda c: " ".join(["word"] * c["n"]) + ".",
        "include_words": lambda c: " ".join(c["words"]) + ".",
        "exclude_words": lambda c: "nothing forbidden here.",
        "keyword_frequency": lambda c: " ".join([c["word"]] * c["n"]) + ".",
        "bullets": lambda c: "\n".join(f"- item {i}" for i in range(c["n"])),
        "sentences": lambda c: " ".join(["It is."] * c["n"]),
        "lowercase": lambda c: "all lowercase.",
        "no_commas": lambda c: "no commas.",
        "starts_with": lambda c: f"{c['word']} it is.",
        "ends_with": lambda c: f"so {c['phrase']}.",
        "title": lambda c: "<<Title>> body.",
    }
    for seed in range(100):
        for c in s.sample_instructions(random.Random(seed)):
            assert s.check(answers[c["type"]](c), c) == 1.0, c


needs_data = pytest.mark.skipif(not (DEMO_DIR / "train.jsonl.gz").is_file(), reason="demo data not generated")


@needs_data
def test_demo_data_is_consistent_with_the_scorer() -> None:
    train, test = demo_rows("train"), demo_rows("test")
    assert len(train) >= 300 and len(test) >= 100
    for row in train:
        spec = s.parse_instructions(row["instructions"])
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert s.score(chosen, spec) == pytest.approx(row["chosen_score"], abs=1e-4)
        assert s.score(rejected, spec) == pytest.approx(row["rejected_score"], abs=1e-4)
        assert row["chosen_score"] >= row["rejected_score"] + 0.1 - 1e-9
        assert chosen.strip() and rejected.strip() and chosen != rejected
        assert s.instruction_text(spec) in row["prompt"][-1]["content"]
    for row in test:
        assert s.parse_instructions(row["instructions"])
    prompts = lambda rows: {r["prompt"][-1]["content"].split(". ")[0] for r in rows}  # noqa: E731  the task sentence
    assert not prompts(train) & prompts(test)


@needs_data
def test_demo_dataset_loads_as_datasets() -> None:
    pytest.importorskip("datasets")
    from epsdpo.data import demo_dataset

    train = demo_dataset("train")
    assert {"prompt", "chosen", "rejected", "instructions"} <= set(train.column_names)
    assert len(demo_dataset("test")) >= 100
    with pytest.raises(ValueError, match="split"):
        demo_dataset("validation")  # type: ignore[arg-type]
