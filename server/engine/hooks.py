"""Hook points: the names clients use, resolved to module paths nnsight reads, in execution order.

A client names what to read either per layer (``layers`` x ``hook_points``)
or by absolute module path (``modules``). Per-layer names are the aliases
``resid_pre``, ``resid_post``, ``attn_out``, ``mlp_out`` (see
``structure.LayerLayout.aliases``) or ``<submodule>.input`` /
``<submodule>.output`` relative to the layer; absolute names are
``<module path>.input`` / ``.output`` (``model.norm.output``).

nnsight hands out a module's values as the forward pass reaches them and
refuses a read the model has already run past, so a plan must read in
execution order. That order is *measured* once, with plain PyTorch hooks on
a two-token forward pass, not guessed from registration order (a Llama layer
registers ``self_attn, mlp, input_layernorm, ...`` but runs
``input_layernorm, self_attn, post_attention_layernorm, mlp``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .structure import LayerLayout

_KINDS = ("input", "output")
_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


def first_tensor(value) -> torch.Tensor:
    """The tensor a hook point's value stands for: a module that returns a tuple (an attention
    block returns ``(output, weights)``) is read at its first element. Raises TypeError."""
    while isinstance(value, (tuple, list)) and value:
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(value).__name__}")
    return value


class HookError(ValueError):
    """A hook-point request that cannot be resolved; ``param`` names the field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class HookPoint:
    """One value to read: ``<module_path>.<kind>``, named ``name`` in captures."""

    name: str  # "layers.3.resid_post", "layers.3.mlp.down_proj.input", "model.norm.output"
    module_path: str  # "model.layers.3", "model.layers.3.mlp.down_proj", "model.norm"
    kind: str  # "input" | "output"
    layer: int | None  # None for absolute module paths outside the layers
    hook: str  # what the client asked for: "resid_post", "mlp.down_proj.input", ...
    order: int  # position of this read in one forward pass
    width: int  # elements per token of the value (its size divided by batch x positions)
    floating: bool = True  # a floating-point value (activations), not integers (token ids)


