"""What every benchmark script shares: each case runs in a fresh worker process (the script itself with
`--worker SPEC`), so its peak RSS is its own, and is timed as a median of repeats after warm-up."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time


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


def median(result: dict, key: str = "times") -> float | None:
    return statistics.median(result[key]) if key in result else None
