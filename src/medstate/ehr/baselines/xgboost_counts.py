"""XGBoost on bag-of-codes counts plus first and last age: the EhrMamba paper's tree baseline.

Features come from the same prompted sequences the neural models see (so the same history cut at the prediction
time): the count of every vocabulary token except special and task tokens, and the age at the first and at the
last event. One classifier per task, trained on the training split; scores are probabilities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from scipy import sparse

from medstate.ehr.sequences import SPECIAL_TOKENS, TYPE_EVENT
from medstate.ehr.store import Samples
from medstate.ehr.vocab import Vocabulary

NAME = "xgboost"


def count_features(samples: Samples, vocab_size: int) -> sparse.csr_matrix:
    rows, cols, first_age, last_age = [], [], [], []
    for i, arrays in enumerate(samples.arrays):
        events = arrays["token_types"] == TYPE_EVENT
        ids = arrays["input_ids"][events]
        ids = ids[ids >= len(SPECIAL_TOKENS)]
        rows.append(np.full(len(ids), i))
        cols.append(ids)
        ages = arrays["ages"][events]
        first_age.append(ages[0] if len(ages) else np.nan)
        last_age.append(ages[-1] if len(ages) else np.nan)
    n = len(samples.arrays)
    counts = sparse.csr_matrix(
        (
            np.ones(sum(len(r) for r in rows), dtype=np.float32),
            (np.concatenate(rows or [[]]), np.concatenate(cols or [[]])),
        ),
        shape=(n, vocab_size),
    )
    ages = sparse.csr_matrix(np.column_stack([first_age, last_age]).astype(np.float32))
    return sparse.hstack([counts, ages], format="csr")


def fit_predict(prepared: str | Path, seed: int = 0, n_estimators: int = 200) -> pl.DataFrame:
    """Tuning and held-out predictions of one XGBoost per task, in the report's layout. One thread: these trees
    are small, and OpenMP threads that wait for a busy core (next to a training run) make boosting 20x slower."""
    from xgboost import XGBClassifier

    prepared = Path(prepared)
    vocab_size = len(Vocabulary.load(prepared / "vocab.json"))
    splits = {split: Samples.read(prepared, "finetune", split) for split in ("train", "tuning", "held_out")}
    features = {split: count_features(samples, vocab_size) for split, samples in splits.items()}
    frames = []
    for task in sorted(splits["train"].frame["task"].unique()):
        train_rows = np.flatnonzero(splits["train"].frame["task"].to_numpy() == task)
        y = splits["train"].frame["label"].to_numpy()[train_rows]
        model = None
        if 0 < y.sum() < len(y):
            model = XGBClassifier(
                n_estimators=n_estimators, max_depth=4, learning_rate=0.1, subsample=0.8, colsample_bytree=0.8,
                tree_method="hist", random_state=seed, n_jobs=1, eval_metric="logloss",
            )  # fmt: skip
            model.fit(features["train"][train_rows], y)
        for split in ("tuning", "held_out"):
            frame = splits[split].frame
            rows = np.flatnonzero(frame["task"].to_numpy() == task)
            if not len(rows):
                continue
            # a task with one class in training can only predict its base rate
            scores = (
                model.predict_proba(features[split][rows])[:, 1] if model is not None else np.full(len(rows), y.mean())
            )
            frames.append(
                frame[rows]
                .select("subject_id", "task", "visit_key", "prediction_time", pl.col("label").alias("y_true"))
                .with_columns(pl.Series("y_score", scores.astype(np.float64)), pl.lit(split).alias("split"))
            )
    return pl.concat(frames).with_columns(pl.lit(NAME).alias("model"), pl.lit(seed).alias("seed"))
