"""Problems: GSM8K through ``datasets`` when it can be reached, a local JSONL file, or the
bundled set written for this project (``problems.jsonl``, 24 problems) for offline runs.

A JSONL line is ``{"id": ..., "question": ..., "answer": ...}``; ``id`` is optional and
``answer`` is a number or GSM8K's worked answer ending in ``#### <number>``.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from grading import reference_answer

log = logging.getLogger("emotion_prefix_gsm8k")

BUNDLED = Path(__file__).resolve().parent / "problems.jsonl"


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str  # the reference as given; graded with grading.reference_answer

    def as_dict(self) -> dict:
        return {"id": self.id, "question": self.question, "answer": self.answer}


def _from_jsonl(path: Path, prefix: str) -> list[Problem]:
    problems = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problem = Problem(str(row.get("id", f"{prefix}-{number}")), row["question"], str(row["answer"]))
            reference_answer(problem.answer)  # refuse a line whose answer has no number, now
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{number}: not a problem line ({exc})") from exc
        problems.append(problem)
    return problems


def _from_gsm8k(split: str) -> list[Problem]:
    from datasets import load_dataset  # optional: pip install datasets

    rows = load_dataset("openai/gsm8k", "main", split=split)
    return [Problem(f"gsm8k-{split}-{i}", row["question"], row["answer"]) for i, row in enumerate(rows)]


def load_problems(
    source: str, path: Path | None, split: str, limit: int | None, seed: int
) -> tuple[list[Problem], str]:
    """The problems to run and a description of where they came from.

    ``auto`` tries GSM8K, then ``path`` if given, then the bundled set. ``limit`` takes a
    seeded random subset (the same one every time for the same seed), kept in source order.
    """
    if source in ("gsm8k", "auto"):
        try:
            problems, origin = _from_gsm8k(split), f"gsm8k ({split}) via datasets"
        except Exception as exc:  # no datasets package, no network, no cache: fall back (or fail)
            if source == "gsm8k":
                raise RuntimeError(
                    f"GSM8K could not be loaded ({type(exc).__name__}: {exc}); install `datasets` and "
                    "check the network, or use data.source jsonl/bundled"
                ) from exc
            log.warning("GSM8K not reachable (%s: %s); falling back", type(exc).__name__, exc)
            source = "jsonl" if path is not None else "bundled"
    if source == "jsonl":
        if path is None:
            raise ValueError("data.source jsonl needs data.path")
        problems, origin = _from_jsonl(path, path.stem), f"jsonl {path}"
    elif source == "bundled":
        problems, origin = _from_jsonl(BUNDLED, "local"), "bundled problems.jsonl (written for this project)"
    if limit is not None and limit < len(problems):
        chosen = sorted(random.Random(seed).sample(range(len(problems)), limit))
        problems = [problems[i] for i in chosen]
    if len({p.id for p in problems}) != len(problems):
        raise ValueError("problem ids must be unique")
    return problems, origin
