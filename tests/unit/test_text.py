"""CompletionText: incremental decoding and stop strings, against plain tokenizer.decode."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from server.engine.text import CompletionText


def feed(text: CompletionText, ids: list[int]) -> list[str]:
    deltas = []
    for token in ids:
        stopped = text.append(token)
        deltas.append(text.take_delta())
        if stopped:
            break
    text.finish()
    deltas.append(text.take_delta())
    return deltas


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_incremental_text_equals_full_decode(tiny_tokenizer, data):
    ids = data.draw(st.lists(st.integers(0, len(tiny_tokenizer) - 1), max_size=40))
    text = CompletionText(tiny_tokenizer)
    deltas = feed(text, ids)
    assert text.text == tiny_tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) == text.text


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_stream_never_emits_text_the_final_answer_lacks(tiny_tokenizer, data):
    ids = data.draw(st.lists(st.integers(3, len(tiny_tokenizer) - 1), min_size=1, max_size=30))
    full = tiny_tokenizer.decode(ids, skip_special_tokens=True)
    start = data.draw(st.integers(0, max(len(full) - 1, 0)))
    stop = full[start : start + data.draw(st.integers(1, 4))] or "x"
    text = CompletionText(tiny_tokenizer, (stop,))
    deltas = feed(text, ids)
    assert "".join(deltas) == text.text
    assert stop not in text.text
    if stop in full:
        assert text.stopped_by == stop
        assert text.text == full[: full.index(stop)]


def test_stop_string_split_across_tokens_is_cut_and_held_back(tiny_tokenizer):
    ids = tiny_tokenizer.encode("one, two, three, four", add_special_tokens=False)
    text = CompletionText(tiny_tokenizer, ("three",))
    emitted = ""
    for token in ids:
        if text.append(token):
            break
        emitted += text.take_delta()
        assert "thr" not in emitted  # a possible stop-string prefix is never streamed early
    text.finish()
    emitted += text.take_delta()
    assert text.stopped_by == "three"
    assert emitted == text.text == "one, two, "


def test_multibyte_character_is_never_streamed_half_decoded(tiny_tokenizer):
    ids = tiny_tokenizer.encode("a 🙂 b", add_special_tokens=False)
    text = CompletionText(tiny_tokenizer)
    deltas = feed(text, ids)
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == "a 🙂 b"
