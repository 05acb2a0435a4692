"""One QEMU VM with the vocabulary of the NixOS test driver: start, wait_for_console, wait_for_unit,
succeed/fail, crash, shutdown, suspend/wake, block/unblock.

QEMU runs TCG only (the host's /dev/kvm is PVM and unusable: shared/research/feasibility-image-qemu.md),
inside the lab network namespace, on a copy-on-write overlay of the built image. It is driven over QMP
(qemu.qmp) and reached over SSH (sshchannel) and its serial console (console). Every wait checks the
console for a panic or an emergency shell and QEMU for having exited, and fails at once with the last
console lines instead of running into its deadline.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol
from qemu.qmp.protocol import ConnectError

from tests.qemu.console import SerialConsole
from tests.qemu.hostcmd import in_netns, run
from tests.qemu.sshchannel import SSHChannel
from tests.support import procs

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


class VMError(AssertionError):
    """A VM did not do what the test waited for; the message carries the console tail."""


@dataclass
class MachineConfig:
    name: str
    disk: Path | None                  # base image (raw); the VM writes to its own qcow2 overlay
    address: str = ""                   # static IPv4 on the lab bridge (kernel command line ip=)
    credentials: dict[str, str] = field(default_factory=dict)  # systemd credentials via SMBIOS type 11
    cmdline_extra: str = ""             # appended by systemd-stub (SMBIOS io.systemd.stub.kernel-cmdline-extra)
    kernel: Path | None = None          # direct kernel boot instead of OVMF + systemd-boot
    initrd: Path | None = None
    append: str = ""                    # kernel command line for direct kernel boot
    pxe: bool = False                   # no disk: SeaBIOS runs the NIC's iPXE ROM, which boots from the network
    smp: int = 2
    memory_mb: int = 2048


class Machine:
    def __init__(self, config: MachineConfig, *, workdir: Path, netns: str, tap: str, mac: str,
                 ssh_key: Path | None = None):
        self.config = config
        self.name = config.name
        self.dir = workdir / config.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.netns = netns
        self.tap = tap
        self.mac = mac
        self.serial_log = self.dir / "serial.log"
        self.console = SerialConsole(self.serial_log)
        self.process: subprocess.Popen | None = None
        self.qmp: QEMUMonitorProtocol | None = None
        self.powered_on = 0.0    # host monotonic time of the last power-on or reset
        self.boot_mark = 0       # console line index where the current boot starts
        self.ssh = (SSHChannel(netns, config.address, ssh_key, self.dir) if ssh_key and config.address
                    else None)
        self._ssh_ready = False

    # --- power ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Power on (a new QEMU process). The disk overlay persists across start/shutdown, like a disk."""
        if self.running():
            return
        overlay = self.dir / "disk.qcow2"
        if self.config.disk and not overlay.exists():
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(self.config.disk),
                 str(overlay), "8G"])
        qmp_socket = self.dir / "qmp.sock"
        qmp_socket.unlink(missing_ok=True)
        stderr = (self.dir / "qemu.stderr").open("ab")
        self.process = procs.popen(in_netns(self.netns, self._qemu_argv(overlay, qmp_socket)),
                                   stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                   start_new_session=True)
        stderr.close()
        self.powered_on = time.monotonic()
        if self.console._thread is None:
            self.console.start()
        self.boot_mark = self.console.mark()
        self._ssh_ready = False
        self.qmp = self._connect_qmp(qmp_socket)

    def _qemu_argv(self, overlay: Path, qmp_socket: Path) -> list[str]:
        c = self.config
        # graphics=off: SeaBIOS (PXE boots) puts its screen, and with it iPXE's, on the serial console
        machine = "q35,graphics=off" if c.pxe else "q35"
        argv = ["qemu-system-x86_64", "-name", c.name, "-accel", "tcg", "-machine", machine, "-cpu", "max",
                "-smp", str(c.smp), "-m", str(c.memory_mb), "-nodefaults", "-display", "none",
                "-monitor", "none", "-serial", f"file:{self.serial_log}",
                "-qmp", f"unix:{qmp_socket},server=on,wait=off",
                # S3 is off by default on q35; suspend() needs it.
                "-global", "ICH9-LPC.disable_s3=0",
                "-netdev", f"tap,id=net0,ifname={self.tap},script=no,downscript=no",
                # romfile=: no iPXE option ROM for VMs that never boot from the network
                "-device", f"virtio-net-pci,id=nic0,netdev=net0,mac={self.mac},"
                           + ("bootindex=1" if c.pxe else "romfile="),
                "-device", "virtio-rng-pci"]
        if c.disk:
            argv += ["-drive", f"file={overlay},if=none,id=disk0,format=qcow2,cache=unsafe",
                     "-device", "virtio-blk-pci,drive=disk0,bootindex=1"]
        if c.kernel:
            argv += ["-kernel", str(c.kernel), "-append", c.append]
            if c.initrd:
                argv += ["-initrd", str(c.initrd)]
        elif not c.pxe:  # PXE: QEMU's default firmware, SeaBIOS, which runs the NIC's iPXE ROM
            variables = self.dir / "efivars.fd"
            if not variables.exists():
                variables.write_bytes(OVMF_VARS.read_bytes())
            argv += ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                     "-drive", f"if=pflash,format=raw,file={variables}"]
        for name, value in c.credentials.items():
            # The binary form needs no quoting: tokens, keys and addresses go through unchanged.
            encoded = base64.b64encode(value.encode()).decode()
            argv += ["-smbios", f"type=11,value=io.systemd.credential.binary:{name}={encoded}"]
        extra = " ".join(filter(None, [self._network_cmdline(), c.cmdline_extra]))
        if extra and not c.kernel:
            argv += ["-smbios", f"type=11,value=io.systemd.stub.kernel-cmdline-extra={extra}"]
        return argv

    def _network_cmdline(self) -> str:
        if not self.config.address:
            return ""
        # systemd-network-generator turns ip= into a .network that sorts before the image's DHCP one.
        return (f"net.ifnames=0 ip={self.config.address}::{self.config.address.rsplit('.', 1)[0]}.1:"
                f"255.255.255.0:{self.name}:eth0:off")

    def _connect_qmp(self, path: Path) -> QEMUMonitorProtocol:
        deadline = time.monotonic() + 30
        while not path.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise self.error("QEMU did not open its QMP socket within 30 s")
            time.sleep(0.05)
        # Once (CI rehearsal, QEMU 10 with wait=off) the first message on a new connection was a RESUME event
        # instead of the greeting; a new connection gets a proper greeting, so try again a few times.
        for attempt in range(5):
            qmp = QEMUMonitorProtocol(str(path))
            try:
                qmp.connect()
                return qmp
            except (ConnectError, OSError) as exc:
                qmp.close()
                if attempt == 4:
                    raise self.error(f"QMP: no session after 5 connections: {exc}") from exc
                time.sleep(0.2)
        raise AssertionError("unreachable")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def crash(self) -> float:
        """Power loss: a hard reset over QMP (no shutdown, nothing flushed). Returns the reset time."""
        assert self.qmp is not None
        self.qmp.cmd("system_reset")
        self.powered_on = time.monotonic()
        self.boot_mark = self.console.mark()
        self._drop_ssh()
        return self.powered_on

    def shutdown(self, timeout: float = 90) -> None:
        """Clean power-off from inside the guest; falls back to pulling the plug after `timeout`."""
        if not self.running():
            return
        if self._ssh_ready:
            self.execute("systemctl poweroff --no-block", timeout=15)
        elif self.qmp:
            self.qmp.cmd("system_powerdown")
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._after_exit()

    def kill(self) -> None:
        """Stop QEMU at once (cleanup, or a VM that is not needed any more)."""
        if self.running():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self._after_exit()

    def _after_exit(self) -> None:
        self._drop_ssh()
        if self.qmp:
            try:
                self.qmp.close()
            except Exception:  # noqa: BLE001 - the peer is gone already
                pass
            self.qmp = None
        self.console.stop()

    # --- sleep and links -----------------------------------------------------------------------------

    def suspend(self, timeout: float = 60) -> float:
        """Suspend to RAM (S3) through systemd in the guest (so its sleep hooks run); returns when QEMU
        reports the VM suspended, with that time."""
        self.execute("systemctl suspend --no-block", timeout=15)
        self._drop_ssh()
        return self._wait_status("suspended", timeout)

    def wake(self, timeout: float = 30) -> float:
        """Wake from S3 (QMP system_wakeup: the power button of a sleeping machine). Returns the wake time."""
        assert self.qmp is not None
        woke = time.monotonic()
        self.qmp.cmd("system_wakeup")
        self._wait_status("running", timeout)
        return woke

    def status(self) -> str:
        assert self.qmp is not None
        return self.qmp.cmd("query-status")["status"]

    def _wait_status(self, wanted: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while (state := self.status()) != wanted:
            self._check_alive()
            if time.monotonic() > deadline:
                raise self.error(f"QEMU status stayed {state!r}, expected {wanted!r} within {timeout:.0f} s")
            time.sleep(0.05)
        return time.monotonic()

    def block(self) -> None:
        """Unplug the network cable (the guest sees NO-CARRIER)."""
        assert self.qmp is not None
        self.qmp.cmd("set_link", name="nic0", up=False)

    def unblock(self) -> None:
        assert self.qmp is not None
        self.qmp.cmd("set_link", name="nic0", up=True)

    # --- waiting ---------------------------------------------------------------------------------------

    def wait_for_console(self, pattern: str | re.Pattern, timeout: float = 300) -> tuple[re.Match, float]:
        """Wait for a console line of the current boot matching `pattern`. Returns the match and the
        seconds from power-on (or reset) to when the line appeared."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            found = self.console.find(regex, self.boot_mark)
            if found:
                _, seen, match = found
                return match, seen - self.powered_on
            self._check_alive()
            if time.monotonic() > deadline:
                raise self.error(f"no console line matching {regex.pattern!r} within {timeout:.0f} s")
            self.console.wait(0.5)

    def wait_for_unit(self, unit: str, timeout: float = 120) -> None:
        """Wait until `unit` is active (a oneshot: has finished); fail at once when it failed."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.succeed(f"systemctl show -p ActiveState --value {unit}", timeout=30).strip()
            if state == "active":
                return
            if state == "failed":
                log = self.execute(f"journalctl -b -u {unit} --no-pager -n 30")[1]
                raise self.error(f"unit {unit} failed:\n{log}")
            if time.monotonic() > deadline:
                raise self.error(f"unit {unit} is {state!r}, not active within {timeout:.0f} s")
            time.sleep(1)

    def wait_until(self, check, timeout: float, what: str, interval: float = 0.5):
        """Poll `check()` until it returns something truthy (returned); fail at once when the boot is lost
        (console, QEMU gone), else naming `what` after `timeout`. For what the host sees, not the console."""
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            self._check_alive()
            if time.monotonic() > deadline:
                raise self.error(f"not within {timeout:.0f} s: {what}")
            time.sleep(interval)

    def _check_alive(self) -> None:
        fatal = self.console.fatal(self.boot_mark)
        if fatal:
            raise self.error(f"boot failed: {fatal!r} on the console")
        if self.process is not None and self.process.poll() is not None:
            raise self.error(f"QEMU exited with status {self.process.returncode} "
                             f"(stderr: {(self.dir / 'qemu.stderr').read_text(errors='replace')[-500:]!r})")

    def error(self, message: str) -> VMError:
        return VMError(f"{self.name}: {message}\n--- last console lines of {self.name} "
                       f"({self.serial_log}) ---\n{self.console.tail()}")

    # --- commands ------------------------------------------------------------------------------------

    def wait_for_ssh(self, timeout: float = 300) -> None:
        if self.ssh is None:
            raise self.error("no command channel: the VM has no address or no SSH key")
        deadline = time.monotonic() + timeout
        while True:
            rc, _, err = self.ssh.execute("true", timeout=20)
            if rc == 0:
                self._ssh_ready = True
                return
            self._check_alive()
            if time.monotonic() > deadline:
                raise self.error(f"SSH did not answer within {timeout:.0f} s: {err.strip()}")
            self._drop_ssh()  # a half-open master from a failed attempt would answer the next one
            time.sleep(1)

    def execute(self, command: str, timeout: float = 60) -> tuple[int, str, str]:
        """Run a shell command in the guest as root: (exit status, stdout, stderr)."""
        if not self._ssh_ready:
            self.wait_for_ssh()
        rc, out, err = self.ssh.execute(command, timeout=timeout)
        if rc == 255:
            self._drop_ssh()
        return rc, out, err

    def succeed(self, command: str, timeout: float = 60) -> str:
        rc, out, err = self.execute(command, timeout)
        if rc != 0:
            raise self.error(f"command failed (exit {rc}): {command}\nstdout: {out}\nstderr: {err}")
        return out

    def fail(self, command: str, timeout: float = 60) -> str:
        """Run a command that must fail; returns its stderr."""
        rc, out, err = self.execute(command, timeout)
        if rc == 0 or rc == 255:
            raise self.error(f"command should have failed but exited {rc}: {command}\nstdout: {out}")
        return err

    def _drop_ssh(self) -> None:
        self._ssh_ready = False
        if self.ssh:
            self.ssh.disconnect()
