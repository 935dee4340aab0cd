"""The logit lens: what each layer's residual stream would predict if the model stopped there.

nostalgebraist (2020), "interpreting GPT: the logit lens": apply the model's own final norm
and unembedding to layer ``L``'s ``resid_post`` and read the next-token distribution. The
last layer's lens is the model's own output (checked in tests/unit/test_lens.py). Gemma 2's
final logit soft-capping (``tanh(logits / cap) * cap``) is applied as the model applies it.

:class:`Unembedding` calls the model's final-norm and unembedding modules through their
nnsight envoys: inside a trace nnsight then stands its interleaving down for the call
(nnsight 0.8 ``Envoy.__call__``, its documented logit-lens pattern), so the call reads
nothing and spends no hook-point occurrence of the real forward pass.
"""

from __future__ import annotations

import torch

from .hooks import HookResolver

LENS_CHUNK = 128  # positions unembedded at once: bounds the [chunk, vocab] temporaries


def final_norm_path(resolver: HookResolver, layers_path: str, count: int) -> str | None:
    """The module that normalises the last layer's output before the unembedding (``model.norm``,
    ``transformer.ln_f``): the last module run between the last layer and the logits module whose
    output is one ``[batch, pos, d_model]`` value; None for a model without one."""
    last = resolver.order_of(f"{layers_path}.{count - 1}", "output")
    head = resolver.order_of(resolver.logits_module, "input") if resolver.logits_module else None
    if last is None or head is None:
        return None
    outputs = resolver.outputs()
    d_model = next(width for index, _, width in outputs if index == last)
    between = [(index, path) for index, path, width in outputs if last < index < head and width == d_model]
    return max(between)[1] if between else None


class Unembedding:
    """``[pos, d_model]`` residuals -> next-token log-probabilities ``[pos, vocab]`` (float32),
    through the served model's own final norm, unembedding and soft-capping."""

    def __init__(self, wrapper, norm_path: str | None, head_path: str, softcap: float | None) -> None:
        self.norm = wrapper.get(norm_path) if norm_path else None
        self.head = wrapper.get(head_path)
        self.softcap = softcap

    def logprobs(self, residual: torch.Tensor) -> torch.Tensor:
        hidden = residual[None]  # [1, pos, d_model]: the modules' own batch layout
        if self.norm is not None:
            hidden = self.norm(hidden)
        logits = self.head(hidden)[0].float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.log_softmax(-1)

    def top(self, residual: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most likely next tokens at each position of ``residual`` (``[pos, d_model]``),
        ``LENS_CHUNK`` positions at a time: token ids long ``[pos, k]`` and their logprobs float32
        ``[pos, k]``, best first, on the CPU."""
        ids, logprobs = [], []
        for chunk in residual.split(LENS_CHUNK):
            top = self.logprobs(chunk).topk(k, dim=-1)
            ids.append(top.indices)
            logprobs.append(top.values)
        if not ids:
            return torch.zeros((0, k), dtype=torch.long), torch.zeros((0, k))
        return torch.cat(ids).cpu(), torch.cat(logprobs).cpu()


def unembedding_of(wrapper, hf_model: torch.nn.Module, resolver: HookResolver) -> Unembedding | None:
    """The served model's own final norm, unembedding and soft-capping (None: no logits module)."""
    head = resolver.logits_module
    if head is None:
        return None
    layout = resolver.layout
    norm = final_norm_path(resolver, layout.path, layout.count)
    return Unembedding(wrapper, norm, head, getattr(hf_model.config, "final_logit_softcapping", None))
