"""Linearizability checking for key/value register histories.

This is a small implementation of the Wing-Gong-Lowe (WGL) algorithm
(Wing & Gong 1993, with the state cache and linked-list representation of
Lowe, "Testing for linearizability", 2017), specialised to a key/value store
where every key is an independent register.

How it is used
--------------
Concurrent test clients record what they did with a :class:`HistoryRecorder`
(Jepsen style: ``invoke`` before sending a request, then ``ok``/``fail``/
``info`` once the outcome is known) and the resulting list of
:class:`Operation` values is handed to :func:`check`::

    rec = HistoryRecorder()
    h = rec.invoke(client=1, kind="write", key="x", value="a")
    ...                       # talk to the cluster
    rec.ok(h)
    result = check(rec.operations())
    assert result.ok, result.explanation

Operation statuses
------------------
* ``"ok"``   -- completed; the result is known and must be explained.
* ``"fail"`` -- definitely did not take effect; ignored by the checker.
* ``"info"`` -- outcome unknown (e.g. a timeout).  The operation may have taken
  effect at any moment after its invocation, or never.  Its completion time is
  +inf and its result is unknown.

Semantics of the register model
-------------------------------
* ``write(key, value)`` sets the value; ``delete(key)`` makes the key absent.
* ``read(key)`` returns the current value, ``None`` meaning "absent".
* ``cas(key, expected, new)`` sets ``new`` iff the current value equals
  ``expected`` (``expected=None`` means "key absent") and returns whether it
  did.  A ``cas`` that returned ``False`` is a check that the value differed.

Values must be hashable, because model states are memoised.

Algorithm
---------
Linearizability is compositional (Herlihy & Wing's locality; "P-compositionality"
in Horn & Kroening's terms), so the history is split per key and each key is
checked on its own: this turns one search over the product of all registers
into many small independent searches.

For one key, the operations' invoke and complete events are sorted in time and
threaded onto a doubly linked list.  The search repeatedly picks a *minimal*
operation -- a call event that appears before the first remaining return
event, i.e. an operation invoked before every pending operation completed --
applies it to the model, and if that is legal, "lifts" its call and return out
of the list (dancing-links style, so undoing is O(1)).  Reaching a return
event means the operation it belongs to has not been linearized although it
has already completed, so the search backtracks.  The cache of
(linearized-set, model-state) pairs means no configuration is explored twice,
which is what keeps the search polynomial in practice for modest concurrency.
On top of the classic algorithm, a few sound reductions keep real histories
cheap (each is justified where it is implemented):

* legal read-only operations are linearized greedily, without branching;
* register values that no remaining operation compares against are merged
  into one "unobserved" state in the cache;
* info operations (which stay pending forever) are tried after completed
  ones, configurations that merely linearized *more* info operations than a
  visited one are pruned (subsumption), and interchangeable info operations
  are only tried in one order.

The search is iterative (explicit stack), so long histories do not hit
Python's recursion limit.  Like any linearizability checker it is
exponential in the worst case -- chiefly with many info operations *and* a
violation, where the search must be exhaustive -- so callers who must not
hang can pass ``max_steps``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "READ",
    "WRITE",
    "CAS",
    "DELETE",
    "OK",
    "FAIL",
    "INFO",
    "Operation",
    "HistoryRecorder",
    "Result",
    "SearchBudgetExceeded",
    "check",
    "check_key",
    "partition_by_key",
]

READ = "read"
WRITE = "write"
CAS = "cas"
DELETE = "delete"
KINDS = frozenset({READ, WRITE, CAS, DELETE})

OK = "ok"
FAIL = "fail"
INFO = "info"
STATUSES = frozenset({OK, FAIL, INFO})

# Explanations list only this many operations of each kind, to stay readable.
_SHOW_PREFIX = 5
_SHOW_UNPLACED = 10


# --------------------------------------------------------------------------
# History representation
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    """One client operation on one key, as observed by the client.

    ``value`` is a write's value, ``expected``/``new`` are a cas's arguments
    and ``result`` is what a read returned (``None`` = absent) or whether a
    cas succeeded.  Times come from one monotonic clock shared by all clients.
    For ``info`` operations ``complete`` is forced to +inf and ``result`` to
    ``None``: neither is known.
    """

    client: Hashable
    kind: str
    key: Hashable
    invoke: float
    complete: float = math.inf
    status: str = OK
    value: Any = None
    expected: Any = None
    new: Any = None
    result: Any = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown operation kind {self.kind!r}")
        if self.status not in STATUSES:
            raise ValueError(f"unknown operation status {self.status!r}")
        if self.status == INFO:
            # Normalise rather than reject: whatever the caller put there is
            # meaningless for an operation whose outcome is unknown.
            object.__setattr__(self, "complete", math.inf)
            object.__setattr__(self, "result", None)
        elif self.complete < self.invoke:
            raise ValueError(f"operation completes before it is invoked: {self!r}")
        if self.kind == CAS and self.status == OK and not isinstance(self.result, bool):
            raise ValueError(f"a completed cas needs a bool result, got {self.result!r}")
        for name in ("value", "expected", "new", "result"):
            try:
                hash(getattr(self, name))
            except TypeError:
                raise TypeError(f"operation {name} must be hashable: {self!r}") from None

    def describe(self, t0: float = 0.0) -> str:
        """A one-line human description, with times relative to ``t0``."""
        if self.kind == WRITE:
            call = f"write({self.key!r}, {self.value!r})"
        elif self.kind == DELETE:
            call = f"delete({self.key!r})"
        elif self.kind == CAS:
            call = f"cas({self.key!r}, {self.expected!r} -> {self.new!r})"
        else:
            call = f"read({self.key!r})"
        if self.status == INFO:
            outcome = " -> ?"
        elif self.kind == READ:
            outcome = f" -> {_show_value(self.result)}"
        elif self.kind == CAS:
            outcome = f" -> {self.result!r}"
        else:
            outcome = ""
        end = "inf" if math.isinf(self.complete) else f"{self.complete - t0:.6f}"
        return f"{call}{outcome}  [client {self.client!r}, {self.status}, {self.invoke - t0:.6f}..{end}]"


def _show_value(value: Any) -> str:
    return "absent" if value is None else repr(value)


class HistoryRecorder:
    """Thread-safe recorder of a concurrent history.

    Call :meth:`invoke` immediately *before* issuing a request and one of
    :meth:`ok`, :meth:`fail` or :meth:`info` immediately *after* learning its
    outcome.  Timestamps are taken inside those calls, so the recorded
    interval always contains the real one -- which is the safe direction: a
    wider interval can only make the checker more permissive, never report a
    violation that did not happen.

    :meth:`operations` may be called at any time; operations still pending at
    that moment are reported as ``info`` (their outcome is not known).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._next_handle = 0
        self._pending: dict[int, Operation] = {}
        self._done: list[Operation] = []

    def invoke(
        self,
        client: Hashable,
        kind: str,
        key: Hashable,
        *,
        value: Any = None,
        expected: Any = None,
        new: Any = None,
    ) -> int:
        """Record the start of an operation; returns a handle for completing it."""
        with self._lock:
            # Constructing the Operation validates kind and hashability early,
            # in the client that made the mistake.
            op = Operation(
                client=client,
                kind=kind,
                key=key,
                invoke=self._clock(),
                status=INFO,
                value=value,
                expected=expected,
                new=new,
            )
            handle = self._next_handle
            self._next_handle += 1
            self._pending[handle] = op
            return handle

    def ok(self, handle: int, result: Any = None) -> None:
        """The operation completed; ``result`` is a read's value or a cas's bool."""
        self._complete(handle, OK, result)

    def fail(self, handle: int) -> None:
        """The operation definitely did not take effect."""
        self._complete(handle, FAIL, None)

    def info(self, handle: int) -> None:
        """The operation's outcome is unknown (it may or may not have happened)."""
        self._complete(handle, INFO, None)

    def _complete(self, handle: int, status: str, result: Any) -> None:
        with self._lock:
            now = self._clock()
            try:
                op = self._pending[handle]
            except KeyError:
                raise KeyError(f"unknown or already completed handle {handle!r}") from None
            # Build (and so validate) the completed operation before forgetting
            # the pending one, so a bad result does not lose the operation.
            done = Operation(
                client=op.client,
                kind=op.kind,
                key=op.key,
                invoke=op.invoke,
                complete=now,
                status=status,
                value=op.value,
                expected=op.expected,
                new=op.new,
                result=result,
            )
            del self._pending[handle]
            self._done.append(done)

    def operations(self) -> list[Operation]:
        """All operations so far (pending ones as ``info``), ordered by invoke time."""
        with self._lock:
            ops = self._done + list(self._pending.values())
        return sorted(ops, key=lambda op: op.invoke)


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """Outcome of :func:`check`.

    On failure ``key`` is the first key (in order of first appearance) whose
    history is not linearizable, ``linearized`` the longest linearizable
    prefix the search found for it, ``unplaced`` the completed operations that
    could not be linearized next, and ``bad_keys`` every failing key.
    """

    ok: bool
    key: Hashable | None = None
    explanation: str = ""
    linearized: tuple[Operation, ...] = ()
    unplaced: tuple[Operation, ...] = ()
    bad_keys: tuple[Hashable, ...] = ()

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return "linearizable" if self.ok else self.explanation


