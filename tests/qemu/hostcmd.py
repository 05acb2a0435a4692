"""The one place the VM harness runs host commands (ip, qemu-img, ssh, ...)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from tests.support import netlab


class HostCommandError(RuntimeError):
    pass


def run(argv: Sequence[str], *, timeout: float = 60, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command, capture its output as text; raise HostCommandError (with stderr) when it fails."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise HostCommandError(f"{' '.join(argv)}: no answer within {timeout:.0f} s") from exc
    if check and done.returncode != 0:
        raise HostCommandError(f"{' '.join(argv)}: exit {done.returncode}: {(done.stderr or done.stdout).strip()}")
    return done


def in_netns(netns: str, argv: Sequence[str]) -> list[str]:
    """argv prefixed to run inside a network namespace (traffic never leaves the test's lab)."""
    return netlab.in_netns(netns, argv)
