"""The state-space engine: Mamba-1 / Mamba-2 layers, language model, recurrent state, checkpoints, LoRA.

    ops/         kernels: pure functions of tensors, each with a float64 `*_ref` twin that its tests compare against
    modules.py   layers that own parameters and call the kernels (Mamba-1 / Mamba-2 blocks, RMSNorm)
    model.py     MambaBackbone, MambaLM (prefill / step / generate), load_pretrained / save_pretrained
    checkpoint.py  checkpoint files (HF and mamba_ssm layouts) as plain tensors and configs; builds no model
    lora.py      LoRA adapters through PEFT (a model component, as torchtune's modules/peft)
    state.py, config.py, loss.py, prune.py, demo.py

May import: medstate.errors, medstate.loading. Nothing above the engine (train, ehr, text, …).
"""

from medstate.ssm.config import SSMConfig
from medstate.ssm.model import LMOutput, MambaBackbone, MambaLM, load_pretrained, sample_next_token, save_pretrained
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
