"""A tiny random Llama-architecture chat model built from a config, for unit tests.

No download: the tokenizer is a byte-level BPE trained here on a few sentences,
with ChatML special tokens and a chat template; the model is a 2-layer Llama
with random weights. Everything is seeded, so the same folder comes out every
time.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Interpretability research studies the internals of neural networks.",
    "What is the capital of France? The capital of France is Paris.",
    "Count from one to ten: one, two, three, four, five, six, seven, eight, nine, ten.",
    "Steering vectors, ablations and activation patching change what a model says.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and symbols ! ? , . : ; ( ) are tokens too. Ünïcödé 🙂 日本",
]


def build_tokenizer():
    """A byte-level BPE tokenizer trained on ``CORPUS``, with ChatML special tokens and a chat
    template (about 400 tokens; seeded by construction, so the same every time)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(folder: Path, *, num_layers: int = 2, hidden: int = 64) -> Path:
    """Write a tokenizer and a random LlamaForCausalLM into ``folder``; return it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fast = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # Larger logits than the default init gives a less uniform, more model-like distribution.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder
