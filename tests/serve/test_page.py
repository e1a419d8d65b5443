"""The patient page in a real headless Chromium (Debian's `chromium` package; the test skips where it is not
installed): the page, served by a real server process, fetches the history and the attributions with the token
given in its URL fragment, draws one chart per task and lists the events that moved the first task most; a
screenshot is taken and checked not to be blank. Without a token it says so."""

import re
import shutil
import subprocess

import numpy as np
import polars as pl
import pytest

from medstate.serve.service import open_service
from medstate.serve.store import Principal, open_store

from .conftest import free_port, served_model, start_server

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (apt-get install chromium)")


def _browse(url: str, screenshot=None) -> str:
    command = [BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--virtual-time-budget=20000", "--window-size=1280,1100"]  # fmt: skip
    command += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    done = subprocess.run([*command, url], capture_output=True, text=True, timeout=120)
    return done.stdout


def test_patient_page_renders_in_chromium(prepared_demo, demo_events, tmp_path):
    model_dir, db = tmp_path / "model", tmp_path / "serve.db"
    served_model(prepared_demo, model_dir, "last", 2)
    service = open_service(model_dir, db)
    who = Principal("loader", frozenset({"ingest"}))
    from medstate.serve.app import MedsEvent

    frame = demo_events.filter(pl.col("subject_id") == 10004457).head(120)
    rows = frame.select("time", "code", "numeric_value", "hadm_id").iter_rows()
    events = [MedsEvent(event_id=str(i), time=t, code=c, numeric_value=v, hadm_id=h).incoming()
              for i, (t, c, v, h) in enumerate(rows)]  # fmt: skip
    for start in (0, 40, 80):
        service.ingest(who, "p-7", events[start : start + 40])
    token = open_store(db).create_token("clinician", ["read"])
    port = free_port()
    server = start_server(model_dir, db, port)
    try:
        url = f"http://127.0.0.1:{port}/view/p-7"
        dom = _browse(f"{url}#token={token}")
        shot = tmp_path / "page.png"
        _browse(f"{url}#token={token}", shot)
        anonymous = _browse(url)
    finally:
        server.kill()
        server.wait()
    assert 'data-ready="true"' in dom, dom[-2000:]
    tasks = [t.name for t in service.served.tasks]
    assert re.findall(r'class="card" data-task="([^"]+)"', dom) == tasks
    assert re.findall(r'class="risk" data-points="(\d+)"', dom) == ["3"] * len(tasks)  # one point per ingest
    rows = re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td><td class=\"(up|down)\">", dom)
    assert 1 <= len(rows) <= 10 and all(code in set(frame["code"].to_list()) | {"GENDER//M"} or "//_Q" in code
                                        for code, _, _ in rows)  # fmt: skip
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] > 500 and float(np.std(pixels[..., :3])) > 0.02  # not a blank page
    assert "no token" in anonymous and 'data-ready="error"' in anonymous
    audit = open_store(db).audit_log("p-7")
    assert {"read history", f"explain {tasks[0]}"} <= {a["action"] for a in audit if a["actor"] == "clinician"}