class SearchBudgetExceeded(RuntimeError):
    """Raised when a key needs more than ``max_steps`` search steps."""

    def __init__(self, key: Hashable, steps: int) -> None:
        super().__init__(f"linearizability search for key {key!r} exceeded {steps} steps")
        self.key = key
        self.steps = steps


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------


def check(
    history: Iterable[Operation],
    initial: Mapping[Hashable, Any] | None = None,
    *,
    max_steps: int | None = None,
) -> Result:
    """Check a key/value history for linearizability.

    ``initial`` maps keys to their value before the history started; keys
    not in it start absent (``None``).  ``max_steps`` bounds the search per
    key (``None`` = unbounded); exceeding it raises :class:`SearchBudgetExceeded`
    rather than returning a verdict that would be a guess.
    """
    initial = initial or {}
    first_failure: Result | None = None
    bad_keys: list[Hashable] = []
    for key, ops in partition_by_key(history).items():
        result = check_key(ops, initial.get(key), max_steps=max_steps)
        if not result.ok:
            bad_keys.append(key)
            if first_failure is None:
                first_failure = result
    if first_failure is None:
        return Result(ok=True)
    return Result(
        ok=False,
        key=first_failure.key,
        explanation=first_failure.explanation,
        linearized=first_failure.linearized,
        unplaced=first_failure.unplaced,
        bad_keys=tuple(bad_keys),
    )


