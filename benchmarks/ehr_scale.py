"""The EHR path at growing cohort sizes: the MIMIC-IV demo replicated K times (new subject/admission/stay ids, times
shifted by a day per copy: the same tables and codes, K x 100 patients) and the Synthea bundles replicated K times
(every resource UUID moved per copy: K x 615 patients), then `data convert`, `ehr prepare` on 1 and
2 workers, 20 finetuning steps of a small EhrMamba (d_model 32, 2 layers) and `ehr evaluate` of it, each a
separate process: wall time, the largest process's max RSS (wait4) and the peak RSS of its process tree. With
`--baseline SRC` (the `src/` of an older checkout, e.g. a `git worktree` of fd5d7aa, the last whole-cohort
`prepare`) the same prepare runs on that code for comparison, up to `--baseline-max-k`. Where `make meds-tools`
has built .venv-meds, meds-torch-data's `MTD_preprocess` (MEDS-Transforms stages: code metadata, vocabulary,
normalisation, tokenisation, tensorisation into nested ragged tensors, one process) runs on the same MEDS copy.

    python benchmarks/ehr_scale.py --k 1,10,30,100 --synthea-k 1,10 --baseline /tmp/oldprep/src

Prints one row per K and writes benchmarks/results/ehr_scale.json; the prepared directory's size is compared with
the token arrays alone (the six model inputs of every stored token).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import polars as pl

import harness  # noqa: F401  (this folder after the installed packages)
from data import DEMO, MEDSTATE, REPO, SYNTHEA, measure, medstate_convert, replicate, replicate_fhir

MTD = REPO / ".venv-meds" / "bin" / "MTD_preprocess"
ARRAYS = ("input_ids", "token_types", "ages", "times", "visit_segments", "visit_orders")
SOURCES = {"mimic-iv": (replicate, DEMO), "fhir": (replicate_fhir, SYNTHEA)}  # data convert --format: (copier, source)


def directory_bytes(folder: Path, names: tuple[str, ...] | None = None) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and (names is None or p.stem in names))


def scale(format: str, k: int, scratch: Path, steps: int, baseline: Path | None) -> dict:
    work = scratch / f"{format}-k{k}"
    shutil.rmtree(work, ignore_errors=True)
    logs = work / "logs"
    logs.mkdir(parents=True)
    copier, source = SOURCES[format]
    copier(source, work / "raw", k)
    row: dict = {"source": format, "k": k}
    row["convert"] = measure(medstate_convert(work / "raw", work / "meds", format=format), logs / "convert.log")
    shutil.rmtree(work / "raw")
    for workers in (1, 2):
        out = work / f"prepared-{workers}"
        cmd = [*MEDSTATE, "ehr", "prepare", str(work / "meds"), "--out", str(out), "--workers", str(workers)]
        row[f"prepare_{workers}"] = measure(cmd, logs / f"prepare-{workers}.log")
    if baseline is not None:
        cmd = ["env", f"PYTHONPATH={baseline}", *MEDSTATE, "ehr", "prepare", str(work / "meds"), "--out",
               str(work / "prepared-baseline")]  # fmt: skip
        row["prepare_baseline"] = measure(cmd, logs / "prepare-baseline.log")
        shutil.rmtree(work / "prepared-baseline")
    prepared = work / "prepared-1"
    row["patients"] = pl.scan_parquet(prepared / "subjects.parquet").select(pl.len()).collect().item()
    row["prepared_mb"] = directory_bytes(prepared) / 2**20
    row["token_arrays_mb"] = directory_bytes(prepared / "shards", ARRAYS) / 2**20
    run = work / "finetune"
    settings = work / "finetune.yaml"  # a small model: the memory of the data path, not of the network, is measured
    settings.write_text(f"sizes: {{d_model: 32, n_layer: 2}}\ntoken_budget: 4096\ntrain: {{max_steps: {steps}, "
                        f"save_every: {steps}}}\n")  # fmt: skip
    cmd = [*MEDSTATE, "ehr", "finetune", str(prepared), str(run), "--config", str(settings)]
    row["finetune"] = measure(cmd, logs / "finetune.log")
    cmd = [*MEDSTATE, "ehr", "evaluate", str(prepared), str(work / "evaluate"), "--model",
           f"ehrmamba={run / 'checkpoints' / 'last'}"]  # fmt: skip
    row["evaluate"] = measure(cmd, logs / "evaluate.log")
    if MTD.exists():
        cmd = ["env", f"PATH={MTD.parent}:{os.environ['PATH']}", str(MTD), f"MEDS_dataset_dir={work / 'meds'}",
               f"output_dir={work / 'mtd'}"]  # fmt: skip
        row["meds_torch_data"] = measure(cmd, logs / "meds-torch-data.log")
        row["meds_torch_data_mb"] = directory_bytes(work / "mtd" / "data") / 2**20  # the nested ragged tensors
        shutil.rmtree(work / "mtd")
    row["cpu"] = cpu_model()
    shutil.rmtree(work / "meds")
    return row


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def show(rows: list[dict]) -> None:
    def cell(step: dict | None) -> str:
        return "-" if step is None else f"{step['wall_s']:.1f} s / {step['tree_peak_rss_mb'] / 1024:.2f} GB"

    print(
        "| data | K | patients | convert | prepare, 1 worker | prepare, 2 workers | 2 vs 1 | prepare ms/patient | "
        "whole-cohort prepare | meds-torch-data | directory / token arrays | finetune 20 steps | evaluate |"
    )
    print("|---" * 13 + "|")
    for r in rows:
        one, two = r["prepare_1"], r["prepare_2"]
        print(
            f"| {r['source']} | {r['k']} | {r['patients']:,} | {cell(r['convert'])} | {cell(one)} | {cell(two)} | "
            f"{one['wall_s'] / two['wall_s']:.2f}x | {1000 * one['wall_s'] / r['patients']:.1f} | "
            f"{cell(r.get('prepare_baseline'))} | {cell(r.get('meds_torch_data'))} | "
            f"{r['prepared_mb']:.1f} / {r['token_arrays_mb']:.1f} MB "
            f"({r['prepared_mb'] / r['token_arrays_mb']:.2f}x) | {cell(r['finetune'])} | {cell(r['evaluate'])} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", default="1,10,30,100", help="comma-separated replica counts")
    parser.add_argument("--synthea-k", default="1,10", help="comma-separated replica counts of the Synthea bundles")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--baseline", type=Path, help="src/ of an older medstate for the comparison row")
    parser.add_argument("--baseline-max-k", type=int, default=30, help="largest K the baseline runs at")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "medstate-ehr-scale")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ehr_scale.json")
    parser.add_argument("--table", action="store_true", help="print the table of --out's rows and stop")
    args = parser.parse_args()
    if args.table:
        show(json.loads(args.out.read_text()))
        return
    rows = []
    runs = [("mimic-iv", int(k)) for k in args.k.split(",") if k] + [
        ("fhir", int(k)) for k in args.synthea_k.split(",") if k
    ]
    for format, k in runs:
        baseline = args.baseline if args.baseline and k <= args.baseline_max_k and format == "mimic-iv" else None
        rows.append(scale(format, k, args.scratch, args.steps, baseline))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
        show(rows)


if __name__ == "__main__":
    main()
