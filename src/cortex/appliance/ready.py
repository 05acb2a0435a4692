"""cortex-ready: succeeds once this node is a healthy cluster member; gates boot-complete.target (boot blessing).

Healthy = the local agent's Status answers with state leader, follower or worker, a known leader and quorum.
Polls every 2 s, prints progress to the console, gives up after --timeout seconds (then, when the boot entry is
still on probation, reboots to use up a try).

It asks the agent in this process, over one channel kept for the whole wait, instead of running
`cortex status` each time: on a slow machine (an appliance under emulation, several booting at once) a fresh
interpreter plus a fresh mutual-TLS handshake per poll took longer than the poll's own limit, so a node that
was long in the cluster never got blessed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HEALTHY_STATES = ("leader", "follower", "worker")
PROGRESS_EVERY = 60.0  # seconds between "still waiting" lines while the reason stays the same


def healthy(doc: dict) -> tuple[bool, str]:
    """(ok, why) for one status document (the fields of `cortex status --json`)."""
    state = doc.get("state", "")
    if state not in HEALTHY_STATES:
        reason = doc.get("waiting_for") or "not in a cluster yet"
        return False, f"state {state or '?'}: {reason}"
    if not doc.get("leader_id"):
        return False, f"state {state}: no leader known"
    if not doc.get("has_quorum"):
        return False, f"state {state}: no quorum"
    return True, f"state {state}, leader {doc['leader_id']}, quorum"


class LocalAgent:
    """The agent at `addr`, asked for its status over one client, made again when the node's credentials
    change (it joins: plaintext before, mutual TLS after) or a call fails."""

    def __init__(self, addr: str, timeout: float):
        self.addr = addr
        self.timeout = timeout
        self._client = None

    def status(self) -> dict:
        from cortex.client import Client

        if self._client is None:
            self._client = Client(self.addr, timeout=self.timeout)
        try:
            reply = self._client.status()
        except Exception:
            self.close()
            raise
        return {"state": reply.state, "waiting_for": reply.waiting_for, "leader_id": reply.leader_id,
                "has_quorum": reply.has_quorum}

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def boot_counting() -> bool:
    """True when the booted boot-loader entry still has a tries counter (i.e. it is on probation)."""
    try:
        out = subprocess.run(["/usr/lib/systemd/systemd-bless-boot", "status"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.stdout.strip() == "indeterminate"


def cmdline_timeout(default: float, path: str = "/proc/cmdline") -> float:
    """`cortex.ready_timeout=SECONDS` on the kernel command line overrides --timeout: a test image (or an
    operator) can make a version that never gets ready use up its boot tries sooner."""
    try:
        words = open(path).read().split()
    except OSError:
        return default
    for word in words:
        if word.startswith("cortex.ready_timeout="):
            try:
                return max(10.0, float(word.split("=", 1)[1]))
            except ValueError:
                say(f"ignoring malformed {word}")
    return default


def say(message: str) -> None:
    print(f"cortex-ready: {message}", flush=True)


def wait_ready(agent, timeout: float, interval: float, clock=time.monotonic, sleep=time.sleep) -> tuple[bool, str]:
    """Poll `agent.status()` until healthy or `timeout` seconds pass; say each new reason once, and the same
    reason again every PROGRESS_EVERY seconds with how long it has lasted."""
    start = clock()
    last, last_said = "", start
    while True:
        try:
            ok, why = healthy(agent.status())
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            ok, why = False, f"agent at {agent.addr} not answering: {str(exc).strip() or type(exc).__name__}"
        now = clock()
        if ok:
            say(f"CORTEX-READY {why} (after {now - start:.0f} s)")
            return True, why
        if why != last or now - last_said >= PROGRESS_EVERY:
            say(f"waiting: {why}" + (f" (for {now - start:.0f} s)" if why == last else ""))
            last, last_said = why, now
        if now - start >= timeout:
            return False, why
        sleep(interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cortex-ready", description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default=os.environ.get("CORTEX_ADDR", "127.0.0.1:7400"))
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--interval", type=float, default=2)
    parser.add_argument("--call-timeout", type=float, default=10,
                        help="seconds one status call may take (a busy agent under emulation answers slowly)")
    parser.add_argument("--reboot-if-counting", action="store_true")
    args = parser.parse_args(argv)
    args.timeout = cmdline_timeout(args.timeout)
    agent = LocalAgent(args.addr, args.call_timeout)
    try:
        ok, why = wait_ready(agent, args.timeout, args.interval)
    finally:
        agent.close()
    if ok:
        return 0
    say(f"gave up after {args.timeout:.0f} s: {why}")
    if args.reboot_if_counting and boot_counting():
        say("this boot entry is on probation (boot counting): rebooting to use up a try")
        subprocess.run(["systemctl", "reboot", "--no-block"], check=False)
    return 1


if __name__ == "__main__":
    sys.exit(main())
