"""The training loop under torchrun (gloo on CPU), with DDP and with FSDP: 2 processes give the loss and validation
curves of 1 process at the same global batch (with layer-wise LR decay and an EMA), and a checkpoint written by 2
processes resumes on 1 as if the run had never changed."""

import csv
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def losses(run_dir, column="loss"):
    with open(run_dir / "log.csv") as handle:
        return {int(r["step"]): float(r[column]) for r in csv.DictReader(handle) if r[column]}


def run(config, run_dir, processes):
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(dataclasses.asdict(config)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, str(WORKER), str(path), str(run_dir)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   str(WORKER), str(path), str(run_dir)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_and_resume_on_one(pretrain_config, tmp_path, parallel):
    base = pretrain_config(schedule="constant", warmup_steps=0, max_steps=8, save_every=4, eval_every=2)
    # padded rows hold unequal numbers of tokens: the processes' losses must be weighted by them
    base = dataclasses.replace(base, held_out=[], layout="padded")
    one = dataclasses.replace(base, batch_size=4)
    two = dataclasses.replace(base, batch_size=2, train=dataclasses.replace(base.train, max_steps=4, parallel=parallel))
    run(one, tmp_path / "one", 1)
    run(two, tmp_path / "two", 2)
    single, double = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(double) == [1, 2, 3, 4]
    for step, loss in double.items():
        assert loss == pytest.approx(single[step], rel=1e-5, abs=1e-6), step
    # validation (of the EMA weights; under FSDP gathered from the shards on every process) at steps 2 and 4
    single_validation, double_validation = (losses(tmp_path / d, "validation") for d in ("one", "two"))
    assert sorted(double_validation) == [2, 4]
    for step, value in double_validation.items():
        assert value == pytest.approx(single_validation[step], rel=1e-5), step
    assert not (tmp_path / "two" / "log.csv.1").exists() and len(list((tmp_path / "two").iterdir())) > 0
    # the 2-process checkpoint (step 4) continues on 1 process to step 8
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    run(one, tmp_path / "resumed", 1)
    resumed = losses(tmp_path / "resumed")
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(single[step], rel=1e-5, abs=1e-6), step
    a = load_file(tmp_path / "one" / "checkpoints/last/model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints/last/model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
