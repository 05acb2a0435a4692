"""Polling for a condition the system reaches on its own time (an election, a replica catching up)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05,
               ignore: tuple[type[BaseException], ...] = (), detail: Callable[[], str] | None = None) -> T:
    """The predicate's first truthy value, polled every `interval` seconds. After `timeout` seconds the test
    fails naming `what` and the last value seen (or the last of the `ignore`d exceptions: a node that is
    restarting or electing refuses calls for a while, which is not yet an answer), then what `detail()` says
    (a log's tail, say)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            value, last = None, exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            more = f"\n{detail()}" if detail else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}{more}")
        time.sleep(interval)


def wait_for_value(fetch: Callable[[], T], accept: Callable[[T], bool], timeout: float, what: str,
                   interval: float = 0.05, ignore: tuple[type[BaseException], ...] = ()) -> T:
    """The first value of `fetch()` that `accept` takes (an empty list or a zero may be the answer), polled
    like wait_until; on timeout the failure shows the last value fetched."""
    seen: list = []

    def accepted() -> tuple | None:
        seen[:] = [fetch()]
        return (seen[0],) if accept(seen[0]) else None

    (value,) = wait_until(accepted, timeout, what, interval, ignore,
                          detail=lambda: f"last value: {seen[0]!r}" if seen else "no value fetched")
    return value
