"""Declarative interventions: what to change in the model's values, as data, never as code.

The one home of an intervention, in three layers:

* :class:`InterventionRequest` (``request.py``): the wire model a client sends;
* :class:`Edit` (``edit.py``): one resolved operation at one hook point, with the
  positions and forward steps it acts on;
* ``OPERATIONS`` (``ops.py``): the operations themselves, small pure functions over the
  last dimension of a ``[..., d]`` tensor, ``patch`` included.

The serving layer resolves requests into edits (``server/serving/interventions.py``:
hook points, stored vectors, presets, patch sources); the engine's runtime applies
them to the asking request's rows only (``server/engine/steps.py``). Nothing persists
past the request.
"""

from .edit import Edit, placed
from .ops import OPERATIONS, apply_operation
from .request import InterventionRequest

__all__ = ["OPERATIONS", "Edit", "InterventionRequest", "apply_operation", "placed"]
