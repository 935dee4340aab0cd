"""Sparse autoencoders (SAEs) in SAELens' on-disk format: loading, encoding, the served set.

A folder holds ``cfg.json`` and ``sae_weights.safetensors`` with ``W_enc [d_in, d_sae]``,
``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and, for ``jumprelu``,
``threshold [d_sae]``. The encoder equations are SAELens' (v6,
``sae_lens/saes/{standard,jumprelu,topk}_sae.py``; JumpReLU: Rajamanoharan et al. 2024,
arXiv:2407.14435; TopK: Gao et al. 2024, arXiv:2406.04093)::

    x'   = x - b_dec  if apply_b_dec_to_input (SAELens' default: true), else x
    pre  = x' @ W_enc + b_enc                                   # [..., d_sae]
    standard:  f = relu(pre)
    jumprelu:  f = relu(pre) * (pre > threshold)
    topk:      f = relu(pre) at the k largest entries of pre, 0 elsewhere
    decode:    x_hat = f @ W_dec + b_dec                        # [..., d_in]

Settings this server does not apply are refused when the SAE loads (:class:`SaeError`
naming the ``cfg.json`` field): ``normalize_activations`` other than ``none``,
``rescale_acts_by_decoder_norm``, ``reshape_activations`` and ``hook_head_index``.

``hook_name`` (top level, or under ``metadata`` as SAELens 6 writes it) says where the SAE
reads: TransformerLens names (``blocks.10.hook_resid_post``, ``hook_resid_pre``,
``hook_attn_out``, ``hook_mlp_out``), this server's per-layer names
(``layers.10.resid_post``, ``layers.10.mlp.down_proj.input``) or module paths
(``model.layers.10.mlp.output``; a bare path means its output). :class:`SaeSet` holds the
served SAEs on the model's device; it is changed on the engine's worker only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from .hooks import HookError, HookPoint, HookResolver

ARCHITECTURES = ("standard", "jumprelu", "topk")
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
MAX_CFG_BYTES = 1 << 20
ENCODE_CHUNK = 256  # positions encoded at once: bounds the [chunk, d_sae] temporaries
_TL_NAME = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|attn_out|mlp_out)$")
_LAYER_NAME = re.compile(r"^layers\.(-?\d+)\.(.+)$")
NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")  # an SAE's name: also part of tensor names


class SaeError(ValueError):
    """An SAE that cannot be served; ``field``: the ``cfg.json`` field or file at fault."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SaeFeatures:
    """The top features of some activations: ``indices`` long ``[pos, k]`` and ``values``
    float32 ``[pos, k]`` (largest first), and ``error_norm`` float32 ``[pos]``:
    ``|x - decode(encode(x))|_2``, the part of each activation the SAE does not reconstruct."""

    indices: torch.Tensor
    values: torch.Tensor
    error_norm: torch.Tensor