def partition_by_key(history: Iterable[Operation]) -> dict[Hashable, list[Operation]]:
    """Group operations by key, keys in order of first appearance."""
    by_key: dict[Hashable, list[Operation]] = {}
    for op in history:
        by_key.setdefault(op.key, []).append(op)
    return by_key


def check_key(
    ops: Sequence[Operation],
    initial: Any = None,
    *,
    max_steps: int | None = None,
) -> Result:
    """Check the operations of a single key (all must share the same key)."""
    keys = {op.key for op in ops}
    if len(keys) > 1:
        raise ValueError(f"check_key got operations on several keys: {keys!r}")
    if not keys:
        return Result(ok=True)
    (key,) = keys
    relevant = _prune_unobservable_info(_relevant(ops))
    best = _search(relevant, initial, key, max_steps)
    if best is None:
        return Result(ok=True)
    return _failure(key, relevant, initial, best)


# --------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------


def _relevant(ops: Iterable[Operation]) -> list[Operation]:
    """Drop operations that cannot constrain or affect the register.

    Failed operations did not happen.  A read with unknown outcome has no
    effect and no observed value, so it can always be linearized (or not)
    without consequence.
    """
    kept = [op for op in ops if op.status != FAIL and not (op.status == INFO and op.kind == READ)]
    kept.sort(key=lambda op: op.invoke)
    return kept


def _written_value(op: Operation) -> Any:
    if op.kind == WRITE:
        return op.value
    if op.kind == CAS:
        return op.new
    return None  # delete


