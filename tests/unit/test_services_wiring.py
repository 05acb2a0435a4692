"""How the services plugin uses cortex.ha: which implementations `build_ports` constructs, the volume lag a
report carries and the commands show, the floating address claimed once a service runs and released when it
stops, and an unplanned takeover that powers the silent holder off first (against the Redfish stand-in of
tests/support/fake_redfish.py: a real HTTPS server speaking Redfish's paths and JSON)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from cortex import config
from cortex.core.commands import CommandError
from cortex.ha.fence import Fencing
from cortex.ha.vip import LinuxFloatingAddress
from cortex.ha.volumes import RemoteVolumeSync
from cortex.services import api, lease, spec
from cortex.services.plugin import ServicesPlugin, build_ports, fence_target
from cortex.services.ports import Ports
from cortex.services.supervisor import Supervisor
from cortex.tasks.executors import ExecutorSettings, ShellExecutor
from tests.support.fake_redfish import FakeBMC
from tests.support.wait import wait_until
from tests.unit.test_services import Store, s, web  # noqa: F401  (s is a fixture)

log = logging.getLogger("test")


def cluster_view(cfg=None) -> SimpleNamespace:
    return SimpleNamespace(read=lambda *a, **k: [], node_credentials=lambda: None, config=cfg, node_id="n1")


def node_config(tmp_path: Path, bmc: FakeBMC | None) -> config.Config:
    text = "node: {id: n1}\n"
    if bmc is not None:
        (tmp_path / "bmc-w1.yaml").write_text("username: fence\npassword: s3cret\n")
        text += (f"fence:\n  w1:\n    address: {bmc.address}\n    credentials_file: bmc-w1.yaml\n"
                 f"    ca_file: {bmc.ca}\n    power_timeout: 30\n")
    (tmp_path / "node.yaml").write_text(text)
    return config.load(tmp_path / "node.yaml")


def test_build_ports_constructs_the_ha_implementations(tmp_path):
    ports = build_ports(tmp_path, cluster_view(node_config(tmp_path, None)), log)
    assert isinstance(ports.volume_sync, RemoteVolumeSync)
    assert isinstance(ports.floating, LinuxFloatingAddress)
    assert ports.fence is None  # no fence section: nothing to call
    assert build_ports(tmp_path, None, log) == Ports()


def test_build_ports_fences_only_the_nodes_the_config_names(tmp_path):
    with FakeBMC(tmp_path, transition=0.2) as bmc:
        ports = build_ports(tmp_path, cluster_view(node_config(tmp_path, bmc)), log)
    assert isinstance(ports.fence, Fencing) and sorted(ports.fence.targets) == ["w1"]


def test_replicate_interval_is_checked_and_defaulted():
    assert spec.validate(web(volume=True))["replicate_interval"] == 30.0
    assert spec.validate(web(volume=True, replicate_interval=5))["replicate_interval"] == 5.0
    assert "replicate_interval" not in spec.validate(web())  # no volume: the spec is as it was
    with pytest.raises(spec.SpecError, match="applies to a service with a volume"):
        spec.validate(web(replicate_interval=5))
    with pytest.raises(spec.SpecError, match="between 1 and 86400"):
        spec.validate(web(volume=True, replicate_interval=0))


def test_the_lag_is_the_freshest_copy_on_another_node(s):  # noqa: F811
    s.apply("service.deploy", {"spec": web(volume=True)})
    report = {"name": "web", "epoch": 1, "state": "stopped", "healthy": False, "restarts": 0, "detail": "",
              "output": []}
    s.apply("service.report", {"node_id": "w1", "services": [{**report, "state": "running", "healthy": True}]},
            ts=1000.0)
    row = s.q("service.get", {"name": "web"})
    assert api.lag(row, now=1001.0) == {"lag_s": None, "lag_node": "", "sync": "not synced to another node yet"}
    s.apply("service.report", {"node_id": "w2", "services": [{**report, "sync_age": 4.0, "synced_from": "w1"}]},
            ts=1010.0)
    row = s.q("service.get", {"name": "web"})
    # 4 s old when reported, reported 6 s ago by the cluster's clock
    assert api.lag(row, now=1016.0) == {"lag_s": 10.0, "lag_node": "w2", "sync": "ok"}
    assert api.summary(row)["lag_node"] == "w2"
    s.apply("service.report", {"node_id": "w2", "services": [{**report, "sync_age": 30.0, "synced_from": "w1",
                                                              "sync_error": "pull from w1 failed: no route"}]},
            ts=1020.0)
    doc = api.lag(s.q("service.get", {"name": "web"}), now=1020.0)
    assert doc["lag_s"] == 30.0 and "no route" in doc["sync"]
    with pytest.raises(CommandError, match="sync_age"):
        s.apply("service.report", {"node_id": "w2", "services": [{**report, "sync_age": -1}]})
    with pytest.raises(CommandError, match="synced_from"):
        s.apply("service.report", {"node_id": "w2", "services": [{**report, "sync_age": 1, "synced_from": "../x"}]})


class RecordingAddress:
    """Records the supervisor's calls; the real LinuxFloatingAddress needs CAP_NET_ADMIN and a network
    namespace, and has its own tests (tests/system/test_vip.py)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []  # (call, address, service state at the time)
        self.probes: list[bool] = []  # each claim's probe flag
        self.inst = None

    def claim(self, cidr: str, interface: str | None = None, probe: bool = True) -> str:
        self.calls.append(("claim", cidr, self.inst.state if self.inst else ""))
        self.probes.append(probe)
        return "eth0"

    def release(self, cidr: str) -> None:
        self.calls.append(("release", cidr, ""))

    def interface_for(self, cidr: str) -> str | None:
        return "eth0"


