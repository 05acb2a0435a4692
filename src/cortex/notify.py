"""systemd readiness notification (sd_notify), written once so the agent needs no libsystemd binding."""

from __future__ import annotations

import os
import socket


def sd_notify(*states: str) -> bool:
    """Send e.g. sd_notify("READY=1", "STATUS=serving"); a no-op (False) outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
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
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