class SparseAutoencoder:
    """One SAE's weights (in its own dtype, on one device) and its equations (module docstring)."""

    def __init__(
        self,
        *,
        architecture: str,
        hook_name: str,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        threshold: torch.Tensor | None = None,
        k: int | None = None,
        apply_b_dec_to_input: bool = True,
    ) -> None:
        if architecture not in ARCHITECTURES:
            raise SaeError(
                f"architecture {architecture!r} is not served (one of {', '.join(ARCHITECTURES)})",
                "architecture",
            )
        if W_enc is None or W_enc.dim() != 2:
            shape = None if W_enc is None else list(W_enc.shape)
            raise SaeError(f"{WEIGHTS_FILE} needs W_enc as [d_in, d_sae]; found {shape}", "W_enc")
        d_in, d_sae = W_enc.shape
        expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        given = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        if architecture == "jumprelu":
            expected["threshold"] = (d_sae,)
            given["threshold"] = threshold
        for name, shape in expected.items():
            tensor = given[name]
            if tensor is None:
                raise SaeError(f"{WEIGHTS_FILE} has no {name} (a {architecture} SAE needs it)", name)
            if tuple(tensor.shape) != shape or not tensor.is_floating_point():
                raise SaeError(
                    f"{name} is a {str(tensor.dtype).removeprefix('torch.')} tensor of shape "
                    f"{list(tensor.shape)}; expected floating point {list(shape)} (W_enc is [d_in, d_sae])",
                    name,
                )
            if not torch.isfinite(tensor).all():
                raise SaeError(f"{name} holds NaN or infinite values", name)
        if architecture == "topk" and not (isinstance(k, int) and 1 <= k <= d_sae):
            raise SaeError(f"a topk SAE needs k between 1 and d_sae ({d_sae}); got {k!r}", "k")
        self.architecture = architecture
        self.hook_name = hook_name
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = W_enc, b_enc, W_dec, b_dec
        self.threshold = threshold if architecture == "jumprelu" else None
        self.k = k if architecture == "topk" else None
        self.apply_b_dec_to_input = apply_b_dec_to_input

    def to(self, device) -> SparseAutoencoder:
        """The same SAE with its weights on ``device``."""
        move = {name: getattr(self, name) for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
        return SparseAutoencoder(
            architecture=self.architecture,
            hook_name=self.hook_name,
            k=self.k,
            apply_b_dec_to_input=self.apply_b_dec_to_input,
            **{name: None if tensor is None else tensor.to(device) for name, tensor in move.items()},
        )

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def nbytes(self) -> int:
        """Bytes its weights take on their device."""
        tensors = (self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.device, self.dtype)
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_in]`` -> ``[..., d_sae]``: ``x' @ W_enc + b_enc`` in the SAE's dtype."""
        return self._input(x) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_in]`` -> the feature activations ``[..., d_sae]`` (module docstring)."""
        pre = self.pre_activations(x)
        if self.architecture == "standard":
            return pre.relu()
        if self.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """``[..., d_sae]`` -> the reconstruction ``[..., d_in]``: ``f @ W_dec + b_dec``."""
        return features.to(self.dtype) @ self.W_dec + self.b_dec

    def feature_activation(self, x: torch.Tensor, feature: int) -> torch.Tensor:
        """``[..., d_in]`` -> one feature's activation ``[...]`` (the SAE's dtype). One encoder
        column for standard and jumprelu SAEs; a topk feature depends on the others, so there the
        whole encoding is computed."""
        if self.architecture == "topk":  # chunked: a [positions, d_sae] encoding at a time
            rows = x.reshape(-1, x.shape[-1])
            parts = [self.encode(chunk)[:, feature] for chunk in rows.split(ENCODE_CHUNK)]
            return torch.cat(parts).reshape(x.shape[:-1]) if parts else rows.new_zeros(x.shape[:-1])
        pre = self._input(x) @ self.W_enc[:, feature] + self.b_enc[feature]
        if self.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold[feature])
        return pre.relu()

    def decoder_row(self, feature: int) -> torch.Tensor:
        """The feature's direction in the model: ``W_dec[feature]``, ``[d_in]``."""
        return self.W_dec[feature]

    def top_features(self, x: torch.Tensor, k: int) -> SaeFeatures:
        """The ``k`` most active features of each row of ``x`` (``[pos, d_in]``), computed
        ``ENCODE_CHUNK`` positions at a time, and each row's reconstruction error norm; on the
        CPU. ``k`` is at most ``d_sae``."""
        indices, values, errors = [], [], []
        for chunk in x.split(ENCODE_CHUNK):
            features = self.encode(chunk)
            top = features.topk(k, dim=-1)
            error = chunk.to(self.W_enc.device, self.dtype) - self.decode(features)
            indices.append(top.indices)
            values.append(top.values.float())
            errors.append(error.float().norm(dim=-1))
        if not indices:
            empty = x.new_zeros((0, k))
            return SaeFeatures(empty.long().cpu(), empty.float().cpu(), x.new_zeros(0).float().cpu())
        return SaeFeatures(torch.cat(indices).cpu(), torch.cat(values).cpu(), torch.cat(errors).cpu())

    def describe(self) -> dict:
        """What ``GET /v1/saes`` says of it (besides its name and hook point)."""
        return {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "k": self.k,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "dtype": str(self.dtype).removeprefix("torch."),
            "hook_name": self.hook_name,
            "bytes": self.nbytes,
        }


