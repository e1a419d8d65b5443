"""Forecasting the next visit with a pretrained EhrMamba: sample what comes after a visit's [REG] (a time-interval
token, [VS], events, [VE]) and score the sampled codes against the visit that really followed.

Sampling runs the history once (prefill) and then one recurrent step per generated token, for `samples` draws in
parallel (the state is copied along the batch). Every generated token gets the aligned arrays the embeddings need:
its token type; the time and age advanced by the sampled interval token (the middle of its range); the next visit
order and the alternating visit segment from [VS] on.

Scoring: for each subject of a split, the history up to the [REG] of its second-to-last visit and the set of event
codes in the last visit (the history is the stored sequence: the most recent `max_length` tokens). A ranking of
codes gives recall@k = |top k ∩ truth| / |truth|. Rankings compared:

- `ehrmamba`: codes by the share of sampled visits that contain them;
- `population frequency`: codes by how many training subjects have them (the code-frequency baseline);
- `patient history`: codes by how often the subject has had them, then by population frequency.

Each mean comes with a 95% interval from a bootstrap over subjects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from medstate.ehr.batching import collate
from medstate.ehr.model import EhrMamba
from medstate.ehr.sequences import (
    ARRAYS,
    INTERVAL_TOKENS,
    REGISTER,
    SPECIAL_TOKENS,
    TYPE_CLS,
    TYPE_EVENT,
    TYPE_INTERVAL,
    TYPE_PAD,
    TYPE_REGISTER,
    TYPE_TASK,
    TYPE_VISIT_END,
    TYPE_VISIT_START,
    VISIT_END,
    VISIT_START,
    YEAR_DAYS,
)
from medstate.ehr.store import Samples
from medstate.ehr.vocab import Vocabulary
from medstate.errors import MedstateError
from medstate.ssm.model import sample_next_token

RANKINGS = ("ehrmamba", "population frequency", "patient history")


def interval_days(token: str) -> float:
    """The middle of an interval token's range, in days ([W1]: 7-13 → 10.5; [M3]: 90-119 → 105; [LT]: 1.5 y)."""
    if token.startswith("[W"):
        return 7 * int(token[2:-1]) + 3.5
    if token.startswith("[M"):
        return 30 * int(token[2:-1]) + 15
    return 1.5 * YEAR_DAYS


@dataclass
class ForecastConfig:
    samples: int = 16
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 64
    ks: tuple[int, ...] = (5, 10, 20)
    seed: int = 0
    bootstrap: int = 1000


@dataclass
class SampledVisit:
    tokens: list[str]  # the generated tokens, up to and including [VE] (or max_new_tokens)
    complete: bool  # ended with [VE]
    codes: list[int]  # event token ids in the visit
    arrays: dict[str, np.ndarray]  # the generated tokens' aligned arrays (input_ids, token_types, ages, times, …)


