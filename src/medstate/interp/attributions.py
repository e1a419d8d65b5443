"""Integrated gradients from a task probability to every input token (captum).

The attribution of token i is IG on the token's input embedding (the output of the EHR embedding layer, before the
backbone), summed over the embedding dimensions. The baseline is the same sequence with every concept replaced by
[PAD] (times, ages, types and visits kept), so each event is credited for what it is. By the completeness
property, the attributions add up to f(x) - f(baseline) of the probability, up to the integral's approximation
error, which `convergence_delta` reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medstate.ehr.batching import collate


@dataclass
class Attribution:
    tokens: list[str]
    scores: np.ndarray  # one per token
    probability: float
    baseline_probability: float
    convergence_delta: float


def integrated_gradients(model, sample: dict, tokens: list[str], steps: int = 64) -> Attribution:
    """`sample`: one prompted sequence's arrays (a finetuning input, `Samples.read`); `tokens` its token strings."""
    from captum.attr import IntegratedGradients

    model.eval()
    batch = collate([sample])
    ends = batch["ends"]
    with torch.no_grad():
        embeds = model.embeddings(batch)
        # the baseline keeps every token's time, age, type and visit but replaces its concept by [PAD]: the
        # attributions are those of the events themselves. (An all-zero baseline would pass the path through the
        # blocks' RMSNorm at zero norm, where the integrand is singular and the attributions stop adding up.)
        baseline = model.embeddings({**batch, "input_ids": torch.zeros_like(batch["input_ids"])})

    def probability(inputs_embeds: torch.Tensor) -> torch.Tensor:
        rows = inputs_embeds.shape[0]
        seq_idx = batch["seq_idx"].expand(rows, -1).contiguous()
        hidden, _ = model.encode(inputs_embeds, seq_idx=seq_idx)
        return torch.sigmoid(model.class_logits(hidden[torch.arange(rows), ends[0, 1]]))

    ig = IntegratedGradients(probability)
    attributions, delta = ig.attribute(
        embeds, baselines=baseline, n_steps=steps, internal_batch_size=8, return_convergence_delta=True
    )
    with torch.no_grad():
        value, base = float(probability(embeds)), float(probability(baseline))
    return Attribution(
        tokens=tokens,
        scores=attributions.sum(-1)[0].detach().numpy(),
        probability=value,
        baseline_probability=base,
        convergence_delta=float(delta.abs().max()),
    )


def plot_timeline(attribution: Attribution, times_days: np.ndarray, path, top: int = 20) -> None:
    """The patient's events as a stem plot of their attributions against days before the prediction (the last
    token), on a symmetric log scale so that the last days and decades earlier both show; the `top` largest
    labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(12, 4))
    scores = attribution.scores
    before = np.asarray(times_days, dtype=np.float64) - float(times_days[-1])
    colours = np.where(scores >= 0, "tab:red", "tab:blue")
    axis.vlines(before, 0, scores, colors=colours, linewidth=1)
    axis.axhline(0, color="grey", linewidth=0.5)
    for i in np.argsort(-np.abs(scores))[:top]:
        axis.annotate(attribution.tokens[i], (before[i], scores[i]), fontsize=6, rotation=30)
    axis.set_xscale("symlog", linthresh=30)
    axis.set(
        xlabel="days before the prediction (linear within 30 days, logarithmic beyond)",
        ylabel="attribution to the probability",
        title=f"p = {attribution.probability:.3f} (baseline {attribution.baseline_probability:.3f})",
    )
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
