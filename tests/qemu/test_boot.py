"""Boot: the appliance boots to agent-ready (init from credentials), /usr is read-only erofs behind
dm-verity, the state partition was created on first boot, the boot was blessed. Beside it, the same image
minus the agent (profile plain) boots alone first: the ratio is what the agent costs the boot."""

from __future__ import annotations

import base64
import json
import shlex

import pytest

from tests.qemu import infra, timings
from tests.qemu.conftest import BOOT_TIMEOUT, CORTEX, ROOT_PASSWORD, ROOT_PASSWORD_HASH

# Runs a program on a new pseudo-terminal as the given user and answers its password prompt, as someone
# at the console would: su (PAM, like login on the console) from an unprivileged user proves the root
# password, since root itself is never asked. Prints what the terminal showed; exits with the program.
PTY_PASSWORD = r"""
import os, pty, sys
uid, password, *argv = sys.argv[1:]
pid, fd = pty.fork()
if pid == 0:
    os.setgroups([]); os.setgid(int(uid)); os.setuid(int(uid))
    os.execvp(argv[0], argv)
seen = b""
def more():
    global seen
    try:
        data = os.read(fd, 4096)
    except OSError:  # EIO: the program closed the terminal
        return False
    seen += data
    return bool(data)
while b"assword" not in seen and more():
    pass
os.write(fd, password.encode() + b"\n")
while more():
    pass
_, status = os.waitpid(pid, 0)
sys.stdout.write(seen.decode(errors="replace"))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def su_as_nobody(vm, password: str) -> tuple[int, str]:
    """`su -c 'id -u' root` typed by the unprivileged user nobody on a terminal of the VM."""
    script = base64.b64encode(PTY_PASSWORD.encode()).decode()
    rc, out, _ = vm.execute(f"echo {script} | base64 -d > /run/pty-password.py && "
                            f"python3 /run/pty-password.py 65534 {shlex.quote(password)} su -c 'echo uid=$(id -u)' root",
                            timeout=60)
    return rc, out


@pytest.fixture(scope="package")  # package scope like node1, so that it runs first (argument order)
def plain_boot(lab) -> float:
    """Power-on -> login prompt of the plain image, booted alone (before node1, which boots alone too)."""
    vm = lab.machine("plain", host=21, disk=lab.images.plain)
    vm.start()
    try:
        _, seconds = vm.wait_for_console(r"login:", timeout=BOOT_TIMEOUT)
        timings.record("boot", "plain Debian image (alone): power-on -> login prompt", seconds)
        # The same boot path: verity /usr and the state partition made on first boot.
        assert vm.succeed("findmnt -n -o FSTYPE /usr").strip() == "erofs"
        assert vm.succeed("findmnt -n -o PARTLABEL /").strip() == "cortex-state"
        vm.fail("systemctl cat cortex-agent.service")
    finally:
        vm.kill()
    return seconds


def test_boot(plain_boot, node1):
    host = infra.host(node1)
    first = timings.rows()
    ready = next(r["value"] for r in first if r["what"].startswith("node1 (alone): power-on -> agent ready"))
    login = next(r["value"] for r in first if r["what"].startswith("node1 (alone): power-on -> login"))
    timings.record("boot", "ratio: cortex agent ready / plain login prompt", ready / plain_boot, unit="x")
    timings.record("boot", "ratio: login prompt cortex / plain", login / plain_boot, unit="x")

    # agent ready: the service runs and the node leads the cluster it created
    assert host.service("cortex-agent").is_running
    status = json.loads(node1.succeed(f"{CORTEX} status --json"))
    assert status["state"] == "leader" and status["has_quorum"], status

    # /usr: read-only erofs on the verity device, every block checked against the UKI's usrhash=
    usr = host.mount_point("/usr")
    assert usr.filesystem == "erofs" and "ro" in usr.options
    assert usr.device == "/dev/mapper/usr"
    assert "usrhash=" in host.file("/proc/cmdline").content_string
    dm = node1.succeed("dmsetup table usr 2>/dev/null || cat /sys/block/$(basename $(readlink -f /dev/mapper/usr))/dm/uuid")
    assert "verity" in dm.lower(), dm
    assert "Read-only file system" in node1.fail("touch /usr/lib/cortex/x")

    # state: the partition repart made on first boot holds / (and with it /etc and /var)
    assert host.mount_point("/").filesystem == "ext4"
    assert node1.succeed("findmnt -n -o PARTLABEL /").strip() == "cortex-state"
    assert host.file("/var/lib/cortex").is_directory
    assert host.file("/etc/machine-id").content_string.strip()

    # blessed: boot-complete.target reached (cortex-ready gates it), the counter stripped from the entry
    node1.wait_for_unit("systemd-bless-boot.service")
    assert node1.succeed("/usr/lib/systemd/systemd-bless-boot status").strip() == "good"
    entries = node1.succeed("ls /efi/EFI/Linux/").split()
    assert any(e.startswith("cortex_") and "+" not in e for e in entries), entries

    # a healthy node is "running", not "degraded": no unit failed on the way (the ESP's automount is not
    # touched by a boot loader update before udev has announced the partition)
    _, state, _ = node1.execute("systemctl is-system-running --wait", timeout=120)
    assert state.strip() == "running", f"{state.strip()}; failed units:\n{node1.execute('systemctl --failed')[1]}"

    # the journal is persistent, on the state partition: a failed boot's log is there on the next one
    machine_id = host.file("/etc/machine-id").content_string.strip()
    assert host.file(f"/var/log/journal/{machine_id}/system.journal").is_file
    assert node1.succeed("findmnt -n -o PARTLABEL -T /var/log/journal").strip() == "cortex-state"

    # a way in at the console: root's password is exactly the credential's hash (not empty, not locked),
    # and typing the password works (su asks PAM like login does; sulogin checks the same shadow entry)
    assert node1.succeed("getent shadow root").split(":")[1] == ROOT_PASSWORD_HASH
    rc, seen = su_as_nobody(node1, ROOT_PASSWORD)
    assert rc == 0 and "uid=0" in seen, seen