def row_of(doc: dict, holder: str = "n1", epoch: int = 1) -> dict:
    return {"name": doc["name"], "epoch": epoch, "spec": spec.validate(doc), "restart_gen": 0, "holder": holder,
            "prev_holder": "", "prev_fenced": 0, "planned": 0, "home": "n1", "candidates": ["n2"], "reports": [],
            "state": "running"}


@pytest.mark.skipif(ShellExecutor(ExecutorSettings()).available() != "", reason="bubblewrap is not usable here")
@pytest.mark.parametrize("how", ["moved", "fenced"])
def test_the_vip_is_claimed_once_the_service_runs_and_released_when_it_stops(tmp_path, how):
    address = RecordingAddress()
    sup = Supervisor("n1", tmp_path, Ports(floating=address), ExecutorSettings(), log)
    doc = {"name": "web", "kind": "shell", "command": "sleep 600", "vip": "192.168.7.50/24",
           "placement": {"home": "n1", "partner": "n2"}}
    sup.reconcile([row_of(doc)], lambda row: "")
    address.inst = sup.instances["web"]
    try:
        wait_until(lambda: address.calls, 60, "the address claimed")
        assert address.calls == [("claim", "192.168.7.50/24", "running")]  # not before the service runs
        assert "claimed 192.168.7.50/24 on eth0" in sup.report([row_of(doc)])[0]["detail"]
    finally:
        if how == "moved":
            sup.reconcile([row_of(doc, holder="n2", epoch=2)], lambda row: "")
        else:
            sup.fence("self-fenced: no committed lease renewal")
    assert address.calls[-1] == ("release", "192.168.7.50/24", "")
    assert [c[0] for c in address.calls].count("claim") == 1
    assert address.probes == [True]  # a first start asks whether another machine answers for the address


