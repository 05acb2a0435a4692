"""pysyncobj's own log lines reach the agent's log at their level (a line it repeats every tick once a minute),
and a node whose disk is full says so once, clearly, and stays up (not twenty tracebacks a second, and not
nothing)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cortex.client import AdminClient, Client, CortexError
from cortex.node import logs
from cortex.security import tls
from tests.support import procs as test_procs
from tests.support.cluster import free_base_port

FILE_LIMIT_KB = 2048  # no file the agent writes grows past this: its disk is full


def json_lines(path: Path) -> list[dict]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


@pytest.fixture
def full_disk_agent(tmp_path: Path):
    """A server agent whose files cannot grow past FILE_LIMIT_KB (RLIMIT_FSIZE, SIGXFSZ ignored so a write
    fails with EFBIG the way it fails with ENOSPC on a full disk)."""
    port = free_base_port()
    config = tmp_path / "config.yaml"
    config.write_text(f"node:\n  id: full\n  role: server\ndata_dir: data\nlisten:\n  grpc: 127.0.0.1:{port}\n"
                      f"  raft: 127.0.0.1:{port + 1}\nlog:\n  format: json\n")
    log_path = tmp_path / "agent.log"
    with open(log_path, "ab") as log:
        proc = test_procs.popen(["bash", "-c", f'trap "" XFSZ; ulimit -f {FILE_LIMIT_KB}; exec "$@"', "agent",
                                 sys.executable, "-m", "cortex", "agent", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        yield proc, f"127.0.0.1:{port}", tmp_path / "data", log_path
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:  # with its disk full the agent may not finish a clean shutdown
            proc.kill()
            proc.wait(20)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_full_disk_is_one_clear_error_in_the_agent_log_and_the_agent_stays_up(full_disk_agent):
    proc, address, data_dir, log_path = full_disk_agent
    socket_path = data_dir / "admin.sock"
    wait_for(lambda: socket_path.exists() or proc.poll() is not None, 60, "the admin socket")
    assert proc.poll() is None, log_path.read_text()
    AdminClient(str(socket_path)).init()
    files = wait_for(lambda: tls.client_files(data_dir / tls.TLS_DIR), 60, "the admin certificate")

    value = "x" * 100_000
    with Client(address, timeout=5, tls_files=files) as c:
        for i in range(3 * FILE_LIMIT_KB // 100):  # well past the limit: some write must fail
            try:
                c.put(f"k{i}", value)
            except CortexError:
                break
        else:
            raise AssertionError("every write succeeded: the file size limit did not apply")

    def refused():
        return [line for line in json_lines(log_path)
                if line.get("level") == "error" and "raft journal write failed" in line.get("msg", "")]

    errors = wait_for(refused, 120, "the refused write in the agent log")
    assert str(data_dir) in errors[0]["error"] and "node full" in errors[0]["error"], errors[0]
    time.sleep(2)  # ticks go on failing to write: still one line, the agent up, no tick tracebacks
    assert len(refused()) == 1 and proc.poll() is None
    assert not [line for line in json_lines(log_path) if "failed _onTick" in line.get("msg", "")]


def test_pysyncobj_lines_reach_the_agent_log_at_their_level_with_the_traceback(capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup("n1", "info", "json")
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            logging.getLogger("pysyncobj.syncobj").exception("failed _onTick in _autoTickThread")
        logging.getLogger("pysyncobj.tcp_connection").debug("below the agent's level: not shown")
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert [(x["logger"], x["level"], x["msg"]) for x in lines] == [
        ("pysyncobj.syncobj", "error", "failed _onTick in _autoTickThread")]
    assert lines[0]["node"] == "n1" and "Traceback" in lines[0]["exc"] and "No space left" in lines[0]["exc"]


def test_a_line_repeated_every_tick_is_logged_once_a_window_with_its_count():
    now = [0.0]
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    handler = Keep()
    handler.addFilter(logs.RepeatLimit("pysyncobj", window=60.0, clock=lambda: now[0]))
    logger = logging.getLogger("pysyncobj.syncobj.repeat-check")
    logger.addHandler(handler)
    logger.propagate = False
    other = logging.getLogger("cortex.repeat-check")
    other.addHandler(handler)
    other.propagate = False
    try:
        for tick in range(100):  # 5 s of 50 ms ticks, every one failing the same way
            now[0] = tick * 0.05
            try:
                raise OSError(28, "No space left on device")
            except OSError:
                logger.exception("failed _onTick in _autoTickThread")
        logger.warning("Failed to store full dump")  # another kind of line is not held back
        other.error("a cortex line is never limited")
        other.error("a cortex line is never limited")
        now[0] = 61.0
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            logger.exception("failed _onTick in _autoTickThread")
    finally:
        logger.removeHandler(handler)
        other.removeHandler(handler)
    assert [(r.levelname, r.getMessage(), getattr(r, "fields", {}).get("repeated")) for r in seen] == [
        ("ERROR", "failed _onTick in _autoTickThread", None),
        ("WARNING", "Failed to store full dump", None),
        ("ERROR", "a cortex line is never limited", None),
        ("ERROR", "a cortex line is never limited", None),
        ("ERROR", "failed _onTick in _autoTickThread", 99),
    ]
