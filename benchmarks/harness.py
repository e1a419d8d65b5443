"""What every benchmark script shares: each case runs in a fresh worker process (the script itself with
`--worker SPEC`), so its peak RSS is its own, and is timed as a median of repeats after warm-up.

Importing it puts the scripts' folder after the installed packages on `sys.path`, so that a script named like a
package (`peft.py`) never shadows that package for the others (the scripts still import one another)."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _HERE] + [_HERE]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run_worker(script: str, spec: dict, timeout: float) -> dict:
    """Run `script --worker SPEC` and return the JSON object it prints last (or {"error": …})."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run(
            [sys.executable, script, "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def answer_worker(spec: str | None, workers: dict) -> bool:
    """In a worker process (`--worker SPEC`): run the case SPEC names and print its JSON result; True if it did."""
    if spec is None:
        return False
    parsed = json.loads(spec)
    print(json.dumps(workers[parsed["case"]](parsed)))
    return True


def case_runner(script: str, results: dict, timeout: float = 1800):
    """`case(name, spec)`: run one case in a worker of `script`, keep its result under `name` in `results`."""

    def case(name: str, spec: dict, limit: float = timeout) -> dict:
        print(f"{name} ...", flush=True)
        results[name] = run_worker(script, spec, limit)
        if "error" in results[name]:
            print(f"  error: {results[name]['error']}")
        return results[name]

    return case


def trainer_steps(parameters, loss_of, optimizer, steps: int, retain: bool = True) -> list[float]:
    """Seconds of `steps` training steps (backward of `loss_of()`, optimizer step) as medstate's Trainer runs them
    on the CPU: freed memory kept (unless `retain` is false), one malloc arena, gradient buffers allocated first."""
    from medstate.train.memory import KeptGradients, retained_memory

    times = []
    with retained_memory(retain) as kept:
        gradients = KeptGradients(parameters) if kept else None
        for _ in range(steps):
            start = time.perf_counter()
            if gradients is not None:
                gradients.zero()
            loss_of().backward()
            if gradients is not None:
                gradients.release_untouched()
            optimizer.step()
            times.append(time.perf_counter() - start)
        if gradients is not None:
            gradients.close()
    return times


def median(result: dict, key: str = "times") -> float | None:
    return statistics.median(result[key]) if key in result else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def write_report(name: str, rows, results: dict, directory: Path) -> None:
    """The rows (case, medstate, compared with, ratio, target, note) as a markdown table with the run's GEMM peaks,
    printed and written to `directory/name.md`, the raw results to `directory/name.json`."""
    import torch

    lines = ["| case | medstate | compared with | ratio | target | note |", "|---|---|---|---|---|---|"]
    for case, ours, theirs, value, target, note in rows:
        if value is None:
            lines.append(f"| {case} | - | - | - | {target} | failed: {note} |")
            continue
        lines.append(f"| {case} | {ours:,.3f} | {theirs:,.3f} | {value:.2f}× | {target} | {note} |")
    peaks = results["gemm_gflops"]
    lines.append("")
    lines.append(f"GEMM peak in this run: {', '.join(f'{k} {v:.0f} GFLOP/s' for k, v in peaks.items())}; "
                 f"torch {torch.__version__}, {os.cpu_count()} CPUs.")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.md").write_text(text + "\n")
    (directory / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
