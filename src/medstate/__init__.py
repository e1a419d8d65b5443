"""medstate: Mamba (selective state-space) foundation models for medicine."""

from medstate.errors import MedstateError

__version__ = "0.1.0"
__all__ = ["MedstateError", "__version__"]
