"""`prepare`: MEDS datasets → model-ready EHR data (the input of pretraining, finetuning and the baselines), as a map
over shards and a small reduce, so that no process ever holds more than one shard.

    1. plan     the units of work: each MEDS shard, split into ranges of subject ids where it has more than
                `shard_subjects` subjects
    2. bins     per-code quantile edges of numeric values, from the training split's (code, value) columns alone
    3. map      per unit (`ehr.shards`, on `workers` processes): sequences, visits, episodes, labels, samples and
                the training tokens' counts
    4. reduce   the vocabulary from the summed training counts; each unit's ids rewritten to it (`store`)
    5. index    subjects.parquet, samples.parquet, labels.parquet

Writes to OUT:

    vocab.json          tokens (fitted on the training split only)
    value_bins.json     per-code quantile edges of numeric values (training split only)
    tasks.yaml          the task suite used for the labels
    prepare.yaml        the resolved settings
    shards/<unit>/      every subject's whole sequence, stored once (`ehr.store`)
    subjects.parquet    one row per subject (pretraining inputs: the sequence truncated to max_length)
    samples.parquet     one row per (task, sample): label, prediction time, visit, and a reference into the store
                        (the units' parts are folded into it once the index is written); its input is the history
                        known at the prediction time in prompted form ([TASK] … [TASK])
    labels.parquet      the labels alone (subject_id, visit_key, prediction_time, label, task, split)

Every row carries the subject's split, so no subject crosses from training into evaluation. A rerun into the same
OUT with the same settings skips the finished units (a killed run resumes) and returns at once once samples.parquet,
written last, is there; with other settings it stops.

Date-only events (codes matching `date_only_codes`: MIMIC-IV procedures and HCPCS, dated by `chartdate`, at 00:00;
and FHIR dates without a time, which the data layer marks `time_precision` = "day") may have happened at any time
of their day, so they are placed and known at the end of their day (23:59:59.999999):
a prediction at noon never sees a procedure done that afternoon. A finetuning input is the history known at the
prediction time (`PatientSequence.until`): events of stays that start later are hidden whatever their own date, and
at a discharge-time prediction the stay is closed with [VE] [REG], as pretraining shows every visit.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import shutil
import socket
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl
import yaml

from medstate.data.meds import data_files
from medstate.ehr.sequences import PROMPT_LAYOUTS, ValueBins, visit_key_columns
from medstate.ehr.shards import SUBJECT_SCHEMA, Unit, UnitJob, run_unit, unit_dir
from medstate.ehr.store import finalize_unit
from medstate.ehr.tasks import LABEL_SCHEMA, TaskSuite
from medstate.ehr.vocab import Vocabulary
from medstate.errors import MedstateError

Progress = Callable[[str, int, int | None], None]  # (stage, done, total)
SAMPLE_SORT = ["task", "subject_id", "prediction_time", "visit_key"]
EXECUTORS = ("local", "ray")


@dataclass
class PrepareConfig:
    max_length: int = 2048
    visit: str = "auto"
    value_bins: int = 5
    min_count: int = 1
    tasks: str | None = None  # a task YAML file; None: the six EhrMamba tasks
    # at most this many samples per subject, for tasks that set no cap of their own (None: all)
    max_samples_per_subject: int | None = None
    seed: int = 0  # of the draw of capped samples
    # codes whose times are dates (00:00 stands for "some time that day"): known at the end of the day
    date_only_codes: tuple[str, ...] = ("^PROCEDURE//ICD//", "^HCPCS//")
    # finetuning inputs: the task token first and last (EhrMamba), or `last` only ([CLS] first): one shared
    # history for all tasks, so a server keeps one recurrent state per patient instead of one per task
    prompt: str = "both"


@dataclass
class PrepareSummary:
    output: Path
    subjects: dict[str, int]
    vocabulary: int
    samples: dict[str, dict[str, int]]  # task → {"n": …, "positives": …}


def prepare(
    meds_dir: str | Path | list[str | Path],
    output: str | Path,
    config: PrepareConfig | None = None,
    progress: Progress | None = None,
    workers: int = 1,
    shard_subjects: int = 1000,
    executor: str = "local",
    address: str | None = None,
) -> PrepareSummary:
    """`progress(stage, done, total)` reports each stage as it goes ("value bins": passes over the training split,
    total unknown; "shards": units mapped; "token ids": units rewritten to the vocabulary; "index": its three
    tables). `workers` processes run the map (the output does not depend on it, nor
    on `shard_subjects`, the most subjects a unit holds: a worker's memory). `executor="ray"` runs the map as Ray
    tasks instead, on the cluster at `address` (None: a Ray started on this machine); the MEDS data and OUT must be
    at the same paths on every node (a shared filesystem)."""
    config = config or PrepareConfig()
    progress = progress or (lambda stage, done, total: None)
    _check(config, workers, shard_subjects)
    if executor not in EXECUTORS:
        raise MedstateError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if address is not None and executor != "ray":
        raise MedstateError("an address is for the ray executor (--executor ray)")
    suite = TaskSuite.load(config.tasks)
    dirs = [meds_dir] if isinstance(meds_dir, (str, Path)) else list(meds_dir)
    units = plan_units(dirs, shard_subjects)
    if not any(u.split == "train" for u in units):
        raise MedstateError(f"{meds_dir} has no train split: vocabulary and value bins are fitted on it")
    out = Path(output)
    settings = yaml.safe_dump({**_plain(asdict(config)), "meds_dirs": [str(d) for d in dirs]})
    bins = _start(out, settings, suite, config, units, progress)
    if not (out / "samples.parquet").is_file():
        _build(out, units, bins, suite, config, progress, workers if executor == "local" else ("ray", address))
    subjects = pl.read_parquet(out / "subjects.parquet", columns=["split"])
    samples = pl.read_parquet(out / "samples.parquet", columns=["task", "label"])
    counted = samples.group_by("task").agg(pl.len().alias("n"), pl.col("label").sum().alias("positives"))
    return PrepareSummary(
        output=out,
        subjects=dict(subjects.group_by("split").len().iter_rows()),
        vocabulary=len(Vocabulary.load(out / "vocab.json")),
        samples={task: {"n": n, "positives": p} for task, n, p in counted.sort("task").iter_rows()},
    )


def _build(out: Path, units: list[Unit], bins: ValueBins, suite: TaskSuite, config: PrepareConfig,
           progress: Progress, workers: int | tuple[str, str | None]) -> None:  # fmt: skip
    """Steps 3 to 5: the map (on `workers` local processes, or ("ray", address)), the vocabulary, the index."""
    jobs = [
        UnitJob(unit, str(out), config.visit, config.max_length, config.prompt, tuple(config.date_only_codes),
                config.max_samples_per_subject, config.seed, {"n_bins": bins.n_bins, "edges": bins.edges},
                suite.to_yaml())
        for unit in units
    ]  # fmt: skip
    mapped = functools.partial(progress, "shards")
    if isinstance(workers, tuple):
        run_map_on_ray(jobs, workers[1], mapped)
    else:
        run_map(jobs, workers, mapped)
    counts: Counter = Counter()
    for unit in units:
        counts.update(json.loads((unit_dir(out, unit.name) / "counts.json").read_text()))
    vocab = Vocabulary.from_counts(counts, config.min_count, [t.token for t in suite.tasks])
    vocab.save(out / "vocab.json")
    for done, unit in enumerate(units, start=1):
        finalize_unit(out, unit.name, vocab)
        progress("token ids", done, len(units))
    write_index(out, units, config.max_length, functools.partial(progress, "index"))


def _check(config: PrepareConfig, workers: int, shard_subjects: int) -> None:
    visit_key_columns(config.visit)  # validates the name
    if config.prompt not in PROMPT_LAYOUTS:
        raise MedstateError(f"prompt must be one of {', '.join(PROMPT_LAYOUTS)}, got {config.prompt!r}")
    if config.max_length < 8:
        raise MedstateError(f"max_length must be at least 8, got {config.max_length}")
    if workers < 1 or shard_subjects < 1:
        raise MedstateError(f"workers and shard_subjects must be at least 1, got {workers} and {shard_subjects}")


def plan_units(dirs: list[str | Path], shard_subjects: int) -> list[Unit]:
    """Every shard of every dataset that holds subjects, as units of at most `shard_subjects` subjects, in a fixed
    order."""
    units = []
    for number, root in enumerate(dirs):
        root = Path(root)
        for path in data_files(root):
            parts = path.relative_to(root / "data").parts
            split = parts[0] if len(parts) > 1 else ""
            ids = Unit("", str(root), str(path), split).subject_ids()
            if ids.is_empty():  # an empty shard holds no work
                continue
            parts_of = max(1, math.ceil(len(ids) / shard_subjects))
            stem = "_".join(path.relative_to(root / "data").with_suffix("").parts)
            for part in range(parts_of):
                name = f"d{number}-{stem}-{part + 1}of{parts_of}"
                if parts_of == 1:
                    units.append(Unit(name, str(root), str(path), split))
                    continue
                chunk = ids[part * len(ids) // parts_of : (part + 1) * len(ids) // parts_of]
                units.append(Unit(name, str(root), str(path), split, int(chunk[0]), int(chunk[-1])))
    return units


def _start(out: Path, settings: str, suite: TaskSuite, config: PrepareConfig, units: list[Unit],
           progress: Progress) -> ValueBins:  # fmt: skip
    """A new OUT gets the settings, the task suite and the value bins; a resumed one must have the same settings
    (its bins are read back), and, when unfinished, loses the units of another shard plan."""
    out.mkdir(parents=True, exist_ok=True)
    written = out / "prepare.yaml"
    if written.is_file() and (out / "value_bins.json").is_file():
        if written.read_text() != settings:
            raise MedstateError(f"{out} was prepared with other settings; prepare into a new directory")
        saved = json.loads((out / "value_bins.json").read_text())
        bins = ValueBins(saved["n_bins"], saved["edges"])
    else:
        train = [u.scan().select("code", "numeric_value") for u in units if u.split == "train"]
        bins = ValueBins(config.value_bins).fit(pl.concat(train), functools.partial(progress, "value bins"))
        (out / "value_bins.json").write_text(json.dumps({"n_bins": bins.n_bins, "edges": bins.edges}) + "\n")
        (out / "tasks.yaml").write_text(suite.to_yaml())
        written.write_text(settings)
    for stale in ("pretrain.parquet", "finetune.parquet"):  # an older medstate's layout
        (out / stale).unlink(missing_ok=True)
    planned = {u.name for u in units}
    finished = (out / "samples.parquet").is_file()
    for folder in (out / "shards").glob("*") if (out / "shards").is_dir() and not finished else []:
        if folder.name not in planned:
            shutil.rmtree(folder)
    return bins


def run_map(jobs: list[UnitJob], workers: int, progress: Callable[[int, int], None] | None = None) -> None:
    """Each job once, on this process or on `workers` new ones (spawned: polars' threads do not survive a fork)."""
    progress = progress or (lambda done, total: None)
    progress(0, len(jobs))
    if workers == 1 or len(jobs) == 1:
        for done, job in enumerate(jobs, start=1):
            run_unit(job)
            progress(done, len(jobs))
        return
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_limit_threads, initargs=(threads,)) as pool:
        futures = [pool.submit(run_unit, job) for job in jobs]
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                future.result()
                progress(done, len(jobs))
        except BrokenProcessPool:
            raise MedstateError(
                "a prepare worker died (out of memory: try fewer --workers or a smaller --shard-subjects; from a "
                'script: call prepare under `if __name__ == "__main__":`, as spawned workers import it); the '
                "finished shards are kept, rerun to resume"
            ) from None


def run_map_on_ray(jobs: list[UnitJob], address: str | None, progress: Callable[[int, int], None] | None) -> None:
    """Each job once, as a Ray task of one CPU (polars on one thread in it) on the cluster at `address`."""
    try:
        import ray
    except ImportError:
        raise MedstateError("the ray executor needs Ray: pip install 'medstate[ray]'") from None
    progress = progress or (lambda done, total: None)
    progress(0, len(jobs))
    started = not ray.is_initialized()
    if started:
        _reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise MedstateError(f"cannot reach a Ray cluster at {address or 'this machine'}: {err}") from None
    try:
        task = ray.remote(num_cpus=1, max_retries=0, runtime_env={"env_vars": {"POLARS_MAX_THREADS": "1"}})(run_unit)
        pending = [task.remote(job) for job in jobs]
        done = 0
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(finished[0])
            except ray.exceptions.RayTaskError as err:
                cause = err.as_instanceof_cause()
                raise (cause if isinstance(cause, MedstateError) else MedstateError(str(cause))) from None
            done += 1
            progress(done, len(jobs))
    finally:
        if started:
            ray.shutdown()


def _reachable(address: str | None) -> None:
    """A `host:port` that answers within 5 s (Ray itself retries an unreachable head for minutes)."""
    host, _, port = (address or "").rpartition(":")
    if not host or not port.isdigit():
        return  # None or "auto": Ray finds or starts one here
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise MedstateError(f"cannot reach a Ray cluster at {address}: {err}") from None


def _limit_threads(threads: str) -> None:
    os.environ["POLARS_MAX_THREADS"] = threads  # read when polars is first imported, in the worker


def write_index(out: Path, units: list[Unit], max_length: int, progress: Callable[[int, int], None]) -> None:
    """labels.parquet, subjects.parquet and samples.parquet (last: the mark of a finished prepare) from the units, in
    the order training reads them; then what only the build needed goes: the units' own samples (samples.parquet
    holds them), token tables and counts (input_ids.npy and vocab.json hold them)."""
    subjects = pl.concat(
        [pl.read_parquet(unit_dir(out, u.name) / "subjects.parquet").with_columns(pl.lit(u.name).alias("unit"))
         for u in units]
    ).cast(SUBJECT_SCHEMA)  # fmt: skip
    repeated = subjects.filter(pl.col("subject_id").is_duplicated())
    if len(repeated):
        first = repeated.sort("subject_id").head(2)
        raise MedstateError(
            f"subject {first['subject_id'][0]} is in two shards ({first['unit'][0]}, {first['unit'][1]}): a subject "
            "must be in one shard of one dataset (convert datasets with colliding ids apart)"
        )
    subjects = subjects.sort("subject_id").with_columns(
        pl.min_horizontal(pl.col("stop") - pl.col("start"), pl.lit(max_length)).alias("length")
    )
    samples = pl.concat([pl.read_parquet(unit_dir(out, u.name) / "samples.parquet") for u in units])
    samples = samples.join(subjects.drop("split", "length"), on="subject_id", how="left").sort(SAMPLE_SORT)
    tables = ((samples.select(*LABEL_SCHEMA, "split"), "labels"), (subjects, "subjects"), (samples, "samples"))
    for done, (frame, name) in enumerate(tables, start=1):
        frame.write_parquet(out / f"{name}.partial.parquet")
        os.replace(out / f"{name}.partial.parquet", out / f"{name}.parquet")
        progress(done, len(tables))
    for unit in units:
        for name in ("samples.parquet", "tokens.json", "counts.json"):
            (unit_dir(out, unit.name) / name).unlink()


def _plain(settings: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
