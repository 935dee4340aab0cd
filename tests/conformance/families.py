"""The architecture families the server is checked on: a tiny random model of each, from its own config.

No download: each family's model is built from that family's own transformers config class
(a few layers, hidden 64, the tokenizer of ``tests/tiny_model.py``), saved to a folder and
served from there like any local checkpoint. The sizes are tiny but the structure is the
family's own: grouped-query attention, q/k norms (Qwen3, OLMo2, Gemma3), mixture-of-experts
MLPs (Qwen3-MoE), sliding-window layers and soft-capped logits (Gemma2, Gemma3), fused
projections (Phi3), parallel attention + MLP blocks and partial rotary embeddings
(GPT-NeoX), learned absolute positions and ``Conv1D`` projections (GPT-2), tied embeddings
(Qwen3, Gemma).

``FAMILIES[name].modules`` is what the hook-point aliases resolve to in that family, the
table ``docs/hook_points.md`` shows (a test keeps the two equal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

HIDDEN = 64
LAYERS = 3


@dataclass(frozen=True)
class Family:
    name: str  # as docs/hook_points.md names it
    config: Callable[[dict], object]  # token ids -> the family's config
    layers: str  # where its decoder layers live
    attention: str  # the attention block inside a layer
    mlp: str  # the MLP block inside a layer
    sliding_window: bool = False  # some layers attend to a window only
    # What the residual stream receives from the attention and MLP blocks, relative to a layer:
    # resid_post = resid_pre + the first + the second (post-norm families add normed values).
    residual_terms: tuple[str, str] = ("attn_out", "mlp_out")

    @property
    def modules(self) -> dict[str, str]:
        """Alias -> '<module path of layer 0>.<input|output>'."""
        layer = f"{self.layers}.0"
        return {
            "resid_pre": f"{layer}.input",
            "resid_post": f"{layer}.output",
            "attn_out": f"{layer}.{self.attention}.output",
            "mlp_out": f"{layer}.{self.mlp}.output",
        }


def _common(ids: dict) -> dict:
    return dict(
        vocab_size=ids["vocab"],
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )


def _llama(ids):
    from transformers import LlamaConfig

    return LlamaConfig(**_common(ids), tie_word_embeddings=False)


def _qwen2(ids):
    from transformers import Qwen2Config

    return Qwen2Config(**_common(ids), tie_word_embeddings=False)


def _qwen3(ids):
    from transformers import Qwen3Config

    # Qwen3-0.6B's traits: head_dim wider than hidden / heads, q/k norms, tied embeddings.
    return Qwen3Config(**_common(ids), head_dim=32, tie_word_embeddings=True)


def _qwen3_moe(ids):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **_common(ids),
        head_dim=32,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        tie_word_embeddings=False,
    )


def _mistral(ids):
    from transformers import MistralConfig

    return MistralConfig(**_common(ids), sliding_window=None, tie_word_embeddings=False)


def _gemma2(ids):
    from transformers import Gemma2Config

    return Gemma2Config(
        **_common(ids),
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=6,  # shorter than the prompts: the window really cuts
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        tie_word_embeddings=True,
    )


def _gemma3(ids):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **_common(ids),
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        tie_word_embeddings=True,
    )


def _phi3(ids):
    from transformers import Phi3Config

    return Phi3Config(**_common(ids), tie_word_embeddings=False)


def _olmo2(ids):
    from transformers import Olmo2Config

    return Olmo2Config(**_common(ids), tie_word_embeddings=False)


def _gpt_neox(ids):
    from transformers import GPTNeoXConfig

    common = _common(ids)
    common.pop("num_key_value_heads")
    return GPTNeoXConfig(**common, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)


def _gpt2(ids):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=ids["vocab"],
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=4,
        n_positions=256,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )


POST_NORM = ("post_attention_layernorm.output", "post_feedforward_layernorm.output")
FAMILIES = {
    family.name: family
    for family in [
        Family("llama", _llama, "model.layers", "self_attn", "mlp"),
        Family("qwen2", _qwen2, "model.layers", "self_attn", "mlp"),
        Family("qwen3", _qwen3, "model.layers", "self_attn", "mlp"),
        Family("qwen3_moe", _qwen3_moe, "model.layers", "self_attn", "mlp"),
        Family("mistral", _mistral, "model.layers", "self_attn", "mlp"),
        Family("gemma2", _gemma2, "model.layers", "self_attn", "mlp", True, POST_NORM),
        Family("gemma3_text", _gemma3, "model.layers", "self_attn", "mlp", True, POST_NORM),
        Family("phi3", _phi3, "model.layers", "self_attn", "mlp"),
        Family("olmo2", _olmo2, "model.layers", "self_attn", "mlp", residual_terms=POST_NORM),
        Family("gpt_neox", _gpt_neox, "gpt_neox.layers", "attention", "mlp"),
        Family("gpt2", _gpt2, "transformer.h", "attn", "mlp"),
    ]
}


def build_family_model(folder: Path, family: Family, tokenizer=None) -> Path:
    """Write a tokenizer (by default the tiny one) and a random model of ``family`` with its
    vocabulary into ``folder``; return it."""
    from tiny_model import build_tokenizer
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or build_tokenizer()
    ids = {
        "vocab": len(tokenizer),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family.config(ids))
    with torch.no_grad():  # larger logits: a less uniform, more model-like distribution
        output = model.get_output_embeddings()
        if output.weight is not model.get_input_embeddings().weight:
            output.weight.mul_(8.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
