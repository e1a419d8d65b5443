"""Fixtures of the serving tests: the shipped MIMIC-IV demo prepared once, and small random EhrMamba checkpoints
with the files a finetuning run's checkpoints carry."""

import shutil

import pytest
import torch
import yaml

from medstate.data.meds import scan_meds
from medstate.ehr.model import EhrMamba, EhrMambaConfig
from medstate.ehr.prepare import PrepareConfig, at_end_of_day, prepare
from medstate.ehr.streaming import StreamEvent
from medstate.ehr.vocab import Vocabulary
from medstate.serve.patient import ServedModel

DEMO = "data/demo/mimic-iv-demo-meds"
COLUMNS = ["time", "code", "numeric_value", "hadm_id"]


@pytest.fixture(scope="session")
def prepared_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared-demo")
    prepare(DEMO, out, PrepareConfig(max_length=256))
    return out


def served_model(prepared, directory, layout: str, version: int) -> ServedModel:
    torch.manual_seed(version)
    vocab = Vocabulary.load(prepared / "vocab.json")
    model = EhrMamba(EhrMambaConfig(vocab_size=len(vocab), d_model=16, n_layer=2, ssm_version=version, dropout=0.0))
    with torch.no_grad():
        model.classifier[1].weight.mul_(4.0)  # probabilities that move with the history
    model.save_pretrained(directory)
    for name in ("vocab.json", "value_bins.json", "tasks.yaml"):
        shutil.copy(prepared / name, directory / name)
    settings = yaml.safe_load((prepared / "prepare.yaml").read_text())
    (directory / "prepare.yaml").write_text(yaml.safe_dump({**settings, "prompt": layout}))
    return ServedModel.load(directory)


@pytest.fixture(scope="session")
def demo_events():
    return at_end_of_day(scan_meds(DEMO).collect(), PrepareConfig().date_only_codes)


def _event(row: dict) -> StreamEvent:
    key = None if row["hadm_id"] is None else f"hadm_id:{row['hadm_id']}"
    return StreamEvent(row["time"], row["code"], row["numeric_value"], key)


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server (initdb in a temporary folder, a Unix socket only), or a skip with the reason;
    `.ci/run` installs PostgreSQL from Debian's packages."""
    import glob
    import os
    import socket
    import subprocess
    import tempfile

    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    if found is None:
        pytest.skip("PostgreSQL is not installed (no initdb): `.ci/run` installs it, or apt-get install postgresql")
    bin_dir = os.path.dirname(os.path.realpath(found))
    root = tempfile.mkdtemp(prefix="medstate-pg-")
    prefix = []
    if os.geteuid() == 0:  # the server refuses to run as root
        prefix = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = os.path.join(root, "data")
    run = lambda *args: subprocess.run([*prefix, *args], capture_output=True, text=True)  # noqa: E731
    made = run(f"{bin_dir}/initdb", "-D", data, "-U", "medstate", "--auth=trust")
    if made.returncode:
        pytest.skip(f"initdb failed: {made.stderr.strip().splitlines()[-1:]}")
    options = f"-p {port} -k {root} -c listen_addresses='' -c fsync=off"
    started = run(f"{bin_dir}/pg_ctl", "-D", data, "-o", options, "-l", os.path.join(root, "log"), "-w", "start")
    if started.returncode:
        pytest.skip(f"PostgreSQL did not start: {started.stderr.strip()[-200:]}")
    yield f"postgresql://medstate@/postgres?host={root}&port={port}"
    run(f"{bin_dir}/pg_ctl", "-D", data, "-m", "immediate", "stop")
    shutil.rmtree(root, ignore_errors=True)
