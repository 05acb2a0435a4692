"""The machine's host name follows its node name, unless someone chose another one.

Every appliance boots with the image's `/etc/hostname` (`cortex`), so without this every node of a
cluster is called `cortex` on the network, in shell prompts and in DHCP leases. `cortex-config` names
the machine after its node at every boot: it writes `/etc/hostname` (on the state partition, so the
next boot starts with the right name before the network comes up) with a marker comment, and sets the
running host name. A host name set otherwise is kept: a `system.hostname` credential (systemd applies
it itself), a `systemd.hostname=` kernel argument (the netboot script sets that to the node name), or an
`/etc/hostname` written by hand (no marker).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

IMAGE_DEFAULTS = ("", "cortex", "localhost")
MARKER = "# written by cortex-config from the node name; replace this file to choose another host name"


def _static_name(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return lines[0] if lines else ""


def decide(node_id: str, etc_hostname: str | None, cmdline: str = "", credential: str = "") -> str:
    """The /etc/hostname content to write, or '' to leave the name alone (pure)."""
    if credential.strip() or any(arg.startswith("systemd.hostname=") for arg in cmdline.split()):
        return ""
    current = etc_hostname or ""
    if MARKER not in current and _static_name(current) not in IMAGE_DEFAULTS:
        return ""  # chosen by someone: theirs
    wanted = f"{MARKER}\n{node_id}\n"
    return "" if current == wanted else wanted


def apply(node_id: str, etc_hostname: Path = Path("/etc/hostname"), cmdline_path: Path = Path("/proc/cmdline"),
          credential: str = "", set_running: bool = True) -> str:
    """Write /etc/hostname and set the running name when `decide` says so; returns what happened."""
    try:
        current = etc_hostname.read_text()
    except FileNotFoundError:
        current = None
    try:
        cmdline = cmdline_path.read_text()
    except OSError:
        cmdline = ""
    text = decide(node_id, current, cmdline, credential)
    if not text:
        return ""
    tmp = etc_hostname.with_name(f".{etc_hostname.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, etc_hostname)
    if set_running and socket.gethostname() != node_id:
        socket.sethostname(node_id)
    return f"host name set to {node_id} (/etc/hostname)"
