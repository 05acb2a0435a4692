"""SMART through `smartctl -j` (smartmontools 7.x JSON): the ATA attributes Backblaze flags drives on, NVMe health.

ATA: raw values of 5 (reallocated sectors), 187 (reported uncorrectable), 188 (command timeout), 197
(current pending sectors), 198 (offline uncorrectable); any above 0 flags the drive. NVMe: critical_warning,
media_errors, percentage_used, temperature. Also the overall `smart_status.passed`.

smartctl can take seconds per device (a drive spinning up), so it runs at most every `interval` seconds, with
a timeout per call; a missing smartctl, a device it cannot open, a malformed document is logged once with the
device named, and the drive's signals are left absent.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import time

log = logging.getLogger("cortex.sentinel")

ATA_IDS = {5: "reallocated", 187: "reported_uncorrect", 188: "command_timeout", 197: "pending", 198: "offline_uncorrect"}
_DEV_RE = re.compile(r"[^A-Za-z0-9_.-]")


def device_label(name: str) -> str:
    """`/dev/nvme0n1` -> `nvme0n1`: the instance suffix of a drive's signals."""
    return _DEV_RE.sub("_", name.rsplit("/", 1)[-1]) or "disk"


def parse(doc: dict) -> dict[str, float | None]:
    """Signals from one `smartctl -j -a DEVICE` document. Raises ValueError when it is not such a document."""
    if not isinstance(doc, dict) or not isinstance(doc.get("device"), dict) or not doc["device"].get("name"):
        raise ValueError("not a smartctl -j document (no device.name)")
    label = device_label(str(doc["device"]["name"]))
    out: dict[str, float | None] = {}
    status = doc.get("smart_status")
    if isinstance(status, dict) and isinstance(status.get("passed"), bool):
        out[f"smart.failed:{label}"] = 0.0 if status["passed"] else 1.0
    temp = doc.get("temperature")
    if isinstance(temp, dict) and isinstance(temp.get("current"), int | float):
        out[f"smart.temp_c:{label}"] = float(temp["current"])
    table = (doc.get("ata_smart_attributes") or {}).get("table")
    if isinstance(table, list):
        present = {}
        for attr in table:
            if isinstance(attr, dict) and attr.get("id") in ATA_IDS:
                raw = attr.get("raw")
                value = raw.get("value") if isinstance(raw, dict) else None
                if isinstance(value, int | float) and not isinstance(value, bool):
                    # drives pack vendor bits into the high bytes of some raw values: the low 32 bits count
                    present[attr["id"]] = float(int(value) & 0xFFFFFFFF)
        for attr_id in ATA_IDS:
            out[f"smart.ata{attr_id}:{label}"] = present.get(attr_id)
    nvme = doc.get("nvme_smart_health_information_log")
    if isinstance(nvme, dict):
        for key in ("critical_warning", "media_errors", "percentage_used", "temperature", "available_spare"):
            value = nvme.get(key)
            name = "temp_c" if key == "temperature" else key
            out[f"smart.nvme_{name}:{label}"] = float(value) if isinstance(value, int | float) else None
    return out


class SmartReader:
    """Runs smartctl on every drive it finds, at most every `interval` seconds; keeps the last readings."""

    def __init__(self, command: str = "smartctl", interval: float = 300.0, timeout: float = 20.0,
                 clock=time.monotonic):
        self.command, self.interval, self.timeout, self.clock = command, interval, timeout, clock
        self.last: dict[str, float | None] = {}
        self._next = 0.0
        self._logged: set[str] = set()

    def _once(self, source: str, what: str, level: int = logging.WARNING) -> None:
        if source not in self._logged:
            self._logged.add(source)
            log.log(level, "sentinel cannot read SMART", extra={"fields": {"source": source, "error": what}})

    def _run(self, args: list[str], source: str) -> dict | None:
        try:
            done = subprocess.run([self.command, "-j", *args], capture_output=True, timeout=self.timeout,
                                  text=True, check=False)
        except subprocess.TimeoutExpired:
            self._once(source, f"smartctl took more than {self.timeout:g}s; the drive's signals stay absent")
            return None
        except OSError as exc:
            self._once(source, str(exc))
            return None
        try:
            doc = json.loads(done.stdout)
        except ValueError:
            self._once(source, f"smartctl printed no JSON (exit {done.returncode}): {done.stderr.strip()[:200]}")
            return None
        # exit status bits 0-1: the command line or the device could not be used; higher bits describe the drive
        if done.returncode & 0b11:
            messages = [m.get("string", "") for m in (doc.get("smartctl") or {}).get("messages") or []
                        if isinstance(m, dict)]
            self._once(source, f"smartctl exit {done.returncode}: {'; '.join(messages)[:200]}")
            return None
        return doc

    def devices(self) -> list[str]:
        doc = self._run(["--scan-open"], "smartctl --scan-open")
        devices = (doc or {}).get("devices") or []
        return [d["name"] for d in devices if isinstance(d, dict) and isinstance(d.get("name"), str)]

    def read(self) -> dict[str, float | None]:
        """The latest readings; smartctl runs only when `interval` has passed since the last run."""
        now = self.clock()
        if now < self._next:
            return self.last
        self._next = now + self.interval
        if not shutil.which(self.command):
            # a VM or a machine without smartmontools is a valid setup: worth a line, not a warning
            self._once("smartctl", f"{self.command} is not installed (apt install smartmontools); SMART is absent",
                       logging.INFO)
            return self.last
        out: dict[str, float | None] = {}
        for device in self.devices():
            doc = self._run(["-a", device], device)
            if doc is None:
                continue
            try:
                out.update(parse(doc))
            except ValueError as exc:
                self._once(device, str(exc))
        self.last = out
        return out