class VisitSampler:
    def __init__(self, model: EhrMamba, vocab: Vocabulary):
        if not isinstance(model, EhrMamba):
            raise MedstateError("forecasting needs an EhrMamba checkpoint (it has the next-event head)")
        self.model, self.vocab = model.eval(), vocab
        types = np.full(len(vocab), TYPE_EVENT, dtype=np.int64)
        gaps = np.zeros(len(vocab))
        special = {"[PAD]": TYPE_PAD, "[UNK]": TYPE_EVENT, "[CLS]": TYPE_CLS, VISIT_START: TYPE_VISIT_START,
                   VISIT_END: TYPE_VISIT_END, REGISTER: TYPE_REGISTER, "[MASK]": TYPE_EVENT}  # fmt: skip
        for token, index in vocab.index.items():
            if token in special:
                types[index] = special[token]
            elif token in INTERVAL_TOKENS:
                types[index], gaps[index] = TYPE_INTERVAL, interval_days(token)
            elif token.startswith("[TASK_"):
                types[index] = TYPE_TASK
        self.types, self.gaps = torch.tensor(types), torch.tensor(gaps, dtype=torch.float32)
        self.visit_start, self.visit_end = vocab.index[VISIT_START], vocab.index[VISIT_END]
        # never sample what cannot come next in a history: padding, [CLS], [MASK], task tokens
        banned = [vocab.index[t] for t in ("[PAD]", "[CLS]", "[MASK]")] + list(np.flatnonzero(types == TYPE_TASK))
        self.banned = torch.tensor(banned, dtype=torch.long)

    @torch.no_grad()
    def sample(self, history: dict, config: ForecastConfig, generator: torch.Generator) -> list[SampledVisit]:
        """`config.samples` continuations of `history` (one sequence's arrays), each up to its first [VE]."""
        n = config.samples
        batch = collate([history])
        hidden, state = self.model.prefill(batch)
        logits = self.model.next_event_logits(hidden[:, -1]).expand(n, -1)
        state = state.select([0] * n)
        clock = VisitClock(self, history, n)
        done = torch.zeros(n, dtype=torch.bool)
        generated = []
        for _ in range(config.max_new_tokens):
            logits = logits.float().index_fill(-1, self.banned, -torch.inf)
            token = sample_next_token(logits, config.temperature, config.top_p, generator=generator)
            step = clock.advance(token)
            generated.append(step)
            done = done | (token == self.visit_end)
            if bool(done.all()):
                break
            hidden, state = self.model.step(step, state)
            logits = self.model.next_event_logits(hidden)
        arrays = {name: torch.stack([step[name] for step in generated], 1).numpy() for name in ARRAYS}
        visits = []
        for row in range(n):
            ids = arrays["input_ids"][row].tolist()
            length = ids.index(self.visit_end) + 1 if self.visit_end in ids else len(ids)
            ids = ids[:length]
            codes = sorted({t for t in ids if self.types[t] == TYPE_EVENT and t >= len(SPECIAL_TOKENS)})
            visits.append(
                SampledVisit(
                    tokens=[self.vocab.tokens[t] for t in ids],
                    complete=ids[-1] == self.visit_end,
                    codes=codes,
                    arrays={name: values[row, :length] for name, values in arrays.items()},
                )
            )
        return visits


class VisitClock:
    """The aligned arrays of generated tokens, as `build_sequence` would lay them out: an interval token moves time
    and age on by the middle of its range and sits outside visits (segment and order 0); [VS] opens the next visit
    (order + 1, segments alternating 1, 2, 1, …), whose tokens carry its order and segment."""

    def __init__(self, sampler: VisitSampler, history: dict, n: int):
        self.types, self.gaps, self.visit_start = sampler.types, sampler.gaps, sampler.visit_start
        self.time = torch.full((n,), float(history["times"][-1]))
        self.age = torch.full((n,), float(history["ages"][-1]))
        self.order = torch.full((n,), int(np.max(history["visit_orders"])))
        self.inside = torch.zeros(n, dtype=torch.bool)

    def advance(self, token: torch.Tensor) -> dict[str, torch.Tensor]:
        kind, gap = self.types[token], self.gaps[token]
        self.time, self.age = self.time + gap, self.age + gap / YEAR_DAYS
        starts = token == self.visit_start
        self.order = self.order + starts.long()
        self.inside = (self.inside | starts) & (kind != TYPE_INTERVAL)
        return {
            "input_ids": token,
            "token_types": kind,
            "ages": self.age,
            "times": self.time,
            "visit_segments": torch.where(self.inside, 2 - self.order % 2, 0),
            "visit_orders": torch.where(self.inside, self.order, 0),
        }


def forecast_points(prepared: Path, split: str) -> list[tuple[int, dict, set[int]]]:
    """(subject_id, history arrays up to the [REG] of the second-to-last visit, event codes of the last visit) for
    every subject of `split` with at least two visits in its stored sequence."""
    samples = Samples.read(prepared, "pretrain", split)
    points = []
    for subject_id, arrays in zip(samples.frame["subject_id"].to_list(), samples.arrays):
        types = arrays["token_types"]
        registers = np.flatnonzero(types == TYPE_REGISTER)
        starts = np.flatnonzero(types == TYPE_VISIT_START)
        if len(registers) < 2 or starts[-1] < registers[-2]:
            continue
        cut = registers[-2] + 1
        last_visit = slice(starts[-1], registers[-1])
        truth = {
            int(t)
            for t, k in zip(arrays["input_ids"][last_visit], types[last_visit])
            if k == TYPE_EVENT and t >= len(SPECIAL_TOKENS)
        }
        if truth:
            points.append((subject_id, {name: a[:cut] for name, a in arrays.items()}, truth))
    return points


