"""The state-space engine: Mamba-1 / Mamba-2 layers, language model, recurrent state, checkpoints."""

from medstate.ssm.checkpoint import load_pretrained, save_pretrained
from medstate.ssm.config import SSMConfig
from medstate.ssm.model import LMOutput, MambaBackbone, MambaLM, sample_next_token
from medstate.ssm.state import SSMState

__all__ = [
    "LMOutput",
    "MambaBackbone",
    "MambaLM",
    "SSMConfig",
    "SSMState",
    "load_pretrained",
    "sample_next_token",
    "save_pretrained",
]