def _prune_unobservable_info(ops: list[Operation]) -> list[Operation]:
    """Drop info mutations whose value nothing could ever have observed.

    Every info operation left in the history stays "pending" until the end,
    doubling the search space, so it pays to drop the ones that provably do
    not matter.  An info write/delete/cas of value v can be removed from any
    linearization when no read returned v, no cas expected v, and no cas
    returned False: then the only operations legal right after it are ones
    that set the value regardless (writes/deletes), so removing it changes no
    later state.  A cas that returned False is excluded because it observes
    "the value is not e", which *any* intervening write may explain.
    """
    if any(op.kind == CAS and op.status == OK and op.result is False for op in ops):
        return ops
    observed = {op.result for op in ops if op.kind == READ}
    observed.update(op.expected for op in ops if op.kind == CAS)
    return [op for op in ops if op.status != INFO or _written_value(op) in observed]


# Step codes: how an operation acts on the register (see _encode).
_SET = 0  # always legal; value := a               (write, delete)
_REQUIRE = 1  # legal iff value == a; unchanged    (ok read)
_SWAP = 2  # legal iff value == a; value := b      (successful or info cas)
_REJECT = 3  # legal iff value != a; unchanged     (cas that returned False)

_Step = tuple[int, Any, Any]  # (code, a, b)


def _encode(op: Operation) -> _Step:
    """Reduce an operation to a (code, a, b) step, so the hot loop does no lookups."""
    if op.kind == WRITE:
        return (_SET, op.value, None)
    if op.kind == DELETE:
        return (_SET, None, None)
    if op.kind == READ:
        return (_REQUIRE, op.result, None)
    # An info cas only matters if it took effect, which requires it to have
    # succeeded; "did not succeed" is the same as "never linearized".
    if op.status == INFO or op.result:
        return (_SWAP, op.expected, op.new)
    return (_REJECT, op.expected, None)


def _apply(step: _Step, value: Any) -> tuple[bool, Any]:
    """Apply one step to the register: (legal?, new value)."""
    code, a, b = step
    if code == _SET:
        return True, a
    if code == _REQUIRE:
        return value == a, value
    if code == _SWAP:
        return (True, b) if value == a else (False, value)
    return value != a, value


# --------------------------------------------------------------------------
# The WGL search
# --------------------------------------------------------------------------


class _Unobserved:
    """The register state "some value no remaining operation compares against"."""

    def __repr__(self) -> str:
        return "<unobserved value>"


_UNOBSERVED = _Unobserved()


def _canonical_steps(ops: Sequence[Operation], initial: Any) -> tuple[list[_Step], Any]:
    """Encode ``ops`` with every unobservable value replaced by one sentinel.

    Operations only ever compare the register against read results and cas
    expectations.  Two values outside that set therefore behave identically
    in every future (a bisimulation), so merging them is sound -- and it lets
    the cache recognise far more configurations as equal, e.g. after writes
    whose values nobody read.
    """
    observed = {op.result for op in ops if op.kind == READ}
    observed.update(op.expected for op in ops if op.kind == CAS)

    def canon(v: Any) -> Any:
        return v if v in observed else _UNOBSERVED

    steps = []
    for op in ops:
        code, a, b = _encode(op)
        if code == _SET:
            a = canon(a)
        elif code == _SWAP:
            b = canon(b)
        steps.append((code, a, b))
    return steps, canon(initial)


