"""Services: spec checks, the `service` state domain applied to a real StateStore, and the pure lease and
takeover decisions (no sockets, no sleeps: time is an argument)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from cortex.core.commands import CommandError, Envelope, validate
from cortex.core.state import StateStore
from cortex.services import lease, spec
from cortex.services.lease import LeaseBook, NodeLease, backoff, decide, start_gate

_ids = itertools.count(1)


class Store:
    def __init__(self, path: Path):
        self.store, self.index = StateStore(path), 0

    def apply(self, command_type: str, args: dict, ts: float = 1000.0, idem: str = "") -> dict:
        self.index += 1
        n = next(_ids)
        env = Envelope(type=command_type, args=validate(command_type, args), id=f"{n:032x}", ts=ts, term=1,
                       idem=idem or f"k{n}")
        return self.store.apply(self.index, env.encode())

    def q(self, name: str, args: dict | None = None):
        return self.store.query(name, args or {})


CAPS = {"kinds": ["shell"], "volume_sync": False, "floating": False}


@pytest.fixture
def s(tmp_path: Path) -> Store:
    st = Store(tmp_path / "state.db")
    for node, role in (("n1", "server"), ("w1", "worker"), ("w2", "worker")):
        st.apply("node.register", {"node_id": node, "role": role, "grpc_address": f"{node}:1"})
        st.apply("service.report", {"node_id": node, "networks": ["192.168.7.10/24"], "caps": CAPS, "services": []})
    return st


def web(**over) -> dict:
    doc = {"name": "web", "kind": "shell", "command": "sleep 1000", "ports": [8080],
           "health": "http://:8080/", "placement": {"home": "w1", "partner": "w2"}}
    doc.update(over)
    return doc


@pytest.mark.parametrize("doc, words", [
    (web(placement={"home": "w1", "partner": "w1"}), "is the home node itself"),
    (web(health="ping me maybe"), "is not understood"),
    (web(health={"http": 8080, "tcp": 80}), "exactly one of"),
    (web(volume={"path": "../../etc"}), "outside the data dir"),
    (web(volume={"path": "/srv/web"}), "outside the data dir"),
    (web(vip="10.0.0.300/24"), "is not an address"),
    (web(kind="vm"), "kind must be one of"),
    (web(command=""), "command is empty"),
    (web(restart={"policy": "sometimes"}), "restart.policy"),
    (web(name="Web_1"), "name must be"),
    ({"name": "x", "kind": "shell", "command": "true"}, "placement must be"),
])
def test_bad_specs_say_what_to_fix(doc, words):
    with pytest.raises(CommandError, match=words):
        spec.validate(doc)


def test_spec_normalizes_health_strings_and_defaults():
    out = spec.validate(web(health="tcp:8080", volume=True, vip="192.168.7.50/24"))
    assert out["health"] == {"type": "tcp", "port": 8080, "interval": 5.0, "timeout": 2.0, "threshold": 3, "grace": 15.0}
    assert out["volume"] == {"path": "services/web/volume", "mount": "/data"}
    assert out["placement"] == {"home": "w1", "partners": ["w2"], "partner_labels": {}}
    assert out["auto_giveback"] is True and out["giveback_after"] == 120.0
    assert out["restart"] == {"policy": "always", "backoff": 1.0, "backoff_max": 60.0}


@pytest.mark.parametrize("doc, words", [
    (web(placement={"home": "w1", "partner": "w9"}), "'w9', which is not a member"),
    (web(vip="10.99.0.5/24"), "outside every network"),
])
def test_cluster_checks_deploy_nothing(s, doc, words):
    result = s.apply("service.deploy", {"spec": doc})
    assert words in result["error"]
    assert s.q("service.list") == []


def test_port_clash_with_another_service_on_the_same_nodes(s):
    assert s.apply("service.deploy", {"spec": web()})["created"]
    clash = s.apply("service.deploy", {"spec": web(name="api", placement={"home": "w2", "partner": "n1"})})
    assert "port 8080 is already used by service 'web'" in clash["error"]
    ok = s.apply("service.deploy", {"spec": web(name="api", ports=[9090], placement={"home": "w2", "partner": "n1"})})
    assert ok["created"] and [r["name"] for r in s.q("service.list")] == ["api", "web"]


def test_deploy_is_idempotent_and_a_changed_spec_restarts(s):
    first = s.apply("service.deploy", {"spec": web()})
    assert first == {"name": "web", "created": True, "holder": "w1", "epoch": 1}
    assert s.apply("service.deploy", {"spec": web()})["unchanged"]
    s.apply("service.deploy", {"spec": web(env={"MODE": "b"})})
    row = s.q("service.get", {"name": "web"})
    assert row["restart_gen"] == 1 and row["holder"] == "w1" and row["epoch"] == 1


def test_planned_takeover_waits_for_release_then_gives_back(s):
    s.apply("service.deploy", {"spec": web()})
    moved = s.apply("service.takeover", {"node": "w1"})
    assert [(m["name"], m["from"], m["holder"], m["epoch"]) for m in moved["moved"]] == [("web", "w1", "w2", 2)]
    row = s.q("service.get", {"name": "web"})
    assert (row["state"], row["released"], row["prev_holder"]) == ("taken_over", 0, "w1")
    assert start_gate(row, "w2", lease_ok=True) == "waiting for w1 to stop it (epoch 2)"
    # a report made before w1 saw epoch 2 does not release it, even if it says stopped
    s.apply("service.report", {"node_id": "w1", "services": [{"name": "web", "epoch": 1, "state": "stopped"}]})
    assert s.q("service.get", {"name": "web"})["released"] == 0
    s.apply("service.report", {"node_id": "w1", "services": [{"name": "web", "epoch": 2, "state": "stopped"}]}, ts=1001)
    row = s.q("service.get", {"name": "web"})
    assert row["released"] == 1 and start_gate(row, "w2", lease_ok=True) == ""
    assert start_gate(row, "w2", lease_ok=False).startswith("no lease")
    assert start_gate(row, "w1", lease_ok=True).startswith("held by w2")
    s.apply("service.report", {"node_id": "w2", "services": [{"name": "web", "epoch": 2, "state": "running",
                                                               "healthy": True}]}, ts=1001.5)
    row = s.q("service.get", {"name": "web"})
    assert row["ready_at"] == 1001.5 and row["last_downtime"] == pytest.approx(1.5)
    back = s.apply("service.giveback", {"node": "w1"}, ts=1100)
    assert [(m["holder"], m["epoch"], m["state"]) for m in back["moved"]] == [("w1", 3, "giving_back")]
    s.apply("service.report", {"node_id": "w2", "services": [{"name": "web", "epoch": 3, "state": "stopped"}]}, ts=1101)
    s.apply("service.report", {"node_id": "w1", "services": [{"name": "web", "epoch": 3, "state": "running",
                                                               "healthy": True}]}, ts=1102)
    row = s.q("service.get", {"name": "web"})
    assert (row["holder"], row["state"], row["takeovers"], row["givebacks"]) == ("w1", "running", 1, 1)


def test_takeover_of_a_partner_moves_on_never_to_itself(s):
    s.apply("service.deploy", {"spec": web(placement={"home": "w1", "partners": ["w2", "n1"]})})
    s.apply("service.move", {"name": "web", "epoch": 1, "holder": "w2", "state": "taken_over", "fenced": True})
    moved = s.apply("service.takeover", {"node": "w2"})["moved"]
    assert [(m["from"], m["holder"], m["epoch"], m["state"]) for m in moved] == [("w2", "w1", 3, "running")]


def test_giveback_of_a_volume_without_volume_sync_is_refused_and_stays(s):
    s.apply("service.deploy", {"spec": web(volume=True)})
    assert s.apply("service.takeover", {"node": "w1"})["moved"] == []  # w2 cannot receive the volume either
    refused = s.apply("service.takeover", {"node": "w1"})["refused"]
    assert "the volume is not replicated" in refused[0]["why"]
    assert s.q("service.get", {"name": "web"})["holder"] == "w1"


def test_move_is_compare_and_set_on_the_epoch(s):
    s.apply("service.deploy", {"spec": web()})
    assert s.apply("service.move", {"name": "web", "epoch": 1, "holder": "w2", "state": "taken_over",
                                    "reason": "x", "fenced": True})["epoch"] == 2
    stale = s.apply("service.move", {"name": "web", "epoch": 1, "holder": "n1", "state": "taken_over"})
    assert "decided on an old view" in stale["error"]


def test_output_is_capped_keeping_the_newest(s):
    s.apply("service.deploy", {"spec": web()})
    for i in range(40):
        s.apply("service.report", {"node_id": "w1", "services": [
            {"name": "web", "epoch": 1, "state": "running", "output": [["stdout", f"{i:05d}" + "x" * 15000]]}]})
    chunks = s.q("service.output", {"name": "web", "limit": 5000})
    assert sum(len(c["data"]) for c in chunks) <= 256 * 1024
    assert chunks[-1]["data"].startswith("00039") and not chunks[0]["data"].startswith("00000")


# --- leases and decisions (pure) ----------------------------------------------------------------------------

def test_node_lease_fences_before_the_leader_may_move():
    mine, book = NodeLease(lease=8, fence_early=3), LeaseBook(lease=8, margin=2)
    mine.renewed(100.0)  # sent at 100 ...
    book.heard("w1", 100.4)  # ... applied by the leader later
    assert mine.valid(104.9) and not mine.valid(105.0)  # the node stops by 105 (+ kill time < 108)
    assert not book.expired("w1", 110.3) and book.expired("w1", 110.4)  # the leader moves at 110.4 at the earliest
    assert NodeLease().valid(0.0) is False  # no renewal yet: no lease


def test_new_leader_gives_everyone_a_full_lease():
    book = LeaseBook(lease=8, margin=2)
    book.start(["w1", "w2"], now=500.0)
    assert not book.expired("w1", 509.9) and book.expired("w1", 510.0)
    assert book.healthy_for("w2", 505.0) == 5.0


def _view(s: Store) -> dict:
    return s.q("service.leader")


def test_unplanned_takeover_only_after_lease_and_margin(s):
    s.apply("service.deploy", {"spec": web()})
    book, seen = LeaseBook(lease=8, margin=2), {}
    book.start(["n1", "w1", "w2"], now=0.0)
    assert decide(_view(s), book, 0.0, seen) == []  # this leader sees the service on w1 from the start
    for t in range(0, 10):
        book.heard("w2", float(t))
        book.heard("n1", float(t))
    assert decide(_view(s), book, 9.9, seen) == []
    moves = decide(_view(s), book, 10.0, seen)
    assert [(m.holder, m.state, m.fenced, m.planned) for m in moves] == [("w2", "taken_over", True, False)]
    assert "w1 lost its lease" in moves[0].reason


def test_a_service_placed_on_a_node_idle_for_long_gets_a_full_lease_first(s):
    """A node running nothing renews rarely; a deploy onto it is not an instant unplanned takeover."""
    book, seen = LeaseBook(lease=8, margin=2), {}
    book.start(["n1", "w1", "w2"], now=0.0)
    for t in range(0, 116):  # the others renew all along
        book.heard("w2", float(t))
        book.heard("n1", float(t))
    s.apply("service.deploy", {"spec": web()})  # homed on w1, silent since 0.0
    assert decide(_view(s), book, 100.0, seen) == []
    assert decide(_view(s), book, 109.9, seen) == []
    book.heard("w1", 105.0)  # its node loop renews once it hears of the service
    assert decide(_view(s), book, 112.0, seen) == []
    moves = decide(_view(s), book, 115.0, seen)
    assert [(m.holder, m.fenced) for m in moves] == [("w2", True)]


def test_auto_giveback_after_home_health_and_not_when_disabled(s):
    s.apply("service.deploy", {"spec": web(giveback_after=30)})
    s.apply("service.deploy", {"spec": web(name="db", ports=[5432], auto_giveback=False)})
    for name in ("web", "db"):
        s.apply("service.move", {"name": name, "epoch": 1, "holder": "w2", "state": "taken_over", "fenced": True})
        s.apply("service.report", {"node_id": "w2", "services": [{"name": name, "epoch": 2, "state": "running",
                                                                   "healthy": True}]})
    book, seen = LeaseBook(lease=8, margin=2), {}
    book.start(["n1", "w1", "w2"], now=0.0)
    for t in range(0, 40):
        for node in ("n1", "w1", "w2"):
            book.heard(node, float(t))
    assert decide(_view(s), book, 29.0, seen) == []
    moves = decide(_view(s), book, 31.0, seen)
    assert [(m.name, m.holder, m.state, m.planned) for m in moves] == [("web", "w1", "giving_back", True)]


def test_failed_giveback_goes_back_to_the_partner_and_says_why(s):
    s.apply("service.deploy", {"spec": web()})
    s.apply("service.move", {"name": "web", "epoch": 1, "holder": "w2", "state": "taken_over", "fenced": True})
    s.apply("service.giveback", {"node": "w1"})
    s.apply("service.report", {"node_id": "w1", "services": [{"name": "web", "epoch": 3, "state": "backoff",
                                                               "restarts": 3, "detail": "exited with code 1"}]})
    book, seen = LeaseBook(), {}
    book.start(["n1", "w1", "w2"], now=0.0)
    moves = decide(_view(s), book, 1.0, seen)
    assert [(m.holder, m.state) for m in moves] == [("w2", "taken_over")]
    assert moves[0].reason.startswith("giveback failed: exited with code 1")


def test_drained_holder_moves_planned(s):
    s.apply("service.deploy", {"spec": web()})
    s.apply("task.drain", {"node_id": "w1", "deadline": 60})
    book = LeaseBook()
    book.start(["n1", "w1", "w2"], now=0.0)
    moves = decide(_view(s), book, 1.0, {})
    assert [(m.holder, m.planned, m.fenced, m.reason) for m in moves] == [("w2", True, False, "w1 is drained")]


def test_backoff_doubles_to_its_cap():
    assert [backoff(n, 1.0, 10.0) for n in range(6)] == [0.0, 1.0, 2.0, 4.0, 8.0, 10.0]
    assert lease.DEFAULT_LEASE - lease.FENCE_EARLY > 0
