"""The prepared token store: every subject's whole sequence stored once, samples as references into it, read
without loading it.

Under a prepared directory:

    shards/<unit>/<array>.npy   the unit's subjects end to end, one flat array per field (input_ids, token_types,
                                ages, times, visit_segments, visit_orders, timestamps in µs, key_ids)
    shards/<unit>/keys.json     the unit's visit keys ("hadm_id:7") per subject, indexed by key_ids (-1: none)
    shards/<unit>/key_starts.npy  the start (µs) of each key's stay (int64 min: not a stay)
    subjects.parquet            one row per subject: unit, start, stop (offsets into the unit's arrays), split,
                                birth and first time (what ages and days at a closing [VE] [REG] are computed from)
    samples.parquet             one row per (task, prediction time): the label columns, the subject's unit and
                                offsets, and the input's length

A pretraining input is a subject's sequence truncated to `max_length`; a finetuning input is
`sequence.until(prediction_time, hidden, close).prompted(task, max_length, layout)`, the same functions `prepare`
used to count its length, applied to vocabulary ids instead of token strings; the hidden stays are the subject's keys
whose stay starts after the prediction time (stored per key, not per sample: a list per sample grows with the
square of a subject's visits). Flat arrays per field with offsets
(rather than meds-torch-data's nested ragged tensors in safetensors) because a sample needs one subject's slice of
each field and nothing else: a positioned read of those bytes (`np.fromfile` at the slice's offset), and the layout
needs no library. Not a memory map: the pages a mapping has touched count in the process's resident memory and stay
there, so a long training run over a large cohort would grow towards the size of the store (seen: +555 MB of
mapped pages after 2,000 random samples at 10,000 patients); read slices are the process's only while used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from medstate.ehr.sequences import ARRAYS, REGISTER, VISIT_END, PatientSequence
from medstate.ehr.shards import STORED, unit_dir
from medstate.ehr.tasks import TaskSuite
from medstate.ehr.vocab import Vocabulary
from medstate.errors import MedstateError
from medstate.loading import read_yaml

KINDS = ("pretrain", "finetune")
_EPOCH = datetime(1970, 1, 1)
READ = (*ARRAYS, "timestamps", "key_ids")


def finalize_unit(out: Path, name: str, vocab: Vocabulary) -> None:
    """The unit's own token ids → vocabulary ids (`input_ids.npy`); done once, kept on a rerun."""
    folder = unit_dir(out, name)
    if (folder / "input_ids.npy").is_file():
        (folder / "local_ids.npy").unlink(missing_ok=True)
        return
    tokens = json.loads((folder / "tokens.json").read_text())
    table = np.asarray([vocab.index.get(t, vocab.unknown_id) for t in tokens] or [0], dtype=np.int32)
    partial = folder / "input_ids.partial.npy"
    np.save(partial, table[np.load(folder / "local_ids.npy")])
    os.replace(partial, folder / "input_ids.npy")
    (folder / "local_ids.npy").unlink()


class _NpySlices:
    """A 1-d .npy file read a slice at a time, at its offset (the header parsed once)."""

    def __init__(self, path: Path):
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, self.dtype = header(handle)
            self.offset = handle.tell()
        if len(shape) != 1:
            raise ValueError(f"{path.name} is not a flat array")
        self.path, self.length = path, shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= self.length:
            raise MedstateError(f"{self.path} has {self.length} values, not [{start}, {stop}); prepare again")
        count = stop - start
        return np.fromfile(self.path, self.dtype, count, offset=self.offset + start * self.dtype.itemsize)


class TokenStore:
    """Subjects' stored sequences, one slice at a time."""

    def __init__(self, prepared: str | Path):
        self.root = Path(prepared)
        self._units: dict[str, tuple[dict[str, _NpySlices], list[str], np.ndarray]] = {}

    def _unit(self, name: str) -> tuple[dict[str, _NpySlices], list[str], np.ndarray]:
        if name not in self._units:
            folder = unit_dir(self.root, name)
            try:
                arrays = {field: _NpySlices(folder / f"{field}.npy") for field in READ}
                keys = json.loads((folder / "keys.json").read_text())
                starts = np.load(folder / "key_starts.npy")
            except (OSError, ValueError) as err:
                message = f"{folder} is incomplete or unreadable ({err}); run `medstate ehr prepare` again"
                raise MedstateError(message) from None
            self._units[name] = (arrays, keys, starts)
        return self._units[name]

    def later_stays(self, unit: str, start: int, stop: int, moment: int) -> list[str]:
        """The visit keys of a subject's stays that start after `moment` (µs since 1970): hidden from its input."""
        arrays, keys, starts = self._unit(unit)
        ids = np.unique(arrays["key_ids"].read(start, stop))
        ids = ids[ids >= 0]
        return [keys[i] for i in ids[starts[ids] > moment].tolist()]

    def sequence(self, unit: str, start: int, stop: int, birth: int | None, first: int | None) -> PatientSequence:
        """A subject's whole sequence with vocabulary ids as its tokens; `birth`, `first`: µs since 1970 or None."""
        arrays, keys, _ = self._unit(unit)
        part = {field: arrays[field].read(start, stop) for field in READ}
        return PatientSequence(
            subject_id=-1,
            tokens=part["input_ids"].tolist(),
            token_types=part["token_types"],
            ages=part["ages"],
            times=part["times"],
            visit_segments=part["visit_segments"],
            visit_orders=part["visit_orders"],
            timestamps=part["timestamps"],
            visit_keys=[keys[k] if k >= 0 else None for k in part["key_ids"].tolist()],
            birth=_moment(birth),
            first_time=_moment(first),
        )


