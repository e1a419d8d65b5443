"""Token-budget batches: samples packed end to end into one row, separated by `seq_idx`, so that no padding is
computed and no information crosses from one patient to the next (the engine's packed sequences)."""

from __future__ import annotations

import numpy as np
import torch

from medstate.ehr.sequences import ARRAY_DTYPES, ARRAYS

# floats stay float32; ids, types, segments and orders index embeddings (long)
DTYPES = {name: torch.float32 if dtype.is_float() else torch.long for name, dtype in ARRAY_DTYPES.items()}


def token_budget_batches(lengths: list[int], budget: int, order: np.ndarray | None = None) -> list[list[int]]:
    """Group sample indices (in `order`, default as given) into batches of at most `budget` tokens; a sample
    longer than the budget gets a batch of its own."""
    order = np.arange(len(lengths)) if order is None else order
    batches, current, used = [], [], 0
    for index in order.tolist():
        if current and used + lengths[index] > budget:
            batches.append(current)
            current, used = [], 0
        current.append(index)
        used += lengths[index]
    if current:
        batches.append(current)
    return batches


def collate(samples: list[dict], with_lm_targets: bool = False) -> dict[str, torch.Tensor]:
    """One packed row [1, T] from samples (dicts of token arrays). Adds seq_idx, `ends` [N, 2] (row, position of
    each sample's last token) and, when asked, next-token targets that never cross a sample boundary."""
    batch = {
        name: torch.tensor(np.concatenate([s[name] for s in samples]), dtype=DTYPES[name])[None] for name in ARRAYS
    }
    lengths = [len(s["input_ids"]) for s in samples]
    batch["seq_idx"] = torch.repeat_interleave(torch.arange(len(samples), dtype=torch.int32), torch.tensor(lengths))[
        None
    ]
    last = torch.tensor(np.cumsum(lengths) - 1)
    batch["ends"] = torch.stack([torch.zeros_like(last), last], dim=1)
    if with_lm_targets:
        targets = torch.full_like(batch["input_ids"], -100)
        targets[0, :-1] = batch["input_ids"][0, 1:]
        targets[0, last] = -100  # the last token of a sample predicts nothing (the next sample is another patient)
        batch["lm_targets"] = targets
    return batch


def sample_windows(ends: torch.Tensor, n_rows: int, context: int) -> list[tuple[int, int, int]]:
    """(row, start, stop) of each sample's last `context` tokens, from its end positions `ends` [N, 2]: in a packed
    batch (one row) a sample starts after the previous one's end; with several rows, each row is one sample."""
    rows, last = ends[:, 0].tolist(), ends[:, 1].tolist()
    starts = [0] + [end + 1 for end in last[:-1]] if n_rows == 1 else [0] * len(rows)
    return [(row, max(start, end + 1 - context), end + 1) for row, start, end in zip(rows, starts, last)]


def row_ends(n_rows: int, width: int) -> torch.Tensor:
    """`ends` [N, 2] for a batch of one sample per row: every row's last position."""
    return torch.stack([torch.arange(n_rows), torch.full((n_rows,), width - 1)], 1)
