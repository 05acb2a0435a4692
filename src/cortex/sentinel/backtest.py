"""A simulated-clock backtest: a node's signals over days, with faults injected, through the real pipeline.

The same History, `assess` and Alerter the plugin runs are driven by a simulated clock: each scenario
generates the signals a machine would show (an idle baseline with noise, plus one fault), records them,
assesses the node and feeds the alerter, exactly as the plugin's loop does. A fault is detected when an
alert of its kind is raised; its lead time is the failure time minus that moment, and must be at least the
scenario's horizon. The idle scenario must raise nothing. `bench/sentinel.py` runs it in full; the unit test
runs it with a coarser step.
"""

from __future__ import annotations

import math
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cortex.sentinel.history import History
from cortex.sentinel.notify import Alerter
from cortex.sentinel.predict import DAY, HOUR, assess

GB = 1e9
T0 = 1_700_000_000.0  # a fixed start, so a run is reproducible


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # the prediction kind that must be raised ("" for the idle timeline: nothing may be)
    duration: float  # seconds simulated
    failure_at: float  # seconds after start when the machine fails (its disk is full, the DIMM dies...)
    horizon: float  # the lead time required
    fault: Callable[[float, dict], None]  # (t since start, signals) -> adjusts the baseline in place
    step: float = 10.0
    evaluate_every: float = 60.0


def baseline(rng: random.Random, t: float, state: dict) -> dict:
    """An idle node: noisy CPU and load, memory wandering within a band, a disk that barely moves."""
    state["mem"] = min(0.75, max(0.45, state.get("mem", 0.6) + rng.gauss(0, 0.002)))
    total = 16 * GB
    daily = math.sin(2 * math.pi * t / DAY)
    return {
        "cpu.busy_pct": max(0.0, 4 + 2 * daily + rng.gauss(0, 1.5)), "cpu.iowait_pct": abs(rng.gauss(0, 0.3)),
        "load.per_cpu": max(0.0, 0.1 + 0.05 * daily + rng.gauss(0, 0.03)),
        "psi.cpu.some_avg60": abs(rng.gauss(0, 0.5)), "psi.memory.some_avg60": abs(rng.gauss(0, 0.1)),
        "psi.memory.full_avg60": 0.0, "psi.io.some_avg60": abs(rng.gauss(0, 0.3)),
        "mem.total_bytes": total, "mem.avail_bytes": total * state["mem"], "mem.avail_pct": 100 * state["mem"],
        "swap.used_pct": 2.0, "oom.kills": 0.0, "temp.max_c": 45 + 3 * daily + rng.gauss(0, 0.8),
        "disk.size_bytes:/": 500 * GB, "disk.avail_bytes:/": 300 * GB - t * 50 + rng.gauss(0, 2e6),
        "disk.avail_pct:/": 60.0, "disk.readonly:/": 0.0, "disk.io_errors:sda": 0.0,
        "edac.ce": 0.0, "edac.ue": 0.0, "thermal.core_throttles": 0.0, "thermal.package_throttles": 0.0,
        **{f"smart.ata{a}:sda": 0.0 for a in (5, 187, 188, 197, 198)}, "smart.failed:sda": 0.0,
        "smart.nvme_critical_warning:nvme0": 0.0, "smart.nvme_media_errors:nvme0": 0.0,
        "smart.nvme_percentage_used:nvme0": 7.0, "smart.failed:nvme0": 0.0,
        "battery.health_pct:BAT0": 93.0 + rng.gauss(0, 0.15), "agent.restarts": 1.0,
    }


def _disk_fill(t: float, s: dict) -> None:
    size = 100 * GB
    free = max(0.0, 0.5 * size * (1 - t / (30 * HOUR)))
    s.update({"disk.size_bytes:/data": size, "disk.avail_bytes:/data": free, "disk.avail_pct:/data": 100 * free / size,
              "disk.readonly:/data": 0.0})


def _memory_leak(t: float, s: dict) -> None:
    if t > 2 * HOUR:
        share = max(0.0, 0.6 * (1 - (t - 2 * HOUR) / (8 * HOUR)))
        s["mem.avail_bytes"], s["mem.avail_pct"] = s["mem.total_bytes"] * share, 100 * share


