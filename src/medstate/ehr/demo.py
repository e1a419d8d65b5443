"""The README's main job on the shipped demo data: convert → prepare → pretrain → prompted multitask finetune →
baselines (LSTM, XGBoost) → evaluate, into one run directory with report.html. It is the benchmark protocol at
demo size, one seed: minutes on a laptop CPU."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from medstate.data.convert import convert
from medstate.ehr.benchmark import BenchmarkSettings, ModelSpec, run_benchmark
from medstate.ehr.prepare import PrepareConfig, prepare
from medstate.errors import MedstateError

DEMO_MODELS = [
    ModelSpec("ehrmamba", "ehrmamba", pretrained=True, finetune="multitask"),
    ModelSpec("lstm", "lstm", pretrained=False, finetune="multitask"),
    ModelSpec("xgboost", "xgboost"),
]


@dataclass
class DemoSettings:
    max_length: int = 1024
    d_model: int = 64
    n_layer: int = 2
    pretrain_steps: int = 120
    finetune_steps: int = 150
    token_budget: int = 4096  # keeps `make demo` well under 15 minutes on a slow 2-core CPU
    seed: int = 0
    bootstrap: int = 200

    def benchmark(self) -> BenchmarkSettings:
        return BenchmarkSettings(
            seeds=[self.seed], models=list(DEMO_MODELS), d_model=self.d_model, n_layer=self.n_layer,
            pretrain_steps=self.pretrain_steps, finetune_steps=self.finetune_steps, warmup_steps=10,
            token_budget=self.token_budget, bootstrap=self.bootstrap,
        )  # fmt: skip


def run_demo(
    data_dir: str | Path = "data/demo",
    out: str | Path = "runs/demo",
    settings: DemoSettings | None = None,
    say: Callable[[str], None] = print,
    progress=None,
) -> dict:
    settings = settings or DemoSettings()
    data_dir, out = Path(data_dir), Path(out)
    if not (data_dir / "synthea-fhir").is_dir() or not (data_dir / "mimic-iv-demo-meds").is_dir():
        raise MedstateError(f"{data_dir} lacks synthea-fhir/ or mimic-iv-demo-meds/ (run from the repository root)")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    timings = {}
    started = time.perf_counter()

    def stage(name: str):
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)
        say(f"{name}: done in {timings[name]} s")

    synthea = convert(data_dir / "synthea-fhir", out / "meds" / "synthea", "fhir", seed=settings.seed)
    mimic = convert(data_dir / "mimic-iv-demo-meds", out / "meds" / "mimic-iv", "meds")
    stage(f"convert ({synthea.summary.events:,} + {mimic.summary.events:,} events)")
    summary = prepare(
        [out / "meds" / "synthea", out / "meds" / "mimic-iv"],
        out / "prepared",
        PrepareConfig(max_length=settings.max_length),
    )
    stage(f"prepare ({summary.vocabulary:,} tokens)")
    result = run_benchmark(out / "prepared", out, settings.benchmark(), say, progress)
    stage("pretrain, finetune, baselines, evaluate")
    pl.DataFrame({"stage": list(timings), "seconds": list(timings.values())}).write_csv(out / "demo_timings.csv")
    return {"timings": timings, "summary": result["summary"], "report": out / "report.html"}
