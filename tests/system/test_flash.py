"""image/flash.sh against real loop devices: what it refuses, and a verified write.

Needs root and losetup (loop devices over files in tmp); skipped otherwise. Nothing but loop devices
created here is ever written: the checks against the host's own disks run with --check, which stops
before writing whatever the checks say.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cortex.appliance import layout

REPO = Path(__file__).resolve().parents[2]
FLASH = REPO / "image" / "flash.sh"
MiB = 1024 * 1024
GiB = 1024 * MiB
# What a "4 GB" USB stick holds (3.73 GiB); the loop devices over it are sparse files, so free.
STICK_4GB = 4_000_000_000 // 4096 * 4096

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="flash.sh tests need root (loop devices)"),
    pytest.mark.skipif(shutil.which("losetup") is None, reason="losetup not available"),
]


def run(*args: str, timeout: float = 120, env: dict | None = None, stdin: str | None = None):
    return subprocess.run(["bash", str(FLASH), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, input=stdin, stdin=None if stdin else subprocess.DEVNULL)


@pytest.fixture
def loop(tmp_path):
    """Attach files as loop devices; detach (and unmount what the test mounted) afterwards."""
    devices: list[str] = []
    mounts: list[Path] = []

    def attach(size: int, partscan: bool = False) -> str:
        backing = tmp_path / f"disk{len(devices)}.img"
        with open(backing, "wb") as f:
            f.truncate(size)
        args = ["losetup", "--find", "--show"] + (["--partscan"] if partscan else []) + [str(backing)]
        try:
            dev = subprocess.run(args, capture_output=True, text=True, check=True, timeout=30).stdout.strip()
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot attach a loop device here: {exc.stderr.strip()}")
        devices.append(dev)
        return dev

    attach.mounts = mounts  # type: ignore[attr-defined]
    yield attach
    for mnt in reversed(mounts):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)
    for dev in devices:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)


def make_image(path: Path, size: int = 3 * MiB) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def mount_ext4(loop, dev: str, where: Path) -> None:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 not available")
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True, timeout=60)
    where.mkdir()
    result = subprocess.run(["mount", dev, str(where)], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a loop device here: {result.stderr.strip()}")
    loop.mounts.append(where)


def test_refuses_non_block_device(tmp_path):
    image = make_image(tmp_path / "cortex.raw")
    target = tmp_path / "not-a-device"
    target.write_bytes(b"\0" * MiB)
    result = run("--yes", "--image", str(image), str(target))
    assert result.returncode != 0 and "not a block device" in result.stderr
    assert target.read_bytes() == b"\0" * MiB
    result = run("--yes", "--image", str(image), str(tmp_path / "missing"))
    assert result.returncode != 0 and "does not exist" in result.stderr


def test_refuses_mounted_loop_device(loop, tmp_path):
    image = make_image(tmp_path / "cortex.raw")
    dev = loop(16 * MiB)
    mount_ext4(loop, dev, tmp_path / "mnt")
    (tmp_path / "mnt" / "keep").write_text("precious")
    result = run("--yes", "--image", str(image), dev)
    assert result.returncode != 0 and "is mounted" in result.stderr, result.stderr
    assert (tmp_path / "mnt" / "keep").read_text() == "precious"


def test_refuses_disk_holding_a_system_path(loop, tmp_path):
    """The disk below / (here: a loop disk whose partition is declared a system mount) is refused."""
    if shutil.which("sfdisk") is None:
        pytest.skip("sfdisk not available")
    image = make_image(tmp_path / "cortex.raw")
    dev = loop(32 * MiB, partscan=True)
    subprocess.run(["sfdisk", "-q", dev], input="label: gpt\n,\n", text=True, check=True, capture_output=True,
                   timeout=30)
    subprocess.run(["partx", "-u", dev], capture_output=True, timeout=30)
    part = f"{dev}p1"
    if not Path(part).exists():
        pytest.skip("no partition device nodes for loop devices here")
    mount_ext4(loop, part, tmp_path / "sys")
    result = run("--yes", "--image", str(image), dev, env={"CORTEX_FLASH_SYSTEM_MOUNTS": str(tmp_path / "sys")})
    assert result.returncode != 0 and f"holds {tmp_path / 'sys'}" in result.stderr, result.stderr
    # The partition itself is refused too (whole disks only).
    result = run("--yes", "--image", str(image), part)
    assert result.returncode != 0 and "partition" in result.stderr


def test_refuses_the_real_root_disk_in_check_mode(tmp_path):
    """--check never writes, so pointing it at the disk holding / is safe and must be refused."""
    source = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "/"], capture_output=True, text=True).stdout.strip()
    if not source.startswith("/dev/") or not Path(source).is_block_device():
        pytest.skip(f"/ is not on a block device here ({source or 'unknown'})")
    disks = subprocess.run(["lsblk", "-n", "-l", "-p", "-s", "-o", "NAME,TYPE", source], capture_output=True,
                           text=True).stdout.split("\n")
    disk = next((line.split()[0] for line in disks if line.split()[1:] == ["disk"]), None)
    if disk is None:
        pytest.skip("cannot tell the disk below /")
    image = make_image(tmp_path / "cortex.raw", MiB)
    result = run("--check", "--yes", "--image", str(image), disk)
    assert result.returncode != 0
    assert "holds /" in result.stderr or "is mounted" in result.stderr, result.stderr


def test_refuses_without_confirmation_and_on_wrong_answer(loop, tmp_path):
    image = make_image(tmp_path / "cortex.raw")
    dev = loop(STICK_4GB)
    result = run("--image", str(image), dev)  # no --yes, no terminal
    assert result.returncode != 0 and "--yes" in result.stderr
    with open(dev, "rb") as f:
        assert f.read(MiB) == b"\0" * MiB


def test_refuses_too_small_device(loop, tmp_path):
    image = make_image(tmp_path / "cortex.raw", 4 * MiB)
    dev = loop(2 * MiB)
    result = run("--yes", "--image", str(image), dev)
    assert result.returncode != 0 and "too small" in result.stderr


def test_writes_and_verifies_unmounted_loop_device(loop, tmp_path):
    image = make_image(tmp_path / "cortex.raw", 3 * MiB + 4096)
    dev = loop(STICK_4GB)
    check = run("--check", "--image", str(image), dev)
    assert check.returncode == 0 and "nothing written" in check.stderr
    result = run("--yes", "--image", str(image), dev, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "verified: sha256" in result.stderr
    with open(dev, "rb") as f:
        assert f.read(image.stat().st_size) == image.read_bytes()


def test_credentials_file_lands_on_the_esp(loop, tmp_path):
    for tool in ("sfdisk", "mkfs.vfat", "mcopy", "mtype"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not available")
    image = tmp_path / "cortex.raw"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    subprocess.run(["sfdisk", "-q", str(image)], input='label: gpt\nstart=2048, size=8192, type=U, name="cortex-esp"\n',
                   text=True, check=True, capture_output=True, timeout=30)
    subprocess.run(["mkfs.vfat", "--offset=2048", str(image), "4096"], check=True, capture_output=True, timeout=30)
    creds = tmp_path / "node7.conf"
    creds.write_text("cortex.node_name=node7\ncortex.init=yes\n")
    dev = loop(STICK_4GB)
    result = run("--yes", "--image", str(image), "--credentials", str(creds), dev, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "verified: sha256" in result.stderr and "credentials written" in result.stderr
    shown = subprocess.run(["mtype", "-i", f"{dev}@@{2048 * 512}", "::/cortex/credentials.conf"], capture_output=True,
                           text=True, timeout=30, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    assert shown.stdout.replace("\r", "") == creds.read_text()


def test_refuses_a_device_that_holds_the_image_but_not_the_first_boot_layout(loop, tmp_path):
    """A 2 GiB stick holds the 1.6 GiB image, but systemd-repart cannot add slot B and the state partition
    on first boot: refused up front (with --check too), naming both sizes; a 4 GB stick passes."""
    minimum = layout.minimum_disk_bytes(layout.read_layout(REPO / "image/tree/usr/lib/repart.d"))
    assert 2 * GiB < minimum <= STICK_4GB
    image = make_image(tmp_path / "cortex.raw", MiB)
    dev = loop(2 * GiB)
    result = run("--check", "--yes", "--image", str(image), dev)
    assert result.returncode != 0, result.stderr
    assert "too small for the appliance's partition layout" in result.stderr
    assert layout.human(minimum) in result.stderr and "2.0GiB" in result.stderr, result.stderr
    result = run("--check", "--yes", "--image", str(image), loop(STICK_4GB))
    assert result.returncode == 0 and "nothing written" in result.stderr, result.stderr
    assert f"layout needs {layout.human(minimum)}" in result.stderr
