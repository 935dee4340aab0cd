"""On-disk stores under the server's own roots (activations now; vectors with issue 4)."""

from .activations import ActivationStore, CaptureWriter, UnknownActivation, UnsafeSaveDir

__all__ = ["ActivationStore", "CaptureWriter", "UnsafeSaveDir", "UnknownActivation"]