@pytest.mark.skipif(ShellExecutor(ExecutorSettings()).available() != "", reason="bubblewrap is not usable here")
def test_an_unplanned_takeover_claims_the_vip_without_probing_for_the_fenced_holder(tmp_path):
    """The previous holder's lease ran out, so its service stopped; its address may still be on its machine
    (an agent killed with -9 cannot release it), and a probe would find it and refuse the claim forever."""
    address = RecordingAddress()
    sup = Supervisor("n2", tmp_path, Ports(floating=address), ExecutorSettings(), log)
    doc = {"name": "web", "kind": "shell", "command": "sleep 600", "vip": "192.168.7.50/24",
           "placement": {"home": "n1", "partner": "n2"}}
    row = {**row_of(doc, holder="n2", epoch=2), "prev_holder": "n1", "prev_fenced": 1}
    sup.reconcile([row], lambda row: "")
    try:
        wait_until(lambda: address.calls, 60, "the address claimed")
        assert address.probes == [False]
    finally:
        sup.stop_all()


def test_a_restarted_agent_removes_the_vip_of_a_service_it_no_longer_runs_once(tmp_path):
    """An earlier life of this agent, killed with -9, may have left the address on this machine while the
    service moved on: the new agent removes it once (not at every round), where it could have claimed it."""
    doc = {"name": "web", "kind": "shell", "command": "sleep 600", "vip": "192.168.7.50/24",
           "placement": {"home": "n1", "partner": "n2"}}
    moved = {**row_of(doc, holder="n2", epoch=2), "prev_holder": "n1", "prev_fenced": 1}
    address = RecordingAddress()
    home = Supervisor("n1", tmp_path, Ports(floating=address), ExecutorSettings(), log)
    for _ in range(3):
        home.reconcile([moved], lambda row: "")
    assert address.calls == [("release", "192.168.7.50/24", "")]
    assert home.instances == {}
    bystander = RecordingAddress()
    Supervisor("n3", tmp_path, Ports(floating=bystander), ExecutorSettings(), log).reconcile([moved], lambda row: "")
    assert bystander.calls == []  # named nowhere in the service: it never claimed the address


class Recorder:
    """The cluster the leader loop proposes to: records each move with the BMC's power state at that moment."""

    def __init__(self, bmc: FakeBMC):
        self.bmc, self.moves = bmc, []
        self.node_id = "n1"

    def propose(self, command_type: str, args: dict) -> dict:
        self.moves.append((args, self.bmc.state()))
        return {"moved": True, "epoch": args["epoch"] + 1, "from": "w1"}

    def write(self, *a, **k) -> dict:  # the takeover message
        return {}


def test_unplanned_takeover_powers_the_silent_holder_off_first(tmp_path, monkeypatch):
    view = {"services": [{"name": "web", "holder": "w1", "home": "w1", "epoch": 3}]}
    takeover = lease.Move("web", 3, "w2", "taken_over", "w1 lost its lease", fenced=True)
    planned = lease.Move("web", 3, "w2", "taken_over", "w1 is drained", planned=True)
    with FakeBMC(tmp_path, transition=0.3) as bmc:
        ports = build_ports(tmp_path, cluster_view(node_config(tmp_path, bmc)), log)
        assert fence_target(takeover, view, ports) == "w1"
        assert fence_target(planned, view, ports) == ""  # a planned move stops the service itself
        assert fence_target(lease.Move("web", 3, "w2", "taken_over", "x", fenced=True),
                            {"services": [{"name": "web", "holder": "w3"}]}, ports) == ""  # no fence section for w3
        plugin = ServicesPlugin.__new__(ServicesPlugin)
        plugin.ports, recorder = ports, Recorder(bmc)
        plugin.ctx = SimpleNamespace(cluster=recorder, log=log, options={})
        plugin._notify = lambda move, result: None
        args, power = _step(plugin, takeover, view, recorder, monkeypatch)
    assert power == "Off"  # the holder was off before the move was proposed
    assert args["fenced"] and "w1 powered off by its fence agent" in args["reason"]


