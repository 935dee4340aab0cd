#!/usr/bin/env python
"""The request fields of OpenAI's chat/completions API and of vLLM's extra parameters, and what
this server does with each, as the table docs/api.md shows.

Run from the repository root::

    .venv/bin/python scripts/fields_table.py

"works": a field of the request models (``server/protocol.py``), checked by the tests;
"no effect": its spec gives it none here (``protocol_fields.NO_EFFECT``), accepted;
"refused": a 400 naming it, unless its value asks for what the server does anyway
(``protocol_fields.REFUSED``). Fields in neither spec are accepted and logged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.protocol import ChatCompletionRequest, CompletionRequest  # noqa: E402
from server.protocol_fields import NO_EFFECT, REFUSED  # noqa: E402

# Fields of the request models that are extensions of this server (docs/capture.md,
# docs/interventions.md), not fields of either spec.
EXTENSIONS = {"capture", "ndif", "interventions", "presets"}
# Fields of the request models that work with a limit (their own checks say so).
PARTLY = {
    "best_of": "only best_of == n (no reranking)",
    "suffix": "only empty (no insertion)",
}


def where(chat: bool, completions: bool) -> str:
    return "both" if chat and completions else "chat" if chat else "completions"


def markdown() -> str:
    chat, completions = set(ChatCompletionRequest.model_fields), set(CompletionRequest.model_fields)
    rows = []
    for name in sorted((chat | completions) - EXTENSIONS):
        rows.append((name, where(name in chat, name in completions), "works", PARTLY.get(name, "")))
    for name, rule in sorted(NO_EFFECT.items()):
        rows.append(
            (name, where("chat" in rule.endpoints, "completions" in rule.endpoints), "no effect", rule.why)
        )
    for name, rule in sorted(REFUSED.items()):
        accepted = ", ".join(f"`{json.dumps(v)}`" for v in rule.accepted)
        note = rule.reason + (f" (accepted: {accepted})" if accepted else "")
        rows.append((name, where("chat" in rule.endpoints, "completions" in rule.endpoints), "refused", note))
    lines = ["| field | endpoints | state | notes |", "| --- | --- | --- | --- |"]
    lines += [f"| `{name}` | {endpoints} | {state} | {note} |" for name, endpoints, state, note in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
