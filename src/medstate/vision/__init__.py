"""medstate.vision: scans (image ↔ sequences, exact inverses), Vision Mamba blocks 2D/3D, a classifier, a
U-Mamba-style segmenter, MambaMIL, baselines, image I/O and training runs. MONAI, nibabel and tifffile come with
`pip install medstate[imaging]`."""

from __future__ import annotations

import importlib
from types import ModuleType

from medstate.errors import MedstateError


def imaging_module(name: str) -> ModuleType:
    """Import an optional imaging dependency, or say how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MedstateError(f"this needs {name.split('.')[0]}: pip install 'medstate[imaging]'") from None
