"""On-disk stores under the server's own roots (activations now; vectors with issue 4)."""

from .activations import ActivationStore, CaptureWriter, PathOutsideRoot, UnknownActivation

__all__ = ["ActivationStore", "CaptureWriter", "PathOutsideRoot", "UnknownActivation"]
