"""State-machine levels: a command type only some replicas know is never proposed, and a server that could not
apply the log is never added (node/levels.py, core/domain.py). The leader's asks are fed in as functions; the
wire part (Status and JoinRequest carry the level) is covered by tests/cluster/test_agent.py."""

from __future__ import annotations

import pytest

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex.core import domain
from cortex.node.levels import RECHECK_EVERY, RETRY_EVERY, LevelBook, ServerLevels


def test_every_command_added_after_levels_carries_a_level_this_build_has():
    levels = {name: c.level for name, c in domain.commands().items()}
    assert domain.level() == max(levels.values()) >= 1
    assert levels["node.expire_requests"] >= 1
    assert levels["kv.put"] == 0 and domain.level_of("kv.put") == 0
    assert domain.level_of("no.such.command") == 0


def test_book_knows_who_is_behind_and_the_level_all_run():
    book = LevelBook("n1", 2)
    assert book.behind(["n1", "n2", "n3"], 1) == [("n2", None), ("n3", None)]
    assert book.cluster_level(["n1", "n2"]) == 0  # not heard from: as if it ran no level at all
    book.observe("n2", 2, now=1.0)
    book.observe("n3", 1, now=1.0)
    assert book.behind(["n1", "n2", "n3"], 2) == [("n3", 1)]
    assert book.behind(["n1", "n2", "n3"], 1) == []
    assert book.cluster_level(["n1", "n2", "n3"]) == 1
    assert book.cluster_level([]) == 2
    book.retain(["n2"])
    assert book.level("n3") is None and book.level("n1") == 2


def test_book_asks_unknown_servers_often_and_known_ones_now_and_then():
    book = LevelBook("n1", 1)
    assert book.due("n2", 0.0)
    book.asked("n2", 0.0)
    assert not book.due("n2", RETRY_EVERY / 2) and book.due("n2", RETRY_EVERY)
    book.asked("n2", 10.0)
    book.observe("n2", 1, 10.0)
    assert not book.due("n2", 10.0 + RETRY_EVERY) and book.due("n2", 10.0 + RECHECK_EVERY)


class Servers:
    """What the leader's replica and its peers would say: rows of the nodes table and each one's Status."""

    def __init__(self, levels: dict[str, int | None]):
        self.levels = levels
        self.leader = True
        self.asked: list[str] = []

    def rows(self) -> list[dict]:
        return [{"id": n, "grpc_address": f"{n}:7400", "role": "server"} for n in self.levels]

    def ask(self, address: str) -> pb.StatusResponse:
        node = address.split(":")[0]
        self.asked.append(node)
        level = self.levels[node]
        if level is None:
            raise ConnectionError(f"{address} does not answer")
        return pb.StatusResponse(node_id=node, state_machine_level=level)  # an older version leaves it 0


@pytest.fixture
def clock():
    now = [100.0]
    return now


def make(servers: Servers, clock) -> ServerLevels:
    return ServerLevels("n1", servers.rows, servers.ask, lambda: servers.leader, clock=lambda: clock[0])


def test_gate_holds_new_commands_until_every_server_runs_their_level(clock):
    servers = Servers({"n1": domain.level(), "n2": 0, "n3": None})
    levels = make(servers, clock)
    assert levels.gate("kv.put") == ""  # level 0: never gated
    why = levels.gate("node.expire_requests")
    assert "n2 (level not known yet)" in why and "n3 (level not known yet)" in why and "n1" not in why
    levels.step()
    assert sorted(servers.asked) == ["n2", "n3"]
    why = levels.gate("node.expire_requests")
    assert "n2 (level 0)" in why and "n3 (level not known yet)" in why and "cortex update status" in why
    assert levels.cluster_level() == 0

    # the rolling update reaches n2, n3 comes back: the leader learns it on its next asks
    servers.levels.update(n2=domain.level(), n3=domain.level())
    clock[0] += RETRY_EVERY
    levels.step()  # n3 (unknown) is asked again soon; n2 (known, behind) only after RECHECK_EVERY
    assert "n2 (level 0)" in levels.gate("node.expire_requests")
    clock[0] += RECHECK_EVERY
    levels.step()
    assert levels.gate("node.expire_requests") == ""
    assert levels.cluster_level() == domain.level()


def test_only_the_leader_asks(clock):
    servers = Servers({"n1": domain.level(), "n2": domain.level()})
    servers.leader = False
    levels = make(servers, clock)
    levels.step()
    assert servers.asked == []