def population_ranking(prepared: Path, vocab_size: int) -> np.ndarray:
    """Event codes by the number of training subjects that have them (most first)."""
    counts = np.zeros(vocab_size)
    for arrays in Samples.read(prepared, "pretrain", "train").arrays:
        ids, types = arrays["input_ids"], arrays["token_types"]
        counts[np.unique(ids[types == TYPE_EVENT])] += 1
    counts[: len(SPECIAL_TOKENS)] = -1
    return np.argsort(-counts, kind="stable")


def _rank(scores: np.ndarray, fallback: np.ndarray, k: int) -> np.ndarray:
    """The top k ids by score (positive scores only), then by the fallback ranking."""
    ordered = [i for i in np.argsort(-scores, kind="stable")[:k] if scores[i] > 0]
    seen = set(ordered)
    for i in fallback:
        if len(ordered) >= k:
            break
        if i not in seen:
            ordered.append(int(i))
    return np.asarray(ordered[:k])


def evaluate_forecast(
    model: EhrMamba, prepared: str | Path, split: str = "held_out", config: ForecastConfig | None = None, progress=None
) -> dict:
    """Next-visit recall@k of sampled visits vs the code-frequency baselines, on every subject of `split`."""
    config = config or ForecastConfig()
    prepared = Path(prepared)
    vocab = Vocabulary.load(prepared / "vocab.json")
    sampler = VisitSampler(model, vocab)
    population = population_ranking(prepared, len(vocab))
    points = forecast_points(prepared, split)
    if not points:
        raise MedstateError(f"no subject in split {split!r} has two visits to forecast between")
    generator = torch.Generator().manual_seed(config.seed)
    k_max = max(config.ks)
    rows = []
    complete = 0
    for done, (subject_id, history, truth) in enumerate(points, start=1):
        visits = sampler.sample(history, config, generator)
        complete += sum(v.complete for v in visits)
        sampled = np.zeros(len(vocab))
        for visit in visits:
            sampled[visit.codes] += 1
        own = np.bincount(history["input_ids"][history["token_types"] == TYPE_EVENT], minlength=len(vocab))
        own[: len(SPECIAL_TOKENS)] = 0
        rankings = {
            "ehrmamba": _rank(sampled, population, k_max),
            "population frequency": population[:k_max],
            "patient history": _rank(own.astype(float), population, k_max),
        }
        for name, ranked in rankings.items():
            for k in config.ks:
                hits = len(truth & set(ranked[:k].tolist()))
                rows.append({"subject_id": subject_id, "ranking": name, "k": k, "recall": hits / len(truth)})
        if progress:
            progress(done, len(points))
    frame = pl.DataFrame(rows)
    rng = np.random.default_rng(config.seed)
    summary = []
    for (name, k), group in frame.group_by("ranking", "k", maintain_order=True):
        recalls = group["recall"].to_numpy()
        means = [recalls[rng.integers(0, len(recalls), len(recalls))].mean() for _ in range(config.bootstrap)]
        low, high = np.quantile(means, [0.025, 0.975])
        summary.append({"ranking": name, "k": k, "recall": float(recalls.mean()), "ci_low": low, "ci_high": high})
    return {
        "split": split,
        "subjects": len(points),
        "mean_true_codes": float(np.mean([len(t) for _, _, t in points])),
        "complete_visits": complete / (len(points) * config.samples),
        "config": {**config.__dict__, "ks": list(config.ks)},
        "summary": summary,
        "per_subject": frame,
    }


def forecast_markdown(result: dict) -> str:
    """recall@k (95% bootstrap interval) per ranking, one row each."""
    ks = result["config"]["ks"]
    lines = ["| ranking | " + " | ".join(f"recall@{k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for name in dict.fromkeys(r["ranking"] for r in result["summary"]):
        cells = [r for r in result["summary"] if r["ranking"] == name]
        lines.append(f"| {name} | " + " | ".join(
            f"{r['recall']:.3f} ({r['ci_low']:.3f}-{r['ci_high']:.3f})" for r in cells) + " |")  # fmt: skip
    return "\n".join(lines)


def write_forecast(result: dict, output: str | Path) -> str:
    """OUTPUT/forecast.json (summary), forecast_per_subject.parquet and forecast.md; returns the markdown table."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    result["per_subject"].write_parquet(output / "forecast_per_subject.parquet")
    summary = {key: value for key, value in result.items() if key != "per_subject"}
    (output / "forecast.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    table = forecast_markdown(result)
    (output / "forecast.md").write_text(table + "\n")
    return table
