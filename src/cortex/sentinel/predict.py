"""Score, factors, predictions and anomalies: pure functions over a node's series, with the clock passed in.

The rules and where their thresholds come from:

- disk full (Prometheus node-mixin NodeFilesystemSpaceFillingUp): a least-squares line over the last 6 h of
  free bytes; warning when it reaches 0 within 24 h and less than 15 % is free, critical within 4 h and < 10 %;
  almost full regardless of trend below 5 % (warning) and 3 % (critical);
- memory exhaustion: the same over the last hour of MemAvailable, 6 h / 20 % and 1 h / 10 %;
- SMART (Backblaze): any raw value above 0 of attributes 5, 187, 188, 197, 198 flags the drive (warning);
  one that grew within a day, a failed overall status or NVMe critical_warning is critical: after a first
  scan error a drive is 39 times more likely to fail within 60 days (Pinheiro et al., FAST'07). Many failing
  drives show no SMART signal at all, so I/O errors the kernel counts are a signal of their own, and the
  two together are critical;
- ECC (Schroeder et al., SIGMETRICS'09): a corrected error makes another within the month 13-90 times
  likelier: new corrected errors within a day are a warning, an uncorrected one is critical;
- battery wear: below 80 % of the design capacity, or a trend reaching it within 30 days, is a warning;
- thermal throttling and temperature, OOM kills, memory pressure, agent restarts, failing tasks: factors that
  lower the score (a node's missed heartbeats and Raft lag, which only the leader sees, are added to its
  published health by records.with_leader_view);
- anomalies: a robust z-score (median and MAD of the last hour) flags a sudden change; it lowers the score a
  little and never alerts by itself.

Hysteresis lives partly here: a rule already raised (`raised` holds its key) is judged against looser
clear thresholds, so a value hovering at a threshold does not flap. The rest (how long a condition must
hold before it is raised, and the minimum hold) is in notify.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol


class View(Protocol):
    """What the rules read: History implements it over SQLite, MemoryView over lists (tests)."""

    def names(self) -> list[str]: ...

    def series(self, name: str, since: float) -> list[tuple[float, float]]: ...

    def last(self, name: str, since: float) -> float | None: ...

    def low(self, name: str, since: float) -> float | None: ...


class MemoryView:
    """A View over {name: [(ts, value), ...]} (sorted by ts)."""

    def __init__(self, data: dict[str, list[tuple[float, float]]]):
        self.data = data

    def names(self) -> list[str]:
        return sorted(self.data)

    def series(self, name: str, since: float) -> list[tuple[float, float]]:
        return [p for p in self.data.get(name, []) if p[0] >= since]

    def last(self, name: str, since: float) -> float | None:
        points = self.series(name, since)
        return points[-1][1] if points else None

    def low(self, name: str, since: float) -> float | None:
        points = self.series(name, since)
        return min(v for _, v in points) if points else None

DAY = 86400.0
HOUR = 3600.0
SMART_HORIZON = 60 * DAY
ECC_HORIZON = 30 * DAY
PENALTY = {"critical": 50.0, "warning": 25.0}
MIN_POINTS = 6
ANOMALY_SIGNALS = ("load.per_cpu", "cpu.busy_pct", "cpu.iowait_pct", "psi.cpu.some_avg60",
                   "psi.memory.some_avg60", "psi.io.some_avg60", "temp.max_c")
ANOMALY_FLOOR = {"load.per_cpu": 0.5, "temp.max_c": 5.0}  # the smallest spread that counts (else 5 points)


@dataclass(frozen=True)
class Fit:
    slope: float  # per second
    intercept: float  # value at t = 0 of the shifted clock (the last point)
    r2: float
    points: int
    span: float


def fit_line(points: list[tuple[float, float]]) -> Fit | None:
    """Least squares over (ts, value); the intercept is the fitted value at the last point's time."""
    n = len(points)
    if n < 2:
        return None
    t0 = points[-1][0]
    xs = [t - t0 for t, _ in points]
    ys = [v for _, v in points]
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    syy = sum((y - my) ** 2 for y in ys)
    slope = sxy / sxx
    r2 = 1.0 if syy == 0 else max(0.0, min(1.0, sxy * sxy / (sxx * syy)))
    return Fit(slope, my - slope * mx, r2, n, xs[-1] - xs[0])


