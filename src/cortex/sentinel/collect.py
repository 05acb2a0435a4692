"""The collectors: one reading of the machine every few seconds, from procfs and sysfs under a root.

Every signal is a float or None: None means the machine does not have it (no EDAC driver, no battery, a
kernel without PSI), never zero, so a score is not lowered, nor a prediction made, from a signal that is not
there. The roots are injectable, so tests feed real-format trees from a directory. A tree that is missing or
malformed is logged once with the file named; the reading goes on with what is left.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("cortex.sentinel")

# File systems worth watching for free space when no path is configured (not pseudo or volatile ones).
DISK_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "vfat", "exfat", "ntfs3", "bcachefs"})
MAX_MOUNTS = 32


@dataclass
class Roots:
    proc: Path = Path("/proc")
    sys: Path = Path("/sys")


@dataclass
class _Once:
    """Log a source's problem once until it recovers, so a missing tree does not fill the log every 10 s."""

    seen: set = field(default_factory=set)

    def problem(self, source: str, what: str) -> None:
        if source not in self.seen:
            self.seen.add(source)
            log.warning("sentinel cannot read a signal source", extra={"fields": {"source": source, "error": what}})

    def ok(self, source: str) -> None:
        self.seen.discard(source)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _number(path: Path) -> float | None:
    text = _read(path)
    if text is None:
        return None
    text = text.strip()
    try:
        return float(int(text, 16)) if text.startswith("0x") else float(text)
    except ValueError:
        return None


def parse_psi(text: str) -> dict[str, float]:
    """`some avg10=1.00 avg60=0.50 avg300=0.10 total=123` lines -> {"some_avg60": 0.5, ...}."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] not in ("some", "full"):
            continue
        for kv in parts[1:]:
            key, _, value = kv.partition("=")
            if key in ("avg10", "avg60") and value:
                out[f"{parts[0]}_{key}"] = float(value)
    return out


def parse_meminfo(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields:
            out[key.strip()] = float(fields[0]) * (1024 if fields[1:2] == ["kB"] else 1)
    return out


def parse_mounts(text: str) -> list[tuple[str, str, str]]:
    """(device, mount point, fs type) of /proc/mounts lines; octal escapes (\\040) decoded."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out.append((parts[0], parts[1].encode().decode("unicode_escape"), parts[2]))
    return out


