"""Leases and the decisions built on them, pure and clock-free: callers pass `now` (time.monotonic()).

Why it is safe without synchronized clocks: a node's lease starts when it *sent* a renewal that the cluster
then committed; the leader counts from when it *applied* that renewal, which is later. The node stops its
services (self-fencing) once `lease - fence_early` has passed without a committed renewal, early enough for
the process tree to be killed; the leader moves a service only after `lease + margin` has passed by its own
clock. Both measure durations on their own monotonic clocks, so only clock *rates* must roughly agree.
A new leader has heard nobody yet: it gives every node a full lease from its own start (like liveness.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from cortex.services import state

DEFAULT_LEASE = 8.0  # seconds a committed renewal keeps a node's services running
DEFAULT_MARGIN = 2.0  # the leader's extra wait beyond the lease before it moves a service
FENCE_EARLY = 3.0  # a node fences this long before its lease ends: time to kill the process tree
GIVEBACK_TIMEOUT = 120.0
MOVE_CRASHES = 3  # crashes of a service just moved in a planned way before it is moved back  # a giveback whose home has not reported healthy by then has failed


class NodeLease:
    """This node's view of its own lease."""

    def __init__(self, lease: float = DEFAULT_LEASE, fence_early: float = FENCE_EARLY):
        if not 0 < fence_early < lease:
            raise ValueError("need 0 < fence_early < lease")
        self.lease, self.fence_early = lease, fence_early
        self.renewed_at: float | None = None  # when the last committed renewal was sent

    def renewed(self, sent_at: float) -> None:
        self.renewed_at = sent_at if self.renewed_at is None else max(self.renewed_at, sent_at)

    def valid(self, now: float) -> bool:
        """Whether services may run (and start) here now."""
        return self.renewed_at is not None and now - self.renewed_at < self.lease - self.fence_early

    def silent_for(self, now: float) -> float | None:
        return None if self.renewed_at is None else now - self.renewed_at


class LeaseBook:
    """The leader's record of renewals it applied, by its own clock."""

    def __init__(self, lease: float = DEFAULT_LEASE, margin: float = DEFAULT_MARGIN):
        self.lease, self.margin = lease, margin
        self._heard: dict[str, float] = {}
        self._since: dict[str, float] = {}  # start of each node's current unbroken run of renewals

    def start(self, nodes, now: float) -> None:
        """On becoming leader: everyone gets a full lease, nobody's health run has begun yet."""
        self._heard = {n: now for n in nodes}
        self._since = {n: now for n in nodes}

    def heard(self, node: str, now: float) -> None:
        last = self._heard.get(node)
        if last is None or now - last >= self.lease:
            self._since[node] = now
        self._heard[node] = max(now, last or now)

    def alive(self, node: str, now: float) -> bool:
        last = self._heard.get(node)
        return last is not None and now - last < self.lease

    def expired(self, node: str, now: float) -> bool:
        """The node's lease has certainly run out, by this leader's clock."""
        last = self._heard.get(node)
        return last is not None and now - last >= self.lease + self.margin

    def healthy_for(self, node: str, now: float) -> float:
        """How long the node has renewed without a gap (0 when it is not alive)."""
        return now - self._since.get(node, now) if self.alive(node, now) else 0.0

    def silent_for(self, node: str, now: float) -> float | None:
        last = self._heard.get(node)
        return None if last is None else now - last


@dataclass(frozen=True)
class Move:
    name: str
    epoch: int  # the epoch it was decided on (compare-and-set)
    holder: str
    state: str
    reason: str
    planned: bool = False
    fenced: bool = False

    def args(self) -> dict:
        return {"name": self.name, "epoch": self.epoch, "holder": self.holder, "state": self.state,
                "reason": self.reason, "planned": self.planned, "fenced": self.fenced}


def start_gate(row: dict, me: str, lease_ok: bool) -> str:
    """'' when this node may start `row`'s service now, else why it waits. A node never starts a service
    whose epoch it does not hold, nor without a lease, nor before the previous holder let go or was fenced."""
    if row["holder"] != me:
        return f"held by {row['holder']} (epoch {row['epoch']})"
    if not lease_ok:
        return "no lease: this node cannot reach a quorum of servers"
    prev = row.get("prev_holder") or ""
    if prev and prev != me and not row.get("released") and not row.get("prev_fenced"):
        return f"waiting for {prev} to stop it (epoch {row['epoch']})"
    return ""


def _report(row: dict, node: str) -> dict | None:
    return next((r for r in row.get("reports", []) if r["node_id"] == node), None)


