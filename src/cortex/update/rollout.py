"""Rolling updates as data: the plan, the rollout's state machine, and a model of one node's A/B slots.

Pure functions only; the updater plugin replicates every transition (so a new leader continues a rollout
where the old one stopped) and does the I/O: draining, installing, rebooting, waiting for a blessed boot.

Order: workers first, then follower servers, the leader last (after a leadership transfer), one node at a
time. A new rollout starts `checking`: the leader runs the pre-flight itself before any node is touched, however
the start was written (a tool, the CLI, a raw write), and only then moves it to `running`. The rollout halts
at the first node that fails and says why; `rollback` then walks the nodes already updated back in reverse
order, draining each again before it switches slots (done -> draining -> reverting -> rolled_back).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from cortex.update.releases import UpdateError, parse_version

ACTIVE = ("draining", "installing", "rebooting", "verifying")
STEP_FLOW = ("pending", *ACTIVE, "done")
TERMINAL = ("done", "skipped", "failed", "rolled_back")
# A rollback takes an updated node back: drain it again, then it switches to its previous slot and reboots.
BACK_FLOW = ("done", "draining", "reverting", "rolled_back")
ROLLOUT_STATES = ("checking", "running", "halted", "done", "rolling_back", "rolled_back", "cancelled")
IN_PROGRESS = ("checking", "running", "rolling_back")  # one at a time: a second start waits for these


@dataclass(frozen=True)
class Target:
    node_id: str
    role: str  # server | worker
    version: str  # what it runs now
    appliance: bool = True  # A/B image; False: installed by pip/Ansible
    leader: bool = False
    healthy: bool = True


@dataclass(frozen=True)
class Step:
    node_id: str
    role: str
    from_version: str
    state: str = "pending"
    reason: str = ""  # why skipped or failed


@dataclass(frozen=True)
class Rollout:
    id: str
    version: str
    steps: tuple[Step, ...]
    state: str = "running"
    reason: str = ""  # why halted

    def step(self, node_id: str) -> Step:
        return next(s for s in self.steps if s.node_id == node_id)


def preflight(targets: list[Target], version: str, allow_downgrade: bool = False) -> list[str]:
    """Why the rollout must not start (empty: go). Checked before any node is touched."""
    problems = []
    new = parse_version(version)
    for t in targets:
        if not t.healthy:
            problems.append(f"{t.node_id} is not healthy; fix or remove it first")
        if t.appliance and parse_version(t.version) > new and not allow_downgrade:
            problems.append(f"{t.node_id} runs {t.version}, newer than {version}; pass --allow-downgrade to go back")
    servers = [t for t in targets if t.role == "server"]
    if len(servers) == 2:
        problems.append("2 servers cannot lose one to a reboot and keep quorum; add a third server first")
    if sum(t.leader for t in targets) != 1:
        problems.append("the cluster has no leader right now; wait for one")
    return problems


def plan(rollout_id: str, targets: list[Target], version: str) -> Rollout:
    """Workers, then followers, then the leader; nodes already there or not appliances are skipped."""
    def order(t: Target) -> tuple:
        return (t.role == "server", t.leader, t.node_id)

    steps = []
    for t in sorted(targets, key=order):
        if not t.appliance:
            steps.append(Step(t.node_id, t.role, t.version, "skipped",
                              "not an appliance: update it through its package path (ansible role, pip)"))
        elif t.version == version:
            steps.append(Step(t.node_id, t.role, t.version, "skipped", f"already runs {version}"))
        else:
            steps.append(Step(t.node_id, t.role, t.version))
    state = "checking" if any(s.state == "pending" for s in steps) else "done"
    return Rollout(rollout_id, version, tuple(steps), state)


def checked(rollout: Rollout, problems: list[str]) -> Rollout:
    """The leader's own pre-flight verdict on a new rollout: go (running) or halt before any node moved."""
    if rollout.state != "checking":
        raise UpdateError(f"rollout {rollout.id} is {rollout.state}, not waiting for its pre-flight check")
    if problems:
        return replace(rollout, state="halted", reason="pre-flight refused, no node was touched: " + "; ".join(problems))
    return replace(rollout, state="running")


def next_step(rollout: Rollout) -> Step | None:
    """The step to work on now: the active one, else the first pending one; None when nothing may move."""
    if rollout.state not in ("running", "rolling_back"):
        return None
    if rollout.state == "rolling_back":
        back = [s for s in rollout.steps if s.state in BACK_FLOW[:-1] or s.state in ACTIVE]
        return back[-1] if back else None
    active = [s for s in rollout.steps if s.state in ACTIVE]
    if active:
        return active[0]
    return next((s for s in rollout.steps if s.state == "pending"), None)