def robust_z(values: list[float], floor: float = 5.0) -> float:
    """How far the last value lies from the median of those before it, in robust standard deviations."""
    if len(values) < 10:
        return 0.0
    history, last = sorted(values[:-1]), values[-1]
    median = history[len(history) // 2]
    mad = sorted(abs(v - median) for v in history)[len(history) // 2]
    return (last - median) / max(1.4826 * mad, floor)


@dataclass
class Assessment:
    score: float = 100.0
    level: str = "healthy"  # healthy, degraded, critical
    factors: list[dict] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    anomalies: list[dict] = field(default_factory=list)

    def doc(self) -> dict:
        return {"score": round(self.score, 1), "level": self.level, "factors": self.factors,
                "predictions": self.predictions, "anomalies": self.anomalies}


def _instances(names: Iterable[str], prefix: str) -> list[str]:
    return sorted({n.split(":", 1)[1] for n in names if n.startswith(prefix + ":")})


def _last(view: View, name: str, now: float, window: float = 600.0) -> float | None:
    return view.last(name, now - window)


def _growth(view: View, name: str, now: float, window: float) -> float:
    """How much a counter grew within the window (0 without readings; a counter reset counts as 0)."""
    last, low = view.last(name, now - window), view.low(name, now - window)
    return 0.0 if last is None or low is None else max(0.0, last - low)


class _Judge:
    def __init__(self, view: View, now: float, raised: set[str]):
        self.view, self.series, self.names, self.now, self.raised = view, view.series, view.names(), now, raised
        self.out = Assessment()

    def predict(self, key: str, kind: str, target: str, severity: str, eta: float | None, confidence: float,
                message: str) -> None:
        self.out.predictions.append({"key": key, "kind": kind, "target": target, "severity": severity,
                                     "eta_s": None if eta is None else round(eta, 1),
                                     "confidence": round(max(0.0, min(1.0, confidence)), 2), "message": message})
        self.factor(key, PENALTY[severity], message)

    def factor(self, name: str, penalty: float, detail: str) -> None:
        self.out.factors.append({"name": name, "penalty": round(penalty, 1), "detail": detail})

    # --- trend rules -------------------------------------------------------------------------------------------
    def _trend(self, key: str, name: str, window: float, total: float | None, limits: tuple, clear_limits: tuple,
               kind: str, what: str) -> None:
        """Free amount `name` trending to 0: limits are ((horizon, pct) critical, (horizon, pct) warning)."""
        points = self.series(name, self.now - window)
        if len(points) < MIN_POINTS or not total:
            return
        fit = fit_line(points)
        free = points[-1][1]
        pct = 100.0 * free / total
        if fit is None or fit.slope >= 0:
            return
        eta = max(0.0, fit.intercept) / -fit.slope
        confidence = fit.r2 * min(1.0, fit.points / 20)
        raised = key in self.raised
        if not raised and fit.r2 < 0.5:
            return  # too noisy to call a trend
        (c_h, c_pct), (w_h, w_pct) = clear_limits if raised else limits
        severity = ("critical" if eta <= c_h and pct < c_pct else "warning" if eta <= w_h and pct < w_pct else "")
        if severity:
            self.predict(key, kind, name.split(":", 1)[-1], severity, eta, confidence,
                         f"{what} full in {_human(eta)} at the current rate ({pct:.1f} % free)")

    def disks(self) -> None:
        for path in _instances(self.names, "disk.avail_bytes"):
            if _last(self.view, f"disk.readonly:{path}", self.now):
                continue
            key = f"disk_full:{path}"
            size = _last(self.view, f"disk.size_bytes:{path}", self.now)
            self._trend(key, f"disk.avail_bytes:{path}", 6 * HOUR, size, ((4 * HOUR, 10.0), (24 * HOUR, 15.0)),
                        ((6 * HOUR, 12.0), (36 * HOUR, 20.0)), "disk_full", f"file system {path}")
            if any(p["key"] == key for p in self.out.predictions):
                continue
            pct = _last(self.view, f"disk.avail_pct:{path}", self.now)
            slack = 1.0 if key in self.raised else 0.0
            if pct is not None and pct < 5.0 + slack:
                self.predict(key, "disk_full", path, "critical" if pct < 3.0 + slack else "warning", None, 1.0,
                             f"file system {path} is almost full ({pct:.1f} % free)")

    def memory(self) -> None:
        total = _last(self.view, "mem.total_bytes", self.now)
        self._trend("memory_exhaustion", "mem.avail_bytes", HOUR, total, ((HOUR, 10.0), (6 * HOUR, 20.0)),
                    ((1.5 * HOUR, 12.0), (9 * HOUR, 25.0)), "memory_exhaustion", "memory")
        ooms = _growth(self.view, "oom.kills", self.now, HOUR)
        if ooms:
            self.factor("oom_kills", min(30.0, 10.0 * ooms), f"{ooms:.0f} process(es) killed for memory in the last hour")
        psi = _last(self.view, "psi.memory.full_avg60", self.now)
        if psi is not None and psi > 10:
            self.factor("memory_pressure", min(20.0, psi), f"tasks stalled on memory {psi:.0f} % of the last minute")
        swap = _last(self.view, "swap.used_pct", self.now)
        if swap is not None and swap > 80:
            self.factor("swap", 10.0, f"swap {swap:.0f} % used")

    def drives(self) -> None:
        labels = set(_instances(self.names, "smart.failed"))
        for prefix in ("smart.ata5", "smart.nvme_critical_warning", "disk.io_errors"):
            labels |= set(_instances(self.names, prefix))
        for label in sorted(labels):
            key = f"drive_failure:{label}"
            signals = []
            severity = ""
            if _last(self.view, f"smart.failed:{label}", self.now, DAY):
                severity, signals = "critical", ["SMART overall status FAILED"]
            flagged = {}
            for attr in (5, 187, 188, 197, 198):
                value = _last(self.view, f"smart.ata{attr}:{label}", self.now, DAY)
                if value:
                    flagged[attr] = value
            if flagged:
                grew = [a for a in flagged if _growth(self.view, f"smart.ata{a}:{label}", self.now, DAY) > 0]
                signals.append("SMART " + ", ".join(f"{a}={v:.0f}" for a, v in flagged.items())
                               + (f" (grew within a day: {', '.join(map(str, grew))})" if grew else ""))
                severity = "critical" if grew or severity else "warning"
            crit = _last(self.view, f"smart.nvme_critical_warning:{label}", self.now, DAY)
            if crit:
                severity = "critical"
                signals.append(f"NVMe critical_warning={crit:.0f}")
            media = _last(self.view, f"smart.nvme_media_errors:{label}", self.now, DAY)
            if media:
                grew = _growth(self.view, f"smart.nvme_media_errors:{label}", self.now, DAY) > 0
                severity = "critical" if grew or severity == "critical" else "warning"
                signals.append(f"NVMe media_errors={media:.0f}" + (" (growing)" if grew else ""))
            used = _last(self.view, f"smart.nvme_percentage_used:{label}", self.now, DAY)
            if used is not None and used >= 100:
                severity = severity or "warning"
                signals.append(f"{used:.0f} % of rated endurance used")
            ioerr = _growth(self.view, f"disk.io_errors:{label}", self.now, HOUR)
            if ioerr:
                # FAST'07: many failing drives show no SMART signal; I/O errors with one are worse than either
                severity = "critical" if signals else "warning"
                signals.append(f"{ioerr:.0f} I/O error(s) in the last hour")
            if not severity:
                continue
            confidence = 0.9 if severity == "critical" else 0.5
            self.predict(key, "drive_failure", label, severity, SMART_HORIZON, confidence,
                         f"drive {label} may fail within 60 days: {'; '.join(signals)}")

    def ecc(self) -> None:
        ue = _growth(self.view, "edac.ue", self.now, DAY)
        ce = _growth(self.view, "edac.ce", self.now, DAY)
        if ue:
            self.predict("memory_errors", "memory_errors", "dimm", "critical", ECC_HORIZON, 0.9,
                         f"{ue:.0f} uncorrected memory error(s) within a day: replace the DIMM")
        elif ce or ("memory_errors" in self.raised and _growth(self.view, "edac.ce", self.now, 3 * DAY)):
            ce = ce or _growth(self.view, "edac.ce", self.now, 3 * DAY)
            self.predict("memory_errors", "memory_errors", "dimm", "warning", ECC_HORIZON, min(0.9, 0.4 + 0.05 * ce),
                         f"{ce:.0f} corrected memory error(s) within a day: more are 13-90x likelier this month")

    def batteries(self) -> None:
        for name in _instances(self.names, "battery.health_pct"):
            key = f"battery_wear:{name}"
            points = self.series(f"battery.health_pct:{name}", self.now - 30 * DAY)
            if not points:
                continue
            health = points[-1][1]
            threshold = 82.0 if key in self.raised else 80.0
            if health < threshold:
                self.predict(key, "battery_wear", name, "warning", 0.0, 1.0,
                             f"battery {name} holds {health:.0f} % of its design capacity")
                continue
            fit = fit_line(points) if len(points) >= MIN_POINTS else None
            steady = key in self.raised or (fit is not None and fit.r2 >= 0.5 and fit.span >= 12 * HOUR)
            if fit and fit.slope < 0 and steady:
                eta = (fit.intercept - 80.0) / -fit.slope
                if eta <= (45 if key in self.raised else 30) * DAY:
                    self.predict(key, "battery_wear", name, "warning", eta, fit.r2 * min(1.0, fit.points / 20),
                                 f"battery {name} falls below 80 % of its design capacity in {_human(eta)}")

    def thermal(self) -> None:
        throttles = sum(_growth(self.view, n, self.now, HOUR) for n in ("thermal.core_throttles",
                                                                          "thermal.package_throttles"))
        if throttles >= 100:
            self.factor("thermal_throttling", min(20.0, throttles / 50), f"{throttles:.0f} thermal throttle events in the last hour")
        temp = _last(self.view, "temp.max_c", self.now)
        if temp is not None and temp >= 90:
            self.factor("temperature", 10.0, f"hottest sensor at {temp:.0f} °C")

    def agent(self) -> None:
        restarts = _growth(self.view, "agent.restarts", self.now, HOUR)
        if restarts >= 2:
            self.factor("agent_restarts", 10.0, f"the agent restarted {restarts:.0f} times in the last hour")
        failures = _last(self.view, "tasks.failure_pct", self.now)
        if failures is not None and failures >= 50:
            self.factor("task_failures", 15.0, f"{failures:.0f} % of this node's recent task attempts failed")

    def anomalies(self) -> None:
        for name in ANOMALY_SIGNALS:
            points = self.series(name, self.now - HOUR)
            z = robust_z([v for _, v in points], ANOMALY_FLOOR.get(name, 5.0))
            if abs(z) >= 8:
                self.out.anomalies.append({"signal": name, "value": points[-1][1], "z": round(z, 1)})
                self.factor(f"anomaly:{name}", 5.0, f"{name} jumped to {points[-1][1]:g} (robust z {z:.0f})")


def assess(view: View, now: float, raised: Iterable[str] = ()) -> Assessment:
    """The node's assessment at `now` from its series (a History, or a MemoryView)."""
    judge = _Judge(view, now, set(raised))
    for rule in (judge.disks, judge.memory, judge.drives, judge.ecc, judge.batteries, judge.thermal, judge.agent,
                 judge.anomalies):
        rule()
    out = judge.out
    out.score = max(0.0, 100.0 - sum(f["penalty"] for f in out.factors))
    severities = {p["severity"] for p in out.predictions}
    out.level = ("critical" if "critical" in severities or out.score < 40 else
                 "degraded" if severities or out.score < 80 else "healthy")
    out.predictions.sort(key=lambda p: (p["severity"] != "critical", math.inf if p["eta_s"] is None else p["eta_s"]))
    return out


def _human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 2 * HOUR:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * DAY:
        return f"{seconds / HOUR:.1f} h"
    return f"{seconds / DAY:.0f} days"