def _smart_ata(t: float, s: dict) -> None:
    if t > 3 * HOUR:  # a first pending sector, then reallocations growing
        s["smart.ata197:sda"] = 8.0
        s["smart.ata5:sda"] = float(int((t - 3 * HOUR) / 1800))


def _smart_nvme(t: float, s: dict) -> None:
    if t > 3 * HOUR:
        s["smart.nvme_media_errors:nvme0"] = float(1 + int((t - 3 * HOUR) / 3600))


def _ecc(t: float, s: dict) -> None:
    if t > 3 * HOUR:
        s["edac.ce"] = float(1 + int((t - 3 * HOUR) / 2400))


def _io_errors(t: float, s: dict) -> None:
    if t > 3 * HOUR:  # a failing drive without any SMART signal: only the kernel's error counter moves
        s["disk.io_errors:sda"] = float(int((t - 3 * HOUR) / 900))


def _battery(t: float, s: dict) -> None:
    s["battery.health_pct:BAT0"] = 86.0 - 0.3 * t / DAY + s["battery.health_pct:BAT0"] - 93.0


def scenarios(quick: bool = False) -> list[Scenario]:
    # quick: readings every 2 min, assessments every 5 (the unit test); full: the plugin's own pace (bench)
    step, every = (300.0, 600.0) if quick else (10.0, 30.0)
    out = [
        Scenario("idle_24h", "", DAY, 0, 0, lambda t, s: None, step=step, evaluate_every=every),
        Scenario("disk_fill", "disk_full", 30 * HOUR, 30 * HOUR, 4 * HOUR, _disk_fill, step=step, evaluate_every=every),
        Scenario("memory_leak", "memory_exhaustion", 10 * HOUR, 10 * HOUR, HOUR, _memory_leak, step=step, evaluate_every=every),
        # drives and DIMMs: the failure is taken to come a week after the first signal (FAST'07 and
        # Schroeder'09 give 60 days and a month for the raised odds); the simulation stops 3 h after it
        Scenario("smart_ata", "drive_failure", 6 * HOUR, 3 * HOUR + 7 * DAY, DAY, _smart_ata, step=step, evaluate_every=every),
        Scenario("smart_nvme", "drive_failure", 6 * HOUR, 3 * HOUR + 7 * DAY, DAY, _smart_nvme, step=step, evaluate_every=every),
        Scenario("io_errors", "drive_failure", 6 * HOUR, 3 * HOUR + 7 * DAY, DAY, _io_errors, step=step, evaluate_every=every),
        Scenario("ecc", "memory_errors", 6 * HOUR, 3 * HOUR + 7 * DAY, DAY, _ecc, step=step, evaluate_every=every),
        Scenario("battery_wear", "battery_wear", 20 * DAY, 20 * DAY, 7 * DAY, _battery, step=4 * HOUR if quick else 600.0,
                 evaluate_every=4 * HOUR if quick else 600.0),
    ]
    return out


@dataclass
class Outcome:
    scenario: str
    kind: str
    detected: bool
    lead_s: float | None
    horizon_s: float
    alerts: list[dict]


def run(scenario: Scenario, directory: Path | None = None, seed: int = 7) -> Outcome:
    rng = random.Random(seed)
    state: dict = {}
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        history = History(Path(tmp) / "history.db")
        alerter = Alerter(raise_after=30.0, clear_after=120.0, min_hold=600.0)
        raised: list[dict] = []
        t, next_eval, next_compact = 0.0, 0.0, 0.0
        while t <= scenario.duration:
            now = T0 + t
            signals = baseline(rng, t, state)
            scenario.fault(t, signals)
            history.add(now, signals)
            if t >= next_compact:
                history.compact(now)
                next_compact = t + 60.0
            if t >= next_eval:
                result = assess(history, now, alerter.raised().keys())
                for tr in alerter.update(now, result.predictions):
                    if tr["state"] == "raised":
                        raised.append({**tr, "t": t})
                next_eval = t + max(scenario.evaluate_every, scenario.step)
            t += scenario.step
        history.close()
    hits = [a for a in raised if a["kind"] == scenario.kind]
    lead = scenario.failure_at - hits[0]["t"] if hits else None
    return Outcome(scenario.name, scenario.kind, bool(hits), lead, scenario.horizon, raised)
