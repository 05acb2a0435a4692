"""The leader's judgement of replica convergence (raft/convergence.py), fed by hand with times and indexes."""

from __future__ import annotations

import pytest

from cortex.builtin import alerts
from cortex.raft.convergence import PROGRESSING, STUCK, ConvergenceTracker, Transition


def feed(tracker: ConvergenceTracker, server: str, points: list[tuple[float, int, int]]) -> list[Transition]:
    """Observations (time, commit index, match index); the transitions they caused."""
    return [t for now, commit, match in points if (t := tracker.observe(server, now, commit, match)) is not None]


def test_a_follower_catching_up_is_never_stuck():
    tracker = ConvergenceTracker(window=10.0)
    # far behind, but every second its lag shrinks while the leader keeps committing
    points = [(float(s), 10_000 + 10 * s, 100 * s) for s in range(0, 60)]
    assert feed(tracker, "n2", points) == []
    assert tracker.state("n2") == PROGRESSING and tracker.stuck_for("n2", 60.0) == 0.0


def test_a_busy_follower_whose_lag_hovers_is_not_stuck():
    tracker = ConvergenceTracker(window=10.0)
    # lag 2, 3, 2, 3 ... under constant load: it never sets a new low, but it passes where the leader was
    points = [(s / 2, 1000 + 5 * s, 1000 + 5 * s - (2 + s % 2)) for s in range(0, 120)]
    assert feed(tracker, "n2", points) == []


def test_a_flat_lag_while_commits_continue_is_stuck_after_the_window():
    tracker = ConvergenceTracker(window=10.0)
    transitions = feed(tracker, "n3", [(float(s), 500 + s, 500 + s - 40) for s in range(0, 10)])
    assert transitions == [] and tracker.state("n3") == PROGRESSING
    assert feed(tracker, "n3", [(10.0, 510, 470)]) == [Transition("n3", PROGRESSING, STUCK, 40)]
    assert tracker.stuck_for("n3", 12.0) == 12.0
    assert feed(tracker, "n3", [(11.0, 511, 471)]) == []  # the lag is unchanged: still stuck, said once
    # a constant 40 entries behind: passing where the leader was does not clear it, a shrinking lag does
    assert feed(tracker, "n3", [(float(s), 500 + s, 500 + s - 40) for s in range(12, 60)]) == []
    assert feed(tracker, "n3", [(60.0, 560, 530)]) == [Transition("n3", STUCK, PROGRESSING, 30)]


def test_a_growing_lag_is_stuck_and_clears_when_it_catches_up():
    tracker = ConvergenceTracker(window=10.0)
    # the whole log behind, the leader streaming, the match index never moving (the partition that healed)
    assert feed(tracker, "n3", [(float(s), 800 + 3 * s, 0) for s in range(0, 10)]) == []
    assert feed(tracker, "n3", [(10.0, 830, 0)]) == [Transition("n3", PROGRESSING, STUCK, 830)]
    assert feed(tracker, "n3", [(40.0, 920, 0)]) == []
    assert feed(tracker, "n3", [(41.0, 921, 921)]) == [Transition("n3", STUCK, PROGRESSING, 0)]
    assert tracker.stuck_for("n3", 50.0) == 0.0


def test_an_idle_cluster_is_never_stuck():
    tracker = ConvergenceTracker(window=10.0)
    assert feed(tracker, "n2", [(float(s), 42, 42) for s in range(0, 300, 7)]) == []
    # behind with nothing being committed: nothing to judge progress against (liveness covers a dead peer)
    assert feed(tracker, "n3", [(float(s), 42, 30) for s in range(0, 300, 7)]) == []
    assert tracker.state("n2") == tracker.state("n3") == PROGRESSING


def test_reset_and_retain_forget():
    tracker = ConvergenceTracker(window=1.0)
    feed(tracker, "n2", [(0.0, 10, 0), (2.0, 20, 0)])
    feed(tracker, "n3", [(0.0, 10, 0), (2.0, 20, 0)])
    assert tracker.state("n2") == STUCK
    tracker.retain({"n3"})
    assert tracker.state("n2") is None and tracker.state("n3") == STUCK
    tracker.reset()
    assert tracker.state("n3") is None
    assert feed(tracker, "n3", [(3.0, 30, 0)]) == []  # a new term judges afresh
    with pytest.raises(ValueError, match="window must be > 0"):
        ConvergenceTracker(window=0)


def test_a_stuck_server_raises_an_alert_and_a_converging_one_does_not():
    status = {"state": "leader", "has_quorum": True, "leader_id": "n1",
              "nodes": [{"id": "n1", "role": "server", "liveness": "alive", "replication_lag": 0},
                        {"id": "n2", "role": "server", "liveness": "alive", "replication_lag": 12,
                         "replication": "stuck", "stuck_for": 31.5},
                        {"id": "n3", "role": "server", "liveness": "alive", "replication_lag": 3,
                         "replication": "progressing"}]}
    found = alerts.active_alerts(status, [], "n1")
    assert [a["key"] for a in found] == ["node.stuck:n2"]
    assert found[0]["severity"] == "critical" and "12 entries behind" in found[0]["message"]
    status["nodes"][1]["replication"] = "progressing"
    assert alerts.active_alerts(status, [], "n1") == []
