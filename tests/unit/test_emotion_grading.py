"""The emotion-prefix example's parts that need no server: grading, rewards, config, data, statistics."""

from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "emotion_prefix_gsm8k"
sys.path[:0] = [str(EXAMPLE), str(EXAMPLE.parent)]

from config import ConfigError, load_config  # noqa: E402
from data import BUNDLED, load_problems  # noqa: E402
from grading import efficiency_reward, extract_answer, format_reward, grade, parse_number, reference_answer  # noqa: E402
from stats import bootstrap_mean_interval, paired_bootstrap_difference, wilson_interval  # noqa: E402
from variants import PREFIXES, SYSTEM_PROMPT, messages  # noqa: E402


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("so 3 + 4 = 7\nAnswer: 7", Fraction(7)),
        ("Answer: $1,234.00", Fraction(1234)),
        ("**Answer:** 1234 dollars", Fraction(1234)),
        ("Answer: \\boxed{1234}", Fraction(1234)),
        ("Answer: 2468/2", Fraction(1234)),
        ("Answer: \\frac{3}{4}", Fraction(3, 4)),
        ("Answer: 0.75", Fraction(3, 4)),
        ("Answer: 1 1/2 cups", Fraction(3, 2)),
        ("Answer: −7", Fraction(-7)),
        ("Answer: 4.75.", Fraction(19, 4)),
        ("ANSWER : 72 clips", Fraction(72)),
        ("Answer: 12\nWait, no.\nAnswer: 13", Fraction(13)),  # the last Answer line counts
        ("Answer: 50%", Fraction(50)),
        ("The answer is 72.", None),  # no Answer: line
        ("Answer: seventy-two", None),
        ("Answer: 5/0", None),
        ("My answer: 8", None),  # "answer:" must start the line
        ("Final Answer: 42", Fraction(42)),
        ("Answer: -$5", Fraction(-5)),
        ("Answer: 1,000,000", Fraction(1_000_000)),
        ("Answer: 1,0000", None),  # a broken grouping is no number
        ("Answer: 1,2,3", None),  # nor is a list
        ("Answer: x2 = 18", Fraction(18)),  # digits inside words are not numbers
        ("Answer: CO2 weighs 44", Fraction(44)),
    ],
)
def test_answers_are_read_from_the_last_answer_line(completion, expected):
    assert parse_number(extract_answer(completion)) == expected
    assert format_reward(completion) == (0.0 if expected is None else 1.0)


def test_grading_compares_exactly_against_the_reference():
    assert reference_answer("Natalia sold 48/2 = 24 clips...\n#### 72") == 72
    assert reference_answer("1,200") == 1200
    with pytest.raises(ValueError):
        reference_answer("#### none")
    assert grade("Answer: 72.0", Fraction(72))["correct"]
    assert not grade("Answer: 72.01", Fraction(72))["correct"]
    assert not grade("72", Fraction(72))["correct"]  # right number, no Answer line: not graded correct
    assert grade("Answer: 3/4", Fraction(3, 4)) == {
        "answer_text": "3/4",
        "answer": "3/4",
        "correct": True,
        "format_reward": 1.0,
    }


def test_format_needs_the_answer_line_last():
    assert format_reward("Answer: 7\nHope this helps!") == 0.0
    assert grade("Answer: 7\nHope this helps!", Fraction(7))["correct"]  # still graded
    assert format_reward("work...\n\nAnswer: 7\n\n") == 1.0


def test_efficiency_depends_on_the_completion_length_only():
    assert efficiency_reward(0, 200) == 1.0
    assert efficiency_reward(50, 200) == 0.75
    assert efficiency_reward(200, 200) == 0.0 and efficiency_reward(250, 200) == 0.0
    with pytest.raises(ValueError):
        efficiency_reward(1, 0)


