"""Waking from sleep, without servers: which notices count as a new wake, and what a wake resets."""

from __future__ import annotations

import time
from pathlib import Path

from cortex.config import Config
from cortex.core.events import EventBus
from cortex.membership.identity import Identity
from cortex.node.member import Member
from cortex.node.wake import RESUME_RETRY, RESUME_RETRY_FOR, Wake


class CountingPeers:
    """Counts the resets of the real Peers it wraps (a reset is what a wake does to connections)."""

    def __init__(self, peers):
        self.peers, self.resets = peers, 0

    def reset(self) -> None:
        self.resets += 1
        self.peers.reset()


def a_wake(tmp_path: Path) -> tuple[Wake, CountingPeers]:
    member = Member(Config(node_id="w1", role="worker", data_dir=tmp_path / "data"), EventBus())
    member.peers = counting = CountingPeers(member.peers)
    return Wake(member), counting


def test_a_wake_noticed_twice_is_handled_once(tmp_path: Path):
    wake, peers = a_wake(tmp_path)
    wake.resume("clock jump", slept=42.0)
    assert wake.now.is_set()  # the background loop runs a round at once
    wake.handle()
    assert peers.resets == 1
    wake.resume("logind")  # the same wake, told again: its fresh connections stay
    wake.handle()
    assert peers.resets == 1
    wake.resume("clock jump", slept=5.0)  # a wake that measured a sleep of its own is a new one
    wake.handle()
    assert peers.resets == 2
    wake.handle()  # nothing reported since
    assert peers.resets == 2


def test_two_reports_before_a_round_keep_the_longest_sleep(tmp_path: Path):
    wake, peers = a_wake(tmp_path)
    wake.resume("clock jump", slept=42.0)
    wake.resume("logind")  # arrives before the loop took the first report: the sleep it measured counts
    wake.handle()
    assert peers.resets == 1
    wake.resume("SIGUSR1")
    wake.handle()
    assert peers.resets == 1


def test_a_worker_hurries_its_heartbeats_until_a_server_answers(tmp_path: Path):
    wake, _ = a_wake(tmp_path)
    wake.resume("clock jump", slept=42.0)
    wake.handle()
    assert wake.resumed_at is None and wake.next_round_in(1.0) == 1.0  # outside a cluster: no heartbeats
    wake.member.server_addresses = ["127.0.0.1:7400"]
    wake.member.publish(Identity(cluster_id="c", node_id="w1", role="worker",
                                 server_grpc_addresses=["127.0.0.1:7400"]))
    wake.resume("clock jump", slept=42.0)
    wake.handle()
    assert wake.next_round_in(1.0) == RESUME_RETRY
    wake.servers_unreachable()  # not long enough yet: keep hurrying
    assert wake.next_round_in(1.0) == RESUME_RETRY
    wake.servers_answered()
    assert wake.resumed_at is None and wake.next_round_in(1.0) == 1.0
    wake.resumed_at = time.monotonic() - RESUME_RETRY_FOR - 1
    wake.servers_unreachable()  # out of reach for too long: back to one heartbeat a round
    assert wake.resumed_at is None