class SampleArrays(Sequence):
    """The inputs of a samples frame, built from the store when asked for (a list to every consumer)."""

    def __init__(self, prepared: Path, frame: pl.DataFrame, kind: str):
        settings = read_yaml(prepared / "prepare.yaml", "prepare settings")
        self.max_length, self.layout, self.kind = settings["max_length"], settings.get("prompt", "both"), kind
        self.store = TokenStore(prepared)
        # numpy columns, not Python lists: a training process's memory per sample stays a few dozen bytes
        self.unit_names, self.units = _codes(frame["unit"])
        self.starts, self.stops = frame["start"].to_numpy(), frame["stop"].to_numpy()
        self.births, self.firsts = _us_column(frame["birth"]), _us_column(frame["first_time"])
        if kind == "finetune":
            vocab = Vocabulary.load(prepared / "vocab.json")
            suite = TaskSuite.load(prepared / "tasks.yaml")
            self.closing = (vocab.index[VISIT_END], vocab.index[REGISTER])
            self.task_ids = {t.name: vocab.index[t.token] for t in suite.tasks}
            self.closes = {t.name: t.closes_visit for t in suite.tasks}
            self.task_names, self.tasks = _codes(frame["task"])
            self.moments = _us_column(frame["prediction_time"])

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]  # negative indices; IndexError past the end
        unit, start, stop = self.unit_names[self.units[index]], int(self.starts[index]), int(self.stops[index])
        sequence = self.store.sequence(unit, start, stop, _known(self.births[index]), _known(self.firsts[index]))
        if self.kind == "pretrain":
            built = sequence.truncate(self.max_length)
        else:
            task = self.task_names[self.tasks[index]]
            hidden = self.store.later_stays(unit, start, stop, int(self.moments[index]))
            moment = _moment(int(self.moments[index]))
            history = sequence.until(moment, hidden, close=self.closes[task], closing=self.closing)
            built = history.prompted(self.task_ids[task], self.max_length, self.layout)
        arrays = {name: np.asarray(getattr(built, name), dtype=STORED[name]) for name in ARRAYS[1:]}
        return {"input_ids": np.asarray(built.tokens, dtype=np.int32), **arrays}


@dataclass
class Samples:
    """A split's inputs: `frame` one row per sample (labels, references, `length`), `arrays` their token arrays."""

    frame: pl.DataFrame | None
    arrays: Sequence[dict]

    @classmethod
    def read(cls, prepared: str | Path, kind: str, split: str | None = None, tasks: list[str] | None = None):
        """Pretraining inputs (one per subject) or finetuning inputs (one per task and prediction time) of `split`
        (None: all), in the prepared order; `tasks` keeps those tasks' samples only."""
        prepared = Path(prepared)
        if kind not in KINDS:
            raise MedstateError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        index = prepared / ("subjects.parquet" if kind == "pretrain" else "samples.parquet")
        if not index.is_file():
            old = (prepared / f"{kind}.parquet").is_file()
            hint = "it was prepared by an older medstate; " if old else ""
            raise MedstateError(f"{index} not found; {hint}run `medstate ehr prepare` first")
        frame = pl.read_parquet(index)
        if split is not None:
            frame = frame.filter(pl.col("split") == split)
        if tasks is not None:
            frame = frame.filter(pl.col("task").is_in(tasks))
        return cls(frame, SampleArrays(prepared, frame, kind))

    @property
    def lengths(self) -> list[int]:
        if self.frame is not None and "length" in self.frame.columns:
            return self.frame["length"].to_list()
        return [len(a["input_ids"]) for a in self.arrays]


_NULL = np.iinfo(np.int64).min  # a null time in an int64 column


def _codes(column: pl.Series) -> tuple[list[str], np.ndarray]:
    """A string column as (its distinct values, each row's index into them)."""
    names, codes = np.unique(column.to_numpy(), return_inverse=True)
    return names.tolist(), codes.astype(np.int32)


def _us_column(column: pl.Series) -> np.ndarray:
    """A datetime column as µs since 1970, nulls as _NULL."""
    return column.cast(pl.Datetime("us")).cast(pl.Int64).fill_null(_NULL).to_numpy()


def _known(microseconds: np.int64) -> int | None:
    return None if microseconds == _NULL else int(microseconds)


def _moment(microseconds: int | None) -> datetime | None:
    return None if microseconds is None else _EPOCH + timedelta(microseconds=microseconds)
