"""A patient's risk, kept up to date event by event: the streaming tokens (`ehr.streaming`) are fed to EhrMamba's
recurrent state as they are committed, and every task's probability comes from a copy of that state fed the
task's last tokens (state branching), so an event costs the same whatever the length of the history.

How the model was finetuned decides what is kept (`medstate ehr prepare --prompt`):
  last   [CLS] history [TASK]: the history's state is the same for every task: one state per patient, and each
         task's answer branches from it.
  both   [TASK] history [TASK] (EhrMamba's prompts): the task token is also the first token, so the history's
         state differs per task from the start: the patient keeps one state per task, stepped together as the rows
         of one batch (K tasks: K times the state memory, about the same time per event on the CPU).

Predictions are those of the whole history so far, as `predict_history` computes them by re-encoding it: a task
predicted at a visit's end (`closes_visit`) sees the last visit closed with [VE] [REG] at its latest event; the
others see it open. When an event changes tokens already fed (a late event, a static fact, a merge of visits),
the state is restored from the last snapshot before the first changed token (snapshots are kept at visit starts:
the most recent ones and every `sparse_every`-th visit) and the tokens from there on are fed again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import torch

from medstate.ehr.batching import DTYPES, collate
from medstate.ehr.model import EhrMamba
from medstate.ehr.prepare import PrepareConfig
from medstate.ehr.sequences import (
    ARRAYS,
    CLS,
    TYPE_INTERVAL,
    TYPE_REGISTER,
    TYPE_TASK,
    TYPE_VISIT_START,
    PatientSequence,
    ValueBins,
    at_end_of_day,
    build_sequence,
)
from medstate.ehr.streaming import Change, Row, StreamEvent, StreamingTokenizer
from medstate.ehr.tasks import TaskSpec, TaskSuite
from medstate.ehr.vocab import Vocabulary
from medstate.errors import MedstateError
from medstate.loading import expect_mapping, from_data, read_json, read_yaml
from medstate.ssm import SSMState


@dataclass
class ServedModel:
    """A finetuned EhrMamba checkpoint with what travels with it (vocabulary, value bins, tasks, settings)."""

    model: EhrMamba
    vocab: Vocabulary
    bins: ValueBins
    tasks: list[TaskSpec]
    settings: PrepareConfig

    @classmethod
    def load(cls, directory: str | Path) -> ServedModel:
        from medstate.ehr.training import load_model

        directory = Path(directory)
        model = load_model(directory)
        if not isinstance(model, EhrMamba):
            raise MedstateError(f"{directory}: serving keeps a recurrent state, so it needs an EhrMamba checkpoint")
        missing = [
            n for n in ("vocab.json", "value_bins.json", "tasks.yaml", "prepare.yaml") if not (directory / n).is_file()
        ]
        if missing:
            raise MedstateError(f"{directory}: no {', '.join(missing)} (a finetuning run's checkpoints carry them)")
        bins = read_json(directory / "value_bins.json", "value bins")
        settings = expect_mapping(read_yaml(directory / "prepare.yaml", "prepared settings"), "prepare.yaml")
        settings = {k: tuple(v) if k == "date_only_codes" else v for k, v in settings.items() if k != "meds_dirs"}
        return cls(
            model.eval(),
            Vocabulary.load(directory / "vocab.json"),
            ValueBins(bins["n_bins"], bins["edges"]),
            list(TaskSuite.load(directory / "tasks.yaml").tasks),
            from_data(PrepareConfig, settings, str(directory / "prepare.yaml")),
        )

    @property
    def layout(self) -> str:
        return self.settings.prompt

    def heads(self) -> list[str]:
        """The first token of each kept state: [CLS] once (layout last), or each task's token (both)."""
        return [CLS] if self.layout == "last" else [t.token for t in self.tasks]

    def batch(self, rows: list[list[Row]]) -> dict[str, torch.Tensor]:
        """Token rows, one list per batch row, all of one length → the model's arrays [B, L]."""
        columns = [list(zip(*row)) for row in rows]  # per batch row: the six arrays' values
        batch = {name: torch.tensor([c[k] for c in columns], dtype=DTYPES[name]) for k, name in enumerate(ARRAYS)
                 if k > 0}  # fmt: skip
        batch["input_ids"] = torch.tensor([self.vocab.encode(list(c[0])) for c in columns], dtype=DTYPES["input_ids"])
        return batch

    def arrays(self, rows: list[Row], start: int) -> dict[str, torch.Tensor]:
        """Committed token rows from position `start` → the model's arrays [R, L] for the R kept states (position
        0 takes each state's head token)."""
        heads = self.heads()
        batch = {name: values.repeat(len(heads), 1) for name, values in self.batch([rows]).items()}
        if start == 0 and self.layout == "both":
            batch["input_ids"][:, 0] = torch.tensor(self.vocab.encode(heads))
            batch["token_types"][:, 0] = TYPE_TASK
        return batch