class _Visited:
    """The WGL cache: configurations already visited.

    A configuration is (set of linearized completed ops, set of linearized
    info ops, register value).  Two refinements over a plain set:

    * The completed-op set is a bitmask over ops in invoke order, and all ops
      below its lowest unset bit ``f`` are linearized, so it is stored as
      ``(f, mask >> f)``: a few machine words instead of one bit per op of
      the whole history.  This is what keeps memory flat on long histories.
    * Subsumption on info ops.  Info ops never *have* to be linearized, so
      each pending one would double the configurations a plain cache tells
      apart.  But having linearized *more* info ops (and otherwise the same
      completed ops and value) only removes options: the pending ops are a
      subset, bounded by the same return events.  So a configuration is
      pruned when a visited one differs only by a subset of info ops.  This
      is sound even while that visited one is still on the DFS stack: a
      failing search is exhaustive, so whatever the pruned configuration
      could reach is reached from the visited one anyway.
    """

    def __init__(self, with_info: bool) -> None:
        self._with_info = with_info
        self._plain: set[tuple[int, int, Any]] = set()
        # (f, ok-mask >> f, value) -> minimal info-sets visited (an antichain)
        self._minimal: dict[tuple[int, int, Any], list[int]] = {}

    def add(self, ok_mask: int, info_mask: int, value: Any) -> bool:
        """Record a configuration; False if it (or one subsuming it) was seen."""
        f = (ok_mask ^ (ok_mask + 1)).bit_length() - 1  # lowest unset bit
        key = (f, ok_mask >> f, value)
        if not self._with_info:
            if key in self._plain:
                return False
            self._plain.add(key)
            return True
        sets = self._minimal.get(key)
        if sets is None:
            self._minimal[key] = [info_mask]
            return True
        if any(s & ~info_mask == 0 for s in sets):
            return False
        sets[:] = [s for s in sets if info_mask & ~s]  # drop those now implied
        sets.append(info_mask)
        return True


_END = -1  # "no next node" in the linked lists
_HEAD = 0  # sentinel before the first event of the main list


@dataclass
class _EventLists:
    """Two doubly linked lists of events over shared node arrays.

    The main list holds the call and return events of completed operations in
    time order.  Info operations never complete, so they have no return
    event; their calls live in a second list (in invoke order), which the
    search walks only after the completed candidates, so that "info op not
    linearized (yet)" is explored first and _Visited's subsumption prunes
    most branches that do linearize it.

    Nodes: 0 = main head, 1..M = main events, M+1 = info head, then info calls.
    """

    nxt: list[int]
    prv: list[int]
    op: list[int]  # node -> op index (-1 for the heads)
    time: list[float]
    is_return: list[bool]
    is_info: list[bool]
    match: list[int]  # call node -> its return node (_END for info calls)
    info_head: int


def _event_lists(ops: Sequence[Operation]) -> _EventLists:
    # Calls sort before returns at equal times, so touching intervals count
    # as concurrent: clocks have finite resolution and we must not invent a
    # real-time order.
    events: list[tuple[float, int, int]] = []  # (time, 0=call/1=return, op)
    infos: list[tuple[float, int]] = []
    for i, op in enumerate(ops):
        if op.status == INFO:
            infos.append((op.invoke, i))
        else:
            events.append((op.invoke, 0, i))
            events.append((op.complete, 1, i))
    events.sort()
    infos.sort()

    n_main = len(events)
    info_head = n_main + 1
    size = n_main + len(infos) + 2
    nxt = list(range(1, size)) + [_END]
    nxt[n_main] = _END  # the main list ends where the info list begins
    prv = [_END] + list(range(size - 1))
    prv[info_head] = _END
    match = [_END] * size
    call_node = {}
    for node, (_, kind, i) in enumerate(events, start=1):
        if kind == 0:
            call_node[i] = node
        else:
            match[call_node[i]] = node
    return _EventLists(
        nxt=nxt,
        prv=prv,
        op=[-1] + [i for _, _, i in events] + [-1] + [i for _, i in infos],
        time=[0.0] + [t for t, _, _ in events] + [0.0] + [t for t, _ in infos],
        is_return=[False] + [kind == 1 for _, kind, _ in events] + [False] * (len(infos) + 1),
        is_info=[False] * (n_main + 2) + [True] * len(infos),
        match=match,
        info_head=info_head,
    )