def _step(plugin, move, view, recorder, monkeypatch):
    """leader_step with decide() answering `move` (decide() itself is tested in test_services.py)."""
    monkeypatch.setattr(lease, "decide", lambda *a, **k: [move])
    plugin._read_leader_view = lambda: {**view, "liveness": {}}
    plugin.book, plugin._book_fresh, plugin._first_seen = lease.LeaseBook(8, 2), True, {}
    plugin.leader_step()
    return recorder.moves[0]


def test_a_fence_agent_that_fails_does_not_hold_the_takeover_up(tmp_path, monkeypatch):
    view = {"services": [{"name": "web", "holder": "w1", "home": "w1", "epoch": 3}]}
    takeover = lease.Move("web", 3, "w2", "taken_over", "w1 lost its lease", fenced=True)
    with FakeBMC(tmp_path, transition=0.3) as bmc:
        ports = build_ports(tmp_path, cluster_view(node_config(tmp_path, bmc)), log)
    # the BMC is gone now: powering off fails, the lease alone fenced the node, the move goes ahead
    plugin = ServicesPlugin.__new__(ServicesPlugin)
    recorder = Recorder(SimpleNamespace(state=lambda: "unknown"))
    plugin.ports, plugin.ctx = ports, SimpleNamespace(cluster=recorder, log=log, options={})
    plugin._notify = lambda move, result: None
    args, _ = _step(plugin, takeover, view, recorder, monkeypatch)
    assert "powering w1 off failed" in args["reason"] and "its lease alone fenced it" in args["reason"]


def test_a_giveback_waits_for_the_home_to_catch_up_and_a_failed_pull_keeps_it_on_the_partner(s):  # noqa: F811
    for node in ("w1", "w2"):  # both can pull volumes
        s.apply("service.report", {"node_id": node, "caps": {"kinds": ["shell"], "volume_sync": True}, "services": []})
    s.apply("service.deploy", {"spec": web(volume=True)})
    s.apply("service.move", {"name": "web", "epoch": 1, "holder": "w2", "state": "taken_over", "fenced": True},
            ts=1000.0)
    s.apply("service.giveback", {"node": "w1"}, ts=1100.0)  # epoch 3, moved at 1100 by the leader's clock
    base = {"name": "web", "epoch": 3, "healthy": False, "restarts": 0, "detail": "", "output": []}
    s.apply("service.report", {"node_id": "w2", "services": [{**base, "state": "running", "healthy": True}]},
            ts=1101.0)
    # the home's copy predates the move: not caught up, and nothing failed
    s.apply("service.report", {"node_id": "w1", "services": [{**base, "state": "waiting", "sync_age": 20.0,
                                                              "synced_from": "w2"}]}, ts=1102.0)
    row = s.q("service.get", {"name": "web"})
    assert lease.catch_up(row) == (False, "")
    book, seen = lease.LeaseBook(), {}
    book.start(["n1", "w1", "w2"], now=0.0)
    assert lease.decide(s.q("service.leader"), book, 1.0, seen) == []
    # pulled after the move: caught up (the partner may stop now)
    s.apply("service.report", {"node_id": "w1", "services": [{**base, "state": "waiting", "sync_age": 0.5,
                                                              "synced_from": "w2"}]}, ts=1103.0)
    assert lease.catch_up(s.q("service.get", {"name": "web"})) == (True, "")
    # the home's pull failed: the service stays with the partner, and the reason says why
    s.apply("service.report", {"node_id": "w1", "services": [{**base, "state": "waiting", "sync_age": 20.0,
                                                              "synced_from": "w2",
                                                              "sync_error": "pull from w2 failed: disk full"}]},
            ts=1104.0)
    moves = lease.decide(s.q("service.leader"), book, 2.0, seen)
    assert [(m.holder, m.state, m.planned) for m in moves] == [("w2", "taken_over", True)]
    assert "w1 could not pull the volume from w2 (pull from w2 failed: disk full)" in moves[0].reason
