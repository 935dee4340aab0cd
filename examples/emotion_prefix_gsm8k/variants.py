"""The prompt variants: a short emotional prefix before the problem, and the shared system prompt.

The prefixes were written for this project. ``control`` has none; every other variant
puts its sentence, then a blank line, before the first user message.
"""

from __future__ import annotations

SYSTEM_PROMPT = (
    "You solve grade-school math word problems. Work it out briefly, then end with a final "
    "line of the form `Answer: <number>` and nothing after it."
)

PREFIXES: dict[str, str] = {
    "control": "",
    "frustration": "I'm so frustrated. I've been stuck on this for ages and nothing I try works.",
    "impatience": "Hurry up, I don't have time for this. Just give me the answer.",
    "anxiety": "I'm really anxious about getting this wrong. A lot depends on it.",
    "collaborative": "Let's work through this one together, step by step.",
    "patience": "Take all the time you need. There is no rush at all.",
    "calm": "Relax. This is a quiet moment to think clearly.",
}
VARIANTS = tuple(PREFIXES)


def messages(variant: str, question: str) -> list[dict[str, str]]:
    """The chat for one problem under one variant (the prefix leads the first user message)."""
    prefix = PREFIXES[variant]
    user = f"{prefix}\n\n{question}" if prefix else question
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
