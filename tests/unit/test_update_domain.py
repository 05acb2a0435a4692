"""The `update` domain on a real StateStore (SQLite), as properties: leaders that act on stale views, repeated
and reordered proposals, a store reopened from disk mid-rollout (a restart), failures at any step. The
replicated rollout only ever moves forward, one node at a time, in plan order, and a new leader that reads
the store continues it to the end."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.core.commands import Envelope, is_internal, validate
from cortex.core.state import StateStore
from cortex.update import rollout

NODES = [("w1", "worker"), ("w2", "worker"), ("n2", "server"), ("n3", "server"), ("n1", "server")]
FLOW = rollout.STEP_FLOW


class Log:
    """A StateStore fed like Raft feeds it: consecutive indexes, envelopes stamped by 'the leader'."""

    def __init__(self, path: Path):
        self.path, self.index, self.store = path, 0, StateStore(path)

    def apply(self, command_type: str, args: dict, idem: str) -> dict:
        self.index += 1
        env = Envelope(type=command_type, args=validate(command_type, args), id=f"id{self.index:06d}",
                       ts=1000.0 + self.index, term=1, idem=idem)
        return self.store.apply(self.index, env.encode())

    def reopen(self) -> None:
        self.store.close()
        self.store = StateStore(self.path)
        self.index = self.store.last_applied

    def current(self) -> dict:
        return self.store.query("update.current", {})


def proposal(view: dict) -> tuple[str, str] | None:
    """What a driver with this (possibly stale) view proposes next."""
    r = rollout.Rollout(view["id"], view["version"], tuple(rollout.Step(**s) for s in view["steps"]), view["state"])
    step = rollout.next_step(r)
    if step is None or view["state"] != "running":
        return None
    return step.node_id, FLOW[FLOW.index(step.state) + 1]


def check(doc: dict, before: dict) -> None:
    states = [s["state"] for s in doc["steps"]]
    assert sum(s in rollout.ACTIVE for s in states) <= 1
    for old, new in zip(before["steps"], doc["steps"]):
        if old["state"] in FLOW and new["state"] in FLOW:
            assert FLOW.index(new["state"]) >= FLOW.index(old["state"]), (old, new)  # never backwards
        if old["state"] in ("done", "failed", "skipped"):
            assert new["state"] == old["state"]
    # plan order: nothing after a node that is not finished has started
    moving = [i for i, s in enumerate(states) if s not in ("pending", "skipped")]
    for i in moving:
        assert all(s in ("done", "skipped") for s in states[:i]), states
    if before["state"] == "halted":
        assert doc["state"] == "halted" and states == [s["state"] for s in before["steps"]]


actions = st.lists(st.one_of(
    st.tuples(st.just("drive"), st.integers(0, 1)),   # leader 0 or 1 proposes from its own view
    st.tuples(st.just("refresh"), st.integers(0, 1)),  # that leader reads the store again
    st.tuples(st.just("repeat"), st.integers(0, 1)),   # it sends its last proposal again (a retry)
    st.tuples(st.just("restart"), st.just(0)),          # the store is closed and opened again
    st.tuples(st.just("fail"), st.just(0)),             # the active node reports a failure
), max_size=60)


@settings(max_examples=40, deadline=None)
@given(actions, st.booleans())
def test_rollout_in_the_store_moves_forward_only_and_a_new_leader_finishes_it(tmp_path_factory, steps, skip_w2):
    log = Log(tmp_path_factory.mktemp("upd") / "state.db")
    plan = [{"node_id": n, "role": r, "from_version": "1.0", "state": "skipped" if skip_w2 and n == "w2"
             else "pending", "reason": "not an appliance" if skip_w2 and n == "w2" else ""} for n, r in NODES]
    started = log.apply("update.start", {"version": "2.0", "source": "http://h/stable", "steps": plan}, "start")
    assert started["state"] == "checking"  # no node moves before the leader's own pre-flight
    first = plan[0]["node_id"]
    assert log.apply("update.advance", {"rollout_id": started["id"], "node_id": first, "state": "draining"},
                     "early")["error"].startswith("refused")
    assert log.apply("update.checked", {"rollout_id": started["id"], "problems": []}, "checked")["state"] == "running"
    assert "error" in log.apply("update.checked", {"rollout_id": started["id"], "problems": ["late"]}, "again")
    views = [log.current(), log.current()]
    last: list[tuple[str, str] | None] = [None, None]
    failed = False
    for action, who in steps:
        before = log.current()
        if action == "refresh":
            views[who] = log.current()
        elif action in ("drive", "repeat"):
            move = proposal(views[who]) if action == "drive" else last[who]
            if move:
                last[who] = move
                result = log.apply("update.advance", {"rollout_id": before["id"], "node_id": move[0],
                                                      "state": move[1]}, f"advance:{move[0]}:{move[1]}")
                if "error" not in result and not result.get("duplicate"):
                    views[who] = log.current()  # a leader learns the outcome of its own proposal
        elif action == "restart":
            log.reopen()
        elif action == "fail":
            active = [s for s in before["steps"] if s["state"] in rollout.ACTIVE]
            if active:
                log.apply("update.advance", {"rollout_id": before["id"], "node_id": active[0]["node_id"],
                                             "state": "failed", "reason": "boom"}, "fail")
                failed = True
        check(log.current(), before)
    # a new leader reads the store and drives to the end
    for _ in range(40):
        view = log.current()
        move = proposal(view)
        if move is None:
            break
        log.apply("update.advance", {"rollout_id": view["id"], "node_id": move[0], "state": move[1]},
                  f"final:{move[0]}:{move[1]}")
    end = log.current()
    if failed:
        assert end["state"] == "halted" and end["reason"].endswith("boom")
        assert [s["state"] for s in end["steps"]].count("failed") == 1
    else:
        assert end["state"] == "done"
        assert all(s["state"] in ("done", "skipped") for s in end["steps"])
    log.store.close()


def test_a_second_rollout_waits_for_the_first_and_only_the_latest_rolls_back(tmp_path: Path):
    log = Log(tmp_path / "s.db")
    steps = [{"node_id": "w1", "role": "worker", "from_version": "1.0", "state": "pending", "reason": ""}]
    first = log.apply("update.start", {"version": "2.0", "source": "http://h/s", "steps": steps}, "a")
    assert "in progress" in log.apply("update.start", {"version": "3.0", "source": "http://h/s", "steps": steps},
                                      "b")["error"]
    log.apply("update.checked", {"rollout_id": first["id"], "problems": []}, "a-checked")
    for state in FLOW[1:]:
        assert "error" not in log.apply("update.advance", {"rollout_id": first["id"], "node_id": "w1",
                                                           "state": state}, f"w1:{state}")
    second = log.apply("update.start", {"version": "3.0", "source": "http://h/s",
                                        "steps": [{**steps[0], "from_version": "2.0"}]}, "c")
    assert second["state"] == "checking"
    assert "only the latest" in log.apply("update.rollback", {"rollout_id": first["id"]}, "r1")["error"]
    assert "being updated" not in str(log.apply("update.rollback", {}, "r2"))  # pending: nothing active
    assert log.current()["state"] == "rolled_back"  # nobody was updated by the second one
    assert log.apply("update.advance", {"rollout_id": second["id"], "node_id": "w1", "state": "draining"},
                     "late")["error"].startswith("refused")
    log.store.close()


def test_the_leaders_preflight_verdict_gates_a_raw_start(tmp_path: Path):
    """update.start written by any path (a raw Write, not the tool) waits for the leader's own pre-flight;
    a refusal halts it before any node moves, and only the leader may record the verdict."""
    log = Log(tmp_path / "s.db")
    steps = [{"node_id": n, "role": r, "from_version": "1.0", "state": "pending", "reason": ""} for n, r in NODES]
    start = log.apply("update.start", {"version": "2.0", "source": "http://h/s", "steps": steps}, "raw")
    assert is_internal("update.checked") and not is_internal("update.start")
    halted = log.apply("update.checked", {"rollout_id": start["id"],
                                          "problems": ["release 2.0: signature does not verify"]}, "verdict")
    assert halted["state"] == "halted" and "no node was touched" in halted["reason"]
    assert "signature does not verify" in log.current()["reason"]
    assert [s["state"] for s in log.current()["steps"]] == ["pending"] * len(NODES)
    assert log.apply("update.start", {"version": "2.0", "source": "http://h/s", "steps": steps,
                                      "allow_downgrade": True}, "retry")["state"] == "checking"
    assert log.current()["allow_downgrade"] is True
    log.store.close()


def test_rollback_drains_each_updated_node_again_newest_first(tmp_path: Path):
    log = Log(tmp_path / "s.db")
    steps = [{"node_id": n, "role": r, "from_version": "1.0", "state": "pending", "reason": ""} for n, r in NODES]
    rid = log.apply("update.start", {"version": "2.0", "source": "http://h/s", "steps": steps}, "s")["id"]
    log.apply("update.checked", {"rollout_id": rid, "problems": []}, "c")
    for node in ("w1", "w2"):  # two nodes updated, then the third fails
        for state in FLOW[1:]:
            assert "error" not in log.apply("update.advance", {"rollout_id": rid, "node_id": node, "state": state},
                                            f"{node}:{state}")
    log.apply("update.advance", {"rollout_id": rid, "node_id": "n2", "state": "draining"}, "n2:d")
    log.apply("update.advance", {"rollout_id": rid, "node_id": "n2", "state": "failed", "reason": "x"}, "n2:f")
    assert log.apply("update.rollback", {}, "rb")["state"] == "rolling_back"

    def move(node: str, state: str) -> dict:
        return log.apply("update.advance", {"rollout_id": rid, "node_id": node, "state": state}, f"b{log.index}")

    assert "error" in move("w1", "draining")  # newest first: w2 before w1
    assert "error" in move("w2", "reverting")  # drained before it switches slots
    for state in ("draining", "reverting", "rolled_back"):
        assert "error" not in move("w2", state), state
    assert log.current()["state"] == "rolling_back"
    assert "error" not in move("w1", "draining")
    assert "error" not in move("w1", "rolled_back")  # already back on 1.0 (fell back or reverted by hand)
    end = log.current()
    assert end["state"] == "rolled_back"
    assert [s["state"] for s in end["steps"]] == ["rolled_back", "rolled_back", "failed", "pending", "pending"]
    log.store.close()