class HookResolver:
    """Resolves requests to :class:`HookPoint` lists for one served model."""

    def __init__(self, model: torch.nn.Module, layout: LayerLayout) -> None:
        self.layout = layout
        self._modules = dict(model.named_modules())
        self._order, self._width, self._floating, self._bare = _execution_order(model)
        logits = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        # The module computing the logits: generation computes them for the last position only.
        self.logits_module = next((name for name, m in self._modules.items() if m is logits), None)
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        # The token embedding: gradient attribution makes its output the leaf gradients start from.
        self.embedding_module = next((name for name, m in self._modules.items() if m is embeddings), None)

    def outputs(self) -> list[tuple[int, str, int]]:
        """``(order, module path, width)`` of every module's output in one forward pass, in order
        (width 0: not one ``[batch, pos, ...]`` tensor)."""
        return sorted(
            (i, path, self._width[(path, kind)])
            for (path, kind), i in self._order.items()
            if kind == "output"
        )

    def returns_tensor(self, path: str) -> bool:
        """Whether the module at ``path`` returns one bare tensor (not a tuple or an output object)."""
        return self._bare.get((path, "output"), False)

    def has_module(self, path: str) -> bool:
        """Whether the served model has a module at ``path``."""
        return path in self._modules

    def order_of(self, path: str, kind: str) -> int | None:
        """When ``<path>.<kind>`` is reached in one forward pass (None: never)."""
        return self._order.get((path, kind))

    def layer_indexes(self, layers: list[int] | str, param: str = "layers") -> list[int]:
        count = self.layout.count
        if layers == "all":
            return list(range(count))
        if isinstance(layers, str) or not layers:
            raise HookError('layers must be "all" or a non-empty list of layer indexes', param)
        resolved = []
        for i, layer in enumerate(layers):
            if not -count <= layer < count:
                raise HookError(f"layer {layer} is out of range for a {count}-layer model", f"{param}[{i}]")
            resolved.append(layer % count)
        return sorted(set(resolved))

    def resolve(
        self,
        *,
        layers: list[int] | str | None,
        hook_points: list[str] | None,
        modules: list[str] | None,
    ) -> list[HookPoint]:
        points: dict[str, HookPoint] = {}
        if hook_points:
            indexes = self.layer_indexes("all" if layers is None else layers)
            aliases = self.layout.aliases()
            for j, hook in enumerate(hook_points):
                relative = aliases.get(hook, hook)
                for layer in indexes:
                    path, kind = self._split(
                        f"{self.layout.path}.{layer}.{relative}", f"hook_points[{j}]", hook
                    )
                    point = self._point(f"layers.{layer}.{hook}", path, kind, layer, hook)
                    points[point.name] = point
        elif layers is not None:
            raise HookError('layers needs hook_points (e.g. ["resid_post"])', "hook_points")
        for j, full in enumerate(modules or ()):
            path, kind = self._split(full, f"modules[{j}]", full)
            points.setdefault(full, self._point(full, path, kind, self._layer_of(path), full))
        if not points:
            raise HookError("name at least one hook point (hook_points or modules)", "hook_points")
        return sorted(points.values(), key=lambda p: (p.order, p.name))

    def _point(self, name: str, path: str, kind: str, layer: int | None, hook: str) -> HookPoint:
        key = (path, kind)
        return HookPoint(
            name, path, kind, layer, hook, self._order[key], self._width[key], self._floating[key]
        )

    def _split(self, full: str, param: str, asked: str) -> tuple[str, str]:
        path, _, kind = full.rpartition(".")
        if not _NAME.match(full) or kind not in _KINDS or path not in self._modules:
            raise HookError(
                f"unknown hook point {asked!r}: use an alias ({', '.join(self.layout.aliases())}), "
                "'<submodule>.input' or '<submodule>.output' (see GET /v1/model/structure)",
                param,
            )
        if (path, kind) not in self._order:
            raise HookError(f"{asked!r} is never reached in a forward pass", param)
        if not self._width[(path, kind)]:
            raise HookError(f"{asked!r} is not a [batch, pos, ...] tensor, so it cannot be captured", param)
        return path, kind

    def _layer_of(self, path: str) -> int | None:
        prefix = f"{self.layout.path}."
        if path.startswith(prefix):
            head = path[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                return int(head)
        return None


@torch.no_grad()
def _execution_order(model: torch.nn.Module) -> tuple[dict, dict, dict, dict]:
    """For each (module path, 'input'|'output'): the index of its first event in one forward
    pass, the number of elements its value holds per token (0 where it is not one
    ``[batch, pos, ...]`` tensor, e.g. a model output object), whether those are floating
    point, and whether the value is one bare tensor."""
    order: dict[tuple[str, str], int] = {}
    width: dict[tuple[str, str], int] = {}
    floating: dict[tuple[str, str], bool] = {}
    bare: dict[tuple[str, str], bool] = {}
    handles = []
    positions = 2

    def record(key: tuple[str, str], value) -> None:
        if key in order:
            return
        order[key] = len(order)
        bare[key] = isinstance(value, torch.Tensor)
        while isinstance(value, (tuple, list)) and value:
            value = value[0]
        per_position = (
            isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == (1, positions)
        )
        width[key] = value.numel() // positions if per_position else 0
        floating[key] = per_position and value.is_floating_point()

    def first_input(args: tuple, kwargs: dict):
        """What nnsight's ``.input`` is: the first positional argument, else the first keyword one."""
        if args:
            return args[0]
        return next(iter(kwargs.values()), None)

    for name, module in model.named_modules():
        if not name:
            continue
        handles.append(
            module.register_forward_pre_hook(
                lambda _m, args, kwargs, n=name: record((n, "input"), first_input(args, kwargs)),
                with_kwargs=True,
            )
        )
        handles.append(module.register_forward_hook(lambda _m, _a, out, n=name: record((n, "output"), out)))
    try:
        device = next(model.parameters()).device
        ids = torch.zeros((1, positions), dtype=torch.long, device=device)
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for handle in handles:
            handle.remove()
    return order, width, floating, bare
