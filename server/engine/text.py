"""One completion's text as its tokens arrive: incremental decoding and stop strings.

:class:`CompletionText` is the single place where generated token ids become
text, for streamed and non-streamed responses alike, so the concatenated
stream deltas equal the non-streamed text by construction. It

* decodes incrementally (a prefix window, as in TGI/vLLM) so each step costs
  O(window), not O(length), and never emits half a UTF-8 character;
* finds stop strings across token boundaries, cuts the text before the stop
  string (OpenAI semantics: the stop string is not returned);
* holds back a tail that could still become a stop string, so a stream never
  emits text that the final answer does not contain.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class CompletionText:
    """Incremental text of one choice. Not thread-safe; owned by one decode loop."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), min_tokens: int = 0) -> None:
        """``min_tokens``: stop strings are not looked for before this many tokens (vLLM's rule;
        one that ends after it, even if it began before, still stops the text)."""
        self._tokenizer = tokenizer
        self._min_tokens = min_tokens
        self._stop = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = []
        self._prefix_offset = 0  # ids[prefix_offset:read_offset] were decoded into the last text
        self._read_offset = 0
        self._text = ""
        self._emitted = 0  # characters of _text handed out by take_delta
        self.stopped_by: str | None = None  # the stop string that ended the text, if any
        self.finished = False

    @property
    def text(self) -> str:
        return self._text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def append(self, token_id: int) -> bool:
        """Add one generated token; True once a stop string has ended the text."""
        if self.stopped_by is not None or self.finished:
            return self.stopped_by is not None
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT_CHAR):
            self._add_text(full[len(prefix) :])
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        return self.stopped_by is not None

    def _add_text(self, new: str) -> None:
        search_from = max(0, len(self._text) - self._max_stop + 1)
        self._text += new
        if not self._stop or len(self._ids) < self._min_tokens:
            return
        hits = [(i, s) for s in self._stop if (i := self._text.find(s, search_from)) >= 0]
        if hits:
            index, stop = min(hits)
            self._text = self._text[:index]
            self.stopped_by = stop

    def finish(self) -> None:
        """No more tokens: flush what is still undecoded (an incomplete character stays U+FFFD)."""
        if self.finished:
            return
        if self.stopped_by is None and self._read_offset < len(self._ids):
            prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
            full = self._decode(self._ids[self._prefix_offset :])
            if len(full) > len(prefix):
                self._add_text(full[len(prefix) :])
        self.finished = True

    def take_delta(self) -> str:
        """Text not handed out yet that can no longer change (all of it once finished)."""
        end = len(self._text)
        if not self.finished and self.stopped_by is None:
            end -= self._held_back()
        if end <= self._emitted:
            return ""
        delta = self._text[self._emitted : end]
        self._emitted = end
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string.

        Only tails starting with a stop string's first character can qualify, so
        this looks at those positions alone instead of trying every length.
        """
        longest = 0
        for stop in self._stop:
            window_start = max(0, len(self._text) - len(stop) + 1)
            position = self._text.find(stop[0], window_start)
            while position != -1:
                tail = len(self._text) - position
                if tail <= longest:
                    break
                if stop.startswith(self._text[position:]):
                    longest = tail
                    break
                position = self._text.find(stop[0], position + 1)
        return longest
