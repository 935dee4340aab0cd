"""The wire model of one intervention: what a client sends in ``interventions`` (JSON, never code).

Validated strictly (no type coercion, finite numbers only) like every request model of
the server; ``server/serving/interventions.py`` resolves it against the served model
into :class:`~interventions.edit.Edit` objects.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class InterventionRequest(BaseModel):
    """One change to the model's values while it answers (extension field ``interventions``)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)

    type: Literal[
        "add", "scale", "ablate", "project_out", "clamp", "patch", "sae_add", "sae_clamp", "sae_ablate"
    ]
    layer: int | None = Field(None, description="One layer (negative counts from the end).")
    layers: list[int] | Literal["all"] | None = Field(None, description="Several layers, or all.")
    hook_point: Annotated[str, Field(max_length=200)] | None = Field(
        None, description="Per-layer name, as in capture: resid_post, mlp_out, mlp.down_proj.input, ..."
    )
    module: Annotated[str, Field(max_length=300)] | None = Field(
        None, description="Absolute module path with .input/.output, instead of layer + hook_point."
    )
    positions: (
        Literal["all", "prompt", "generated", "last"]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=100_000)]
    ) = "all"
    vector: (
        Annotated[list[float], Field(max_length=1_000_000)] | Annotated[str, Field(max_length=100)] | None
    ) = Field(
        None,
        description="The numbers, or the name of a stored vector (POST /v1/vectors). add: the direction "
        "to add; project_out/clamp: the direction; ablate: a mean to set.",
    )
    scale: float = Field(1.0, description="add: the multiple of the vector added.")
    factor: float | None = Field(None, description="scale: the factor to multiply by.")
    value: float = Field(
        0.0,
        description="clamp: the component along the direction is set to this; sae_clamp: the feature's "
        "activation.",
    )
    sae: Annotated[str, Field(max_length=64)] | None = Field(
        None,
        description="sae_add/sae_clamp/sae_ablate: a loaded SAE's name (GET /v1/saes); it acts at the "
        "SAE's hook point.",
    )
    feature: Annotated[int, Field(ge=0)] | None = Field(None, description="sae_*: the SAE feature's index.")
    strength: float = Field(1.0, description="sae_add: the multiple of the feature's decoder row added.")
    activation_id: Annotated[str, Field(max_length=40)] | None = Field(
        None, description="patch: the id of an earlier capture (act-...)."
    )
    tensor: Annotated[str, Field(max_length=300)] | None = Field(
        None, description="patch: the captured tensor's name, e.g. layers.3.resid_post."
    )
    steps: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)] | None = Field(
        None,
        description="[first, end): the forward steps to act on; step 0 is the prompt, step k the k-th token.",
    )

    @model_validator(mode="after")
    def _steps_in_order(self):
        if self.steps is not None and self.steps[0] >= self.steps[1]:
            raise ValueError("steps is [first, end) with first < end")
        return self
