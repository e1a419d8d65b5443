"""The README's main job on the shipped demo data: convert → prepare → pretrain → prompted multitask finetune →
baseline → evaluate, into one run directory with report.html. Small settings: minutes on a laptop CPU."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from medstate.data.convert import convert
from medstate.ehr.baselines import xgboost_counts
from medstate.ehr.model import EhrMamba
from medstate.ehr.prepare import PrepareConfig, prepare
from medstate.ehr.training import finetune, new_model, predictions_for_report, pretrain
from medstate.errors import MedstateError
from medstate.eval.report import write_report
from medstate.train.loop import TrainConfig, seed_everything


@dataclass
class DemoSettings:
    max_length: int = 1024
    d_model: int = 64
    n_layer: int = 2
    pretrain_steps: int = 120
    finetune_steps: int = 150
    token_budget: int = 8192
    seed: int = 0
    bootstrap: int = 200


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

    seed_everything(settings.seed)
    synthea = convert(data_dir / "synthea-fhir", out / "meds" / "synthea", "fhir", seed=settings.seed)
    mimic = convert(data_dir / "mimic-iv-demo-meds", out / "meds" / "mimic-iv", "meds")
    stage(f"convert ({synthea.summary.events:,} + {mimic.summary.events:,} events)")
    summary = prepare(
        [out / "meds" / "synthea", out / "meds" / "mimic-iv"],
        out / "prepared",
        PrepareConfig(max_length=settings.max_length),
    )
    stage(f"prepare ({summary.vocabulary:,} tokens)")
    model = new_model(out / "prepared", {"d_model": settings.d_model, "n_layer": settings.n_layer})
    config = TrainConfig(max_steps=settings.pretrain_steps, lr=2e-3, warmup_steps=10, seed=settings.seed)
    pretrain(out / "prepared", out / "pretrain", model, config, settings.token_budget, progress)
    stage("pretrain")
    model = EhrMamba.from_pretrained(out / "pretrain" / "checkpoints" / "last")
    config = TrainConfig(max_steps=settings.finetune_steps, lr=1e-3, warmup_steps=10, seed=settings.seed)
    finetune(out / "prepared", out / "finetune", model, config, None, settings.token_budget, progress)
    stage("finetune (prompted multitask)")
    baseline = xgboost_counts.fit_predict(out / "prepared", settings.seed)
    stage("baseline (XGBoost on code counts)")
    model = EhrMamba.from_pretrained(out / "finetune" / "checkpoints" / "last")
    predictions = pl.concat(
        [predictions_for_report(model, out / "prepared", "ehrmamba", settings.seed), baseline], how="diagonal_relaxed"
    )
    result = write_report(
        predictions, out, title="medstate demo: EhrMamba and baselines", n_bootstrap=settings.bootstrap
    )
    stage("evaluate")
    pl.DataFrame({"stage": list(timings), "seconds": list(timings.values())}).write_csv(out / "timings.csv")
    return {"timings": timings, "summary": result["summary"], "report": out / "report.html"}
