"""Reasoning parsers (``--reasoning-parser``, vLLM's flag and names): a chat answer's thinking,
``<think>...</think>``, returned apart from its content.

* ``qwen3``: the answer opens the block itself (Qwen3's template; with
  ``chat_template_kwargs: {"enable_thinking": false}`` the template closes an empty block in
  the prompt and the answer is all content). An answer that does not start with ``<think>``
  is all content.
* ``deepseek_r1``: the template opens the block in the prompt (DeepSeek-R1, and Qwen3's
  Thinking-2507 models): the answer is reasoning until ``</think>`` (a ``<think>`` the answer
  repeats at its start is dropped), content after it.

One piece of code splits both ways: :class:`ReasoningStream` takes the answer's text deltas
as they are generated and holds back only what could still be the start of a tag;
:meth:`ReasoningParser.split` feeds it the whole text. So a streamed answer's
``delta.reasoning_content`` and ``delta.content`` join to what the same request answers
unstreamed (``message.reasoning_content``, ``message.content``); the tags themselves appear in
neither. An answer that ends inside its reasoning has ``content`` null.

The tags are text: the tokenizer must keep them when it decodes (Qwen3's and the R1
distills' do: they are added tokens, not special ones).
"""

from __future__ import annotations

from dataclasses import dataclass

REASONING_PARSERS = ("qwen3", "deepseek_r1")
START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningParser:
    """``name``: one of :data:`REASONING_PARSERS`; ``opens_in_prompt``: the template opened the
    block (deepseek_r1), else the answer must (qwen3)."""

    name: str

    @property
    def opens_in_prompt(self) -> bool:
        return self.name == "deepseek_r1"

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self.opens_in_prompt)

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole answer; None where the answer has none."""
        stream = self.stream()
        reasoning, content = stream.feed(text)
        more_reasoning, more_content = stream.finish()
        return stream.result(reasoning + more_reasoning, content + more_content)


class ReasoningStream:
    """Splits one answer's text deltas into (reasoning, content) deltas, tags removed."""

    def __init__(self, opens_in_prompt: bool) -> None:
        self.opens_in_prompt = opens_in_prompt
        self.state = "start"  # start -> reasoning -> content, or start -> content (qwen3)
        self.held = ""  # text that may still be the start of a tag
        self.reasoned = False  # the answer had a reasoning block
        self.closed = False  # the block was closed by END

    def feed(self, delta: str) -> tuple[str, str]:
        """The (reasoning, content) text this delta makes certain."""
        text = self.held + delta
        self.held = ""
        reasoning = content = ""
        while text:
            if self.state == "start":
                if START.startswith(text) and text != START:  # may still become "<think>"
                    self.held = text
                    return reasoning, content
                if text.startswith(START):
                    text = text[len(START) :]
                    self.state, self.reasoned = "reasoning", True
                elif self.opens_in_prompt:
                    self.state, self.reasoned = "reasoning", True
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                index = text.find(END)
                if index >= 0:
                    reasoning += text[:index]
                    text = text[index + len(END) :]
                    self.state, self.closed = "content", True
                    continue
                keep = _partial_suffix(text, END)
                reasoning += text[: len(text) - keep]
                self.held = text[len(text) - keep :]
                return reasoning, content
            else:
                content += text
                text = ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What was held back, at the end of the answer."""
        held, self.held = self.held, ""
        if self.state == "start":  # the whole answer is a prefix of "<think>"
            self.state = "reasoning" if self.opens_in_prompt else "content"
            self.reasoned = self.opens_in_prompt
        return (held, "") if self.state == "reasoning" else ("", held)

    def result(self, reasoning: str, content: str) -> tuple[str | None, str | None]:
        """A whole answer's fields: reasoning None without a block; content None when the answer
        ended inside its reasoning, or had none."""
        if not self.reasoned:
            return None, content
        return reasoning, (content or None) if self.closed else None


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag`` (0 if none)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0
