"""Backbone configuration: one plain dataclass for Mamba-1 and Mamba-2, convertible to and from the
Hugging Face (`model_type` mamba / mamba2) and mamba_ssm native config layouts."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from medstate.errors import MedstateError


@dataclass
class SSMConfig:
    """Architecture of a Mamba language model / backbone.

    `version` 1 is the selective-scan mixer of Gu & Dao (2023); 2 is the SSD mixer of Dao & Gu (2024).
    Field names follow mamba_ssm; `to_hf_dict` / `from_hf_dict` translate to transformers' names.
    """

    version: int = 2
    vocab_size: int = 50288
    d_model: int = 768
    n_layer: int = 24
    d_state: int = 128
    expand: int = 2
    d_conv: int = 4
    # Mamba-2 only
    head_dim: int = 64
    n_groups: int = 1
    chunk_size: int = 256
    dt_limit: tuple[float, float] = (0.0, math.inf)
    # Mamba-1 only: rank of the dt projection (None = ceil(d_model / 16))
    dt_rank: int | None = None
    use_bias: bool = False
    use_conv_bias: bool = True
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    # initialisation of freshly created models
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise MedstateError(f"SSMConfig.version must be 1 or 2, got {self.version!r}")
        self.dt_limit = (float(self.dt_limit[0]), float(self.dt_limit[1]))
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)
        if self.version == 2:
            if self.d_inner % self.head_dim:
                raise MedstateError(f"d_model*expand = {self.d_inner} is not a multiple of head_dim {self.head_dim}")
            if self.n_heads % self.n_groups:
                raise MedstateError(f"n_heads {self.n_heads} is not a multiple of n_groups {self.n_groups}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SSMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    # ----- Hugging Face transformers layout -------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        common = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "state_size": self.d_state,
            "num_hidden_layers": self.n_layer,
            "layer_norm_epsilon": self.norm_eps,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "expand": self.expand,
            "conv_kernel": self.d_conv,
            "use_bias": self.use_bias,
            "use_conv_bias": self.use_conv_bias,
            "hidden_act": "silu",
            "residual_in_fp32": self.residual_in_fp32,
            "time_step_rank": self.dt_rank,
            "time_step_min": self.dt_min,
            "time_step_max": self.dt_max,
            "time_step_floor": self.dt_init_floor,
            "tie_word_embeddings": self.tie_embeddings,
        }
        if self.version == 1:
            return {"model_type": "mamba", "architectures": ["MambaForCausalLM"], **common}
        return {
            "model_type": "mamba2",
            "architectures": ["Mamba2ForCausalLM"],
            **common,
            "num_heads": self.n_heads,
            "head_dim": self.head_dim,
            "n_groups": self.n_groups,
            "chunk_size": self.chunk_size,
            "time_step_limit": [_to_json_float(self.dt_limit[0]), _to_json_float(self.dt_limit[1])],
            "rms_norm": True,
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> SSMConfig:
        model_type = data.get("model_type")
        if model_type not in ("mamba", "mamba2"):
            raise MedstateError(f"config.json has model_type {model_type!r}; expected 'mamba' or 'mamba2'")
        act = data.get("hidden_act", "silu")
        if act != "silu":
            raise MedstateError(f"hidden_act {act!r} is not supported (only 'silu')")
        rank = data.get("time_step_rank", "auto")
        kwargs: dict[str, Any] = {
            "version": 1 if model_type == "mamba" else 2,
            "vocab_size": data["vocab_size"],
            "d_model": data["hidden_size"],
            "n_layer": data["num_hidden_layers"],
            "d_state": data.get("state_size", 16 if model_type == "mamba" else 128),
            "expand": data.get("expand", 2),
            "d_conv": data.get("conv_kernel", 4),
            "dt_rank": None if rank == "auto" else int(rank),
            "use_bias": data.get("use_bias", False),
            "use_conv_bias": data.get("use_conv_bias", True),
            "norm_eps": data.get("layer_norm_epsilon", 1e-5),
            "residual_in_fp32": data.get("residual_in_fp32", True),
            "tie_embeddings": data.get("tie_word_embeddings", model_type == "mamba"),
            "pad_token_id": data.get("pad_token_id"),
            "bos_token_id": data.get("bos_token_id"),
            "eos_token_id": _first(data.get("eos_token_id")),
            "dt_min": data.get("time_step_min", 0.001),
            "dt_max": data.get("time_step_max", 0.1),
            "dt_init_floor": data.get("time_step_floor", 1e-4),
        }
        if model_type == "mamba2":
            limit = [_from_json_float(v) for v in data.get("time_step_limit", (0.0, math.inf))]
            kwargs.update(
                head_dim=data.get("head_dim", 64),
                n_groups=data.get("n_groups", 1),
                chunk_size=data.get("chunk_size", 256),
                dt_limit=(limit[0], limit[1]),
            )
            config = cls(**kwargs)
            if "num_heads" in data and data["num_heads"] != config.n_heads:
                raise MedstateError(
                    f"config.json: num_heads {data['num_heads']} != hidden_size*expand/head_dim {config.n_heads}"
                )
            return config
        return cls(**kwargs)

    # ----- mamba_ssm native layout (state-spaces/mamba-*, state-spaces/mamba2-*) --------------------
    @classmethod
    def from_mamba_ssm_dict(cls, data: dict[str, Any]) -> SSMConfig:
        ssm_cfg = dict(data.get("ssm_cfg") or {})
        layer = ssm_cfg.pop("layer", "Mamba1")
        if data.get("d_intermediate", 0):
            raise MedstateError("mamba_ssm checkpoints with MLP blocks (d_intermediate > 0) are not supported")
        if data.get("attn_layer_idx"):
            raise MedstateError("hybrid mamba_ssm checkpoints with attention layers are not supported")
        if not data.get("rms_norm", True):
            raise MedstateError("mamba_ssm checkpoints with LayerNorm (rms_norm=false) are not supported")
        vocab = data["vocab_size"]
        multiple = data.get("pad_vocab_size_multiple", 1)
        if vocab % multiple:
            vocab += multiple - vocab % multiple
        version = {"Mamba1": 1, "Mamba2": 2}.get(layer)
        if version is None:
            raise MedstateError(f"mamba_ssm layer type {layer!r} is not supported (Mamba1 or Mamba2)")
        kwargs: dict[str, Any] = {
            "version": version,
            "vocab_size": vocab,
            "d_model": data["d_model"],
            "n_layer": data["n_layer"],
            "residual_in_fp32": data.get("residual_in_fp32", True),
            "tie_embeddings": data.get("tie_embeddings", True),
            "d_state": ssm_cfg.get("d_state", 16 if version == 1 else 128),
            "d_conv": ssm_cfg.get("d_conv", 4),
            "expand": ssm_cfg.get("expand", 2),
            "use_bias": ssm_cfg.get("bias", False),
            "use_conv_bias": ssm_cfg.get("conv_bias", True),
            "dt_min": ssm_cfg.get("dt_min", 0.001),
            "dt_max": ssm_cfg.get("dt_max", 0.1),
            "dt_init_floor": ssm_cfg.get("dt_init_floor", 1e-4),
        }
        if version == 1:
            rank = ssm_cfg.get("dt_rank", "auto")
            kwargs["dt_rank"] = None if rank == "auto" else int(rank)
        else:
            limit = ssm_cfg.get("dt_limit", (0.0, math.inf))
            kwargs.update(
                head_dim=ssm_cfg.get("headdim", 64),
                n_groups=ssm_cfg.get("ngroups", 1),
                chunk_size=ssm_cfg.get("chunk_size", 256),
                dt_limit=(float(limit[0]), float(limit[1])),
            )
            if ssm_cfg.get("d_ssm") not in (None, kwargs["expand"] * kwargs["d_model"]):
                raise MedstateError("mamba_ssm Mamba2 with d_ssm != d_inner (gated MLP part) is not supported")
        return cls(**kwargs)


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


def _to_json_float(value: float) -> float | dict[str, str]:
    """JSON has no infinity; transformers writes it as {"__float__": "Infinity"} and reads that back."""
    return value if math.isfinite(value) else {"__float__": "Infinity" if value > 0 else "-Infinity"}


def _from_json_float(value: Any) -> float:
    if isinstance(value, dict):
        value = value.get("__float__")
    return math.inf if value is None else float(value)
