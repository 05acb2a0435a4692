"""Host-side handles on netns_client.py, which talks gRPC to the VMs from inside the lab namespace.

A Stream (watch, write) runs until stopped, a thread collecting its JSON lines with their host
monotonic stamps, so the tests can time what the cluster reported against what the harness did (a reset,
a wake) on the same clock.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.qemu.hostcmd import in_netns, run
from tests.support import procs

SCRIPT = Path(__file__).with_name("netns_client.py")
# Members speak mutual TLS: the probes present an admin certificate of the cluster under test
# (use_credentials: a directory with ca.crt, admin.crt and admin.key, read by cortex.client via $CORTEX_TLS_DIR).
_credentials: dict[str, Path] = {}


def use_credentials(directory: Path) -> None:
    _credentials["dir"] = directory


def _with_credentials(netns: str, argv: list[str]) -> list[str]:
    env = [f"CORTEX_TLS_DIR={_credentials['dir']}"] if _credentials else []
    return in_netns(netns, ["env", *env, *argv])


def _argv(netns: str, *args: str) -> list[str]:
    return _with_credentials(netns, [sys.executable, str(SCRIPT), *args])


def cortex_cli(netns: str, *args: str) -> list[str]:
    """argv of the `cortex` CLI run in the lab, presenting the probes' admin certificate."""
    return _with_credentials(netns, [sys.executable, "-m", "cortex", *args])


class Stream:
    def __init__(self, netns: str, *args: str, log: Path):
        self.lines: list[dict] = []
        self._cond = threading.Condition()
        self._log = log.open("a")
        self.process = procs.popen(_argv(netns, *args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=self._log, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            doc = json.loads(line)
            self._log.write(line)
            with self._cond:
                self.lines.append(doc)
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float, what: str, since: float = 0.0) -> dict:
        """The first line stamped at or after `since` for which `predicate` holds (waits up to `timeout`)."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for doc in self.lines[seen:]:
                    if doc["t"] >= since and predicate(doc):
                        return doc
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = "\n".join(json.dumps(d) for d in self.lines[-15:])
                    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last lines:\n{tail}")
                self._cond.wait(min(left, 0.5))

    def stop(self) -> list[dict]:
        """Close its stdin (it finishes its current step and exits) and return everything it printed."""
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=5)
        self._log.close()
        return list(self.lines)


def watch(netns: str, addresses: list[str], log: Path) -> Stream:
    return Stream(netns, "watch", *addresses, log=log)


def writer(netns: str, addresses: list[str], prefix: str, log: Path) -> Stream:
    return Stream(netns, "write", *addresses, "--prefix", prefix, log=log)


def http(netns: str, url: str, log: Path) -> Stream:
    """Who answers at `url`: a line per change of the body's first line, or of the kind of failure."""
    return Stream(netns, "http", url, log=log)


def get(netns: str, address: str, keys: list[str], level: str = "linearizable") -> dict[str, str | None]:
    out = run(_argv(netns, "get", address, *keys, "--level", level), timeout=120).stdout
    return json.loads(out.splitlines()[-1])["values"]


def scan(netns: str, address: str, prefix: str, level: str = "linearizable") -> dict[str, str]:
    """Every key under `prefix` and its value (a few reads, for the thousands of keys a writer leaves)."""
    out = run(_argv(netns, "scan", address, prefix, "--level", level), timeout=300).stdout
    return json.loads(out.splitlines()[-1])["values"]
