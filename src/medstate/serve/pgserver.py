"""A throwaway PostgreSQL server (initdb in a temporary folder, reachable on a Unix socket only), for the tests and
the benchmark of the PostgreSQL store, and for trying the service against a real server on one machine."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator

from medstate.errors import MedstateError


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    """Yields the server's URL; the server and its files are gone afterwards. MedstateError says why it could not
    start (not installed: `apt-get install postgresql`)."""
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    if found is None:
        raise MedstateError("PostgreSQL is not installed (no initdb); apt-get install postgresql")
    bin_dir = os.path.dirname(os.path.realpath(found))
    root = tempfile.mkdtemp(prefix="medstate-pg-")
    prefix = []
    if os.geteuid() == 0:  # the server refuses to run as root
        if shutil.which("runuser") is None:
            raise MedstateError("running as root, PostgreSQL needs runuser to start as the postgres user")
        prefix = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = os.path.join(root, "data")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *args], capture_output=True, text=True)

    try:
        made = run(f"{bin_dir}/initdb", "-D", data, "-U", "medstate", "--auth=trust")
        if made.returncode:
            raise MedstateError(f"initdb failed: {made.stderr.strip()[-300:]}")
        options = f"-p {port} -k {root} -c listen_addresses='' -c max_connections=200"
        started = run(f"{bin_dir}/pg_ctl", "-D", data, "-o", options, "-l", os.path.join(root, "log"), "-w", "start")
        if started.returncode:
            raise MedstateError(f"PostgreSQL did not start: {started.stderr.strip()[-300:]}")
        try:
            yield f"postgresql://medstate@/postgres?host={root}&port={port}"
        finally:
            run(f"{bin_dir}/pg_ctl", "-D", data, "-m", "immediate", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)
