"""The services watchdog process (services/watchdog.py) on its own, as the agent drives it through its stdin:
a lease deadline that passes unpetted kills the services' processes and releases their floating address; the
agent's end without a goodbye fences at once; a goodbye ends it without fencing. A "service" here is a sleep
carrying the environment every service process carries; the address lies in a namespace of the test's own
(root only: CI runs as root; the cluster tests cover the watchdog beside real agents).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

from tests.support import procs
from tests.support.netlab import Address, in_netns, namespace_with, requires_root
from tests.support.wait import wait_until

pytestmark = requires_root
CIDR = "10.233.9.50/24"


def service_process(services_dir, name: str = "svc") -> subprocess.Popen:
    env = {"CORTEX_SERVICE": name, "CORTEX_VOLUME": str(services_dir / name / "volume"), "CORTEX_NODE": "wd"}
    return procs.popen([shutil.which("sleep"), "120"], env=env)


def watchdog(services_dir, ns: str = "") -> subprocess.Popen:
    argv = [sys.executable, "-m", "cortex.services.watchdog"]
    proc = procs.popen(in_netns(ns, argv) if ns else argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    send(proc, {"services_dir": str(services_dir), "podman": []})
    return proc


def send(proc: subprocess.Popen, doc) -> None:
    proc.stdin.write((doc if isinstance(doc, bytes) else json.dumps(doc).encode()) + b"\n")
    proc.stdin.flush()


def holders(ns: str) -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute(netns=ns) as ipr:
        return [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr() if a.get_attr("IFA_ADDRESS") == CIDR.split("/")[0]]


def test_an_unpetted_deadline_kills_the_services_and_releases_their_address(tmp_path):
    with namespace_with([("wd0", "wd1")], [Address("wd0", CIDR)]) as ns:
        service, bystander = service_process(tmp_path), procs.popen([shutil.which("sleep"), "120"])
        dog = watchdog(tmp_path, ns)
        try:
            send(dog, {"deadline": time.monotonic() + 0.2, "services": ["svc"], "containers": [], "vips": [CIDR]})
            assert service.wait(timeout=10) == -9
            wait_until(lambda: holders(ns) == [], 10, "the floating address released")
            assert bystander.poll() is None and dog.poll() is None  # only services; the watchdog stays
            send(dog, {"bye": True})
            assert dog.wait(timeout=10) == 0
            log = dog.stderr.read().decode()
            assert "lease ran out" in log and "killed 1 service processes" in log and f"released {CIDR}" in log
        finally:
            for proc in (service, bystander, dog):
                proc.kill()
                proc.wait()


def test_the_agents_end_fences_at_once_and_a_goodbye_does_not(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"  # two nodes' services directories
    ended, byed = service_process(one, "a"), service_process(two, "b")
    try:
        dog = watchdog(one)
        send(dog, {"deadline": time.monotonic() + 600, "services": ["a"], "containers": [], "vips": []})
        dog.stdin.close()  # the agent is gone (SIGKILL): end of file, no goodbye
        assert ended.wait(timeout=10) == -9 and dog.wait(timeout=10) == 0
        assert "the agent ended without stopping its services" in dog.stderr.read().decode()

        dog = watchdog(two)
        send(dog, b"not json")  # said and ignored
        send(dog, {"bye": True})
        assert dog.wait(timeout=10) == 0 and byed.poll() is None
        assert "ignored a line that is not JSON" in dog.stderr.read().decode()
    finally:
        for proc in (ended, byed):
            proc.kill()
            proc.wait()