def _search(ops: Sequence[Operation], initial: Any, key: Hashable, max_steps: int | None) -> list[int] | None:
    """Return None if ``ops`` is linearizable, else the longest linearizable
    prefix found (as indices into ``ops``, in linearization order).

    ``ops`` must be sorted by invoke time (it keeps the cache keys small).
    """
    ev = _event_lists(ops)
    # Local names: this loop is the hot path.
    nxt, prv, node_op, node_time = ev.nxt, ev.prv, ev.op, ev.time
    is_return, is_info, match, info_head = ev.is_return, ev.is_info, ev.match, ev.info_head
    size = len(nxt)

    def unlink(node: int) -> None:
        p, n = prv[node], nxt[node]
        nxt[p] = n
        if n != _END:
            prv[n] = p

    def relink(node: int) -> None:
        # Dancing links: the node still remembers its neighbours, and we undo
        # in exact reverse order of unlinking, so they are the right ones.
        p, n = prv[node], nxt[node]
        nxt[p] = node
        if n != _END:
            prv[n] = node

    steps, value = _canonical_steps(ops, initial)

    # Completed and info ops are numbered separately (each in invoke order),
    # giving two bitmasks: see _Visited for why.
    bit = [0] * len(ops)
    n_ok = n_info = 0
    for i, op in enumerate(ops):
        if op.status == INFO:
            bit[i], n_info = 1 << n_info, n_info + 1
        else:
            bit[i], n_ok = 1 << n_ok, n_ok + 1

    # Info ops with identical effect (same canonical step -- typically writes
    # of unobserved values) are interchangeable once both are invoked: both
    # stay minimal forever, so linearizing one or the other leads to
    # isomorphic configurations.  Only the earliest pending one of each such
    # class is tried; so each class is always linearized in list order, and
    # "my predecessor in the class is linearized" identifies the earliest
    # pending one.
    prev_same = [_END] * size
    last_of_class: dict[_Step, int] = {}
    for node in range(info_head + 1, size):
        cls = steps[node_op[node]]
        prev_same[node] = last_of_class.get(cls, _END)
        last_of_class[cls] = node
    lifted = [False] * size

    # How many not-yet-linearized ops still compare the register against each
    # value.  Once a value has none left it is as good as unobservable, and
    # the cache key uses _UNOBSERVED for it (the bisimulation argument of
    # _canonical_steps, applied to the remaining ops): e.g. once the readers
    # of two concurrent writes are done, either order of the writes leads to
    # the same cached configuration.
    watchers: dict[Any, int] = {}
    for code, a, _ in steps:
        if code != _SET:
            watchers[a] = watchers.get(a, 0) + 1

    def read_only_candidate(value: Any) -> int:
        """A minimal completed read-only op that is legal right now, if any.

        Such an op can be linearized immediately without losing anything: in
        any linearization from here it can be moved to the front, since it
        does not change the value and, being minimal, may precede every other
        pending op.  So the search commits to it and never tries alternatives
        in this configuration: reads (typically half the history) then cost
        no branching at all.
        """
        node = nxt[_HEAD]
        while node != _END and not is_return[node]:
            code, a, _ = steps[node_op[node]]
            if (code == _REQUIRE and value == a) or (code == _REJECT and value != a):
                return node
            node = nxt[node]
        return _END

    ok_mask = info_mask = 0  # linearized completed / info ops
    visited = _Visited(with_info=n_info > 0)
    visited.add(ok_mask, info_mask, value if watchers.get(value) else _UNOBSERVED)
    # Per linearized op: (call node, value before it, deadline before it,
    # whether it was forced by read_only_candidate).
    stack: list[tuple[int, Any, float, bool]] = []
    order: list[int] = []  # linearized op indices, parallel to ``stack``
    best: list[int] = []
    budget = math.inf if max_steps is None else max_steps
    n_steps = 0

    if nxt[_HEAD] == _END:
        return None  # nothing but info ops: none of them need to have happened
    # ``deadline`` is the completion time of the earliest pending completed
    # op; info ops invoked later than it are not minimal yet.  It is only
    # meaningful while ``node`` walks the info list.
    deadline = math.inf
    entering = True  # just reached a new configuration
    forced = False  # ``node`` is a read-only op we committed to
    node = _END
    while True:
        n_steps += 1
        if n_steps > budget:
            raise SearchBudgetExceeded(key, n_steps - 1)

        if entering:
            entering = False
            node = read_only_candidate(value)
            forced = node != _END
            if not forced:
                node = nxt[_HEAD]
            continue

        if node != _END and is_return[node]:
            # End of the completed candidates; continue with the info ones.
            deadline = node_time[node]
            node = nxt[info_head]
            continue

        if node == _END or (is_info[node] and node_time[node] > deadline):
            # Every candidate of this configuration has been tried: backtrack.
            if not stack:
                return best
            node, value, deadline, was_forced = stack.pop()
            i = order.pop()
            code, a, _ = steps[i]
            if code != _SET:
                watchers[a] += 1
            lifted[node] = False
            if is_info[node]:
                info_mask ^= bit[i]
            else:
                ok_mask ^= bit[i]
                relink(match[node])
            relink(node)
            # A forced op's configuration is equivalent to its parent, so its
            # failure is the parent's failure too.
            node = _END if was_forced else nxt[node]
            continue

        if is_info[node] and prev_same[node] != _END and not lifted[prev_same[node]]:
            node = nxt[node]  # an equivalent earlier info op is tried instead
            continue

        # ``node`` is a candidate: try to linearize its operation next.
        i = node_op[node]
        legal, new_value = _apply(steps[i], value)
        if legal:
            code, a, _ = steps[i]
            if code != _SET:
                watchers[a] -= 1  # as it will be in the new configuration
            if is_info[node]:
                new_ok, new_info = ok_mask, info_mask | bit[i]
            else:
                new_ok, new_info = ok_mask | bit[i], info_mask
            cache_value = new_value if watchers.get(new_value) else _UNOBSERVED
            if visited.add(new_ok, new_info, cache_value):
                stack.append((node, value, deadline, forced))
                order.append(i)
                ok_mask, info_mask, value = new_ok, new_info, new_value
                lifted[node] = True
                unlink(node)
                if not is_info[node]:
                    unlink(match[node])
                if len(order) > len(best):
                    best = order[:]
                if nxt[_HEAD] == _END:
                    # Every completed op is linearized; the info ops left
                    # over are simply taken not to have happened.
                    return None
                entering = True
                continue
            if code != _SET:
                watchers[a] += 1  # not taken after all
        # Illegal or already covered.  For a forced op that means this whole
        # configuration is covered (it is equivalent to its forced successor).
        node = _END if forced else nxt[node]
        forced = False