def _visit_starts(rows: list[Row], offset: int) -> list[int]:
    """Positions where a visit starts (its interval token, or its [VS] when none precedes it)."""
    starts = []
    for i, row in enumerate(rows):
        if row[1] == TYPE_INTERVAL or (row[1] == TYPE_VISIT_START and (i == 0 or rows[i - 1][1] != TYPE_INTERVAL)):
            starts.append(offset + i)
    return starts


class PatientStream:
    def __init__(
        self, served: ServedModel, events: list[StreamEvent] = (), recent_snapshots: int = 8, sparse_every: int = 16
    ):
        """A patient's stream; with `events` (arrival order), the whole history is encoded at once."""
        self._setup(served, StreamingTokenizer.from_events(served.bins, list(events)), recent_snapshots, sparse_every)
        self.snapshots: dict[int, SSMState] = {}  # position p → the state after the first p committed tokens
        self.state = served.model.empty_state(len(served.heads()))
        self.fed = 0
        self._catch_up()

    def _setup(self, served, tokenizer, recent_snapshots: int = 8, sparse_every: int = 16) -> None:
        self.served, self.tokenizer = served, tokenizer
        self.recent, self.sparse = recent_snapshots, sparse_every
        self.replayed_tokens = 0  # tokens fed again after changes to earlier tokens

    @classmethod
    def restore(
        cls, served: ServedModel, events: list[StreamEvent], state: bytes, snapshots: dict[int, bytes], **kwargs
    ) -> PatientStream:
        """A stream as it was after `events` (arrival order), from its saved state and snapshots (the history is
        tokenized again, not re-encoded). A state that does not fit the tokens is an error (re-encode instead)."""
        stream = cls.__new__(cls)
        stream._setup(served, StreamingTokenizer.from_events(served.bins, events), **kwargs)
        stream.state = SSMState.from_bytes(state)
        stream.snapshots = {p: SSMState.from_bytes(b) for p, b in snapshots.items()}
        stream.fed = len(stream.tokenizer.committed)
        if stream.state.batch_size != len(served.heads()) or any(p >= stream.fed for p in stream.snapshots):
            raise MedstateError("the saved state does not fit this model or these events; rebuild the state")
        return stream

    def state_bytes(self) -> bytes:
        return self.state.to_bytes()

    def snapshot_bytes(self) -> dict[int, bytes]:
        return {p: s.to_bytes() for p, s in self.snapshots.items()}

    def add(self, event: StreamEvent) -> Change:
        change = self.tokenizer.add(event)
        if change.start < self.fed:
            self._restore(change.start)
        self._catch_up()
        return change

    def extend(self, events: list[StreamEvent]) -> None:
        """Several events at once: tokenized one by one, fed once (the state restored once, from before the
        earliest token they change): a long history arriving in one request is encoded, not stepped."""
        earliest = self.fed
        for event in events:
            earliest = min(earliest, self.tokenizer.add(event).start)
        if earliest < self.fed:
            self._restore(earliest)
        self._catch_up()

    @torch.no_grad()
    def predictions(self) -> dict[str, float]:
        """Each task's probability from the history so far (state branching: the kept state is not changed), every
        task in one model call: a task predicted at a visit's end reads [VE] [REG] [TASK] after the state, the
        others [TASK] (rows padded at the end, each read at its own last token)."""
        served, committed = self.served, self.tokenizer.committed
        tail = self.tokenizer.closing()
        rows = []
        for task in served.tasks:
            before = tail if task.closes_visit else []
            last = (before or committed)[-1]
            rows.append([*before, (task.token, TYPE_TASK, last[2], last[3], 0, 0)])
        width = max(len(r) for r in rows)
        batch = served.batch([r + [r[-1]] * (width - len(r)) for r in rows])
        state = self.state.select([0] * len(rows) if len(served.heads()) == 1 else range(len(rows)))
        hidden, _ = served.model.prefill(batch, state)
        ends = hidden[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])]
        probabilities = torch.sigmoid(served.model.class_logits(ends).double())
        return {t.name: float(p) for t, p in zip(served.tasks, probabilities)}

    # ----- feeding the state ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _catch_up(self) -> None:
        """Feed the committed tokens not yet in the state, snapshotting at each visit start on the way."""
        committed = self.tokenizer.committed
        cuts = [p for p in _visit_starts(committed[self.fed :], self.fed) if p > self.fed] + [len(committed)]
        for cut in cuts:
            if cut > self.fed:
                batch = self.served.arrays(committed[self.fed : cut], self.fed)
                if cut - self.fed == 1:
                    self.state = self.served.model.step({k: v[:, 0] for k, v in batch.items()}, self.state)[1]
                else:
                    self.state = self.served.model.prefill(batch, self.state)[1]
                self.fed = cut
            if cut < len(committed):
                self.snapshots[cut] = self.state.clone()
        self._thin()

    def _restore(self, position: int) -> None:
        kept = [p for p in self.snapshots if p <= position]
        start = max(kept, default=0)
        self.state = self.snapshots[start].clone() if start else self.served.model.empty_state(len(self.served.heads()))
        self.replayed_tokens += self.fed - start
        self.snapshots = {p: s for p, s in self.snapshots.items() if p <= start}
        self.fed = start

    def _thin(self) -> None:
        """Keep the snapshots of the `recent` latest visit starts and of every `sparse`-th one."""
        positions = sorted(self.snapshots)
        recent = set(positions[-self.recent :])
        committed = self.tokenizer.committed
        for p in positions:
            order = committed[p + 1][5] if committed[p][1] == TYPE_INTERVAL else committed[p][5]
            if p not in recent and order % self.sparse:
                del self.snapshots[p]


