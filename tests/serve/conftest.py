"""Fixtures of the serving tests: the shipped MIMIC-IV demo prepared once, and small random EhrMamba checkpoints
with the files a finetuning run's checkpoints carry."""

import shutil

import pytest
import torch
import yaml

from medstate.data.meds import scan_meds
from medstate.ehr.model import EhrMamba, EhrMambaConfig
from medstate.ehr.prepare import PrepareConfig, prepare
from medstate.ehr.sequences import at_end_of_day
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
    """A throwaway PostgreSQL server, or a skip with the reason (`.ci/run` installs PostgreSQL)."""
    from medstate.errors import MedstateError
    from medstate.serve.pgserver import throwaway_postgres

    try:
        with throwaway_postgres() as url:
            yield url
    except MedstateError as err:
        pytest.skip(str(err))


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model_dir, db, port, *options: str, scheme: str = "http"):
    """`medstate serve` in a process of its own, once /health answers."""
    import subprocess
    import sys
    import time

    import httpx

    process = subprocess.Popen([sys.executable, "-m", "medstate.cli", "serve", str(model_dir), "--db", str(db),
                                "--port", str(port), *options],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{scheme}://127.0.0.1:{port}/health", timeout=1, verify=False).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("the server did not start")