def read_sae(cfg_bytes: bytes, weights_bytes: bytes, device: torch.device | str = "cpu") -> SparseAutoencoder:
    """An SAE from the contents of its ``cfg.json`` and ``sae_weights.safetensors``, on ``device``.

    Raises:
        SaeError: a field or tensor this server cannot serve (named in ``field``).
    """
    try:
        cfg = json.loads(cfg_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SaeError(f"{CFG_FILE} is not JSON: {exc}", CFG_FILE) from None
    if not isinstance(cfg, dict):
        raise SaeError(f"{CFG_FILE} is not a JSON object", CFG_FILE)
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook_name = cfg.get("hook_name", metadata.get("hook_name"))
    if not isinstance(hook_name, str) or not hook_name:
        raise SaeError(f"{CFG_FILE} names no hook_name (where the SAE reads)", "hook_name")
    for field, served in (("normalize_activations", "none"), ("reshape_activations", "none")):
        if cfg.get(field, served) not in (served, None):
            raise SaeError(f"{field} {cfg[field]!r} is not applied by this server (only {served!r})", field)
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise SaeError(
            "rescale_acts_by_decoder_norm is not applied by this server", "rescale_acts_by_decoder_norm"
        )
    if cfg.get("hook_head_index", metadata.get("hook_head_index")) is not None:
        raise SaeError("SAEs on one attention head (hook_head_index) are not served", "hook_head_index")
    architecture = cfg.get("architecture", "standard")
    k = cfg.get("k")
    if k is None and isinstance(cfg.get("activation_fn_kwargs"), dict):  # SAELens before 6
        k = cfg["activation_fn_kwargs"].get("k")
    if architecture == "standard" and cfg.get("activation_fn_str", cfg.get("activation_fn")) == "topk":
        architecture = "topk"  # SAELens before 6: a standard SAE with a topk activation
    apply = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply, bool):
        raise SaeError("apply_b_dec_to_input must be true or false", "apply_b_dec_to_input")
    try:
        tensors = load_safetensors(weights_bytes)
    except (SafetensorError, ValueError) as exc:
        raise SaeError(f"{WEIGHTS_FILE} is not a safetensors file: {exc}", WEIGHTS_FILE) from None
    encoder = tensors.get("W_enc")
    if encoder is None or encoder.dim() != 2 or not encoder.is_floating_point():
        raise SaeError(f"{WEIGHTS_FILE} needs W_enc, a floating-point [d_in, d_sae] tensor", "W_enc")
    for field in ("d_in", "d_sae"):
        declared = cfg.get(field)
        actual = encoder.shape[0 if field == "d_in" else 1]
        if declared is not None and actual is not None and declared != actual:
            raise SaeError(f"{CFG_FILE} says {field} {declared}; W_enc has {actual}", field)
    dtype = encoder.dtype
    return SparseAutoencoder(
        architecture=architecture,
        hook_name=hook_name,
        k=k,
        apply_b_dec_to_input=apply,
        **{
            name: tensors[name].to(device, dtype) if name in tensors else None
            for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
        },
    )


def sae_flag_problem(spec: str, backend: str) -> str | None:
    """What is wrong with one ``--sae NAME=FOLDER`` flag (None: nothing the model is needed for)."""
    name, equals, folder = spec.partition("=")
    if not equals or not NAME.match(name):
        return "expected NAME=FOLDER, NAME of letters, digits, '_', '-', '.' (at most 64)"
    if backend != "hf":
        return "SAEs run on --backend hf only (docs/scale_out.md)"
    for file in (CFG_FILE, WEIGHTS_FILE):
        if not (Path(folder).expanduser() / file).is_file():
            return f"{folder} has no {file} (SAELens' format: {CFG_FILE} and {WEIGHTS_FILE})"
    return None


