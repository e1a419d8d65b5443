"""The benchmark protocol: models × tasks × seeds on one prepared dataset, into one run directory.

Each model is declared by what it is built from (its kind), whether it is pretrained (next-event prediction for
EhrMamba, masked language modelling for the Transformers) and how it is finetuned: `multitask` (prompted
multitask finetuning, one model for every task) or `single` (one finetuned model per task, from the same
pretrained weights). Pretrained weights are shared between models of the same kind and seed (EhrMamba and its
single-task variant; BigBird and MultiBird).

Every unit of work is resumable: training runs restart from their last checkpoint (exactly), and a finished
(model, seed) leaves `predictions/<model>-seed<k>.parquet`, which a re-run does not recompute. The report
(metrics.json, predictions.parquet, report.md/html) is written from all finished cells.

    run_dir/
      benchmark.yaml                    the settings
      pretrain/<kind>/seed<k>/          pretraining runs (checkpoints, log.csv)
      finetune/<model>/seed<k>[/<task>] finetuning runs
      predictions/<model>-seed<k>.parquet
      timings.csv                       seconds per (model, seed, stage)
      metrics.json, predictions.parquet, report.md, report.html
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl
import yaml

from medstate.ehr.baselines import xgboost_counts
from medstate.ehr.training import MODEL_KINDS, EhrTrainSettings, load_model, predictions_for_report, run_training
from medstate.errors import MedstateError
from medstate.eval.report import write_report
from medstate.loading import load_settings
from medstate.train.loop import TrainConfig, checkpoint_step

FINETUNE_MODES = ("multitask", "single")


@dataclass
class ModelSpec:
    name: str
    kind: str  # one of training.MODEL_KINDS, or xgboost
    pretrained: bool = False
    finetune: str = "multitask"  # multitask | single


DEFAULT_MODELS = [  # cheapest first, so that an interrupted run has the most models finished
    ModelSpec("xgboost", "xgboost"),
    ModelSpec("ehrmamba", "ehrmamba", pretrained=True, finetune="multitask"),
    ModelSpec("lstm", "lstm", pretrained=False, finetune="multitask"),
    ModelSpec("bert", "bert", pretrained=True, finetune="single"),
    ModelSpec("multibird", "bigbird", pretrained=True, finetune="multitask"),
    ModelSpec("ehrmamba-single", "ehrmamba", pretrained=True, finetune="single"),
    ModelSpec("bigbird", "bigbird", pretrained=True, finetune="single"),
]


@dataclass
class BenchmarkSettings:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    models: list[ModelSpec] = field(default_factory=lambda: list(DEFAULT_MODELS))
    d_model: int = 64  # every neural model: the same width and depth
    n_layer: int = 2
    pretrain_steps: int = 150
    # equal compute per task: a multitask run gets as many steps as a single-task model's runs together
    finetune_steps: int = 300  # a multitask finetuning run
    single_task_steps: int = 50  # each task's run of a single-task model
    pretrain_lr: float = 2e-3
    finetune_lr: float = 1e-3
    warmup_steps: int = 20
    token_budget: int = 4096
    bootstrap: int = 1000

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: dict | None = None) -> BenchmarkSettings:
        """A YAML file of these fields (None: the defaults) with typed overrides (`load_settings`)."""
        return load_settings(cls, path, overrides, "benchmark settings")

    def select_models(self, names: list[str]) -> None:
        """Run only the models named (in the settings' order); an unknown name is an error."""
        unknown = set(names) - {m.name for m in self.models}
        if unknown:
            raise MedstateError(f"unknown model(s) {', '.join(sorted(unknown))}")
        self.models = [m for m in self.models if m.name in names]

    def validate(self) -> None:
        kinds = (*MODEL_KINDS, "xgboost")
        for spec in self.models:
            if spec.kind not in kinds:
                raise MedstateError(f"model {spec.name}: unknown kind {spec.kind!r}; choose one of {', '.join(kinds)}")
            if spec.finetune not in FINETUNE_MODES:
                raise MedstateError(f"model {spec.name}: finetune must be multitask or single")
            if spec.pretrained and spec.kind in ("lstm", "xgboost"):
                raise MedstateError(f"model {spec.name}: a {spec.kind} model has no pretraining objective")
        if len({m.name for m in self.models}) != len(self.models):
            raise MedstateError("model names must be unique")


class _Timings:
    """Seconds per (model, seed, stage), appended to timings.csv as each stage ends (kept across resumed runs).

    A stage that started from a checkpoint left by an earlier, interrupted run is marked `resumed`: its seconds are
    only the part done in this run, and so are its cell's `total`.
    """

    def __init__(self, path: Path, say: Callable[[str], None]):
        self.path, self.say = path, say
        # a timings.csv from before `resumed` was recorded reads as not resumed
        self.rows = [{"resumed": False, **row} for row in pl.read_csv(path).to_dicts()] if path.is_file() else []

    @contextmanager
    def stage(self, model: str, seed: int, name: str, resumed: bool = False):
        started = time.perf_counter()
        yield
        self._record(model, seed, name, time.perf_counter() - started, resumed)

    @contextmanager
    def cell(self, model: str, seed: int, resumed: bool):
        """Times a whole (model, seed) as its `total` stage; resumed if it was, or if any of its stages was."""
        started, first = time.perf_counter(), len(self.rows)
        yield
        resumed = resumed or any(row["resumed"] for row in self.rows[first:])
        self._record(model, seed, "total", time.perf_counter() - started, resumed)

    def _record(self, model: str, seed: int, name: str, seconds: float, resumed: bool) -> None:
        seconds = round(seconds, 1)
        self.rows.append({"model": model, "seed": seed, "stage": name, "seconds": seconds, "resumed": resumed})
        pl.DataFrame(self.rows).write_csv(self.path)
        self.say(f"{model} seed {seed}: {name} in {seconds} s" + (" (resumed)" if resumed else ""))


def run_benchmark(
    prepared: str | Path,
    run_dir: str | Path,
    settings: BenchmarkSettings | None = None,
    say: Callable[[str], None] = print,
    progress=None,
) -> dict:
    settings = settings or BenchmarkSettings()
    settings.validate()
    prepared, run_dir = Path(prepared), Path(run_dir)
    if not (prepared / "samples.parquet").is_file():
        raise MedstateError(f"{prepared} is not a prepared dataset; run `medstate ehr prepare` first")
    run_dir.mkdir(parents=True, exist_ok=True)
    record = f"# prepared: {prepared} (the settings below load with --settings)\n{yaml.safe_dump(asdict(settings))}"
    (run_dir / "benchmark.yaml").write_text(record)
    (run_dir / "predictions").mkdir(exist_ok=True)
    tasks = sorted(pl.read_parquet(prepared / "labels.parquet", columns=["task"])["task"].unique())
    timings = _Timings(run_dir / "timings.csv", say)
    for seed in settings.seeds:
        for spec in settings.models:
            cell = run_dir / "predictions" / f"{spec.name}-seed{seed}.parquet"
            if cell.is_file():
                say(f"{spec.name} seed {seed}: done earlier")
                continue
            started_before = (run_dir / "finetune" / spec.name / f"seed{seed}").is_dir()
            with timings.cell(spec.name, seed, resumed=started_before):
                frame = _Cell(prepared, run_dir, spec, seed, settings, timings, progress).run(tasks)
            frame.write_parquet(cell)

    cells = sorted((run_dir / "predictions").glob("*.parquet"))
    predictions = pl.concat([pl.read_parquet(c) for c in cells], how="diagonal_relaxed")
    title = f"medstate EHR: {len(settings.models)} models, {len(tasks)} tasks, {len(settings.seeds)} seed(s)"
    result = write_report(predictions, run_dir, title=title, n_bootstrap=settings.bootstrap)
    return {"summary": result["summary"], "report": run_dir / "report.html", "timings": timings.rows}


@dataclass
class _Cell:
    """One (model, seed): pretraining (shared by kind and seed), finetuning, predictions."""

    prepared: Path
    run_dir: Path
    spec: ModelSpec
    seed: int
    settings: BenchmarkSettings
    timings: _Timings
    progress: Callable | None

    def run(self, tasks: list[str]) -> pl.DataFrame:
        spec, seed = self.spec, self.seed
        if spec.kind == "xgboost":
            with self.timings.stage(spec.name, seed, "fit"):
                frame = xgboost_counts.fit_predict(self.prepared, seed)
            return frame.with_columns(pl.lit(spec.name).alias("model"))
        init = self._pretrain() if spec.pretrained else None
        groups = [tasks] if spec.finetune == "multitask" else [[task] for task in tasks]
        frames = []
        for group in groups:
            directory = self.run_dir / "finetune" / spec.name / f"seed{seed}"
            directory = directory / group[0] if spec.finetune == "single" else directory
            label = group[0] if len(group) == 1 else "all tasks"
            model = self._finetune(directory, init, group, label)
            with self.timings.stage(spec.name, seed, f"predict {label}"):
                frames.append(predictions_for_report(model, self.prepared, spec.name, seed, group))
        return pl.concat(frames)

    def _settings(self, steps: int, lr: float, init: Path | None, tasks: list[str] | None) -> EhrTrainSettings:
        if self.spec.kind == "lstm":
            sizes = {"d_model": self.settings.d_model, "hidden": self.settings.d_model}
        else:
            sizes = {"d_model": self.settings.d_model, "n_layer": self.settings.n_layer}
        train = TrainConfig(steps, lr, warmup_steps=self.settings.warmup_steps, seed=self.seed)
        return EhrTrainSettings(self.spec.kind, sizes, None if init is None else str(init), tasks,
                                self.settings.token_budget, train=train)  # fmt: skip

    def _pretrain(self) -> Path:
        """Pretrains (or resumes pretraining) once per kind and seed; a model that finds it done reuses it, untimed."""
        directory = self.run_dir / "pretrain" / self.spec.kind / f"seed{self.seed}"
        settings = self._settings(self.settings.pretrain_steps, self.settings.pretrain_lr, None, None)
        self._train("pretrain", directory, settings, f"pretrain {self.spec.kind}")
        return directory / "checkpoints" / "last"

    def _finetune(self, directory: Path, init: Path | None, tasks: list[str], label: str):
        steps = self.settings.finetune_steps if self.spec.finetune == "multitask" else self.settings.single_task_steps
        settings = self._settings(steps, self.settings.finetune_lr, init, tasks)
        self._train("finetune", directory, settings, f"finetune {label}")
        return load_model(directory / "checkpoints" / "last")

    def _train(self, stage: str, directory: Path, settings: EhrTrainSettings, label: str):
        """One training run: from its own checkpoint where it has one (marked resumed), else from `settings.init`
        (pretrained weights) or a new model."""
        done = checkpoint_step(directory / "checkpoints" / "last")
        if done >= settings.train.max_steps:
            return
        with self.timings.stage(self.spec.name, self.seed, label, resumed=done > 0):
            run_training(stage, self.prepared, directory, settings, self.progress)
