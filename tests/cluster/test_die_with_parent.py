"""Agents a test run starts die with it, even when pytest itself is SIGKILLed (a timeout, CI cancelling the
job) and even when the agent was restarted from a thread that has ended since: PR_SET_PDEATHSIG, armed by
cortex.dev.cluster when CORTEX_DIE_WITH_PARENT=1 (set by the test fixtures, never by `cortex dev up`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from cortex.dev import cluster as devcluster
from tests.support import procs
from tests.support.wait import wait_until

ROOT = Path(__file__).resolve().parents[2]

INNER_TEST = '''
import json
import os
import threading
import time


def test_holds_a_cluster_until_killed(make_cluster):
    cluster = make_cluster(1, workers=1)
    # restarted from a thread that ends at once: the kernel ties the death signal to the forking thread
    restart = threading.Thread(target=lambda: (cluster.kill("w1"), cluster.start("w1")))
    restart.start()
    restart.join()
    cluster.wait_healthy()
    pids = {n.id: n.pid for n in cluster.nodes}
    with open(os.environ["PIDS_FILE"] + ".part", "w") as f:
        json.dump({"pytest": os.getpid(), "agents": pids}, f)
    os.rename(os.environ["PIDS_FILE"] + ".part", os.environ["PIDS_FILE"])
    time.sleep(600)
'''


def test_agents_of_a_sigkilled_pytest_do_not_survive_it(tmp_path: Path):
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "test_inner.py").write_text(textwrap.dedent(INNER_TEST))
    pids_file = tmp_path / "pids.json"
    env = {k: v for k, v in os.environ.items() if k != devcluster.DIE_WITH_PARENT_ENV}  # the fixtures set it
    with open(tmp_path / "inner.log", "wb") as log:
        pytest_proc = procs.popen([sys.executable, "-m", "pytest", "-q", "-p", "tests.support.cluster",
                                   "-p", "no:cacheprovider", "--rootdir", str(inner), str(inner / "test_inner.py")],
                                  cwd=ROOT, env={**env, "PIDS_FILE": str(pids_file)}, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        def started() -> bool:
            assert pytest_proc.poll() is None, (tmp_path / "inner.log").read_text()[-3000:]
            return pids_file.exists()

        wait_until(started, 90, "the inner pytest's cluster", interval=0.2)
        report = json.loads(pids_file.read_text())
        agents = report["agents"]
        assert report["pytest"] == pytest_proc.pid
        assert set(agents) == {"n1", "w1"}
        time.sleep(0.5)  # the thread that restarted w1 has ended by now; w1 must still run
        assert all(devcluster.alive(pid) for pid in agents.values()), agents
    finally:
        pytest_proc.send_signal(signal.SIGKILL)
        pytest_proc.wait(10)
    wait_until(lambda: not any(devcluster.alive(pid) for pid in agents.values()), 10,
               f"the agents {agents} to die with their pytest")
