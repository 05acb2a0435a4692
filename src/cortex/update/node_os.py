"""The node side of an update, behind one small interface: what this node runs, installing a verified release
into the inactive slot, going back to the previous slot, rebooting.

- `ApplianceOS`: the Cortex image. The agent runs unprivileged (DynamicUser, ProtectSystem=strict), so it
  never writes partitions itself: it drops a request into its state directory and the root-owned
  `cortex-update.path` → `cortex-update.service` runs `cortex update apply-local` (re-verifies, runs
  systemd-sysupdate against the verified local copy, reboots). Boot counting and blessing are systemd-boot's
  and cortex-ready.service's.
- `SimulatedOS`: the same A/B slot logic (rollout.Slots) kept in a JSON file, for nodes that are plain
  processes (tests, dev clusters): "reboot" ends the agent process and whoever supervises it starts it
  again, exactly like systemd would. A release whose UKI contains `CORTEX_BROKEN` never gets ready.
- `PackageOS`: installed by pip or Ansible; a rollout skips it and says to use the package path.

Every kind remembers the version it was told to install (`expected.json` in the plugin's data directory),
so after a reboot it can tell "runs the new version" from "fell back to the previous slot".
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from cortex import __version__
from cortex.update.releases import UpdateError
from cortex.update.rollout import Slots

BROKEN_MARK = b"CORTEX_BROKEN"


@dataclass(frozen=True)
class Facts:
    version: str
    kind: str  # appliance | simulated | package
    blessed: bool  # this boot is known good (not on probation)
    boot_id: str
    booted_at: float
    free_bytes: int
    ready: bool = True  # False: this boot never gets ready (a broken version); it must not be blessed


class NodeOS(Protocol):
    kind: str

    def facts(self) -> Facts: ...

    def install(self, release_dir: Path, version: str) -> None:
        """Write the verified release into the inactive slot; the next boot tries it (with boot counting)."""

    def revert(self, version: str) -> None:
        """Make the slot holding `version` (the previous one) the next boot's default."""

    def reboot(self) -> None: ...

    def bless(self) -> None:
        """Mark the running boot good (the agent is ready and in its cluster)."""


