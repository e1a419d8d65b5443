"""Optimizer parameter groups: weight decay on weight matrices only, and optional layer-wise learning-rate decay.

No weight decay on norms, biases and the SSM's A_log and D (as mamba_ssm marks them); decay on every other
parameter of two or more dimensions. With layer-wise decay γ, block i of L runs at lr·γ^(L−1−i): the top block at
the peak rate, each block below it a factor γ slower; the final norm and any head above the blocks run at the peak
rate, and the embeddings (with the vocabulary head tied to them) below block 0, at lr·γ^L, as the rule intends.
`embeddings_at_peak=True` reproduces BioMamba's code, where the tied embeddings got the full peak rate.
"""

from __future__ import annotations

import re

import torch

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")  # medstate's blocks; GPT-2's `h`
_EMBEDDING = re.compile(r"embed|(?:^|\.)(?:wte|wpe)\.")  # GPT-2's token and position embeddings
_NO_DECAY = re.compile(r"(norm|bias|(^|\.)A_log$|(^|\.)D$)")


def decays(name: str, parameter: torch.nn.Parameter) -> bool:
    return parameter.ndim >= 2 and not _NO_DECAY.search(name)


def depth(name: str, n_layer: int) -> int:
    """0 for the embeddings, i + 1 for block i, n_layer + 1 for what comes after the blocks."""
    found = _BLOCK.search(name)
    if found:
        return int(found.group(1)) + 1
    return 0 if _EMBEDDING.search(name) else n_layer + 1


def parameter_groups(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float | None = None,
    n_layer: int | None = None,
    embeddings_at_peak: bool = False,
) -> list[dict]:
    """Groups for torch.optim (each with its own `lr` and `weight_decay`, and a `name`)."""
    n_layer = n_layer if n_layer is not None else getattr(getattr(model, "config", None), "n_layer", 0)
    groups: dict[tuple[float, float], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        rate = lr
        if layer_decay is not None:
            level = depth(name, n_layer)
            if level == 0 and embeddings_at_peak:
                level = n_layer + 1
            rate = lr * layer_decay ** max(0, n_layer - level)
        decay = weight_decay if decays(name, parameter) else 0.0
        group = groups.setdefault((rate, decay), {"params": [], "names": [], "lr": rate, "weight_decay": decay})
        group["params"].append(parameter)
        group["names"].append(name)
    return list(groups.values())
