"""Group commit (raft/commit.py) over a real one-server RaftNode: the calling threads propose themselves, join
what arrives meanwhile into one entry, and every caller gets its own outcomes in order."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cortex.config import RaftConfig
from cortex.core.state import StateStore
from cortex.raft.commit import GroupCommitter
from cortex.raft.consensus import RaftNode
from cortex.raft.errors import ProposalError
from tests.support.cluster import free_base_port
from tests.support.envelopes import env
from tests.support.wait import wait_until


@pytest.fixture(scope="module")
def leader(tmp_path_factory):
    data_dir: Path = tmp_path_factory.mktemp("raft")
    me = f"127.0.0.1:{free_base_port(width=1)}"
    store = StateStore(data_dir / "state.db")
    node = RaftNode(store, me, [me], RaftConfig(), "secret", data_dir)
    wait_until(node.is_leader, 60, "the one server elects itself", interval=0.05)
    yield node
    node.destroy()
    store.close()


def _put(node: RaftNode, key: str, value: str) -> bytes:
    return env("kv.put", {"key": key, "value": value}, term=node.term())


def test_concurrent_callers_are_joined_into_fewer_entries_each_answered_in_order(leader):
    committer = GroupCommitter(leader)
    callers, per_caller = 24, 5
    start = threading.Barrier(callers)
    answers: dict[int, list] = {}

    def caller(i: int) -> None:
        start.wait()
        answers[i] = committer.submit([_put(leader, f"gc/{i}", str(n)) for n in range(per_caller)], timeout=30)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(answers) == list(range(callers))
    for i, outcomes in answers.items():
        assert all(not isinstance(o, ProposalError) for o in outcomes), outcomes
        indexes = [index for _, index in outcomes]
        assert indexes == sorted(indexes)  # one caller's envelopes keep their order in the log
        assert leader.store.query("kv.get", {"key": f"gc/{i}"})["value"] == str(per_caller - 1)
    assert committer.rounds < callers  # joined: fewer entries than callers, let alone envelopes
    assert committer._leading == 0 and not committer._pending  # every caller gave its role back


def test_a_lone_proposal_goes_out_as_it_is_and_close_refuses_what_comes_after(leader):
    committer = GroupCommitter(leader)
    result, index = committer.propose(_put(leader, "gc/lone", "x"), timeout=30)
    assert "error" not in result and index == leader.store.last_applied and committer.rounds == 1
    committer.close()
    with pytest.raises(ProposalError) as refused:
        committer.propose(_put(leader, "gc/late", "x"), timeout=30)
    assert not refused.value.maybe_applied and "retry" in str(refused.value)
    assert leader.store.query("kv.get", {"key": "gc/late"}) is None
