"""Structured layer pruning of Mamba language models: whole residual blocks removed, the rest renumbered, so that
the pruned model is an ordinary checkpoint (medstate and HF transformers load it; its recurrent state has one
entry per kept block).

Which blocks to keep:
    keep_indices("0,1,2,4,6", n)     the listed blocks
    keep_indices("first:16", n)      the first 16;  "last:16": the last 16
    keep_indices("every-other", n)   blocks 0, 2, 4, … and always the last one
    keep_indices("drop:3,5", n)      all but the listed blocks
or by a measured criterion: `block_influence` (ShortGPT's block influence, Men et al. 2024): for each block,
1 − cos(block input, block output) per token of a calibration text, averaged; a block that barely turns the residual
stream does little, and `least_influential` drops the `n` lowest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medstate.errors import MedstateError
from medstate.ssm.model import MambaLM


def keep_indices(spec: str, n_layer: int) -> list[int]:
    """The blocks a specification keeps, in order (see the module's docstring)."""
    spec = spec.strip()
    try:
        if spec == "every-other":
            keep = sorted(set(range(0, n_layer, 2)) | {n_layer - 1})
        elif spec.startswith(("first:", "last:")):
            count = int(spec.split(":", 1)[1])
            keep = list(range(count)) if spec.startswith("first:") else list(range(n_layer - count, n_layer))
        elif spec.startswith("drop:"):
            dropped = {int(i) for i in spec[5:].split(",") if i.strip()}
            keep = [i for i in range(n_layer) if i not in dropped]
            if not dropped <= set(range(n_layer)):
                raise MedstateError(f"layers to drop {sorted(dropped)} are not all in 0..{n_layer - 1}")
        else:
            keep = [int(i) for i in spec.split(",") if i.strip()]
    except ValueError:
        raise MedstateError(
            f"cannot read the layers to keep {spec!r}: use 0,1,2,4 or first:K, last:K, every-other, drop:3,5"
        ) from None
    if not keep or len(set(keep)) != len(keep) or keep != sorted(keep) or not 0 <= keep[0] <= keep[-1] < n_layer:
        raise MedstateError(f"layers to keep {keep} must be distinct, increasing and within 0..{n_layer - 1}")
    return keep


def prune_layers(model: MambaLM, keep: Sequence[int]) -> MambaLM:
    """A new model with the kept blocks only, renumbered 0..len(keep)-1, weights copied (in eval mode)."""
    config = model.config
    keep = keep_indices(",".join(map(str, keep)), config.n_layer)
    if getattr(config, "attn_layer_idx", None):
        raise MedstateError("pruning hybrid models with attention layers is not supported")
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if parts[:2] == ["backbone", "layers"]:
            old = int(parts[2])
            if old not in new_index:
                continue
            parts[2] = str(new_index[old])
        state[".".join(parts)] = tensor
    with torch.device("meta"):
        pruned = MambaLM(dataclasses.replace(config, n_layer=len(keep)))
    pruned.load_state_dict(state, assign=True)
    if config.tie_embeddings:
        pruned.lm_head.weight = pruned.backbone.embeddings.weight
    return pruned.eval()


@torch.no_grad()
def block_influence(model: MambaLM, batches: Iterable[torch.Tensor]) -> np.ndarray:
    """[n_layer] mean over all tokens of 1 − cos(block input, block output), over batches of token ids."""
    totals, tokens = np.zeros(model.config.n_layer), 0
    handles = []
    current: dict[int, float] = {}

    def hook(index: int):
        def measure(block, args, output):
            before, after = args[0].float(), output[0].float()
            current[index] = float((1 - F.cosine_similarity(before, after, dim=-1)).sum())

        return measure

    for i, layer in enumerate(model.backbone.layers):
        handles.append(layer.register_forward_hook(hook(i)))
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            model.backbone(ids.to(next(model.parameters()).device))
            totals += np.array([current[i] for i in range(len(totals))])
            tokens += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not tokens:
        raise MedstateError("block influence needs calibration tokens")
    return totals / tokens


def least_influential(influence: Sequence[float], n_drop: int) -> list[int]:
    """The blocks to keep after dropping the `n_drop` of lowest influence (ties: the later block goes first)."""
    n_layer = len(influence)
    if not 0 <= n_drop < n_layer:
        raise MedstateError(f"can drop 0 to {n_layer - 1} of {n_layer} layers, not {n_drop}")
    order = sorted(range(n_layer), key=lambda i: (influence[i], -i))
    return sorted(set(range(n_layer)) - set(order[:n_drop]))
