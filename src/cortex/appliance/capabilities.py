"""The capabilities systemd hands the agent (the unit's AmbientCapabilities=: CAP_NET_ADMIN and CAP_NET_RAW,
which claiming a service's floating address needs, cortex.ha.vip) are for the agent alone.

An ambient capability is inherited across execve by every child of a non-root process: the tasks' and
services' sandboxes would start holding it, and bubblewrap refuses to run at all with capabilities it did
not get as a setuid binary ("Unexpected capabilities but not setuid"). Clearing the ambient set keeps the
agent's own permitted and effective sets, so it can still add addresses; its children start with none.
Capabilities belong to threads: this runs first in the agent's main thread, before it starts any other.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


def held(kind: str = "CapAmb", status: Path = Path("/proc/thread-self/status")) -> int:
    """A capability set of the calling thread as a bit mask (kind: CapAmb, CapEff, CapPrm, CapInh)."""
    for line in status.read_text().splitlines():
        if line.startswith(f"{kind}:"):
            return int(line.split()[1], 16)
    raise OSError(f"{status} has no {kind} line")


def keep_to_self() -> int:
    """Clear this thread's ambient capabilities (those of every thread and child started after it); returns
    the mask that was cleared, 0 when there was nothing to clear."""
    ambient = held("CapAmb")
    if not ambient:
        return 0
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    zero = ctypes.c_ulong(0)  # the kernel refuses the call unless the unused arguments are all zero (64 bits)
    if prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), zero, zero, zero) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"could not clear the ambient capabilities ({os.strerror(errno)}): the agent's "
                             "tasks and services would inherit them")
    return ambient
