"""`just flash` and `just qemu` hand their arguments to the scripts as the user quoted them.

The documented SSH credential (`ssh.authorized_keys.root=ssh-ed25519 AAAA... me@laptop`) and file names
with spaces must arrive as one argument each. QEMU itself never runs here: `qemu.sh --dry-run` prints the
command line it would start, one argument per line. The flash recipe runs against a sparse loop device
with `--check`, which writes nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.system.test_flash import STICK_4GB, loop  # noqa: F401 - the fixture is used by name

REPO = Path(__file__).resolve().parents[2]
JUST = shutil.which("just", path=str(REPO / ".venv/bin")) or shutil.which("just")
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq7 admin@my laptop, office"

needs_just = pytest.mark.skipif(JUST is None, reason="just is not installed (pip install rust-just: the dev extra)")


def just(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([JUST, "--justfile", str(REPO / "Justfile"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def qemu_argv(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    assert lines and lines[0] == "qemu-system-x86_64", stdout
    return lines


@needs_just
@pytest.mark.parametrize("mode", ["disk", "netboot"])
def test_qemu_credential_with_spaces_arrives_intact(mode):
    extra = ["--netboot"] if mode == "netboot" else []
    result = just("qemu", "node2", "--dry-run", *extra, "--cred", f"ssh.authorized_keys.root={KEY}",
                  "--cred", "cortex.init=yes")
    assert result.returncode == 0, result.stderr
    argv = qemu_argv(result.stdout)
    smbios = [argv[i + 1] for i, a in enumerate(argv) if a == "-smbios"]
    # QEMU's option syntax doubles a comma inside a value.
    assert smbios == [f"type=11,value=io.systemd.credential:ssh.authorized_keys.root={KEY.replace(',', ',,')}",
                      "type=11,value=io.systemd.credential:cortex.init=yes"]
    assert "hostname=node2" in " ".join(argv)
    if mode == "netboot":
        append = argv[argv.index("-append") + 1]
        # One quoted kernel argument (systemd unquotes it), not five.
        assert f'"systemd.set-credential=ssh.authorized_keys.root:{KEY}"' in append
        assert "systemd.set-credential=cortex.init:yes" in append


def test_qemu_refuses_values_no_quoting_can_carry():
    result = subprocess.run(["bash", str(REPO / "image/qemu.sh"), "n1", "--dry-run", "--cred", 'cortex.x=a "b"'],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "double quote" in result.stderr
    result = subprocess.run(["bash", str(REPO / "image/qemu.sh"), "n1", "--dry-run", "--cred", "no-equals"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "expected name=value" in result.stderr



@needs_just
def test_qemu_console_on_request_and_kernel_arguments_for_the_disk():
    """`just qemu NAME --console`: the terminal is the serial line (input too) and QEMU runs until quit;
    without it the serial line goes to the log only, as the VM tests and a watched boot use it. --append
    reaches a disk boot through systemd-stub's SMBIOS string (the UKI's own command line is fixed)."""
    hashed = "$6$salt$hash"
    result = just("qemu", "node2", "--dry-run", "--console", "--cred", f"passwd.hashed-password.root={hashed}",
                  "--append", "systemd.unit=emergency.target")
    assert result.returncode == 0, result.stderr
    argv = qemu_argv(result.stdout)
    chardev = argv[argv.index("-chardev") + 1]
    assert chardev.startswith("stdio,id=con0,mux=on,signal=off,logfile=") and chardev.endswith("/node2/serial.log")
    assert argv[argv.index("-serial") + 1] == "chardev:con0" and "-monitor" not in argv
    smbios = [argv[i + 1] for i, a in enumerate(argv) if a == "-smbios"]
    assert smbios == [f"type=11,value=io.systemd.credential:passwd.hashed-password.root={hashed}",
                      "type=11,value=io.systemd.stub.kernel-cmdline-extra=systemd.unit=emergency.target"]

    argv = qemu_argv(just("qemu", "node2", "--dry-run").stdout)
    assert argv[argv.index("-serial") + 1].startswith("file:") and "-chardev" not in argv
    assert argv[argv.index("-monitor") + 1] == "none" and "-smbios" not in argv


def test_qemu_refuses_a_timeout_that_is_not_seconds():
    result = subprocess.run(["bash", str(REPO / "image/qemu.sh"), "n1", "--dry-run", "--timeout", "5m"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "--timeout 5m: expected whole seconds" in result.stderr

@needs_just
@pytest.mark.skipif(os.geteuid() != 0, reason="flash.sh checks a real (loop) block device: needs root")
def test_flash_file_names_with_spaces_arrive_intact(loop, tmp_path):  # noqa: F811 - the fixture
    folder = tmp_path / "my sticks"
    folder.mkdir()
    image = folder / "cortex image.raw"
    image.write_bytes(os.urandom(1024 * 1024))
    creds = folder / "node 2.conf"
    creds.write_text(f"cortex.node_name=node2\nssh.authorized_keys.root={KEY}\n")
    dev = loop(STICK_4GB)
    result = just("flash", "--check", "--yes", "--image", str(image), "--credentials", str(creds), dev)
    assert result.returncode == 0, result.stderr
    assert f"image   {image} (" in result.stderr and "nothing written" in result.stderr
    # The device may come first too, as the recipe's signature suggests.
    result = just("flash", dev, "--check", "--yes", "--image", str(image))
    assert result.returncode == 0, result.stderr
