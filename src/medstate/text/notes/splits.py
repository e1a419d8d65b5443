"""The splits of a labelled cohort: train / tuning / test by patient, seeded, and the labelled document that
`text classify` reads (`medstate text notes --cohort` writes it)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from medstate.errors import MedstateError

SPLITS = ("train", "tuning", "test")
DEFAULT_SPLITS = {"train": 0.6, "tuning": 0.2, "test": 0.2}  # shares of patients


@dataclass(frozen=True)
class LabelledDocument:
    id: str
    subject: str
    split: str
    text: str
    labels: dict[str, bool]


def assign_splits(subjects: list[str], shares: dict[str, float], seed: int) -> dict[str, str]:
    """Subjects in a seeded hash order, cut by the shares (each split gets at least one subject)."""
    if len(subjects) < len(SPLITS):
        raise MedstateError(f"{len(subjects)} subjects cannot fill the {len(SPLITS)} splits")
    order = sorted(subjects, key=lambda s: hashlib.blake2b(f"{seed}:{s}".encode(), digest_size=8).digest())
    total = sum(shares.values())
    counts = [max(1, round(len(order) * shares[name] / total)) for name in SPLITS[:-1]]
    counts[0] = min(counts[0], len(order) - counts[1] - 1)
    bounds = np.cumsum([0, *counts, len(order) - sum(counts)])
    return {s: name for name, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:]) for s in order[lo:hi]}
