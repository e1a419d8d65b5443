"""Writing a MEDS dataset with bounded memory.

Readers hand over batches of events. Stage 1 appends each batch, partitioned by `subject_id % shards`, to one
staging file (Arrow IPC) per shard, so no more than a batch is held. Stage 2 reads one staging file at a time (1/shards
of the data), drops exact duplicate rows (counted), sorts by subject_id then time (static facts, with a null time,
first), and writes `data/<split>/<shard>.parquet`. Splits are drawn per subject from a seeded permutation, so the
same input and seed give the same dataset. The dataset is assembled in `<output>.partial/` and renamed into place
at the end: an interrupted conversion never leaves a half-written dataset where a finished one is expected.

Never delete what medstate did not write: the output may not be, contain or lie inside the input; `--overwrite`
replaces only a directory that holds medstate's marker file (`.medstate-output`) and nothing but what medstate
writes; a leftover `<output>.partial/` is removed only when it carries the marker too.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import multiprocessing
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from medstate import __version__
from medstate.data.meds import MEDS_SCHEMA
from medstate.data.report import ConversionReport
from medstate.errors import MedstateError

MEDS_VERSION = "0.3.3"
SPLITS = ("train", "tuning", "held_out")
_SOURCE = "_source"
_STAGING_BYTES_PER_SHARD = 16 << 20
_SHARDS_PER_WORKER = 4
MARKER = ".medstate-output"  # left in every directory medstate writes: the only ones --overwrite may replace
_WRITTEN = {MARKER, "data", "metadata", "report.json"}


def check_output(output: Path, input: Path | None, overwrite: bool) -> None:
    """Refuse an output that would delete or mix with anything medstate did not write (see the module doc)."""
    if output.exists() and not output.is_dir():
        raise MedstateError(f"output {output} is a file, not a directory; choose a directory path")
    if input is not None:
        source, target = input.resolve(), output.resolve()
        if source == target or source in target.parents or target in source.parents:
            raise MedstateError(
                f"output {output} is, contains or lies inside the input {input}; choose a directory outside it"
            )
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise MedstateError(f"output directory {output} is not empty; choose another or pass --overwrite")
        _refuse_foreign(output, "--overwrite")
    partial = output.with_name(output.name + ".partial")
    if partial.exists():
        _refuse_foreign(partial, "a leftover partial conversion")


def _refuse_foreign(directory: Path, why: str) -> None:
    if not directory.is_dir() or not (directory / MARKER).is_file():
        raise MedstateError(f"{why} would delete {directory}, which medstate did not write (no {MARKER}); move it away")
    foreign = sorted(p.name for p in directory.iterdir() if p.name not in _WRITTEN)
    if foreign:
        raise MedstateError(f"{why} would delete {directory / foreign[0]}, which medstate did not write; move it away")


def auto_shards(input_bytes: int) -> int:
    """About half a million events per shard for compressed MIMIC-like input (≈35 compressed bytes per event), so
    that sorting a shard stays well under a gigabyte however large the input."""
    return max(1, math.ceil(input_bytes / _STAGING_BYTES_PER_SHARD))


@dataclass
class WriteSummary:
    output: Path
    subjects: int
    events: int
    shards: int
    subjects_per_split: dict[str, int]
    codes: int


class MedsWriter:
    """Collects event batches (MEDS columns plus any of `extra_columns`) and writes a MEDS dataset."""

    def __init__(
        self,
        output: str | Path,
        report: ConversionReport,
        extra_columns: dict[str, pl.DataType] | None = None,
        shards: int = 1,
        overwrite: bool = False,
        workers: int | None = None,
        input: str | Path | None = None,
    ):
        """`workers`: processes that sort shards at the end (default: up to 2; 0 sorts in this process). `input`:
        the data being converted, which the output must not touch."""
        self.output = Path(output)
        self.workers = min(2, os.cpu_count() or 1) if workers is None else workers
        check_output(self.output, None if input is None else Path(input), overwrite)
        if shards < 1:
            raise MedstateError(f"--shards must be at least 1, got {shards}")
        self.report = report
        self.shards = shards
        self.overwrite = overwrite
        self.schema = {**MEDS_SCHEMA, **(extra_columns or {}), _SOURCE: pl.String}
        self.partial = self.output.with_name(self.output.name + ".partial")
        shutil.rmtree(self.partial, ignore_errors=True)  # only ever one of ours (check_output)
        (self.partial / "staging").mkdir(parents=True)
        (self.partial / MARKER).write_text(f"written by medstate {__version__}\n")
        self._writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}

    def add(self, events: pl.DataFrame, source: str | None = None) -> None:
        """Append events from `source`, or from the sources named in their `_source` column. Columns outside the
        schema are an error in the reader, not in the data."""
        if events.is_empty():
            return
        if source is not None:
            events = events.with_columns(pl.lit(source).alias(_SOURCE))
        unknown = set(events.columns) - set(self.schema)
        if unknown:
            raise ValueError(f"columns {sorted(unknown)} are not in the writer schema")
        events = events.select(
            (pl.col(name) if name in events.columns else pl.lit(None)).cast(dtype).alias(name)
            for name, dtype in self.schema.items()
        )
        for name, n in events.group_by(_SOURCE).len().iter_rows():
            self.report.written(name, n)
        if self.shards == 1:
            self._append(0, events)
            return
        shard_of = (pl.col("subject_id") % self.shards).alias("_shard")
        for (shard,), part in events.with_columns(shard_of).partition_by("_shard", as_dict=True).items():
            self._append(int(shard), part.drop("_shard"))

    def _append(self, shard: int, events: pl.DataFrame) -> None:
        table = events.to_arrow()
        if shard not in self._writers:
            # Arrow IPC, lz4-compressed: staging is written once and read once, so speed beats size
            path = self.partial / "staging" / f"{shard}.arrow"
            options = pa.ipc.IpcWriteOptions(compression="lz4")
            self._writers[shard] = pa.ipc.new_stream(path, table.schema, options=options)
        self._writers[shard].write_table(table)

    def finish(
        self,
        dataset_name: str,
        dataset_version: str = "",
        seed: int = 0,
        split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        code_metadata: Callable[[pl.Series], pl.DataFrame] | None = None,
        subject_map: pl.DataFrame | None = None,
        splits: pl.DataFrame | None = None,
        time_zone: str | None = None,
    ) -> WriteSummary:
        """Sort, split and write the dataset. `splits` (subject_id, split) keeps a source's own splits; subjects it
        does not list are drawn like the rest."""
        for writer in self._writers.values():
            writer.close()
        staging = [self.partial / "staging" / f"{shard}.arrow" for shard in sorted(self._writers)]
        subjects = (
            pl.concat([pl.read_ipc_stream(p, columns=["subject_id"]).unique() for p in staging])
            if staging
            else pl.DataFrame(schema={"subject_id": pl.Int64})
        )
        if subjects.is_empty():
            shutil.rmtree(self.partial)
            raise MedstateError("no events were read; check the input path and format (see the report above)")
        given = splits.join(subjects, on="subject_id", how="semi") if splits is not None else None
        if given is None or given.height < subjects.height:
            rest = subjects if given is None else subjects.join(given, on="subject_id", how="anti")
            drawn = assign_splits(rest["subject_id"], seed, split_fractions)
            given = drawn if given is None else pl.concat([given, drawn])
        splits = given.sort("subject_id")
        metadata = self.partial / "metadata"
        metadata.mkdir()
        splits.write_parquet(metadata / "subject_splits.parquet")
        done = self._sort_shards(staging, metadata / "subject_splits.parquet")
        events_total = sum(events for events, _, _ in done)
        for _, _, merged in done:
            for source, n in merged.items():
                self.report.sources[source].duplicates_merged += n
                self.report.sources[source].written -= n
        code_counts = [codes for _, codes, _ in done]
        shutil.rmtree(self.partial / "staging")
        codes = pl.concat(code_counts).group_by("code").agg(pl.col("len").sum().alias("count")).sort("code")
        _codes_table(codes, code_metadata).write_parquet(metadata / "codes.parquet")
        if subject_map is not None:
            subject_map.write_parquet(metadata / "subject_map.parquet")
        (metadata / "dataset.json").write_text(
            json.dumps(
                {
                    "dataset_name": dataset_name,
                    "dataset_version": dataset_version,
                    "etl_name": "medstate",
                    "etl_version": __version__,
                    "meds_version": MEDS_VERSION,
                    "created_at": dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat(),
                    "split_seed": seed,
                    "split_fractions": dict(zip(SPLITS, split_fractions)),
                    "time_zone": time_zone or "as recorded in the source (no conversion)",
                },
                indent=2,
            )
            + "\n"
        )
        self.report.write(self.partial / "report.json")
        if self.output.exists():  # empty, or one of ours that the user asked to overwrite (check_output)
            check_output(self.output, None, self.overwrite)  # again: nothing foreign arrived meanwhile
            shutil.rmtree(self.output)
        self.partial.rename(self.output)
        per_split = splits.group_by("split").len()
        return WriteSummary(
            output=self.output,
            subjects=subjects.height,
            events=events_total,
            shards=len(staging),
            subjects_per_split=dict(zip(per_split["split"], per_split["len"])),
            codes=codes.height,
        )

    def _sort_shards(self, staging: list[Path], splits: Path) -> list:
        """Stage 2 for every shard. Several shards run in worker processes that are replaced every few shards:
        the allocators of polars and Arrow keep freed memory, and a fresh process is the sure way to keep the peak
        flat however many shards there are."""
        jobs = [(path, splits, self.partial / "data") for path in staging]
        if self.workers == 0 or len(staging) == 1:
            return [sort_shard(*job) for job in jobs]
        # multiprocessing.Pool, not ProcessPoolExecutor: the latter's max_tasks_per_child deadlocks on Python 3.11
        context = multiprocessing.get_context("spawn")
        with context.Pool(self.workers, maxtasksperchild=_SHARDS_PER_WORKER) as pool:
            return pool.starmap(sort_shard, jobs, chunksize=1)

    def abort(self) -> None:
        for writer in self._writers.values():
            writer.close()
        shutil.rmtree(self.partial, ignore_errors=True)


def sort_shard(path: Path, splits_path: Path, data_dir: Path) -> tuple[int, pl.DataFrame, dict[str, int]]:
    """One staged shard → data/<split>/<shard>.parquet: exact duplicates dropped, sorted by subject then time
    (static facts first, otherwise in arrival order). Returns the events written, code counts, duplicates merged
    per source."""
    staged = pl.read_ipc_stream(path)
    events = drop_exact_duplicates(staged)
    merged = {}
    if events.height < staged.height:
        before = dict(staged.group_by(_SOURCE).len().iter_rows())
        after = dict(events.group_by(_SOURCE).len().iter_rows())
        merged = {source: n - after.get(source, 0) for source, n in before.items() if n > after.get(source, 0)}
    del staged
    events = events.drop(_SOURCE).sort(["subject_id", "time"], nulls_last=False, maintain_order=True)
    splits = pl.read_parquet(splits_path)
    split_of = events["subject_id"].replace_strict(splits["subject_id"], splits["split"], return_dtype=pl.String)
    for split in SPLITS:
        part = events.filter(split_of == split)
        if part.height:
            out = data_dir / split / f"{path.stem}.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            part.write_parquet(out, compression="zstd", compression_level=1)
    return events.height, events.group_by("code").len(), merged


def drop_exact_duplicates(events: pl.DataFrame) -> pl.DataFrame:
    """Rows equal in every column to an earlier row are dropped, the first kept, the order unchanged. Row hashes
    find the candidates cheaply; the candidates are then compared exactly, so a hash collision never drops a row."""
    candidates = events.hash_rows().is_duplicated()
    if not candidates.any():
        return events
    indexed = events.with_row_index("_index")
    suspects = indexed.filter(candidates)
    repeated = suspects.filter(~pl.struct(pl.exclude("_index")).is_first_distinct())["_index"]
    return indexed.filter(~pl.col("_index").is_in(repeated.implode())).drop("_index")


def assign_splits(subject_ids: pl.Series, seed: int, fractions: tuple[float, float, float]) -> pl.DataFrame:
    """Subject-level train/tuning/held_out: a seeded permutation of the sorted ids, cut by the fractions (rounded
    so that the counts add up). The same ids and seed give the same splits on any machine."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise MedstateError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    ids = np.sort(subject_ids.unique().to_numpy())
    order = np.random.default_rng(seed).permutation(len(ids))
    n_train = round(fractions[0] * len(ids))
    n_tuning = round(fractions[1] * len(ids))
    labels = np.empty(len(ids), dtype=object)
    labels[order[:n_train]] = "train"
    labels[order[n_train : n_train + n_tuning]] = "tuning"
    labels[order[n_train + n_tuning :]] = "held_out"
    return pl.DataFrame(
        {"subject_id": ids, "split": labels.tolist()}, schema={"subject_id": pl.Int64, "split": pl.String}
    )


def _codes_table(codes: pl.DataFrame, code_metadata: Callable[[pl.Series], pl.DataFrame] | None) -> pl.DataFrame:
    """codes.parquet: every code in the data with its event count, and its description and parent codes where the
    source's dictionaries know them."""
    known = pl.DataFrame(schema={"code": pl.String, "description": pl.String, "parent_codes": pl.List(pl.String)})
    if code_metadata is not None:
        known = pl.concat([known, code_metadata(codes["code"])], how="vertical_relaxed")
    known = known.unique("code", keep="first", maintain_order=True)
    return codes.join(known, on="code", how="left").select("code", "description", "parent_codes", "count")
