"""EHR pretraining under torchrun (gloo on CPU), with DDP and with FSDP: 2 processes taking one batch each per step
give the losses and weights of 1 process accumulating the same 2 batches per step, each batch weighted by its
scored events (without dropout, whose masks depend on which process draws them)."""

import os
import subprocess
import sys

import polars as pl
import pytest
import torch

from medstate.ehr.model import EhrMamba


def run(prepared, run_dir, processes, *options):
    command = [
        "ehr", "pretrain", str(prepared), str(run_dir), "--d-model", "16", "--n-layer", "2", "--max-steps", "6",
        "--save-every", "3", "--token-budget", "1024", "--warmup-steps", "2", "--dropout", "0", *options,
    ]  # fmt: skip
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, *launcher, "-m", "medstate.cli", *command],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    errors = [line for line in result.stderr.splitlines() if "Error" in line or "error:" in line]
    assert result.returncode == 0, "\n".join(errors[-10:]) or result.stderr[-3000:]
    return pl.read_csv(run_dir / "log.csv")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_accumulating(prepared, tmp_path, parallel):
    one = run(prepared, tmp_path / "one", 1, "--grad-accumulation", "2")
    two = run(prepared, tmp_path / "two", 2, "--parallel", parallel)
    assert two["step"].to_list() == list(range(1, 7))
    assert two["tokens"].to_list() == one["tokens"].to_list()  # the same events scored in each step
    assert two["loss"].to_list() == pytest.approx(one["loss"].to_list(), rel=1e-5)
    a = EhrMamba.from_pretrained(tmp_path / "one" / "checkpoints" / "last").state_dict()
    b = EhrMamba.from_pretrained(tmp_path / "two" / "checkpoints" / "last").state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
