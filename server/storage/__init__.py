"""On-disk stores under the server's own roots: captured activations and named vectors."""

from .activations import ActivationStore, CaptureWriter, UnknownActivation, UnsafeSaveDir
from .presets import PresetStore, UnknownPreset
from .vectors import UnknownVector, VectorStore

__all__ = [
    "ActivationStore",
    "CaptureWriter",
    "PresetStore",
    "UnknownPreset",
    "UnknownActivation",
    "UnknownVector",
    "UnsafeSaveDir",
    "VectorStore",
]
