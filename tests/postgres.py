"""A real PostgreSQL server for the tests, started from its binaries (initdb into a temporary folder, a free port)."""

from __future__ import annotations

import getpass
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from llmops.ports import free_port


def postgres_bin() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    return Path(found).resolve().parent if found else None  # the folder that also holds pg_ctl and createdb


@contextmanager
def postgres_server(host: str = "127.0.0.1") -> Iterator[str]:
    """A PostgreSQL server listening on `host` (a free port), with a database `mlflow`; its URL. Trusts every
    client: `host` is loopback or a test network's address. initdb refuses root: as root, it runs as `postgres`."""
    binaries = postgres_bin()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries (initdb) not installed: apt-get install postgresql")
    as_user: list[str] = []
    if os.geteuid() == 0:
        if subprocess.run(["id", "postgres"], capture_output=True, check=False).returncode != 0:
            pytest.skip("running as root and there is no `postgres` user to run the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
    # Not under pytest's folder: the server's user must be able to reach it.
    root = Path(tempfile.mkdtemp(prefix="llmops-postgres-"))
    data = root / "data"
    if as_user:
        shutil.chown(root, "postgres")
    port = free_port()
    user = "postgres" if as_user else getpass.getuser()
    subprocess.run([*as_user, str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", user], check=True,
                   capture_output=True)  # fmt: skip
    if host != "127.0.0.1":  # the test network's other hosts too
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write("host all all 0.0.0.0/0 trust\n")
    options = f"-p {port} -k {root} -c listen_addresses={host}"
    subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"),
                    "-w", "start"], check=True, capture_output=True)  # fmt: skip
    try:
        subprocess.run([*as_user, str(binaries / "createdb"), "-h", host, "-p", str(port), "-U", user,
                        "mlflow"], check=True, capture_output=True)  # fmt: skip
        yield f"postgresql+psycopg2://{user}@{host}:{port}/mlflow"  # MLflow 3.17 assumes psycopg 3 otherwise
    finally:
        subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], check=False,
                       capture_output=True)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)