def task_input(
    served: ServedModel, task: TaskSpec, full: PatientSequence, max_length: int | None = None
) -> PatientSequence:
    """The input a task's prediction reads from a whole history `full`: closed at the end for tasks predicted at
    a visit's end, else with the last visit open; in the model's prompt layout, not truncated (unless
    `max_length`: the most recent tokens, as in finetuning)."""
    if not task.closes_visit and len(full) > 1 and full.token_types[-1] == TYPE_REGISTER:
        full = full._select(list(range(len(full) - 2)))
    return full.prompted(task.token, max_length or len(full) + 2, served.layout)


def explain(served: ServedModel, events: list[StreamEvent], task: TaskSpec, top: int = 10, max_length: int = 512):
    """The events that move a task's probability most (integrated gradients, `medstate.interp`) in the latest
    `max_length` tokens of the history: [(token, time, attribution)], largest first, and the probability."""
    from medstate.ehr.sequences import STATIC_TIMESTAMP, TYPE_EVENT, TYPE_STATIC
    from medstate.interp.attributions import integrated_gradients

    sequence = task_input(served, task, StreamingTokenizer.from_events(served.bins, events).sequence(), max_length)
    sample = dict(zip(ARRAYS, _arrays(sequence, served.vocab)))
    attribution = integrated_gradients(served.model, sample, sequence.tokens, steps=32)
    kinds = np.isin(sequence.token_types, (TYPE_EVENT, TYPE_STATIC))
    order = [i for i in np.argsort(-np.abs(attribution.scores)) if kinds[i]][:top]
    found = []
    for i in order:
        stamp = int(sequence.timestamps[i])
        moment = None if stamp == STATIC_TIMESTAMP else datetime(1970, 1, 1) + timedelta(microseconds=stamp)
        found.append((sequence.tokens[i], moment, float(attribution.scores[i])))
    return found, attribution.probability


@torch.no_grad()
def predict_history(served: ServedModel, events: pl.DataFrame) -> dict[str, float]:
    """Each task's probability from a whole history re-encoded from scratch (nothing kept): what a stream's
    `predictions` equal. `events`: the patient's MEDS rows (time, code, numeric_value, visit key columns, optionally
    time_precision), in arrival order; date-only events are moved to the end of their day as `prepare` does."""
    if "time_precision" not in events.columns:
        events = events.with_columns(pl.lit(None, pl.String).alias("time_precision"))
    events = at_end_of_day(events, served.settings.date_only_codes)  # as `prepare` reads them
    full = build_sequence(0, events, served.bins, served.settings.visit)
    samples = []
    for task in served.tasks:
        sequence = task_input(served, task, full)
        samples.append(dict(zip(ARRAYS, _arrays(sequence, served.vocab))))
    batch = collate(samples)
    logits = served.model(batch, ends=batch["ends"]).class_logits
    return {t.name: float(p) for t, p in zip(served.tasks, torch.sigmoid(logits.double()))}


def _arrays(sequence: PatientSequence, vocab: Vocabulary) -> list:
    return [vocab.encode(sequence.tokens), sequence.token_types, sequence.ages, sequence.times,
            sequence.visit_segments, sequence.visit_orders]  # fmt: skip
