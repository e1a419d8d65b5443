"""Serving each patient's recurrent state, against re-encoding the history (how EhrMamba, CEHR-GPT, FEMR, PyHealth
and the MEDS stack predict today), on loopback, bounded in count and time:

1. update-and-predict per event at 1,000 and 10,000 events of history: `PatientStream.add` + every task's
   prediction, vs `predict_history` (the history's sequence built and re-encoded, every task); the history is the
   demo patient with the most events, repeated forward in time to length; events in time order (and one late
   event: replayed from the last snapshot). Medians;
2. the running service (`medstate serve`, one uvicorn process) under concurrent clients: 100 demo patients whose
   first 1,000 events (or all, if fewer) are loaded first (untimed: a running service has histories), then their
   next 100 events each streamed in file order, 5 per request, round-robin over the patients (date-only procedures
   arrive as late events), 8 concurrent connections, at most `--seconds` per configuration: events/s, p50/p99
   request latency, errors, events lost or applied twice (the log checked against what was acknowledged); SQLite
   and PostgreSQL (a throwaway server); the same load against `medstate serve --reencode` (no state, the whole log
   re-encoded at each ingest) as the peer.

The model is the demo's finetuned EhrMamba (`make demo`: runs/demo/finetune/ehrmamba/seed0/checkpoints/last), or a
random model of its shape on the prepared demo data when it is absent.

    python benchmarks/serve.py            # ~12 min on 2 cores
    python benchmarks/serve.py --quick    # small sizes: checks the script only
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import answer_worker, case_runner, ratio, write_report
from text import gemm_peak

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "runs/demo/finetune/ehrmamba/seed0/checkpoints/last"
DEMO_MEDS = ROOT / "data/demo/mimic-iv-demo-meds"


def model_dir(work: Path) -> tuple[Path, str]:
    if (DEMO_MODEL / "vocab.json").is_file():
        return DEMO_MODEL, "the demo's finetuned EhrMamba (Mamba-1, width 64, 2 blocks, 6 tasks, prompts first+last)"
    import shutil

    import torch

    from medstate.ehr.model import EhrMamba, EhrMambaConfig
    from medstate.ehr.prepare import PrepareConfig, prepare
    from medstate.ehr.vocab import Vocabulary

    prepared, directory = work / "prepared", work / "model"
    prepare(DEMO_MEDS, prepared, PrepareConfig(max_length=1024))
    torch.manual_seed(0)
    vocab = Vocabulary.load(prepared / "vocab.json")
    EhrMamba(EhrMambaConfig(vocab_size=len(vocab), d_model=64, n_layer=2)).save_pretrained(directory)
    for name in ("vocab.json", "value_bins.json", "tasks.yaml", "prepare.yaml"):
        shutil.copy(prepared / name, directory / name)
    return directory, "a random EhrMamba of the demo model's shape (`make demo` not run)"


def demo_events():
    from medstate.data.meds import scan_meds
    from medstate.ehr.prepare import PrepareConfig
    from medstate.ehr.sequences import at_end_of_day

    return at_end_of_day(scan_meds(DEMO_MEDS).collect(), PrepareConfig().date_only_codes)


def per_event(spec: dict) -> dict:
    """Milliseconds per event: streaming vs re-encoding, at each history length."""
    from datetime import timedelta

    import polars as pl

    from medstate.ehr.streaming import StreamEvent
    from medstate.serve.patient import PatientStream, ServedModel, predict_history
    from medstate.serve.service import stream_frame

    served = ServedModel.load(spec["model"])
    events = demo_events()
    subject = events.group_by("subject_id").len().sort("len")["subject_id"][-1]
    one = events.filter(pl.col("subject_id") == subject).sort("time", maintain_order=True)
    dated = one.filter(pl.col("time").is_not_null() & (pl.col("code") != "MEDS_BIRTH"))
    span = dated["time"].max() - dated["time"].min() + timedelta(days=60)
    head = [StreamEvent(t, c, v, None) for t, c, v in one.filter(pl.col("time").is_null() | (pl.col("code") ==
            "MEDS_BIRTH")).select("time", "code", "numeric_value").iter_rows()]  # fmt: skip
    needed = max(spec["histories"]) + spec["events"] + 10
    stream_events, copy = list(head), 0
    while len(stream_events) < needed:  # the history repeated forward in time, its stays renamed
        for t, c, v, h in dated.select("time", "code", "numeric_value", "hadm_id").iter_rows():
            key = None if h is None else f"hadm_id:{h}-{copy}"
            stream_events.append(StreamEvent(t + copy * span, c, None if v is None else float(v), key))
        copy += 1
    out = {}
    for history in spec["histories"]:
        stream = PatientStream(served, stream_events[:history])
        following = stream_events[history : history + spec["events"]]
        streaming = []
        for event in following:
            started = time.perf_counter()
            stream.add(event)
            stream.predictions()
            streaming.append(time.perf_counter() - started)
        late_event = StreamEvent(stream.tokenizer.last_time - timedelta(hours=1), "LAB//late", None, None)
        started = time.perf_counter()
        stream.add(late_event)
        stream.predictions()
        late = time.perf_counter() - started
        reencoding = []
        for i in range(spec["reencode_events"]):
            started = time.perf_counter()
            predict_history(served, stream_frame(stream_events[: history + i + 1]))
            reencoding.append(time.perf_counter() - started)
        out[str(history)] = {"streaming": streaming[1:], "reencoding": reencoding, "late": late,
                             "tokens": len(stream.tokenizer.committed), "replayed": stream.replayed_tokens}  # fmt: skip
    return out


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _drive(port: int, token: str, streams: dict[str, list[dict]], preload: int, connections: int,
                 seconds: float) -> dict:  # fmt: skip
    """Each patient's first `preload` events in requests of up to 1,000 (untimed: a running service has
    histories), then the rest streamed 5 per request, round-robin over the patients (a patient is never sent on two
    connections at once), until all are sent or `seconds` have passed."""
    import httpx

    latencies, errors, acknowledged = [], 0, {p: [] for p in streams}
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=connections)

    async def send(http, patient, batch, timed):
        nonlocal errors
        began = time.perf_counter()
        try:
            response = await http.post(f"/v1/patients/{patient}/events", json={"events": batch})
        except httpx.HTTPError:
            errors += 1
            return
        if timed:
            latencies.append(time.perf_counter() - began)
        if response.status_code == 200:
            acknowledged[patient].extend(r["event_id"] for r in batch)
        else:
            errors += 1

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, limits=limits,
                                 timeout=600) as http:  # fmt: skip
        waiting = list(streams)

        async def load_histories():
            while waiting:
                patient = waiting.pop()
                rows = streams[patient][:preload]
                for start in range(0, len(rows), 1000):
                    await send(http, patient, rows[start : start + 1000], False)

        began = time.perf_counter()
        await asyncio.gather(*(load_histories() for _ in range(connections)))
        preload_seconds = time.perf_counter() - began
        queue: asyncio.Queue = asyncio.Queue()
        for patient, rows in streams.items():
            if len(rows) > preload:
                queue.put_nowait((patient, preload))
        started = time.perf_counter()
        deadline = started + seconds

        async def stream():
            while not queue.empty() and time.perf_counter() < deadline:
                patient, position = queue.get_nowait()
                batch = streams[patient][position : position + 5]
                await send(http, patient, batch, True)
                if position + 5 < len(streams[patient]):
                    queue.put_nowait((patient, position + 5))

        await asyncio.gather(*(stream() for _ in range(connections)))
        wall = time.perf_counter() - started
    timed_events = sum(max(0, len(keys) - min(preload, len(streams[p]))) for p, keys in acknowledged.items())
    return {"latencies": latencies, "errors": errors, "acknowledged": acknowledged, "wall": wall,
            "timed_events": timed_events, "preload_seconds": preload_seconds}  # fmt: skip


def load(spec: dict) -> dict:
    """The service under concurrent clients; the log checked afterwards against what was acknowledged."""
    import contextlib
    import socket

    import httpx

    from medstate.serve.pgserver import throwaway_postgres
    from medstate.serve.store import open_store

    events = demo_events()
    streams = {}
    for (subject,), frame in sorted(events.partition_by("subject_id", as_dict=True, maintain_order=True).items()):
        rows = frame.head(spec["preload"] + spec["stream"]).select("time", "code", "numeric_value", "hadm_id")
        rows = rows.iter_rows()
        streams[str(subject)] = [
            {"event_id": f"{subject}-{i}", "time": None if t is None else t.isoformat(), "code": c,
             "numeric_value": None if v is None else float(v), "hadm_id": h}
            for i, (t, c, v, h) in enumerate(rows)
        ]  # fmt: skip
        if len(streams) == spec["patients"]:
            break
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        db = stack.enter_context(throwaway_postgres()) if spec["db"] == "postgresql" else str(work / "serve.db")
        token = open_store(db).create_token("load", ["ingest"])
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "medstate.cli", "serve", spec["model"], "--db", db, "--port", str(port),
                   "--max-concurrent", "64", *(["--reencode"] if spec["reencode"] else [])]  # fmt: skip
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(600):
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                time.sleep(0.2)
            run = asyncio.run(_drive(port, token, streams, spec["preload"], spec["connections"], spec["seconds"]))
        finally:
            server.terminate()
            server.wait(60)
        store = open_store(db)
        lost = duplicated = logged = 0
        with store.transaction() as cursor:
            for patient, keys in run["acknowledged"].items():
                rows = cursor.execute("SELECT event_key FROM events WHERE patient_id = ?", (patient,)).fetchall()
                found = [r[0] for r in rows]
                logged += len(found)
                duplicated += len(found) - len(set(found))
                lost += len(set(keys) - set(found))
    latencies = run["latencies"]
    acked = sum(len(k) for k in run["acknowledged"].values())
    histories = [min(spec["preload"], len(rows)) for rows in streams.values()]
    return {"events_per_s": run["timed_events"] / run["wall"], "acknowledged": acked, "logged": logged,
            "lost": lost, "median_history": statistics.median(histories), "preload_s": run["preload_seconds"],
            "duplicated": duplicated, "errors": run["errors"], "requests": len(latencies),
            "p50_ms": 1e3 * statistics.median(latencies) if latencies else None,
            "p99_ms": 1e3 * _percentile(latencies, 0.99) if latencies else None, "wall_s": run["wall"]}  # fmt: skip


WORKERS = {"per_event": per_event, "load": load}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=90.0, help="time bound of each load configuration")
    args = parser.parse_args()
    if answer_worker(args.worker, WORKERS):
        return
    quick = args.quick
    script, results, rows = str(Path(__file__).resolve()), {"gemm_gflops": gemm_peak()}, []
    case = case_runner(script, results, 3600)
    with tempfile.TemporaryDirectory() as work:
        model, described = model_dir(Path(work))
        histories = [200, 1000] if quick else [1000, 10000]
        found = case("per event", {"case": "per_event", "model": str(model), "histories": histories,
                                   "events": 10 if quick else 40, "reencode_events": 2 if quick else 5})  # fmt: skip
        for history in histories:
            entry = found.get(str(history), {})
            ours = statistics.median(entry["streaming"]) * 1e3 if entry else None
            theirs = statistics.median(entry["reencoding"]) * 1e3 if entry else None
            tokens = entry.get("tokens", 0)
            rows.append((f"update-and-predict per event (ms), {history:,} events of history ({tokens:,} tokens): "
                         "streaming vs re-encoding the history", ours, theirs, ratio(theirs, ours),
                         "≥ 100 at 10,000" if history == max(histories) else "(report)",
                         f"ratio = re-encoding / streaming; a late event (1 h before the latest): "
                         f"{1e3 * entry.get('late', float('nan')):.1f} ms, {entry.get('replayed', 0)} tokens "
                         f"replayed from a snapshot"))  # fmt: skip
        load_spec = {"case": "load", "model": str(model), "patients": 20 if quick else 100,
                     "preload": 100 if quick else 1000, "stream": 20 if quick else 100, "connections": 8,
                     "seconds": 20 if quick else args.seconds}  # fmt: skip
        runs = {}
        for db in ("sqlite", "postgresql"):
            for reencode in (False, True):
                name = f"{db}, {'re-encoding' if reencode else 'streaming'}"
                runs[name] = case(f"load: {name}", {**load_spec, "db": db, "reencode": reencode})
        for db in ("sqlite", "postgresql"):
            ours, theirs = runs[f"{db}, streaming"], runs[f"{db}, re-encoding"]
            note = (f"p50 / p99 {ours.get('p50_ms', 0):.0f} / {ours.get('p99_ms', 0):.0f} ms vs "
                    f"{theirs.get('p50_ms', 0):.0f} / {theirs.get('p99_ms', 0):.0f} ms; errors {ours.get('errors')} / "
                    f"{theirs.get('errors')}; lost {ours.get('lost')} / {theirs.get('lost')}, applied twice "
                    f"{ours.get('duplicated')} / {theirs.get('duplicated')}; {ours.get('acknowledged')} / "
                    f"{theirs.get('acknowledged')} events acknowledged")  # fmt: skip
            rows.append((f"the service under load (events/s), {load_spec['patients']} demo patients with histories of "
                         f"up to {load_spec['preload']:,} events (median {ours.get('median_history', 0):,.0f}) "
                         f"streaming their next events, 5 per request, 8 connections, {db}: streaming vs "
                         "re-encoding service", ours.get("events_per_s"), theirs.get("events_per_s"),
                         ratio(ours.get("events_per_s"), theirs.get("events_per_s")), "errors 0, lost 0, twice 0",
                         note))  # fmt: skip
    results["model"] = described
    write_report("serve", rows, results, RESULTS)
    print(f"model: {described}")


if __name__ == "__main__":
    main()
