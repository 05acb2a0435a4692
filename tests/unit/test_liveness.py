"""The liveness state machine, fed with explicit times (no clocks, no sleeps)."""

import pytest

from cortex.membership.liveness import LivenessTracker, Transition


def test_silence_makes_a_node_suspect_then_offline_and_a_heartbeat_brings_it_back():
    t = LivenessTracker(suspect_after=3, offline_after=10)
    t.start({"w1": "alive", "w2": "alive"}, now=100)
    t.heard("w2", 102)
    assert t.evaluate(102.9) == []
    assert t.evaluate(103) == [Transition("w1", "alive", "suspect")]
    t.apply(Transition("w1", "alive", "suspect"))
    assert t.evaluate(105.5) == [Transition("w2", "alive", "suspect")]
    assert Transition("w1", "suspect", "offline") in t.evaluate(110)
    t.apply(Transition("w1", "suspect", "offline"))
    t.heard("w1", 111)
    assert Transition("w1", "offline", "alive") in t.evaluate(111)


def test_a_new_leader_gives_everyone_a_full_grace_period():
    t = LivenessTracker(3, 10)
    t.start({"w1": "offline", "n2": "alive"}, now=50)
    # it has heard no one yet, which proves nothing: no node turns suspect before suspect_after
    assert t.evaluate(52) == [Transition("w1", "offline", "alive")]
    assert t.evaluate(53) == [Transition("n2", "alive", "suspect"), Transition("w1", "offline", "suspect")]


def test_forgotten_and_unknown_nodes_are_ignored_and_bad_timeouts_refused():
    t = LivenessTracker(1, 2)
    t.start({"w1": "alive"}, now=0)
    t.heard("ghost", 1)
    t.forget("w1")
    assert t.evaluate(100) == []
    t.track("w2", "alive", now=100)
    assert t.evaluate(101) == [Transition("w2", "alive", "suspect")]
    with pytest.raises(ValueError):
        LivenessTracker(5, 5)


def test_event_bus_delivers_by_pattern_and_survives_a_failing_subscriber():
    from cortex.core.events import Event, EventBus

    bus = EventBus()
    seen = []
    bus.subscribe("node.*", lambda e: 1 / 0)
    unsubscribe = bus.subscribe("node.*", seen.append)
    bus.subscribe("leader.changed", seen.append)
    bus.publish(Event("node.offline", {"node_id": "w1"}))
    bus.publish(Event("task.done"))
    unsubscribe()
    bus.publish(Event("node.alive", {"node_id": "w1"}))
    bus.publish(Event("leader.changed"))
    assert [e.type for e in seen] == ["node.offline", "leader.changed"]
    assert [e.type for e in bus.recent("node.*")] == ["node.offline", "node.alive"]