def _run(argv: list[str], timeout: float = 600) -> str:
    """The one place this module runs a program; its failure is an UpdateError saying what failed."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UpdateError(f"{argv[0]}: {exc}") from None
    if out.returncode != 0:
        raise UpdateError(f"{' '.join(argv[:3])} failed ({out.returncode}): {(out.stderr or out.stdout).strip()[-500:]}")
    return out.stdout


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _booted_at() -> float:
    try:
        return time.time() - float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError):
        return 0.0


def _free(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return -1


# --- plain processes: the A/B model in a file -------------------------------------------------------------

class SimulatedOS:
    """Slots A/B in `<dir>/slots.json`; one process lifetime is one boot."""

    kind = "simulated"

    def __init__(self, directory: Path, initial_version: str):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "slots.json"
        doc = self._load() or {"slots": asdict(Slots((initial_version, None), 0, 0)), "broken": {}}
        slots = Slots(tuple(doc["slots"]["versions"]), doc["slots"]["booted"], doc["slots"]["good"],
                      {int(k): v for k, v in doc["slots"]["tries"].items()})
        # This process start is a boot: systemd-boot's choice (newest entry with tries left, else the good one)
        slots = self._choose(slots)
        self.slots, self.broken = slots, doc["broken"]
        self.boot_id, self.booted_at = uuid.uuid4().hex, time.time()
        self._save()

    @staticmethod
    def _choose(slots: Slots) -> Slots:
        candidates = [i for i in (0, 1) if slots.tries.get(i, 0) > 0]
        slot = candidates[0] if candidates else slots.good
        tries = dict(slots.tries)
        if slot in tries:
            tries[slot] -= 1
            if tries[slot] <= 0 and slot != slots.good:
                tries[slot] = 0  # used up: stays bad until blessed or overwritten
        return Slots(slots.versions, slot, slots.good, tries)

    def _load(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _save(self) -> None:
        doc = {"slots": {**asdict(self.slots), "tries": {str(k): v for k, v in self.slots.tries.items()}},
               "broken": self.broken}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.path)  # a crash mid-write keeps the old slots (an interrupted install)

    def facts(self) -> Facts:
        version = self.slots.versions[self.slots.booted]
        on_probation = self.slots.booted != self.slots.good
        return Facts(version, self.kind, not on_probation, self.boot_id, self.booted_at, _free(self.dir),
                     ready=not self.broken.get(version, False))

    def install(self, release_dir: Path, version: str) -> None:
        uki = next(release_dir.glob("cortex_*.efi"), None)
        if uki is None:
            raise UpdateError(f"{release_dir}: no boot entry (.efi) in the release")
        target = self.slots.inactive()
        if target == self.slots.good and self.slots.good != self.slots.booted:
            raise UpdateError("the inactive slot is the only known-good fallback; this boot is not blessed yet")
        versions = tuple(version if i == target else v for i, v in enumerate(self.slots.versions))
        self.broken[version] = BROKEN_MARK in uki.read_bytes()
        self.slots = Slots(versions, self.slots.booted, self.slots.good, {**self.slots.tries, target: 3})
        self._save()

    def revert(self, version: str) -> None:
        slot = self.slots.versions.index(version) if version in self.slots.versions else -1
        if slot < 0:
            raise UpdateError(f"no slot holds {version}; nothing to go back to")
        tries = {k: v for k, v in self.slots.tries.items() if k != slot}
        tries[1 - slot] = 0  # the newer entry is marked bad, the previous one is the default again
        self.slots = Slots(self.slots.versions, self.slots.booted, slot, tries)
        self._save()

    def bless(self) -> None:
        tries = {k: v for k, v in self.slots.tries.items() if k != self.slots.booted}
        self.slots = Slots(self.slots.versions, self.slots.booted, self.slots.booted, tries)
        self._save()

    def reboot(self) -> None:
        # the agent shuts down cleanly; its supervisor (systemd, the test) starts it again
        os.kill(os.getpid(), signal.SIGTERM)


# --- the appliance image ----------------------------------------------------------------------------------

class ApplianceOS:
    """Hands privileged work to cortex-update.service through a request file (see the module docstring)."""

    kind = "appliance"
    OS_RELEASE = Path("/usr/lib/os-release")

    def __init__(self, state_dir: Path, version: str):
        self.state_dir = state_dir
        self.version = version
        self._blessed = False  # once blessed, a boot stays blessed: no need to ask again

    def facts(self) -> Facts:
        if not self._blessed:
            try:
                # good: blessed; clean: booted without a counter (nothing on probation); indeterminate: on probation
                self._blessed = _run(["/usr/lib/systemd/systemd-bless-boot", "status"], 10).strip() in ("good", "clean")
            except UpdateError:
                self._blessed = True  # no boot counting in use (no entry counter): nothing on probation
        return Facts(self.version, self.kind, self._blessed, _boot_id(), _booted_at(), _free(self.state_dir))

    def _request(self, doc: dict) -> None:
        path = self.state_dir / "request.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, path)  # cortex-update.path fires on the complete file only

    def install(self, release_dir: Path, version: str) -> None:
        self._request({"action": "install", "release": str(release_dir), "version": version, "reboot": False})
        done = self.state_dir / "result.json"
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            try:
                result = json.loads(done.read_text())
            except (OSError, ValueError):
                time.sleep(1)
                continue
            if result.get("version") == version and result.get("action") == "install":
                done.unlink(missing_ok=True)
                if not result.get("ok"):
                    raise UpdateError(f"install of {version} failed: {result.get('error', '?')}")
                return
            time.sleep(1)
        raise UpdateError("cortex-update.service did not answer within 15 min; see `journalctl -u cortex-update`")

    def revert(self, version: str) -> None:
        self._request({"action": "revert", "version": version, "reboot": True})

    def bless(self) -> None:
        pass  # cortex-ready.service → boot-complete.target → systemd-bless-boot does it

    def reboot(self) -> None:
        self._request({"action": "reboot"})


class PackageOS:
    """pip or Ansible installs: reported so the rollout can skip it with a clear message."""

    kind = "package"

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.boot_id, self.booted_at = uuid.uuid4().hex, time.time()

    def facts(self) -> Facts:
        return Facts(__version__, self.kind, True, self.boot_id, self.booted_at, _free(self.state_dir))

    def install(self, release_dir: Path, version: str) -> None:
        raise UpdateError("not an appliance: update it through its package path (ansible role, pip)")

    def revert(self, version: str) -> None:
        raise UpdateError("not an appliance: downgrade it through its package path (ansible role, pip)")

    def bless(self) -> None:
        pass

    def reboot(self) -> None:
        raise UpdateError("not an appliance: the rollout does not reboot it")
