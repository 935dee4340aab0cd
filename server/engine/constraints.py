"""Constrained decoding (structured output): each row of a job follows its grammar.

A request's ``response_format`` (JSON schema, any JSON object) or vLLM's
``structured_outputs`` (JSON schema, regex, choice, Lark grammar) becomes one llguidance
grammar (``SamplingParams.grammar``); each row of the job gets its own ``LLMatcher``. At
every step the loop asks :class:`Constraints` which tokens each row may take, sets the
others' logits to -inf (after the logits processors, before temperature and the other
warpers), samples, and hands each row's token back to its matcher. A constrained row and a
free one share a batch: only the constrained row's logits are masked. The end-of-sequence
token is allowed only where the grammar is complete.

llguidance (Microsoft's Low-level Guidance, the engine behind vLLM's ``guidance`` backend)
was chosen over xgrammar and outlines-core by measurement (``scripts/bench_structured.py``,
docs/api.md): fastest per token, grammars compile in about a millisecond, no dependencies.
The served tokenizer is converted for it once, lazily (about a second), and shared. A
request's grammar is compiled once, on the prompt thread, when it is checked; the decode loop
copies that matcher for each row (compiling a large grammar there would stall every job).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch

COMPILED_KEPT = 64  # compiled grammars kept (the most recently checked), each copied per row


class GrammarError(ValueError):
    """A grammar llguidance cannot use, or a row whose matcher failed; the message says why."""


class Constraints:
    """The served tokenizer as llguidance sees it, and the per-row work of constrained jobs.

    ``vocab_width``: the width of the model's logits (may exceed the tokenizer's vocabulary);
    ``eos_ids``: what ends a row where the grammar is complete."""

    def __init__(self, tokenizer, vocab_width: int, eos_ids: frozenset[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_width = vocab_width
        self._eos_ids = sorted(eos_ids)
        self._ll_tokenizer = None
        self._compiled: OrderedDict[str, object] = OrderedDict()  # grammar -> matcher, by check()
        self._lock = threading.Lock()

    def tokenizer(self):
        """The llguidance tokenizer (built on first use: about a second).

        Raises:
            GrammarError: llguidance cannot take this tokenizer (a slow one, say)."""
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                try:
                    self._ll_tokenizer = llguidance.hf.from_tokenizer(
                        self._hf_tokenizer, n_vocab=self.vocab_width, eos_token=self._eos_ids or None
                    )
                except (ValueError, TypeError) as exc:
                    raise GrammarError(
                        f"structured output is not available for this model's tokenizer: {exc}"
                    ) from exc
            return self._ll_tokenizer

    def check(self, grammar: str) -> None:
        """Compile ``grammar`` and compute its first mask (where grammars that can match nothing
        fail), keeping the compiled matcher for the job's rows (:meth:`matchers` copies it).

        Raises:
            GrammarError: llguidance cannot follow it with this tokenizer."""
        from llguidance import LLMatcher
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        tokenizer = self.tokenizer()
        error = LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise GrammarError(error)
        matcher = LLMatcher(tokenizer, grammar)
        if not matcher.is_error():
            fill_next_token_bitmask(matcher, allocate_token_bitmask(1, self.vocab_width), 0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        with self._lock:
            self._compiled[grammar] = matcher
            self._compiled.move_to_end(grammar)
            while len(self._compiled) > COMPILED_KEPT:
                self._compiled.popitem(last=False)

    def matchers(self, grammar: str, rows: int) -> list:
        """One matcher per row: copies of the one :meth:`check` compiled (compiled here where it
        did not run); no grammar is compiled on the decode thread for a checked request."""
        with self._lock:
            compiled = self._compiled.get(grammar)
        if compiled is None:
            self.check(grammar)
            with self._lock:
                compiled = self._compiled[grammar]
        return [compiled.deep_copy() for _ in range(rows)]

    def allowed(self, matchers: list, active: list[bool]) -> torch.Tensor:
        """``[rows, vocab_width]`` bool on the CPU: the tokens each active row may take next
        (an inactive row, already finished, is left unconstrained).

        Raises:
            GrammarError: a matcher in an error state."""
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        bitmask = allocate_token_bitmask(len(matchers), self.vocab_width)
        for row, (matcher, live) in enumerate(zip(matchers, active, strict=True)):
            if live:  # a finished row keeps the all-ones row of the allocation: unconstrained
                fill_next_token_bitmask(matcher, bitmask, row)
                if matcher.is_error():
                    raise GrammarError(matcher.get_error())
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, : self.vocab_width]
        return torch.from_numpy(bits.astype(bool))

    @staticmethod
    def advance(matchers: list, tokens: list[int], active: list[bool]) -> None:
        """Each active row's matcher takes the row's token."""
        for matcher, token, live in zip(matchers, tokens, active, strict=True):
            if live and not matcher.consume_token(token):
                raise GrammarError(matcher.get_error() or f"token {token} does not follow the grammar")