def advance(rollout: Rollout, node_id: str, new_state: str, reason: str = "") -> Rollout:
    """Apply one reported transition; refuse anything out of order (a stale report, a second node at once)."""
    step = rollout.step(node_id)
    if rollout.state == "rolling_back":
        current = next_step(rollout)
        if step is not current or step.state not in BACK_FLOW[:-1]:
            raise UpdateError(f"rolling back: only {getattr(current, 'node_id', 'no node')} may move")
        # forward along done -> draining -> reverting -> rolled_back; straight to rolled_back when the node
        # is already back on its previous version (it fell back, or was reverted by hand)
        if new_state != "rolled_back" and (new_state not in BACK_FLOW
                                           or BACK_FLOW.index(new_state) != BACK_FLOW.index(step.state) + 1):
            raise UpdateError(f"rolling back {node_id}: {step.state} -> {new_state} is not a step of a rollback")
        steps = tuple(replace(s, state=new_state) if s.node_id == node_id else s for s in rollout.steps)
        left = any(s.state in BACK_FLOW[:-1] for s in steps)
        return replace(rollout, steps=steps, state="rolling_back" if left else "rolled_back")
    if rollout.state != "running":
        raise UpdateError(f"rollout {rollout.id} is {rollout.state}; nothing moves")
    if step is not next_step(rollout):
        current = next_step(rollout)
        raise UpdateError(f"{node_id} is not the node being updated ({current.node_id if current else 'none'})")
    if new_state == "failed":
        steps = tuple(replace(s, state="failed", reason=reason) if s.node_id == node_id else s for s in rollout.steps)
        return replace(rollout, steps=steps, state="halted", reason=f"{node_id}: {reason or 'failed'}")
    flow = STEP_FLOW.index(step.state)
    if new_state not in STEP_FLOW or STEP_FLOW.index(new_state) != flow + 1:
        raise UpdateError(f"{node_id}: {step.state} -> {new_state} is not a step of an update")
    steps = tuple(replace(s, state=new_state) if s.node_id == node_id else s for s in rollout.steps)
    finished = all(s.state in ("done", "skipped") for s in steps)
    return replace(rollout, steps=steps, state="done" if finished else "running")


def start_rollback(rollout: Rollout) -> Rollout:
    if rollout.state not in ("checking", "halted", "done", "running"):
        raise UpdateError(f"rollout {rollout.id} is {rollout.state}; only a checking, halted, running or done one "
                          "rolls back")
    if any(s.state in ACTIVE for s in rollout.steps):
        # the node in flight finishes or fails first; rolling back under it would race its reboot
        raise UpdateError("a node is being updated right now; wait for it to finish or fail, then roll back")
    has_done = any(s.state == "done" for s in rollout.steps)
    return replace(rollout, state="rolling_back" if has_done else "rolled_back")


# --- one node's A/B slots (what systemd-sysupdate, systemd-boot's boot counting and blessing do) ---------

@dataclass(frozen=True)
class Slots:
    """Two /usr slots; the boot entries point at them. `tries` counts down an unblessed new entry."""

    versions: tuple[str | None, str | None]  # slot A, slot B
    booted: int  # which slot runs now
    good: int  # the slot of the last blessed boot: the fallback
    tries: dict = field(default_factory=dict)  # slot -> tries left for an unblessed entry

    def inactive(self) -> int:
        return 1 - self.booted

    def install(self, version: str) -> Slots:
        """sysupdate writes the inactive slot only (ProtectVersion=%A) and adds an entry with 3 tries."""
        if self.versions[self.booted] == version:
            raise UpdateError(f"{version} is already running")
        target = self.inactive()
        if target == self.good and self.good != self.booted:
            raise UpdateError("the inactive slot is the only known-good fallback; bless the running one first")
        versions = tuple(version if i == target else v for i, v in enumerate(self.versions))
        return Slots(versions, self.booted, self.good, {**self.tries, target: 3})

    def boot(self, comes_up: bool) -> Slots:
        """Reboot: systemd-boot picks the newest entry with tries left, else the good one; blessing follows
        if the node comes up healthy (cortex-ready → boot-complete.target)."""
        candidates = [i for i in (0, 1) if self.tries.get(i, 0) > 0]
        slot = candidates[0] if candidates else self.good
        tries = dict(self.tries)
        if slot in tries:
            tries[slot] -= 1
        if comes_up and self.versions[slot] is not None:
            tries.pop(slot, None)
            return Slots(self.versions, slot, slot, tries)
        return Slots(self.versions, slot, self.good, tries)