class Collector:
    """Reads the signals of one node. `sample()` returns {signal name: float or None}.

    Names are `group.metric` with a `:instance` suffix for per-instance signals (`disk.avail_bytes:/data`).
    """

    def __init__(self, roots: Roots | None = None, watch_paths: Iterable[str] = (),
                 statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
                 clock: Callable[[], float] = time.monotonic):
        self.roots = roots or Roots()
        self.watch_paths = [str(p) for p in watch_paths]
        self.statvfs = statvfs
        self.once = _Once()
        self._cpu_prev: tuple[float, float, float] | None = None
        self._disk_prev: dict[str, tuple[float, int]] = {}
        self.clock = clock

    def sample(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for part in (self.cpu, self.load, self.pressure, self.memory, self.vmstat, self.disks, self.block_errors,
                     self.edac, self.throttle, self.temperatures, self.batteries):
            try:
                out.update(part())
            except Exception as exc:  # a malformed tree never stops the other collectors
                self.once.problem(part.__name__, f"{type(exc).__name__}: {exc}")
        return out

    # --- procfs ------------------------------------------------------------------------------------------------
    def cpu(self) -> dict:
        text = _read(self.roots.proc / "stat")
        if text is None or not text.startswith("cpu "):
            self.once.problem(str(self.roots.proc / "stat"), "missing or not a /proc/stat")
            return {"cpu.busy_pct": None, "cpu.iowait_pct": None}
        values = [float(v) for v in text.splitlines()[0].split()[1:]]
        idle, iowait = values[3], values[4] if len(values) > 4 else 0.0
        total = sum(values[:8])
        prev, self._cpu_prev = self._cpu_prev, (total, idle + iowait, iowait)
        if prev is None or total <= prev[0]:
            return {"cpu.busy_pct": None, "cpu.iowait_pct": None}
        dt = total - prev[0]
        return {"cpu.busy_pct": round(100.0 * (1 - (idle + iowait - prev[1]) / dt), 3),
                "cpu.iowait_pct": round(100.0 * (iowait - prev[2]) / dt, 3)}

    def load(self) -> dict:
        text = _read(self.roots.proc / "loadavg")
        if text is None:
            return {"load.1": None, "load.5": None}
        parts = text.split()
        cpus = os.cpu_count() or 1
        return {"load.1": float(parts[0]), "load.5": float(parts[1]), "load.per_cpu": float(parts[0]) / cpus}

    def pressure(self) -> dict:
        out: dict[str, float | None] = {}
        for resource in ("cpu", "memory", "io"):
            text = _read(self.roots.proc / "pressure" / resource)
            psi = parse_psi(text) if text else {}
            out[f"psi.{resource}.some_avg60"] = psi.get("some_avg60")
            if resource != "cpu":
                out[f"psi.{resource}.full_avg60"] = psi.get("full_avg60")
        return out

    def memory(self) -> dict:
        text = _read(self.roots.proc / "meminfo")
        if text is None:
            self.once.problem(str(self.roots.proc / "meminfo"), "missing")
            return {"mem.avail_bytes": None, "mem.avail_pct": None, "swap.used_pct": None}
        m = parse_meminfo(text)
        total, avail = m.get("MemTotal"), m.get("MemAvailable")
        swap_total, swap_free = m.get("SwapTotal"), m.get("SwapFree")
        return {"mem.total_bytes": total, "mem.avail_bytes": avail,
                "mem.avail_pct": round(100.0 * avail / total, 3) if total and avail is not None else None,
                "swap.used_pct": round(100.0 * (swap_total - swap_free) / swap_total, 3)
                if swap_total and swap_free is not None else None}

    def vmstat(self) -> dict:
        text = _read(self.roots.proc / "vmstat")
        if text is None:
            return {"oom.kills": None}
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return {"oom.kills": float(value)}
        return {"oom.kills": None}  # kernels before 4.13 do not count them

    def disks(self) -> dict:
        paths = list(self.watch_paths)
        if not paths:
            text = _read(self.roots.proc / "mounts") or ""
            seen_dev: set[str] = set()
            for dev, mount, fs in parse_mounts(text):
                if fs in DISK_FS and dev not in seen_dev and len(paths) < MAX_MOUNTS:
                    seen_dev.add(dev)
                    paths.append(mount)
        out: dict[str, float | None] = {}
        for path in paths:
            try:
                st = self.statvfs(path)
            except OSError as exc:
                self.once.problem(f"statvfs {path}", str(exc))
                out[f"disk.avail_bytes:{path}"] = None
                continue
            self.once.ok(f"statvfs {path}")
            size = st.f_blocks * st.f_frsize
            out[f"disk.size_bytes:{path}"] = float(size)
            out[f"disk.avail_bytes:{path}"] = float(st.f_bavail * st.f_frsize)
            out[f"disk.avail_pct:{path}"] = round(100.0 * st.f_bavail / st.f_blocks, 4) if st.f_blocks else None
            out[f"disk.readonly:{path}"] = float(bool(st.f_flag & os.ST_RDONLY))
            # fill rate since the last reading (bytes/s, negative while space is freed); the predictions fit
            # their own line over hours, this is what a dashboard plots
            avail, now = st.f_bavail * st.f_frsize, self.clock()
            prev = self._disk_prev.get(path)
            self._disk_prev[path] = (now, avail)
            out[f"disk.fill_rate_bps:{path}"] = round((prev[1] - avail) / (now - prev[0]), 3) \
                if prev and now > prev[0] else None
        return out

    # --- sysfs -------------------------------------------------------------------------------------------------
    def block_errors(self) -> dict:
        """SCSI/SATA devices count failed commands in `device/ioerr_cnt` (hex); NVMe reports through SMART."""
        out = {}
        block = self.roots.sys / "block"
        for dev in sorted(block.glob("*")) if block.is_dir() else ():
            if dev.name.startswith(("loop", "ram", "zram", "dm-", "md")):
                continue
            count = _number(dev / "device" / "ioerr_cnt")
            if count is not None:
                out[f"disk.io_errors:{dev.name}"] = count
        return out

    def edac(self) -> dict:
        mc = self.roots.sys / "devices" / "system" / "edac" / "mc"
        controllers = sorted(mc.glob("mc[0-9]*")) if mc.is_dir() else []
        if not controllers:
            return {"edac.ce": None, "edac.ue": None}
        ce = ue = 0.0
        for c in controllers:
            ce += _number(c / "ce_count") or 0.0
            ue += _number(c / "ue_count") or 0.0
        return {"edac.ce": ce, "edac.ue": ue}

    def throttle(self) -> dict:
        cpus = self.roots.sys / "devices" / "system" / "cpu"
        core, packages, found = 0.0, {}, False
        for cpu in sorted(cpus.glob("cpu[0-9]*")) if cpus.is_dir() else ():
            tt = cpu / "thermal_throttle"
            count = _number(tt / "core_throttle_count")
            if count is None:
                continue
            found = True
            core += count
            package = _number(cpu / "topology" / "physical_package_id") or 0.0
            packages[package] = max(packages.get(package, 0.0), _number(tt / "package_throttle_count") or 0.0)
        if not found:
            return {"thermal.core_throttles": None, "thermal.package_throttles": None}
        return {"thermal.core_throttles": core, "thermal.package_throttles": sum(packages.values())}

    def temperatures(self) -> dict:
        temps = []
        hwmon = self.roots.sys / "class" / "hwmon"
        for h in sorted(hwmon.glob("hwmon*")) if hwmon.is_dir() else ():
            for t in sorted(h.glob("temp*_input")):
                value = _number(t)
                if value is not None and -40_000 < value < 150_000:
                    temps.append(value / 1000.0)
        if not temps:
            zones = self.roots.sys / "class" / "thermal"
            for z in sorted(zones.glob("thermal_zone*")) if zones.is_dir() else ():
                value = _number(z / "temp")
                if value is not None and -40_000 < value < 150_000:
                    temps.append(value / 1000.0)
        return {"temp.max_c": max(temps) if temps else None}

    def batteries(self) -> dict:
        out = {}
        supplies = self.roots.sys / "class" / "power_supply"
        for ps in sorted(supplies.glob("*")) if supplies.is_dir() else ():
            if (_read(ps / "type") or "").strip() != "Battery":
                continue
            full = _number(ps / "energy_full") or _number(ps / "charge_full")
            design = _number(ps / "energy_full_design") or _number(ps / "charge_full_design")
            out[f"battery.health_pct:{ps.name}"] = round(100.0 * full / design, 3) if full and design else None
            cycles = _number(ps / "cycle_count")
            out[f"battery.cycles:{ps.name}"] = cycles if cycles else None  # many firmwares report 0: unknown
            out[f"battery.capacity_pct:{ps.name}"] = _number(ps / "capacity")
        return out
