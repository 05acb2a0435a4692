"""Network partitions and killed agents between real agents, each in its own network namespace (root only, as
CI runs): Raft under a partition, and a service moving its floating address between nodes.

Topology (tests/support/agentlab.py): a bridge namespace, one namespace per server and one for a client,
joined by veth pairs on 10.231.<k>.0/24. Every packet of the test stays inside namespaces this test creates:
clients run in a node's or the client's namespace (nsenter), never from the root namespace (where 10.x would
be routed off the machine).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.support.agentlab import AgentLab, Prober, VipWatch
from tests.support.cluster import first_leader
from tests.support.linearizability import HistoryRecorder, check
from tests.support.procwatch import Observer
from tests.support.wait import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


# shorter leases than the default (8 s + 2 s) keep the service test's two takeovers quick; the Raft tests do not
# look at them
SERVICES = {"services": {"lease": 6, "lease_margin": 1}}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """One cluster for the module: every test leaves its nodes running and its links healed."""
    lab = AgentLab(tmp_path_factory.mktemp("lab"), f"cx{os.getpid() % 10000}", subnet=os.getpid() % 250,
                   nodes=[("n1", "server"), ("n2", "server"), ("n3", "server")], plugins=SERVICES)
    try:
        lab.up()
        lab.form()
        yield lab
    finally:
        lab.close()


def leader_of(lab: AgentLab, among: list[int]) -> int | None:
    return first_leader(among, lambda i: (lab.status(i) or {}).get("state", ""))


def test_partitioned_leader_cannot_write_majority_elects_and_heals_without_split_brain(lab: AgentLab):
    old = leader_of(lab, [1, 2, 3])
    assert old is not None
    majority = [i for i in (1, 2, 3) if i != old]
    assert lab.cortex(old, "kv", "put", "before", "1").returncode == 0

    lab.isolate(old)
    isolated_at = time.monotonic()
    new = wait_until(lambda: leader_of(lab, majority), 20, "the majority to elect a leader", interval=0)
    elected = time.monotonic() - isolated_at
    assert lab.cortex(new, "kv", "put", "during", "majority").returncode == 0

    minority = lab.cortex(old, "kv", "put", "during", "minority", "--retry", "2")
    assert minority.returncode != 0, "a partitioned minority must not accept writes"
    s = lab.status(old)
    assert s is not None and s["state"] != "leader", "the isolated leader must step down"

    lab.heal(old)
    def converged() -> bool:
        digests = {i: json.loads(lab.cortex(i, "state", "--json").stdout or "{}").get("digest") for i in (1, 2, 3)}
        return len(set(digests.values())) == 1 and None not in digests.values()

    wait_until(converged, 30, "the replicas to converge", interval=0.3)
    for i in (1, 2, 3):
        assert lab.cortex(i, "kv", "get", "during").stdout.strip() == "majority"
        assert lab.cortex(i, "kv", "get", "before").stdout.strip() == "1"
    print(f"isolated leader n{old}: majority elected n{new} after {elected:.2f}s")


def test_checker_catches_a_real_stale_read_from_an_isolated_follower(lab: AgentLab):
    """A follower cut off from Raft still answers `--level stale` from its own copy: the recorded
    history is not linearizable and the checker must say so, naming the key. The same read at level
    linearizable refuses while isolated and returns the new value once healed."""
    leader = leader_of(lab, [1, 2, 3])
    assert leader is not None
    follower = next(i for i in (1, 2, 3) if i != leader)
    history = HistoryRecorder()

    h = history.invoke("writer", "write", "k", value="old")
    assert lab.cortex(leader, "kv", "put", "k", "old").returncode == 0
    history.ok(h)
    wait_until(lambda: lab.cortex(follower, "kv", "get", "k", "--level", "stale").stdout.strip() == "old", 10,
               "the follower to receive the first write", interval=0.1)

    lab.isolate(follower)
    try:
        h = history.invoke("writer", "write", "k", value="new")
        majority = next(i for i in (1, 2, 3) if i != follower)
        assert lab.cortex(majority, "kv", "put", "k", "new", "--retry", "20").returncode == 0
        history.ok(h)
        h = history.invoke("reader", "read", "k")
        seen = lab.cortex(follower, "kv", "get", "k", "--level", "stale").stdout.strip()
        history.ok(h, seen)
        assert seen == "old"
        result = check(history.operations())
        assert not result.ok and result.key == "k", result
        assert lab.cortex(follower, "kv", "get", "k", "--level", "linearizable").returncode != 0
    finally:
        lab.heal(follower)
    wait_until(lambda: lab.cortex(follower, "kv", "get", "k", "--level", "linearizable").stdout.strip() == "new",
               30, "the healed follower to catch up", interval=0.3)


SERVICE = "vipweb"
PORT = 8080


def first_sample(observer: Observer, since: float, test) -> float | None:
    return next((t for t, nodes in list(observer.samples) if t >= since and test(nodes)), None)


def test_a_service_moves_its_floating_address_on_kill_and_on_partition_and_never_runs_twice(lab: AgentLab,
                                                                                               tmp_path: Path):
    """A shell service answers HTTP on its VIP (its page: the node and pid serving it), home A, partner B, the
    two servers that do not lead (the leader stays up, so no election adds to the takeovers). A client in its
    own namespace asks the VIP every 50 ms. (a) kill -9 of A's agent: B answers on the VIP; the address
    leaves A's machine (its watchdog releases it). (b) A's link cut, its agent alive:
    A stops the service and releases the VIP before B starts it and claims it. An observer of /proc sees
    never two nodes running it, and in (b) never two namespaces holding the address."""
    leader = leader_of(lab, [1, 2, 3])
    assert leader is not None
    a, b = [i for i in (1, 2, 3) if i != leader]
    home, partner = lab.ids[a - 1], lab.ids[b - 1]
    vip = lab.address(100)
    spec = tmp_path / "vipweb.json"  # JSON is YAML
    spec.write_text(json.dumps({
        "name": SERVICE, "kind": "shell", "vip": f"{vip}/24", "auto_giveback": False,
        "command": f"echo $CORTEX_NODE $$ > index.html; exec python3 -m http.server {PORT}",
        "health": {"http": PORT, "interval": 0.2, "threshold": 2}, "restart": {"backoff": 0.2},
        "placement": {"home": home, "partner": partner}}))
    with Observer(SERVICE, lab.root) as observer:
        watch = VipWatch(lab, vip)
        prober = Prober(f"http://{vip}:{PORT}/", lab.client_ns)
        try:
            deployed = lab.cortex(leader, "services", "deploy", str(spec))
            assert deployed.returncode == 0, deployed.stderr
            prober.mark()
            prober.wait_for(home, 60)
            wait_until(lambda: watch.holders() == [home], 5, f"the address on {home} alone", interval=0.05)

            # (a) kill -9 of the home's agent: its service dies with it, the address stays on its machine
            killed = prober.mark()
            lab.kill_agent(a)
            answered = prober.wait_for(partner, 40)
            assert watch.first(partner, True, killed) is not None
            print(f"kill -9 of {home}'s agent: {partner} answered on {vip} after {answered - killed:.2f}s")
            # the watchdog beside the killed agent releases the address when the agent's end of its pipe
            # closes; had it died too, the restarted agent would remove the leftover (Supervisor)
            lab.start_agent(a)
            wait_until(lambda: watch.first(home, False, killed), 60,
                       f"the address gone from {home} after its agent was killed", interval=0.1)
            wait_until(lambda: watch.holders() == [partner], 5, f"the address on {partner} alone", interval=0.05)

            def given_back() -> bool:
                result = json.loads(lab.cortex(leader, "ha", "giveback", home, "--json", timeout=90).stdout or "{}")
                return bool(result.get("moved"))

            wait_until(given_back, 90, f"the giveback to {home} (once its agent is back)", interval=1)
            prober.mark()
            prober.wait_for(home, 30)

            # (b) the home's link cut, its agent alive: it fences itself before the partner starts
            cut = prober.mark()
            lab.isolate(a)
            try:
                answered = prober.wait_for(partner, 40)
                assert lab.agents[a].poll() is None, "the isolated home's agent must stay up"
                stopped = first_sample(observer, cut, lambda nodes: home not in nodes)
                released = watch.first(home, False, cut)
                started = first_sample(observer, cut, lambda nodes: partner in nodes)
                claimed = watch.first(partner, True, cut)
                assert None not in (stopped, released, started, claimed), (stopped, released, started, claimed)
                assert max(stopped, released) < min(started, claimed), \
                    f"{home} stopped at +{stopped - cut:.2f}s and released at +{released - cut:.2f}s; {partner} " \
                    f"started at +{started - cut:.2f}s and claimed at +{claimed - cut:.2f}s"
                assert watch.overlaps(cut) == []
                print(f"partition of {home}: stopped +{stopped - cut:.2f}s, released +{released - cut:.2f}s; "
                      f"{partner} started +{started - cut:.2f}s, claimed +{claimed - cut:.2f}s, answered "
                      f"+{answered - cut:.2f}s")
            finally:
                lab.heal(a)
            assert {answer[0] for _, answer in prober.answers(cut) if answer} <= {home, partner}
        finally:
            prober.close()
            watch.close()
            if a not in lab.agents:  # a failure before the restart: the next test needs every node
                lab.start_agent(a)
            lab.cortex(leader, "services", "remove", SERVICE)
            wait_until(lambda: not observer.nodes_now(), 30, "the service to stop everywhere", interval=0.1)
            wait_until(lab.all_alive, 60, "every node alive again", interval=0.3)
    assert observer.double_runs() == [], "two nodes ran the service at once"
