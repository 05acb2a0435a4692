"""Suspend/resume: a worker sleeps in S3 past the failure timeout (the leader marks it offline), is woken,
and is alive again within the target without its agent having been restarted."""

from __future__ import annotations

import json
import warnings

from tests.qemu import probes, timings
from tests.qemu.conftest import CORTEX

TARGET = 3.0  # seconds from wake to "alive" in the leader's view (the target)
# What the test enforces: alive again sooner than the failure timeout (liveness.offline_after), with the
# same agent process. The 3 s target is reported (ok / MISSED, plus a warning) in the timings table, not
# enforced: under TCG on two shared cores this path measured 2.9 s with the machine loaded by other work,
# so a red CI would mostly measure the emulator (the benchmark measures ~30 ms on real hardware).
LIMIT = 10.0


def agent_process(vm) -> tuple[str, str]:
    """(main PID, restart count) of the agent: unchanged across the sleep means no restart."""
    out = vm.succeed("systemctl show -p MainPID -p NRestarts --value cortex-agent.service").split()
    return out[0], out[1]


def test_suspended_worker_comes_back_alive(lab, cluster):
    worker = cluster["node4"]
    before = agent_process(worker)
    watch = probes.watch(lab.netns, lab.grpc("node1", "node2", "node3"), log=lab.workdir / "suspend-watch.jsonl")
    try:
        def liveness(doc: dict) -> str:
            return doc.get("nodes", {}).get("node4", "") if doc.get("state") == "leader" else ""

        watch.wait_for(lambda d: liveness(d) == "alive", 60, "the leader sees node4 alive")
        slept = worker.suspend()
        offline = watch.wait_for(lambda d: liveness(d) == "offline", 60, "the leader marks node4 offline",
                                 since=slept)
        timings.record("suspend", "S3 -> leader marks the worker offline", offline["t"] - slept)
        woke = worker.wake()
        alive = watch.wait_for(lambda d: liveness(d) == "alive", 60, "node4 alive again", since=woke)
        back = alive["t"] - woke
        timings.record("suspend", f"wake -> worker alive in the leader's view (target <= {TARGET:.0f} s)", back,
                       "MISSED" if back > TARGET else "ok")
    finally:
        watch.stop()

    # the guest's side of the wake, for the artifacts: kernel resume, the link, sleep hook, the agent's reaction
    (lab.workdir / "suspend-journal.txt").write_text(worker.succeed(
        "journalctl -b --no-pager -o short-monotonic "
        "| grep -E 'PM: suspend|sleep hook|systemd-sleep|networkd|carrier|cortex-agent|cortex\\[|resum' "
        "| tail -n 120 || true"))
    answered = [json.loads(line) for line in worker.succeed(
        "journalctl -b -u cortex-agent --no-pager -o cat | grep -F 'resumed: the servers answered' || true"
    ).splitlines() if line.startswith("{")]
    assert answered, "the agent never logged that the servers answered after the wake"
    timings.record("suspend", "... of which: the agent noticed the wake -> a server answered its heartbeat",
                   answered[-1]["after_ms"] / 1000)
    assert agent_process(worker) == before, "the agent was restarted across the sleep"
    journal = worker.succeed("journalctl -b --no-pager -o cat | grep -E 'cortex sleep hook|PM: suspend exit' || true")
    assert "cortex sleep hook: resumed" in journal, journal
    # Reported, not enforced: on the appliance the system bus still refuses the agent (a known gap, see
    # image/README.md); the clock watch and the sleep hook are what the wake above relied on.
    agent_log = worker.succeed("journalctl -b -u cortex-agent --no-pager -o cat | grep -F cortex.appliance.sleepwatch || true")
    if "watching logind for sleep and resume" not in agent_log:
        warnings.warn(f"the agent does not hear logind on the appliance: {agent_log.strip()[-300:]}", stacklevel=1)
    worker.succeed(f"{CORTEX} status --json")
    assert back <= LIMIT, f"resume -> alive took {back:.1f} s (target {TARGET:.0f} s, limit {LIMIT:.0f} s)"
    if back > TARGET:
        warnings.warn(f"resume -> alive took {back:.1f} s: target {TARGET:.0f} s missed", stacklevel=1)
