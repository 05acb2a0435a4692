"""Tests for the WGL linearizability checker (tests.support.linearizability)."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from tests.support.linearizability import (
    CAS,
    DELETE,
    FAIL,
    INFO,
    OK,
    READ,
    WRITE,
    HistoryRecorder,
    Operation,
    SearchBudgetExceeded,
    check,
    check_key,
)

# --------------------------------------------------------------------------
# Helpers for hand-written histories
# --------------------------------------------------------------------------


def w(client: int, key: str, value: Any, t0: float, t1: float, status: str = OK) -> Operation:
    return Operation(client=client, kind=WRITE, key=key, invoke=t0, complete=t1, status=status, value=value)


def r(client: int, key: str, result: Any, t0: float, t1: float, status: str = OK) -> Operation:
    return Operation(client=client, kind=READ, key=key, invoke=t0, complete=t1, status=status, result=result)


def cas(
    client: int,
    key: str,
    expected: Any,
    new: Any,
    result: bool | None,
    t0: float,
    t1: float,
    status: str = OK,
) -> Operation:
    return Operation(
        client=client,
        kind=CAS,
        key=key,
        invoke=t0,
        complete=t1,
        status=status,
        expected=expected,
        new=new,
        result=result,
    )


def d(client: int, key: str, t0: float, t1: float, status: str = OK) -> Operation:
    return Operation(client=client, kind=DELETE, key=key, invoke=t0, complete=t1, status=status)


# --------------------------------------------------------------------------
# Basic semantics
# --------------------------------------------------------------------------


def test_empty_history_is_linearizable() -> None:
    assert check([]).ok


def test_sequential_history_is_linearizable() -> None:
    h = [
        r(0, "x", None, 0, 1),
        w(0, "x", 1, 2, 3),
        r(1, "x", 1, 4, 5),
        w(1, "x", 2, 6, 7),
        r(0, "x", 2, 8, 9),
        d(0, "x", 10, 11),
        r(1, "x", None, 12, 13),
    ]
    result = check(h)
    assert result.ok
    assert bool(result) is True
    assert result.key is None


def test_sequential_history_with_wrong_read_fails() -> None:
    h = [w(0, "x", 1, 0, 1), w(0, "x", 2, 2, 3), r(1, "x", 3, 4, 5)]
    assert not check(h).ok


@pytest.mark.parametrize("observed", [1, 2])
def test_read_concurrent_with_write_may_see_either_value(observed: int) -> None:
    h = [
        w(0, "x", 1, 0, 1),
        w(0, "x", 2, 2, 6),  # overlaps the read below
        r(1, "x", observed, 3, 5),
    ]
    assert check(h).ok


def test_read_overlapping_write_cannot_see_a_third_value() -> None:
    h = [w(0, "x", 1, 0, 1), w(0, "x", 2, 2, 6), r(1, "x", 3, 3, 5)]
    result = check(h)
    assert not result.ok
    assert result.key == "x"


def test_touching_intervals_are_treated_as_concurrent() -> None:
    # The read starts exactly when the write completes; with a finite-resolution
    # clock we must not assume the write came first.
    h = [w(0, "x", 1, 0, 1), w(0, "x", 2, 2, 3), r(1, "x", 1, 3, 4)]
    assert check(h).ok


def test_stale_read_is_caught_and_names_the_key() -> None:
    h = [
        w(0, "y", "other", 0, 1),  # unrelated key: must not be blamed
        w(0, "x", "old", 0, 1),
        w(0, "x", "new", 2, 3),
        r(1, "x", "old", 4, 5),  # starts after "new" was acknowledged
        r(1, "y", "other", 4, 5),
    ]
    result = check(h)
    assert result.ok is False
    assert result.key == "x"
    assert result.bad_keys == ("x",)
    assert "'x'" in result.explanation
    assert "read('x') -> 'old'" in result.explanation
    # The search got as far as both writes, then could not place the read.
    assert [op.value for op in result.linearized] == ["old", "new"]
    assert [op.kind for op in result.unplaced] == [READ]
    assert result.unplaced[0].result == "old"


def test_all_bad_keys_reported_first_one_named() -> None:
    h = [
        w(0, "a", 1, 0, 1),
        r(0, "a", 2, 2, 3),
        w(0, "b", 1, 0, 1),
        r(0, "b", 1, 2, 3),
        r(0, "c", 7, 0, 1),
    ]
    result = check(h)
    assert not result.ok
    assert result.key == "a"
    assert result.bad_keys == ("a", "c")


def test_initial_values() -> None:
    h = [r(0, "x", "seed", 0, 1), r(0, "y", None, 0, 1)]
    assert check(h, initial={"x": "seed"}).ok
    assert not check(h).ok  # without the seed, "x" starts absent


def test_keys_are_independent() -> None:
    # Each key alone is fine, although interleaving in time is arbitrary.
    h = [
        w(0, "x", 1, 0, 10),
        w(1, "y", 1, 0, 10),
        r(2, "x", None, 1, 2),
        r(2, "y", 1, 3, 4),
        r(3, "x", 1, 5, 6),
        r(3, "y", 1, 7, 8),
    ]
    assert check(h).ok


def test_later_read_cannot_go_back_in_time() -> None:
    # Two reads concurrent with a write: the first sees the new value, the
    # second (starting after the first finished) must not see the old one.
    h = [
        w(0, "x", 0, 0, 1),
        w(0, "x", 1, 2, 20),
        r(1, "x", 1, 3, 4),
        r(2, "x", 0, 5, 6),
    ]
    result = check(h)
    assert not result.ok
    assert result.key == "x"


# --------------------------------------------------------------------------
# fail and info operations
# --------------------------------------------------------------------------


def test_failed_write_is_ignored() -> None:
    h = [w(0, "x", 1, 0, 1), w(1, "x", 2, 2, 3, status=FAIL), r(0, "x", 1, 4, 5)]
    assert check(h).ok
    # ...so its value can not be read either.
    h2 = [w(0, "x", 1, 0, 1), w(1, "x", 2, 2, 3, status=FAIL), r(0, "x", 2, 4, 5)]
    assert not check(h2).ok


def test_info_write_later_read_is_fine() -> None:
    h = [
        w(0, "x", 1, 0, 1),
        w(1, "x", 2, 2, 3, status=INFO),  # timed out
        r(0, "x", 2, 10, 11),  # ...but it did happen
    ]
    assert check(h).ok


def test_info_write_may_also_never_happen() -> None:
    h = [w(0, "x", 1, 0, 1), w(1, "x", 2, 2, 3, status=INFO), r(0, "x", 1, 10, 11)]
    assert check(h).ok


def test_info_write_cannot_take_effect_before_its_invocation() -> None:
    h = [w(0, "x", 1, 0, 1), r(0, "x", 2, 2, 3), w(1, "x", 2, 4, 5, status=INFO)]
    result = check(h)
    assert not result.ok
    assert result.key == "x"


def test_info_write_takes_effect_at_most_once() -> None:
    # 2 (info), then 3, then reading 2 again would need the info write twice.
    h = [
        w(1, "x", 2, 0, 1, status=INFO),
        r(0, "x", 2, 2, 3),
        w(0, "x", 3, 4, 5),
        r(0, "x", 2, 6, 7),
    ]
    assert not check(h).ok


def test_read_of_value_never_written_is_caught_despite_info_ops() -> None:
    h = [
        w(0, "x", 1, 0, 1),
        w(1, "x", 2, 2, 3, status=INFO),
        w(2, "x", 3, 2, 3, status=FAIL),
        r(0, "x", 4, 5, 6),
    ]
    result = check(h)
    assert not result.ok
    assert result.key == "x"
    assert "read('x') -> 4" in result.explanation


def test_info_operations_are_normalised() -> None:
    op = Operation(client=0, kind=WRITE, key="x", invoke=1.0, complete=2.0, status=INFO, value=1)
    assert op.complete == math.inf
    assert op.result is None


def test_info_read_is_ignored() -> None:
    h = [w(0, "x", 1, 0, 1), Operation(client=1, kind=READ, key="x", invoke=2, status=INFO, result=5)]
    assert check(h).ok


def test_unobserved_info_write_can_explain_failed_cas() -> None:
    # The cas expecting the initial value fails; only the (never read) info
    # write can explain it.  Guards the info-pruning optimisation.
    h = [w(1, "x", "b", 0, 1, status=INFO), cas(0, "x", "a", "c", False, 2, 3)]
    assert check(h, initial={"x": "a"}).ok
    # Without the info write the cas must have succeeded.
    assert not check(h[1:], initial={"x": "a"}).ok


# --------------------------------------------------------------------------
# cas
# --------------------------------------------------------------------------


def test_cas_success_and_failure_semantics() -> None:
    ok_history = [
        w(0, "x", 1, 0, 1),
        cas(0, "x", 1, 2, True, 2, 3),
        cas(1, "x", 1, 3, False, 4, 5),  # value is 2 now
        r(1, "x", 2, 6, 7),
        cas(0, "x", None, 9, False, 8, 9),  # key exists
        d(0, "x", 10, 11),
        cas(1, "x", None, 5, True, 12, 13),  # expected=None means absent
        r(0, "x", 5, 14, 15),
    ]
    assert check(ok_history).ok


def test_cas_that_should_have_failed_is_caught() -> None:
    h = [w(0, "x", 1, 0, 1), cas(0, "x", 7, 2, True, 2, 3)]
    assert not check(h).ok


def test_cas_that_should_have_succeeded_is_caught() -> None:
    h = [w(0, "x", 1, 0, 1), cas(0, "x", 1, 2, False, 2, 3)]
    assert not check(h).ok


def test_two_concurrent_cas_cannot_both_win() -> None:
    h = [w(0, "x", 0, 0, 1), cas(1, "x", 0, 1, True, 2, 5), cas(2, "x", 0, 2, True, 2, 5)]
    result = check(h)
    assert not result.ok
    # One of the two must be losing; either way, exactly one "winner" is lost.
    assert len(result.linearized) == 2


def test_concurrent_cas_one_wins() -> None:
    h = [
        w(0, "x", 0, 0, 1),
        cas(1, "x", 0, 1, True, 2, 5),
        cas(2, "x", 0, 2, False, 2, 5),
        r(0, "x", 1, 6, 7),
    ]
    assert check(h).ok


def test_info_cas_only_matters_if_it_succeeded() -> None:
    base = [w(0, "x", 0, 0, 1), cas(1, "x", 0, 1, None, 2, 3, status=INFO)]
    assert check(base + [r(0, "x", 1, 4, 5)]).ok  # it happened
    assert check(base + [r(0, "x", 0, 4, 5)]).ok  # it did not
    # It cannot have succeeded if its expectation never held.
    base_bad = [w(0, "x", 7, 0, 1), cas(1, "x", 0, 1, None, 2, 3, status=INFO)]
    assert not check(base_bad + [r(0, "x", 1, 4, 5)]).ok


def test_info_ops_with_same_expectation_are_not_interchangeable() -> None:
    # Only the later info cas can explain the read; trying just the first of
    # "similar" info ops would be wrong here (their effects differ).
    h = [
        w(0, "x", 0, 0, 1),
        cas(1, "x", 0, 1, None, 2, 3, status=INFO),
        cas(2, "x", 0, 2, None, 2.5, 3, status=INFO),
        r(0, "x", 2, 4, 5),
        cas(0, "x", 7, 8, False, 6, 7),  # (keeps the first info cas from being pruned)
    ]
    assert check(h).ok


def test_identical_info_writes_each_take_effect_at_most_once() -> None:
    # Two info writes of the same value can explain the value reappearing
    # once (after being overwritten), but not twice.
    base = [
        w(1, "x", "a", 0, 1, status=INFO),
        w(2, "x", "a", 0, 1, status=INFO),
        r(0, "x", "a", 2, 3),
        w(0, "x", "b", 4, 5),
        r(0, "x", "a", 6, 7),
    ]
    assert check(base).ok
    assert not check([*base, w(0, "x", "c", 8, 9), r(0, "x", "a", 10, 11)]).ok


def test_completed_cas_requires_bool_result() -> None:
    with pytest.raises(ValueError):
        cas(0, "x", 1, 2, None, 0, 1)


def test_check_key_rejects_mixed_keys() -> None:
    assert check_key([w(0, "x", 1, 0, 1), r(0, "x", 1, 2, 3)]).ok
    with pytest.raises(ValueError):
        check_key([w(0, "x", 1, 0, 1), r(0, "y", 1, 2, 3)])


def test_operation_validation() -> None:
    with pytest.raises(ValueError):
        Operation(client=0, kind="increment", key="x", invoke=0, complete=1)
    with pytest.raises(ValueError):
        Operation(client=0, kind=READ, key="x", invoke=0, complete=1, status="maybe")
    with pytest.raises(ValueError):
        Operation(client=0, kind=READ, key="x", invoke=2, complete=1)
    with pytest.raises(TypeError):
        Operation(client=0, kind=WRITE, key="x", invoke=0, complete=1, value=[1, 2])


# --------------------------------------------------------------------------
# HistoryRecorder
# --------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_recorder_records_intervals_statuses_and_pending_ops() -> None:
    rec = HistoryRecorder(clock=FakeClock())
    h1 = rec.invoke(0, WRITE, "x", value="a")  # t=1
    h2 = rec.invoke(1, READ, "x")  # t=2
    rec.ok(h1)  # t=3
    rec.ok(h2, result="a")  # t=4
    h3 = rec.invoke(0, CAS, "x", expected="a", new="b")  # t=5
    rec.ok(h3, result=True)  # t=6
    h4 = rec.invoke(1, WRITE, "x", value="c")  # t=7
    rec.fail(h4)  # t=8
    h5 = rec.invoke(1, WRITE, "x", value="d")  # t=9
    rec.info(h5)  # t=10
    rec.invoke(2, READ, "x")  # t=11, never completed

    ops = rec.operations()
    assert [(op.kind, op.status) for op in ops] == [
        (WRITE, OK),
        (READ, OK),
        (CAS, OK),
        (WRITE, FAIL),
        (WRITE, INFO),
        (READ, INFO),
    ]
    assert (ops[0].invoke, ops[0].complete) == (1.0, 3.0)
    assert (ops[1].invoke, ops[1].complete, ops[1].result) == (2.0, 4.0, "a")
    assert (ops[2].expected, ops[2].new, ops[2].result) == ("a", "b", True)
    assert ops[4].complete == math.inf
    assert ops[5].complete == math.inf
    assert check(ops).ok

    with pytest.raises(KeyError):
        rec.ok(h1)  # already completed


def test_recorder_is_thread_safe_and_history_checks() -> None:
    # Real threads against a lock-protected dict: a linearizable "server".
    rec = HistoryRecorder()
    store: dict[str, int] = {}
    lock = threading.Lock()

    def client(cid: int) -> None:
        rng = random.Random(cid)
        for n in range(200):
            key = rng.choice("ab")
            if rng.random() < 0.5:
                h = rec.invoke(cid, WRITE, key, value=cid * 1000 + n)
                with lock:
                    store[key] = cid * 1000 + n
                rec.ok(h)
            else:
                h = rec.invoke(cid, READ, key)
                with lock:
                    value = store.get(key)
                rec.ok(h, result=value)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ops = rec.operations()
    assert len(ops) == 1000
    assert all(op.status == OK for op in ops)
    assert check(ops).ok


# --------------------------------------------------------------------------
# Randomised histories from a real sequential simulation
# --------------------------------------------------------------------------


def simulate(
    rng: random.Random,
    n_ops: int,
    n_clients: int,
    keys: Sequence[str],
    p_info: float = 0.0,
    p_fail: float = 0.0,
) -> list[Operation]:
    """A linearizable-by-construction history.

    Each client runs operations back to back with random gaps and durations;
    every operation that takes effect gets a linearization point inside its
    interval, and results come from executing the operations against a plain
    dict in linearization-point order.
    """
    # (invoke, complete, client, kind, key, args, outcome) -- outcome decided
    # up front for fail/info; results are filled in by the replay below.
    planned: list[dict[str, Any]] = []
    clock = [0.0] * n_clients
    client_id = list(range(n_clients))
    next_client = n_clients
    values = itertools.count(1)
    for n in range(n_ops):
        c = n % n_clients
        invoke = clock[c] + rng.expovariate(10.0)
        complete = invoke + rng.expovariate(2.0)  # long ops -> lots of overlap
        clock[c] = complete
        kind = rng.choices([READ, WRITE, CAS, DELETE], weights=[5, 4, 2, 1])[0]
        status = OK
        if kind != READ or rng.random() < 0.5:
            roll = rng.random()
            status = INFO if roll < p_info else FAIL if roll < p_info + p_fail else OK
        effective = status == OK or (status == INFO and rng.random() < 0.5)
        planned.append(
            dict(
                client=client_id[c],
                kind=kind,
                key=rng.choice(keys),
                invoke=invoke,
                complete=complete,
                status=status,
                value=next(values) if kind == WRITE else None,
                expected=None,
                new=next(values) if kind == CAS else None,
                point=rng.uniform(invoke, complete) if effective else None,
            )
        )
        if status == INFO:
            # Jepsen convention: a client with an unknown outcome is replaced.
            client_id[c] = next_client
            next_client += 1

    store: dict[str, Any] = {}
    written: dict[str, list[Any]] = {}
    for p in sorted((p for p in planned if p["point"] is not None), key=lambda p: p["point"]):
        key = p["key"]
        current = store.get(key)
        if p["kind"] == WRITE:
            store[key] = p["value"]
        elif p["kind"] == DELETE:
            store.pop(key, None)
        elif p["kind"] == READ:
            p["result"] = current
        else:
            # Expect a recently seen value (or absence) so cas succeeds often.
            p["expected"] = current if rng.random() < 0.6 else rng.choice(written.get(key, [None]) + [None])
            p["result"] = p["expected"] == current
            if p["result"]:
                store[key] = p["new"]
        if p["kind"] in (WRITE, CAS):
            written.setdefault(key, []).append(store.get(key))

    ops = []
    for p in planned:
        if p["kind"] == CAS and p["point"] is None:
            p["expected"] = rng.choice([None, 1, 2])  # arbitrary, it did not happen
        result = p.get("result")
        if p["status"] == FAIL:
            result = rng.choice([True, False]) if p["kind"] == CAS else None
        ops.append(
            Operation(
                client=p["client"],
                kind=p["kind"],
                key=p["key"],
                invoke=p["invoke"],
                complete=p["complete"],
                status=p["status"],
                value=p["value"],
                expected=p["expected"],
                new=p["new"],
                result=result,
            )
        )
    return ops


@pytest.mark.parametrize("seed", range(30))
def test_random_linearizable_histories_pass_and_corruption_is_caught(seed: int) -> None:
    rng = random.Random(seed)
    history = simulate(rng, n_ops=150, n_clients=6, keys=["a", "b", "c"], p_info=0.05, p_fail=0.05)
    result = check(history)
    assert result.ok, result.explanation

    reads = [i for i, op in enumerate(history) if op.kind == READ and op.status == OK]
    victim = rng.choice(reads)
    bad = history[victim]
    corrupted = list(history)
    # No operation ever writes a string, so this value was certainly never
    # the register's state: the history cannot be linearizable any more.
    corrupted[victim] = Operation(
        client=bad.client,
        kind=READ,
        key=bad.key,
        invoke=bad.invoke,
        complete=bad.complete,
        result="never-written",
    )
    result = check(corrupted)
    assert not result.ok
    assert result.key == bad.key
    assert result.bad_keys == (bad.key,)
    assert corrupted[victim] in result.unplaced


@pytest.mark.parametrize("seed", range(20))
def test_random_stale_read_is_caught(seed: int) -> None:
    # Append, after everything else completed, a read returning the value of
    # a write that was definitely overwritten: the latest-invoked write
    # started after that older write completed, so it is linearized later.
    # Every write/cas uses a fresh value, so nothing else can restore the old
    # one, and deletes leave the key absent (None), never the old value.
    rng = random.Random(1000 + seed)
    history = simulate(rng, n_ops=120, n_clients=5, keys=["k"])
    assert check(history).ok
    writes = [op for op in history if op.kind == WRITE]
    latest = max(writes, key=lambda op: op.invoke)
    older = [op for op in writes if op.complete < latest.invoke]
    assert older, "the simulation should produce real-time ordered writes"
    stale = rng.choice(older).value
    end = max(op.complete for op in history)
    result = check([*history, r(99, "k", stale, end + 1, end + 2)])
    assert not result.ok
    assert result.key == "k"
    assert result.unplaced[-1].result == stale


# --------------------------------------------------------------------------
# Cross-check against brute force on small random histories
# --------------------------------------------------------------------------


def brute_force_linearizable(ops: Sequence[Operation], initial: Any = None) -> bool:
    """Try every subset of info ops and every real-time-respecting order."""
    ops = [op for op in ops if op.status != FAIL and not (op.status == INFO and op.kind == READ)]
    required = [op for op in ops if op.status == OK]
    optional = [op for op in ops if op.status == INFO]
    for k in range(len(optional) + 1):
        for chosen in itertools.combinations(optional, k):
            for order in itertools.permutations(required + list(chosen)):
                if _respects_real_time(order) and _legal(order, initial):
                    return True
    return False


def _respects_real_time(order: Sequence[Operation]) -> bool:
    return all(not (b.complete < a.invoke) for i, a in enumerate(order) for b in order[i + 1 :])


def _legal(order: Sequence[Operation], value: Any) -> bool:
    for op in order:
        if op.kind == WRITE:
            value = op.value
        elif op.kind == DELETE:
            value = None
        elif op.kind == READ:
            if op.result != value:
                return False
        elif op.status == INFO or op.result:
            if value != op.expected:
                return False
            value = op.new
        elif value == op.expected:
            return False
    return True


def random_small_history(rng: random.Random, n: int) -> list[Operation]:
    ops = []
    vals = [None, 1, 2]
    for c in range(n):
        t0 = rng.randint(0, 8)
        t1 = t0 + rng.randint(0, 4)
        status = rng.choices([OK, INFO, FAIL], weights=[6, 2, 1])[0]
        kind = rng.choice([READ, WRITE, WRITE, CAS, DELETE])
        ops.append(
            Operation(
                client=c,
                kind=kind,
                key="x",
                invoke=t0,
                complete=t1,
                status=status,
                value=rng.choice([1, 2]) if kind == WRITE else None,
                expected=rng.choice(vals) if kind == CAS else None,
                new=rng.choice([1, 2]) if kind == CAS else None,
                result=(
                    rng.choice(vals)
                    if kind == READ
                    else rng.choice([True, False])
                    if kind == CAS and status == OK
                    else None
                ),
            )
        )
    return ops


def test_agrees_with_brute_force_on_small_histories() -> None:
    rng = random.Random(42)
    verdicts = []
    for _ in range(600):
        h = random_small_history(rng, rng.randint(1, 6))
        initial = rng.choice([None, 1])
        expected = brute_force_linearizable(h, initial)
        assert check(h, initial={"x": initial}).ok == expected, h
        verdicts.append(expected)
    # The generator must exercise both outcomes for this test to mean much.
    assert 0.2 < sum(verdicts) / len(verdicts) < 0.8


def reference_linearizable(ops: Sequence[Operation], initial: Any = None) -> bool:
    """A direct, memoised transcription of the definition, for medium sizes.

    Deliberately independent of the checker's machinery: any not-yet-placed
    op may go next unless some other unplaced completed op finished before
    it was invoked; info ops are optional; success once every completed op
    is placed.
    """
    ops = [op for op in ops if op.status != FAIL and not (op.status == INFO and op.kind == READ)]
    required = frozenset(i for i, op in enumerate(ops) if op.status == OK)

    @functools.cache
    def search(placed: frozenset[int], value: Any) -> bool:
        if required <= placed:
            return True
        waiting = [j for j in required if j not in placed]
        for i, op in enumerate(ops):
            if i in placed or any(ops[j].complete < op.invoke for j in waiting if j != i):
                continue
            if not _legal([op], value):
                continue
            if op.kind == WRITE:
                new_value = op.value
            elif op.kind == DELETE:
                new_value = None
            elif op.kind == CAS and (op.status == INFO or op.result):
                new_value = op.new
            else:
                new_value = value
            if search(placed | {i}, new_value):
                return True
        return False

    return search(frozenset(), initial)


def perturb(rng: random.Random, history: list[Operation]) -> list[Operation]:
    """Replace one completed read/cas result by a plausible, maybe wrong, one."""
    candidates = [i for i, op in enumerate(history) if op.status == OK and op.kind in (READ, CAS)]
    if not candidates:
        return history
    values = (
        [None]
        + [op.value for op in history if op.kind == WRITE]
        + [op.new for op in history if op.kind == CAS]
    )
    i = rng.choice(candidates)
    op = history[i]
    if op.kind == READ:
        changed = dataclasses.replace(op, result=rng.choice(values))
    else:
        changed = dataclasses.replace(op, expected=rng.choice(values), result=rng.choice([True, False]))
    return history[:i] + [changed] + history[i + 1 :]


def test_agrees_with_reference_on_medium_histories() -> None:
    # Info-heavy histories from the simulation, half of them perturbed:
    # exercises the checker's pruning (info subsumption, interchangeable info
    # ops, greedy reads, unobserved values) on both outcomes.
    rng = random.Random(4242)
    verdicts = []
    for _ in range(300):
        history = simulate(
            rng, n_ops=rng.randint(8, 16), n_clients=rng.randint(2, 5), keys=["x"], p_info=0.25, p_fail=0.1
        )
        if rng.random() < 0.6:
            history = perturb(rng, history)
        expected = reference_linearizable(history)
        assert check(history).ok == expected, history
        verdicts.append(expected)
    assert 0.2 < sum(verdicts) / len(verdicts) < 0.8


# --------------------------------------------------------------------------
# Performance sanity and search budget
# --------------------------------------------------------------------------


def test_two_thousand_ops_five_clients() -> None:
    rng = random.Random(7)
    history = simulate(rng, n_ops=2000, n_clients=5, keys=["a", "b", "c"], p_info=0.01, p_fail=0.02)
    assert len(history) == 2000
    result = check(history)
    assert result.ok, result.explanation


def test_few_thousand_ops_on_one_key() -> None:
    rng = random.Random(8)
    history = simulate(rng, n_ops=3000, n_clients=8, keys=["hot"], p_info=0.005)
    assert check(history).ok


def test_long_sequential_history_does_not_hit_recursion_limit() -> None:
    h = []
    for i in range(5000):
        h.append(w(0, "x", i, 4 * i, 4 * i + 1))
        h.append(r(1, "x", i, 4 * i + 2, 4 * i + 3))
    assert check(h).ok
    h[-1] = r(1, "x", -1, h[-1].invoke, h[-1].complete)
    result = check(h)
    assert not result.ok
    assert len(result.linearized) == len(h) - 1


def test_search_budget() -> None:
    rng = random.Random(9)
    history = simulate(rng, n_ops=300, n_clients=5, keys=["k"])
    with pytest.raises(SearchBudgetExceeded) as excinfo:
        check(history, max_steps=10)
    assert excinfo.value.key == "k"
    assert check(history, max_steps=10_000_000).ok