# --------------------------------------------------------------------------
# Explaining a failure
# --------------------------------------------------------------------------


def _failure(key: Hashable, ops: Sequence[Operation], initial: Any, best: list[int]) -> Result:
    """Build a Result describing where the longest linearization got stuck."""
    value = initial
    for i in best:
        _, value = _apply(_encode(ops[i]), value)

    placed = set(best)
    remaining = [i for i in range(len(ops)) if i not in placed]
    # The minimal operations at that point: invoked no later than the first
    # completion among the remaining completed operations (same tie rule as
    # the search).  On failure at least one completed op remains, otherwise
    # the search would have succeeded from this configuration.
    deadline = min(ops[i].complete for i in remaining if ops[i].status != INFO)
    unplaced = [ops[i] for i in remaining if ops[i].status != INFO and ops[i].invoke <= deadline]
    prefix = [ops[i] for i in best]

    t0 = ops[0].invoke if ops else 0.0
    lines = [
        f"key {key!r} is not linearizable ({len(ops)} relevant operations).",
        f"Longest linearizable prefix found: {len(prefix)} operations"
        + (", ending with:" if prefix else "."),
    ]
    if len(prefix) > _SHOW_PREFIX:
        lines.append("  ...")
    lines += [f"  {op.describe(t0)}" for op in prefix[-_SHOW_PREFIX:]]
    lines.append(f"after which {key!r} is {_show_value(value)}.")
    lines.append("Operations that could not be linearized next:")
    for op in unplaced[:_SHOW_UNPLACED]:
        legal, _ = _apply(_encode(op), value)
        why = "legal here, but every continuation failed" if legal else "illegal here"
        lines.append(f"  {op.describe(t0)}  ({why})")
    if len(unplaced) > _SHOW_UNPLACED:
        lines.append(f"  ... and {len(unplaced) - _SHOW_UNPLACED} more")
    lines.append(f"(times are seconds relative to {t0:.6f})")
    return Result(
        ok=False,
        key=key,
        explanation="\n".join(lines),
        linearized=tuple(prefix),
        unplaced=tuple(unplaced),
        bad_keys=(key,),
    )