def _tl_hook(hook: str, resolver: HookResolver) -> str:
    """TransformerLens' ``hook_attn_out`` / ``hook_mlp_out`` are what a sublayer adds to the
    residual stream: on layers that normalise a sublayer's output before adding it (Gemma 2/3,
    OLMo 2: ``post_attention_layernorm`` and ``post_feedforward_layernorm``) that is the norm's
    output, not the attention or MLP module's."""
    sandwich = {"attn_out": "post_attention_layernorm.output", "mlp_out": "post_feedforward_layernorm.output"}
    if hook in sandwich:
        try:
            resolver.resolve(layers=[0], hook_points=[sandwich["mlp_out"]], modules=None)
        except HookError:
            return hook  # no norm after the MLP: the sublayer's own output is what is added
        return sandwich[hook]
    return hook


def sae_hook_point(hook_name: str, resolver: HookResolver) -> HookPoint:
    """Where an SAE named ``hook_name`` reads, as one of the served model's hook points.

    Raises:
        SaeError: a name that is not one hook point of this model (field ``hook_name``)."""
    try:
        if match := _TL_NAME.match(hook_name):
            points = resolver.resolve(
                layers=[int(match[1])], hook_points=[_tl_hook(match[2], resolver)], modules=None
            )
        elif match := _LAYER_NAME.match(hook_name):
            points = resolver.resolve(layers=[int(match[1])], hook_points=[match[2]], modules=None)
        else:
            module = hook_name if hook_name.endswith((".input", ".output")) else f"{hook_name}.output"
            points = resolver.resolve(layers=None, hook_points=None, modules=[module])
    except HookError as exc:
        raise SaeError(
            f"hook_name {hook_name!r} is not a hook point of the served model: {exc}", "hook_name"
        ) from None
    (point,) = points
    return point


@dataclass(frozen=True)
class ServedSae:
    """An SAE the server holds: its name, where it reads, its weights, where it came from."""

    name: str
    point: HookPoint
    sae: SparseAutoencoder
    folder: str

    def on(self, device) -> ServedSae:
        """The same SAE with its weights on ``device``."""
        return ServedSae(self.name, self.point, self.sae.to(device), self.folder)

    def describe(self) -> dict:
        return {
            "object": "sae",
            "name": self.name,
            "hook_point": self.point.name,
            "module": f"{self.point.module_path}.{self.point.kind}",
            "layer": self.point.layer,
            "folder": self.folder,
            **self.sae.describe(),
        }


class SaeSet:
    """The SAEs the server holds, by name. Changed on the engine's worker only; read anywhere
    (a request that resolved an SAE keeps using it even if it is unloaded meanwhile)."""

    def __init__(self) -> None:
        self._served: dict[str, ServedSae] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._served

    def get(self, name: str) -> ServedSae:
        """Raises KeyError for a name not loaded."""
        return self._served[name]

    def listing(self) -> list[dict]:
        served = list(self._served.values())  # one snapshot: an unload meanwhile changes nothing here
        return [item.describe() for item in sorted(served, key=lambda item: item.name)]

    @property
    def nbytes(self) -> int:
        return sum(served.sae.nbytes for served in self._served.values())

    def add(self, served: ServedSae) -> None:
        self._served[served.name] = served

    def remove(self, name: str) -> ServedSae:
        """Raises KeyError for a name not loaded."""
        return self._served.pop(name)


def load_sae(
    name: str, cfg_bytes: bytes, weights_bytes: bytes, folder: str, resolver: HookResolver, device
) -> ServedSae:
    """Read an SAE and check it fits the served model (its ``d_in`` is its hook point's width).

    Raises:
        SaeError: naming the field at fault."""
    sae = read_sae(cfg_bytes, weights_bytes, device)  # "cpu" first, where the caller checks room
    point = sae_hook_point(sae.hook_name, resolver)
    if not point.floating:
        raise SaeError(f"{point.name} holds integers, not activations", "hook_name")
    if point.width != sae.d_in:
        raise SaeError(f"d_in is {sae.d_in}; {point.name} has width {point.width}", "d_in")
    return ServedSae(name, point, sae, folder)
