"""Grading and rewards: the last ``Answer:`` line, numbers compared exactly after normalising.

``1,234``, ``$1,234.00``, ``1234 dollars``, ``**Answer:** 1234``, ``\\boxed{1234}`` and
``2468/2`` are all 1234; ``3/4``, ``0.75`` and ``\\frac{3}{4}`` are equal; ``1 1/2`` is 1.5.
Numbers are compared as exact fractions, never as floats.

Rewards: ``format`` is 1 when the completion ends with an ``Answer:`` line with a number on it;
``efficiency`` depends on the completion's own length only (1 for an empty completion, 0 at
or past the token limit): the prompt's length, which the variant's prefix changes, never
enters it.
"""

from __future__ import annotations

import re
from fractions import Fraction

_ANSWER_LINE = re.compile(
    r"^[\s>*_#-]*(?:final\s+)?answer[\s*_]*[:：][\s*_]*(?P<rest>.*)$", re.IGNORECASE | re.MULTILINE
)
_FRAC_LATEX = re.compile(r"\\[dt]?frac\{\s*(-?[\d.,]+)\s*\}\{\s*(-?[\d.,]+)\s*\}")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
# A number, not part of a word ("CO2", "x2"): an optional sign (a minus sign or a hyphen, or an
# en dash right before the digits), an optional currency sign, digits with optional thousands
# commas (groups of exactly three), optional decimals; then optionally a mixed fraction
# ("1 1/2") or a fraction ("3/4"). A number followed by ",<digit>" is a list or a bad grouping.
_NUMBER = re.compile(
    r"(?<![\w.,])(?P<sign>[-−]\s*|–(?=[\d$€£¥]))?[$€£¥]?\s*"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?![\d,])|\d+(?![\d,]))?(?P<dec>\.\d+)?"
    r"(?:(?:\s+(?P<mnum>\d+)\s*/\s*(?P<mden>\d+))|(?:\s*/\s*(?P<den>\d+(?:\.\d+)?)))?"
    r"(?![\w,]\d)"
)


def extract_answer(completion: str) -> str | None:
    """The text after the last ``Answer:`` line marker, or None."""
    matches = list(_ANSWER_LINE.finditer(completion))
    return matches[-1].group("rest").strip() if matches else None


def parse_number(text: str | None) -> Fraction | None:
    """The first number in ``text`` as an exact fraction (currency, commas, units, LaTeX allowed)."""
    if text is None:
        return None
    boxed = _BOXED.search(text)
    if boxed:
        text = boxed.group(1)
    text = _FRAC_LATEX.sub(r"\1/\2", text)
    for match in _NUMBER.finditer(text):
        whole, decimals = match.group("int"), match.group("dec")
        if whole is None and decimals is None:
            continue
        value = Fraction((whole or "0").replace(",", "") + (decimals or ""))
        if match.group("mnum"):
            denominator = int(match.group("mden"))
            if denominator == 0:
                return None
            value += Fraction(int(match.group("mnum")), denominator)
        elif match.group("den"):
            denominator = Fraction(match.group("den"))
            if denominator == 0:
                return None
            value /= denominator
        return -value if match.group("sign") else value
    return None


def reference_answer(answer: str) -> Fraction:
    """A dataset's answer: GSM8K's ``... #### 72`` or a plain number."""
    final = answer.rsplit("####", 1)[-1]
    value = parse_number(final)
    if value is None:
        raise ValueError(f"no number in the reference answer {answer!r}")
    return value


def grade(completion: str, reference: Fraction) -> dict:
    """Everything the report needs about one completion."""
    answer_text = extract_answer(completion)
    value = parse_number(answer_text)
    return {
        "answer_text": answer_text,
        "answer": None if value is None else str(value),
        "correct": value is not None and value == reference,
        "format_reward": format_reward(completion),
    }


def format_reward(completion: str) -> float:
    """1 when the completion ends with an ``Answer:`` line holding a number (what the system prompt asks)."""
    lines = [line for line in completion.splitlines() if line.strip()]
    return 1.0 if lines and parse_number(extract_answer(lines[-1])) is not None else 0.0


def efficiency_reward(completion_tokens: int, max_tokens: int) -> float:
    """1 - completion_tokens / max_tokens, clipped to [0, 1]: shorter answers score higher."""
    if max_tokens <= 0:
        raise ValueError("max_tokens must be positive")
    return max(0.0, 1.0 - completion_tokens / max_tokens)
