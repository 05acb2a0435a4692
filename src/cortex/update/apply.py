"""`cortex update apply-local`: the root side of an update on the appliance (cortex-update.service).

The agent runs unprivileged and cannot write partitions or the ESP. It downloads and verifies a release
into its state directory and writes `request.json`; cortex-update.path starts this helper as root, which

- install: verifies the release again against the trusted keys from the node's own config (never trusting
  the agent's word for it), then runs systemd-sysupdate with the image's transfer definitions rewritten to
  read from that verified local directory (`[Source] Type=regular-file`), so sysupdate writes the inactive
  /usr slot, its verity partition and the UKI with its boot-counting tries;
- revert: marks every newer UKI as bad (tries left 0: systemd-boot sorts it last), so the previous entry
  boots again;
- reboot: `systemctl reboot`.

It writes `result.json` for the agent. Each action is idempotent: the request file is consumed first.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import yaml

from cortex.update import node_os
from cortex.update import releases as updates
from cortex.update.releases import UpdateError

DEFINITIONS = Path("/usr/lib/sysupdate.d")
SYSUPDATE_PATHS = (Path("/usr/lib/systemd/systemd-sysupdate"), Path("/lib/systemd/systemd-sysupdate"))
UKI_DIRS = (Path("/efi/EFI/Linux"), Path("/boot/EFI/Linux"))
UKI_RE = re.compile(r"^cortex_(?P<v>[\d.]+)(\+(?P<left>\d+)(-(?P<done>\d+))?)?\.efi$")


def trusted_keys(config: Path) -> list[str]:
    doc = yaml.safe_load(config.read_text()) or {}
    return list(((doc.get("plugins") or {}).get("updater") or {}).get("trusted_keys") or [])


def local_definitions(release: Path, into: Path, source: Path = DEFINITIONS) -> Path:
    """The image's sysupdate transfers with their [Source] pointed at a verified local directory."""
    for conf in sorted(source.glob("*.conf")):
        out, section = [], ""
        for line in conf.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith("["):
                section = stripped
            elif section == "[Source]" and stripped.startswith("Type="):
                line = "Type=regular-file"
            elif section == "[Source]" and stripped.startswith("Path="):
                line = f"Path={release}"
            out.append(line)
        (into / conf.name).write_text("\n".join(out) + "\n")
    return into


def install(release: Path, version: str, keys: list[str]) -> None:
    manifest = updates.verify(release, keys)
    if manifest["version"] != version:
        raise UpdateError(f"{release} holds {manifest['version']}, not {version}")
    with tempfile.TemporaryDirectory(prefix="cortex-sysupdate-") as tmp:
        definitions = local_definitions(release, Path(tmp))
        node_os._run([sysupdate_binary(), f"--definitions={definitions}", "--verify=no", "update", version],
                     timeout=1800)


def sysupdate_binary() -> str:
    """systemd-sysupdate lives outside $PATH on Debian (systemd 254: /usr/lib/systemd/)."""
    return shutil.which("systemd-sysupdate") or next(
        (str(p) for p in SYSUPDATE_PATHS if p.exists()), "systemd-sysupdate")


def revert(version: str, dirs: tuple[Path, ...] = UKI_DIRS) -> list[str]:
    """Mark the entries newer than `version` bad (boot counter +0-N); return what was renamed."""
    wanted = updates.parse_version(version)
    renamed = []
    for directory in dirs:
        if not directory.is_dir():
            continue
        for uki in directory.glob("cortex_*.efi"):
            m = UKI_RE.match(uki.name)
            if m and updates.parse_version(m["v"]) > wanted and m["left"] != "0":
                target = uki.with_name(f"cortex_{m['v']}+0-{int(m['done'] or 0) + 1}.efi")
                uki.rename(target)
                renamed.append(f"{uki.name} -> {target.name}")
    if not renamed and not any((d / f"cortex_{version}.efi").exists() or list(d.glob(f"cortex_{version}+*.efi"))
                               for d in dirs if d.is_dir()):
        raise UpdateError(f"no boot entry for {version} left to go back to")
    return renamed


def main(state_dir: Path, config: Path) -> int:
    request_path = state_dir / "request.json"
    try:
        text = request_path.read_text()
    except OSError:
        return 0  # nothing to do
    # Consumed before anything else: cortex-update.path starts this service for as long as the file exists.
    request_path.unlink(missing_ok=True)
    try:
        request = json.loads(text)
        if not isinstance(request, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        (state_dir / "result.json").write_text(json.dumps({"ok": False, "error": f"unreadable request: {exc}"}))
        return 1
    action, version = request.get("action"), request.get("version", "")
    result = {"action": action, "version": version, "ok": True}
    try:
        if action == "install":
            install(Path(request["release"]), version, trusted_keys(config))
        elif action == "revert":
            result["renamed"] = revert(version)
        elif action != "reboot":
            raise UpdateError(f"unknown action {action!r}")
    except (UpdateError, OSError, KeyError) as exc:
        result.update(ok=False, error=str(exc))
    (state_dir / "result.json").write_text(json.dumps(result))
    if result["ok"] and (action == "reboot" or request.get("reboot")):
        node_os._run(["systemctl", "reboot", "--no-block"], timeout=30)
    return 0 if result["ok"] else 1
