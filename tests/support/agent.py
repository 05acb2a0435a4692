"""Single agents started by hand (no cortex.dev.cluster): for the tests of formation, join and configuration,
where how the process is started is the subject."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cortex.client import Client, CortexError
from cortex.security import tls
from tests.support import procs as test_procs
from tests.support.wait import wait_until


def cortex(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = test_procs.run([sys.executable, "-m", "cortex", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"cortex {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def write_config(directory: Path, node_id: str, port: int, role: str = "server", extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    raft = f"\n  raft: 127.0.0.1:{port + 1}" if role == "server" else ""
    path = directory / "config.yaml"
    path.write_text(f"node:\n  id: {node_id}\n  role: {role}\ndata_dir: data\n"
                    f"listen:\n  grpc: 127.0.0.1:{port}{raft}\nlog:\n  format: text\n{extra}")
    return path


def start_agent(config: Path, env: dict | None = None) -> subprocess.Popen:
    with open(config.parent / "agent.log", "ab") as log:
        return test_procs.popen([sys.executable, "-m", "cortex", "agent", "--config", str(config)], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=config.parent)


def wait_status(address: str, predicate, timeout: float = 20.0, data_dir: Path | None = None):
    """`data_dir`: the node's, whose certificate (once it is a member) opens its mTLS port."""

    seen = []

    def matching_status():
        files = tls.client_files(data_dir / tls.TLS_DIR) if data_dir else None
        with Client(address, timeout=1, tls_files=files) as c:
            seen[:] = [c.status()]
        return seen[0] if predicate(seen[0]) else None

    try:
        return wait_until(matching_status, timeout, f"a matching status from {address}", ignore=(CortexError,))
    except AssertionError as exc:
        raise AssertionError(f"status never matched; last: {seen[0] if seen else None}") from exc


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(10)
