"""On-disk stores under the server's own roots: captured activations, named vectors, presets."""

from .activations import (
    ActivationStore,
    CaptureTooLarge,
    CaptureWriter,
    DamagedActivation,
    UnknownActivation,
    UnsafeSaveDir,
)
from .files import UnsafeEntry
from .presets import DamagedPreset, PresetStore, UnknownPreset
from .vectors import DamagedVector, UnknownVector, VectorStore

__all__ = [
    "ActivationStore",
    "CaptureTooLarge",
    "CaptureWriter",
    "DamagedActivation",
    "DamagedPreset",
    "DamagedVector",
    "PresetStore",
    "UnknownActivation",
    "UnknownPreset",
    "UnknownVector",
    "UnsafeEntry",
    "UnsafeSaveDir",
    "VectorStore",
]
