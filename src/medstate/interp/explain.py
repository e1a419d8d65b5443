"""`explain`: integrated gradients for chosen samples of a task, written as one CSV and one timeline plot each.

results = explain(prepared, model, output, task="readmission_30d")         # the top-scored positives
results = explain(prepared, model, output, task="los_7d", subject=10002930)  # every sample of one subject
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from medstate.ehr.model import EhrMamba
from medstate.ehr.store import Samples
from medstate.ehr.training import predict
from medstate.ehr.vocab import Vocabulary
from medstate.errors import MedstateError
from medstate.interp.attributions import Attribution, integrated_gradients, plot_timeline


@dataclass
class Explained:
    name: str  # <subject>-<prediction time>, the stem of its CSV and PNG
    label: int
    tokens: list[str]
    attribution: Attribution

    def top(self, count: int) -> list[tuple[str, float]]:
        """The `count` tokens with the largest absolute attribution, largest first."""
        best = np.argsort(-np.abs(self.attribution.scores))[:count]
        return [(self.tokens[i], float(self.attribution.scores[i])) for i in best]


def choose_samples(
    model, prepared: Path, samples: Samples, task: str, split: str, subject: int | None, count: int
) -> list[int]:
    """Row indices to explain: every sample of `subject`, else the `count` top-scored positives (or top-scored
    samples when the split has no positive)."""
    frame = samples.frame
    if subject is not None:
        chosen = np.flatnonzero(frame["subject_id"].to_numpy() == subject).tolist()
        if not chosen:
            raise MedstateError(f"subject {subject} has no {task!r} sample in split {split!r}")
        return chosen
    scores = predict(model, prepared, split, [task])["y_score"].to_numpy()
    positives = np.flatnonzero(frame["label"].to_numpy() == 1)
    pool = positives if len(positives) else np.arange(len(scores))
    return pool[np.argsort(-scores[pool])][:count].tolist()


def explain(
    prepared: str | Path,
    model,
    output: str | Path,
    task: str,
    subject: int | None = None,
    split: str = "held_out",
    count: int = 3,
    steps: int = 64,
    top: int = 10,
    progress: Callable[[int, int], None] | None = None,
) -> list[Explained]:
    """Integrated gradients from `task`'s probability to each token of the chosen samples: OUTPUT/<name>.csv
    (position, token, days, attribution) and OUTPUT/<name>.png (timeline) per sample."""
    if not isinstance(model, EhrMamba):
        raise MedstateError("explain needs an EhrMamba checkpoint")
    prepared, output = Path(prepared), Path(output)
    samples = Samples.read(prepared, "finetune", split, [task])
    if not samples.arrays:
        raise MedstateError(f"no {task!r} samples in split {split!r} of {prepared}")
    chosen = choose_samples(model, prepared, samples, task, split, subject, count)
    vocab = Vocabulary.load(prepared / "vocab.json")
    output.mkdir(parents=True, exist_ok=True)
    results = []
    for done, index in enumerate(chosen, start=1):
        row = samples.frame.row(index, named=True)
        arrays = samples.arrays[index]
        tokens = [vocab.tokens[i] for i in arrays["input_ids"]]
        attribution = integrated_gradients(model, arrays, tokens, steps=steps)
        name = f"{row['subject_id']}-{row['prediction_time']:%Y%m%dT%H%M}"
        pl.DataFrame(
            {"position": np.arange(len(tokens)), "token": tokens, "days": arrays["times"],
             "attribution": attribution.scores}
        ).write_csv(output / f"{name}.csv")  # fmt: skip
        plot_timeline(attribution, arrays["times"], output / f"{name}.png", top=top)
        results.append(Explained(name, int(row["label"]), tokens, attribution))
        if progress:
            progress(done, len(chosen))
    return results
