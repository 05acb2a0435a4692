"""Commands on a VM over SSH, run from inside the lab namespace.

The key is made per test session and reaches the VM as the `ssh.authorized_keys.root` credential
(systemd's provision.conf installs it); host keys are new on every VM, so they are not checked. One
multiplexed connection per VM (ControlMaster) keeps each command to one round trip: a fresh SSH handshake
costs seconds under TCG.
"""

from __future__ import annotations

from pathlib import Path

from tests.qemu.hostcmd import HostCommandError, in_netns, run


def make_key(directory: Path) -> Path:
    key = directory / "id_ed25519"
    if not key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cortex-vm-tests", "-f", str(key)])
    return key


class SSHChannel:
    def __init__(self, netns: str, address: str, key: Path, control_dir: Path):
        self.netns = netns
        self.address = address
        self.key = key
        self.control = control_dir / f"ssh-{address}"

    def _argv(self, *extra: str) -> list[str]:
        return in_netns(self.netns, [
            "ssh", "-i", str(self.key), "-F", "/dev/null",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
            "-o", "ServerAliveInterval=2", "-o", "ServerAliveCountMax=5",
            "-o", "ControlMaster=auto", "-o", f"ControlPath={self.control}", "-o", "ControlPersist=300",
            *extra, f"root@{self.address}"])

    def execute(self, command: str, timeout: float = 60) -> tuple[int, str, str]:
        """(exit status, stdout, stderr); 255 means SSH itself failed (no connection)."""
        try:
            done = run([*self._argv(), "--", command], timeout=timeout, check=False)
        except HostCommandError as exc:  # a hung connection counts as "no connection"
            return 255, "", str(exc)
        return done.returncode, done.stdout, done.stderr

    def disconnect(self) -> None:
        """Drop the shared connection (after a reset or a sleep its TCP peer is gone or stale)."""
        if self.control.exists():
            try:
                run(self._argv("-O", "exit"), timeout=10, check=False)
            except HostCommandError:
                pass  # the master is stuck: removing its socket below makes the next command start anew
            self.control.unlink(missing_ok=True)
