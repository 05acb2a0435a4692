"""systemd readiness notification (sd_notify), written once so the agent needs no libsystemd binding."""

from __future__ import annotations

import os
import socket

# What systemd handed this process, once claim() took it out of the environment.
_claimed: dict[str, str] | None = None
_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def claim() -> None:
    """Keep systemd's notification variables for this process alone (libsystemd's unset_environment):
    children (podman, task shells, plugins) would otherwise inherit NOTIFY_SOCKET and send notifications
    systemd refuses ("reception only permitted for main PID"), or that a laxer NotifyAccess would believe."""
    global _claimed
    if _claimed is None:
        _claimed = {name: os.environ.pop(name) for name in _VARIABLES if name in os.environ}


def _get(name: str) -> str | None:
    return os.environ.get(name) if _claimed is None else _claimed.get(name)


def sd_notify(*states: str) -> bool:
    """Send e.g. sd_notify("READY=1", "STATUS=serving"); a no-op (False) outside systemd."""
    address = _get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall("\n".join(states).encode())
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Half the WATCHDOG_USEC systemd gave us, in seconds, when the watchdog is meant for this process."""
    usec = _get("WATCHDOG_USEC")
    pid = _get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