def catch_up(row: dict) -> tuple[bool, str]:
    """A giveback of a service with a volume: (whether the home has pulled the partner's volume since the
    move, the error of the home's pull since the move or ''). The partner keeps serving until the home caught
    up, so the final pull after it stops copies only the last seconds. Both sides of the comparison are the
    leader's clock: the move's time, and a report's time less the age the home gave its copy."""
    home = _report(row, row["holder"])
    if home is None or row.get("moved_at") is None or home["epoch"] < row["epoch"] or home["at"] < row["moved_at"]:
        return False, ""
    if home.get("sync_age") is not None and home["at"] - home["sync_age"] >= row["moved_at"] \
            and home.get("synced_from") == row["prev_holder"]:
        return True, ""
    return False, home.get("sync_error", "")


def decide(view: dict, book: LeaseBook, now: float, first_seen: dict, giveback_timeout: float = GIVEBACK_TIMEOUT) -> list[Move]:
    """The leader's moves for one round. `view` is the `service.leader` query's answer; `first_seen` maps
    (name, epoch) to when this leader first saw that epoch (kept by the caller across rounds)."""
    ready, drained = view["ready"], set(view["drained"])
    moves = []
    for row in view["services"]:
        name, holder, home, epoch = row["name"], row["holder"], row["home"], row["epoch"]
        seen = first_seen.setdefault((name, epoch), now)
        usable = {n: caps for n, caps in ready.items() if book.alive(n, now)}
        order = [home, *row["candidates"]] if holder != home else row["candidates"]
        targets = [n for n in order if n != holder and not state.refusal(row, n, usable)]
        # A node that runs nothing renews only now and then (idle_report_period): a service just placed on it
        # gets a full lease from when this leader first saw it there, as every node does on a new leader.
        if book.expired(holder, now) and now - seen >= book.lease + book.margin:
            targets = [n for n in order if n != holder and not state.refusal(row, n, usable, planned=False)]
            if targets:
                target = targets[0]
                silent = book.silent_for(holder, now) or 0.0
                moves.append(Move(name, epoch, target, "running" if target == home else "taken_over",
                                  f"{holder} lost its lease (silent {silent:.1f}s, so its services are fenced); "
                                  f"{target} took over", planned=False, fenced=True))
            elif not row["reason"].startswith("no partner"):
                moves.append(Move(name, epoch, holder, row["state"],
                                  f"no partner ready to take over from {holder}, which lost its lease"))
            continue
        if row["reason"].startswith("no partner") and book.alive(holder, now):
            moves.append(Move(name, epoch, holder, row["state"], f"{holder} renews its lease again"))
        if holder in drained:
            live = [t for t in targets if t not in drained]
            if live:
                moves.append(Move(name, epoch, live[0], "running" if live[0] == home else "taken_over",
                                  f"{holder} is drained", planned=True))
            continue
        report = _report(row, holder)
        # a planned move has failed once the new holder gave up (sync failed, restart policy) or keeps crashing;
        # one crash is not enough (the old holder's port may take a moment to close)
        failed = report is not None and report["epoch"] == epoch and row["planned"] and row["ready_at"] is None \
            and (report["state"] == "failed" or report["state"] == "backoff" and report["restarts"] >= MOVE_CRASHES)
        timed_out = row["state"] == "giving_back" and now - first_seen[(name, epoch)] > giveback_timeout
        prev = row["prev_holder"]
        if row["state"] == "giving_back" and row["spec"]["volume"] and prev and prev != holder \
                and not row.get("released") and not state.refusal(row, prev, usable):
            caught, error = catch_up(row)
            if not caught and error:  # the partner still serves: it keeps the service, and the reason says why
                moves.append(Move(name, epoch, prev, "taken_over" if prev != home else "running",
                                  f"giveback failed: {holder} could not pull the volume from {prev} ({error}); it "
                                  f"runs on {prev} again"[:2000], planned=True))
                continue
        if (failed or timed_out) and prev and prev != holder and not state.refusal(row, prev, usable):
            what = "giveback" if row["state"] == "giving_back" else "takeover"
            why = report["detail"] if failed and report["detail"] else \
                f"{holder} did not report it healthy within {giveback_timeout:g}s" if timed_out else "it failed to start"
            moves.append(Move(name, epoch, prev, "taken_over" if prev != home else "running",
                              f"{what} failed: {why}; it runs on {prev} again", planned=True))
            continue
        spec = row["spec"]
        if holder != home and row["state"] == "taken_over" and spec["auto_giveback"] and home not in drained \
                and book.healthy_for(home, now) >= spec["giveback_after"] and row["ready_at"] is not None:
            problem = state.refusal(row, home, usable)
            if not problem:
                moves.append(Move(name, epoch, home, "giving_back",
                                  f"automatic giveback: {home} healthy for {spec['giveback_after']:g}s", planned=True))
            elif not row["reason"].startswith("giveback refused"):
                moves.append(Move(name, epoch, holder, row["state"], f"giveback refused: {problem}"))
    return moves


def backoff(failures: int, base: float, cap: float) -> float:
    """Seconds before the next start after `failures` consecutive failures (exponential, capped)."""
    return 0.0 if failures <= 0 else min(cap, base * 2 ** (failures - 1))
