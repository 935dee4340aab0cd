"""The served model's shape: its layers, module tree and hook points.

Hook-point naming (see docs/hook_points.md). Layers count from 0; negative
indexes count from the end. Per layer ``i``:

=============  ==============================================  ====================
alias          module path (Llama/Qwen/SmolLM)                 value
=============  ==============================================  ====================
resid_pre      ``model.layers.{i}`` input                      [batch, pos, d_model]
resid_post     ``model.layers.{i}`` output                     [batch, pos, d_model]
attn_out       ``model.layers.{i}.self_attn`` output           [batch, pos, d_model]
mlp_out        ``model.layers.{i}.mlp`` output                 [batch, pos, d_model]
=============  ==============================================  ====================

plus ``<submodule>.input`` / ``<submodule>.output`` for any submodule of the
layer. Aliases are resolved from the model's own structure, so GPT-2 style
models (``transformer.h.{i}``, ``attn``) get the same names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class LayerLayout:
    """Where the decoder layers live and what their attention/MLP children are called."""

    path: str  # e.g. "model.layers"
    count: int
    attention: str | None  # child name inside a layer, e.g. "self_attn"
    mlp: str | None

    def aliases(self) -> dict[str, str]:
        """alias -> "<relative submodule>.<input|output>" ('' is the layer itself)."""
        out = {"resid_pre": "input", "resid_post": "output"}
        if self.attention:
            out["attn_out"] = f"{self.attention}.output"
        if self.mlp:
            out["mlp_out"] = f"{self.mlp}.output"
        return out


def find_layers(model: torch.nn.Module) -> LayerLayout:
    """The decoder-layer ModuleList: the longest ModuleList of identical blocks."""
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ValueError(f"no decoder layers found in {type(model).__name__}")
    path, layers = best
    children = dict(layers[0].named_children())
    attention = next((n for n in _ATTENTION_NAMES if n in children), None)
    mlp = next((n for n in _MLP_NAMES if n in children), None)
    return LayerLayout(path=path, count=len(layers), attention=attention, mlp=mlp)


def layer_hook_points(model: torch.nn.Module, layout: LayerLayout) -> list[str]:
    """Every per-layer hook point: '<submodule>.input' and '.output' for each submodule of layer 0."""
    layer = model.get_submodule(f"{layout.path}.0")
    points = ["input", "output"]
    for name, _ in layer.named_modules():
        if name:
            points += [f"{name}.input", f"{name}.output"]
    return points


def module_tree(model: torch.nn.Module) -> list[dict]:
    """Every module with its dotted path (as nnsight and HF name it) and class name."""
    return [{"path": name, "type": type(module).__name__} for name, module in model.named_modules() if name]


def context_length(config, tokenizer, override: int | None = None) -> int:
    """The context window: --max-model-len, else the config's positions, else the tokenizer's."""
    if override:
        return override
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**8:
        return value
    return 2048
