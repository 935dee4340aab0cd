"""Token bytes come from the tokenizer's byte mapping, so split characters can be rebuilt."""

from __future__ import annotations

import pytest

from server.engine.vocab import build_vocabulary


@pytest.fixture(scope="module")
def vocabulary(tiny_tokenizer):
    return build_vocabulary(tiny_tokenizer)


@pytest.mark.parametrize("text", ["a 🙂 b", "日本 Ünïcödé", "plain ascii, numbers 123"])
def test_token_bytes_rebuild_the_text(vocabulary, tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(vocabulary.bytes(i) for i in ids).decode("utf-8") == text
    assert [vocabulary.text(i) for i in ids] == [tiny_tokenizer.decode([i]) for i in ids]


def test_split_characters_have_their_real_bytes(vocabulary, tiny_tokenizer):
    ids = tiny_tokenizer.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1  # the emoji is split across byte tokens
    assert all(vocabulary.text(i) == "\ufffd" for i in ids)
    assert [vocabulary.bytes(i) for i in ids] != [b"\xef\xbf\xbd"] * len(ids)


def test_special_tokens_and_out_of_range(vocabulary, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    assert vocabulary.text(eos) == "<|im_end|>" and vocabulary.bytes(eos) == b"<|im_end|>"
    assert vocabulary.text(10**6) == "" and vocabulary.bytes(-1) == b""
