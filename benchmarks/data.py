"""MIMIC-IV → events: medstate vs PyHealth (and the two MEDS ETLs) on the MIMIC-IV demo, then a scale run.

    .venv/bin/python benchmarks/data.py                      # peers + medstate, 1 warm-up + 3 runs, then 1×/10×/100×
    .venv/bin/python benchmarks/data.py --skip-peers --scales 1,10

Part 1 runs every tool as its own process on the same demo CSV files and reports medians of wall time and of peak
memory, as ratios peer / medstate:
- PyHealth 2.1.0 `MIMIC4Dataset` load (patients, admissions, icustays + diagnoses_icd, procedures_icd,
  prescriptions, labevents) against `medstate data convert --tables` with the same seven tables;
- the official MIMIC_IV_MEDS ETL and meds_etl (all tables) against `medstate data convert` (all tables).
The peers run through ../shared/peers/bench.py (built by ../shared/peers/setup.sh), which measures them the way this
script measures medstate: wall time, ru_maxrss of the largest process (wait4), and the peak summed RSS of the process
tree sampled every 0.1 s.

Part 2 replicates the demo subjects N times (new subject/admission/stay ids, times shifted by one day per copy),
writes the copies as csv.gz, converts them, and reports events/s and peak memory per scale: memory must stay flat
while the data grows (the writer stages shards and sorts one shard at a time).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import polars as pl
import psutil

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEMO = SHARED / "data" / "mimic-iv-demo-2.2"
SYNTHEA = SHARED / "data" / "synthea-fhir-r4-smart" / "bundles"
PEERS = SHARED / "peers"
PEERS_HOME = Path(os.environ.get("PEERS_HOME", Path.home() / ".cache" / "medstate-peers"))
MEDSTATE = [sys.executable, "-m", "medstate.cli"]
PYHEALTH_TABLES = "patients,admissions,icustays,diagnoses_icd,procedures_icd,prescriptions,labevents"
PEER_STEPS = {
    "pyhealth_load": "medstate_pyhealth_tables",
    "mimic_iv_meds": "medstate_all",
    "meds_etl_mimic": "medstate_all",
}
TIME_COLUMNS = {
    "admittime", "dischtime", "deathtime", "edregtime", "edouttime", "intime", "outtime", "charttime", "storetime",
    "chartdate", "starttime", "stoptime", "endtime", "dod", "scheduletime", "entertime", "verifiedtime",
}  # fmt: skip
ID_OFFSETS = {"subject_id": 1_000_000, "hadm_id": 100_000_000, "stay_id": 100_000_000}


def measure(cmd: list, log: Path) -> dict:
    """Wall time, largest single-process max RSS (wait4) and peak RSS of the whole process tree."""
    peak = [0]
    stop = threading.Event()
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

        def sample():
            while not stop.is_set():
                try:
                    root = psutil.Process(proc.pid)
                    tree = [root, *root.children(recursive=True)]
                    peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree))
                except psutil.Error:
                    pass
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        stop.set()
        sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed; see {log}")
    return {"wall_s": wall, "maxrss_mb": usage.ru_maxrss / 1024, "tree_peak_rss_mb": peak[0] / 2**20}


def medstate_convert(input: Path, output: Path, tables: str | None = None, format: str = "mimic-iv") -> list:
    cmd = [*MEDSTATE, "data", "convert", "--format", format, str(input), str(output), "--overwrite"]
    return cmd + (["--tables", tables] if tables else [])


def run_peers(runs: int, warmup: int) -> dict:
    if not (PEERS_HOME / "venv-pyhealth" / ".peers-complete").exists():
        print(f"peers not built in {PEERS_HOME}; run `bash {PEERS}/setup.sh` first (skipping peers)")
        return {}
    before = set((PEERS_HOME / "results").glob("*")) if (PEERS_HOME / "results").is_dir() else set()
    cmd = [sys.executable, str(PEERS / "bench.py"), "--runs", str(runs), "--warmup", str(warmup), *PEER_STEPS]
    subprocess.run(cmd, check=True)
    (resdir,) = set((PEERS_HOME / "results").glob("*")) - before
    rows = [json.loads(line) for line in (resdir / "runs.jsonl").read_text().splitlines()]
    out = {}
    for step in PEER_STEPS:
        ok = [r for r in rows if r["step"] == step and r["exit"] == 0 and r["run"].startswith("run")]
        if ok:
            out[step] = {
                key: statistics.median(r[key] for r in ok) for key in ("wall_s", "maxrss_mb", "tree_peak_rss_mb")
            } | {"runs": len(ok), "result": ok[-1].get("result")}
    return out


def replicate(source: Path, target: Path, copies: int) -> int:
    """Copies of every demo table with new ids and times shifted by one day per copy; returns bytes written."""
    for path in sorted(source.rglob("*.csv.gz")):
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.name.startswith("d_"):
            shutil.copy(path, out)
            continue
        frame = pl.read_csv(path, infer_schema=False)
        with gzip.open(out, "wb", compresslevel=1) as handle:
            for copy in range(copies):
                shifted = frame.with_columns(
                    *(
                        (pl.col(c).cast(pl.Int64) + copy * offset).cast(pl.String)
                        for c, offset in ID_OFFSETS.items()
                        if c in frame.columns
                    ),
                    *(_shift(c, copy) for c in frame.columns if c in TIME_COLUMNS),
                )
                handle.write(shifted.write_csv(include_header=copy == 0).encode())
    return sum(p.stat().st_size for p in target.rglob("*.csv.gz"))


UUID = re.compile(rb"\b([0-9a-f]{8})(-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\b")


def replicate_fhir(source: Path, target: Path, copies: int) -> int:
    """Copies of every FHIR bundle (*.json.gz) with every resource id (a UUID, as Synthea writes them) moved to a new
    one per copy, so each copy is a new patient with the same records; returns bytes written."""
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.json.gz")):
        text = gzip.decompress(path.read_bytes())
        for copy in range(copies):

            def moved(match: re.Match, copy: int = copy) -> bytes:
                return b"%08x%s" % ((int(match[1], 16) + copy * 0x9E3779B1) % 2**32, match[2])

            name = UUID.sub(moved, path.name.encode()).decode() if copy else path.name
            (target / name).write_bytes(gzip.compress(UUID.sub(moved, text) if copy else text, compresslevel=1))
    return sum(p.stat().st_size for p in target.glob("*.json.gz"))


def _shift(column: str, days: int) -> pl.Expr:
    full = pl.col(column).str.strptime(pl.Datetime, "%Y-%m-%d %H:%M:%S", strict=False)
    date = pl.col(column).str.strptime(pl.Date, "%Y-%m-%d", strict=False)
    delta = pl.duration(days=days)
    return (
        pl.when(full.is_not_null())
        .then((full + delta).dt.strftime("%Y-%m-%d %H:%M:%S"))
        .otherwise((date + delta).dt.strftime("%Y-%m-%d"))
        .alias(column)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--scales", default="1,10,100")
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "medstate-data-bench")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "data")
    parser.add_argument("--keep", action="store_true", help="keep the replicated inputs in --scratch")
    args = parser.parse_args()
    shutil.rmtree(args.scratch, ignore_errors=True)
    logs = args.scratch / "logs"
    logs.mkdir(parents=True)

    cases = {
        "medstate_pyhealth_tables": (
            medstate_convert(DEMO, args.scratch / "pyhealth-tables", PYHEALTH_TABLES),
            "pyhealth-tables",
        ),
        "medstate_all": (medstate_convert(DEMO, args.scratch / "all"), "all"),
    }
    # medstate is measured before and after the peers and the runs are pooled, so that a drift of the machine's
    # speed during the peers' minutes does not favour either side
    runs: dict[str, list] = {name: [] for name in cases}
    for phase in ("before", "after"):
        if phase == "after":
            peers = {} if args.skip_peers else run_peers(args.runs, args.warmup)
        for name, (cmd, _) in cases.items():
            results = [measure(cmd, logs / f"{name}.{phase}{i}.log") for i in range(args.warmup + args.runs)]
            runs[name] += results[args.warmup :]
    medstate = {}
    for name, (_, folder) in cases.items():
        medstate[name] = {key: statistics.median(r[key] for r in runs[name]) for key in runs[name][0]}
        medstate[name]["runs"] = len(runs[name])
        medstate[name]["events"] = json.loads((args.scratch / folder / "report.json").read_text())["totals"]["written"]

    lines = ["## MIMIC-IV demo (100 patients): peer / medstate, medians", ""]
    lines += ["| peer | medstate step | peer wall s | medstate wall s | wall ratio | peer peak tree RSS MB | "
              "medstate peak tree RSS MB | RSS ratio | peer max RSS MB (largest process) | medstate max RSS MB |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for peer, ours in PEER_STEPS.items():
        if peer not in peers:
            continue
        p, m = peers[peer], medstate[ours]
        lines.append(
            f"| {peer} | {ours} | {p['wall_s']:.2f} | {m['wall_s']:.2f} | {p['wall_s'] / m['wall_s']:.1f}× | "
            f"{p['tree_peak_rss_mb']:.0f} | {m['tree_peak_rss_mb']:.0f} | "
            f"{p['tree_peak_rss_mb'] / m['tree_peak_rss_mb']:.1f}× | {p['maxrss_mb']:.0f} | {m['maxrss_mb']:.0f} |"
        )
    lines += ["", "Events written by medstate: " + ", ".join(f"{k} {v['events']:,}" for k, v in medstate.items())]
    outputs = {k: v["result"] for k, v in peers.items() if v.get("result")}
    lines += ["Peer outputs: " + "; ".join(f"{k} {v}" for k, v in outputs.items()), ""]

    scale_rows = []
    for copies in (int(s) for s in args.scales.split(",")):
        data = args.scratch / f"x{copies}"
        started = time.perf_counter()
        size = replicate(DEMO, data, copies)
        generated = time.perf_counter() - started
        result = measure(medstate_convert(data, args.scratch / f"x{copies}-meds"), logs / f"scale{copies}.log")
        report = json.loads((args.scratch / f"x{copies}-meds" / "report.json").read_text())
        events = report["totals"]["written"]
        shards = len(list((args.scratch / f"x{copies}-meds" / "data" / "train").glob("*.parquet")))
        scale_rows.append({"copies": copies, "input_mb": size / 2**20, "events": events, "shards": shards, **result})
        print(f"scale {copies}×: {events:,} events, {result['wall_s']:.1f} s (input generated in {generated:.0f} s)")
        shutil.rmtree(args.scratch / f"x{copies}-meds")
        if not args.keep:
            shutil.rmtree(data)
    if scale_rows:
        lines += ["## Scale: the demo replicated (new ids, shifted times), all tables, one run each", ""]
        lines += ["| copies | input csv.gz MB | events | shards/split | wall s | events/s | peak tree RSS MB | "
                  "max RSS MB |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in scale_rows:
            lines.append(
                f"| {r['copies']} | {r['input_mb']:.0f} | {r['events']:,} | {r['shards']} | {r['wall_s']:.1f} | "
                f"{r['events'] / r['wall_s']:,.0f} | {r['tree_peak_rss_mb']:.0f} | {r['maxrss_mb']:.0f} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(f"# benchmarks/data.py ({time.strftime('%Y-%m-%d')})\n\n{text}")
    args.out.with_suffix(".json").write_text(
        json.dumps({"medstate": medstate, "peers": peers, "scale": scale_rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