def test_variants_put_the_prefix_before_the_first_user_message():
    assert set(PREFIXES) == {
        "control",
        "frustration",
        "impatience",
        "anxiety",
        "collaborative",
        "patience",
        "calm",
    }
    assert messages("control", "Q?") == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "Q?"},
    ]
    assert messages("calm", "Q?")[1]["content"] == PREFIXES["calm"] + "\n\nQ?"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_the_example_config_loads_and_relative_paths_follow_the_file():
    config = load_config(EXAMPLE / "config.yaml")
    assert config.run.out_dir == EXAMPLE / "runs" / "example"
    assert config.data.limit == 10 and len(config.variants) == 7


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("generation:\n  max_token: 10\n", "generation.max_token: Extra inputs are not permitted"),
        ("sever:\n  url: x\n", "sever: Extra inputs are not permitted"),
        ("variants: [frustration, calm]\n", "must include control"),
        ("variants: [control, rage]\n", "unknown variants"),
        ("deploy:\n  target: remote\n", "needs deploy.host"),
        ("deploy:\n  port: 8001\n", "server.url must be http://127.0.0.1:8001"),
        ("data:\n  source: jsonl\n", "needs data.path"),
        ("generation:\n  temperature: -1\n", "generation.temperature"),
        ("- just\n- a list\n", "must be a mapping"),
        ("generation: {max_tokens: [\n", "while parsing"),
        ("data:\n  source: bundled\n  path: x.jsonl\n", "data.path is not used with data.source bundled"),
        ("data:\n  source: jsonl\n  path: x.jsonl\n  split: train\n", "data.split is not used"),
        ("generation:\n  samples_per_problem: 2\n", "needs temperature > 0"),
        ("capture:\n  layers: []\n", "capture.layers"),
    ],
)
def test_a_bad_config_is_refused_naming_the_key(tmp_path, text, complaint):
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, text))
    assert complaint in str(caught.value)


def test_data_sources(tmp_path):
    bundled, origin = load_problems("bundled", None, "test", None, 0)
    assert len(bundled) == 24 and "bundled" in origin
    assert all(reference_answer(p.answer) > 0 for p in bundled)
    subset, _ = load_problems("bundled", None, "test", 5, seed=3)
    again, _ = load_problems("bundled", None, "test", 5, seed=3)
    assert subset == again and len(subset) == 5
    assert [p.id for p in subset] == sorted(p.id for p in subset)  # kept in source order

    lines = tmp_path / "mine.jsonl"
    lines.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n\n")
    (problem,), origin = load_problems("jsonl", lines, "test", None, 0)
    assert problem.id == "mine-1" and origin == f"jsonl {lines}"
    lines.write_text(json.dumps({"question": "1+1?", "answer": "two"}) + "\n")
    with pytest.raises(ValueError, match="mine.jsonl:1"):
        load_problems("jsonl", lines, "test", None, 0)


def test_auto_falls_back_when_gsm8k_cannot_be_reached(monkeypatch):
    import data

    def unreachable(split):
        raise ConnectionError("offline")

    monkeypatch.setattr(data, "_from_gsm8k", unreachable)
    problems, origin = load_problems("auto", None, "test", 3, 0)
    assert len(problems) == 3 and "bundled" in origin
    with pytest.raises(RuntimeError, match="GSM8K could not be loaded"):
        load_problems("gsm8k", None, "test", 3, 0)
    assert BUNDLED.exists()


def test_interval_estimates():
    low, high = wilson_interval(5, 10)  # the textbook value
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0.25 < high < 0.35
    low, high = wilson_interval(10, 10)
    assert 0.65 < low < 0.75 and high == pytest.approx(1.0)
    assert bootstrap_mean_interval([1.0, 2.0, 3.0], seed=1) == bootstrap_mean_interval(
        [1.0, 2.0, 3.0], seed=1
    )
    low, high = bootstrap_mean_interval([0.0, 1.0] * 50)
    assert low < 0.5 < high
    mean, low, high = paired_bootstrap_difference([1, 1, 0, 1], [0, 1, 0, 0])
    assert mean == 0.5 and low <= mean <= high
