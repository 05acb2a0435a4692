"""The built appliance images the VM tests boot: built once per test session by image/build.sh
(which installs mkosi, QEMU and OVMF itself) unless a build newer than every source is already there."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from tests.qemu.hostcmd import run

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "image/.build/out"
# What goes into the image: a change to any of these makes a build stale.
SOURCES = [REPO / "src", REPO / "proto", REPO / "image", REPO / "pyproject.toml"]
# The netboot image (kernel + cpio) is for test_netboot's diskless PXE node.
BUILD_ENV = {"CORTEX_IMAGE_NETBOOT": "1", "CORTEX_IMAGE_UPDATE": "0", "CORTEX_IMAGE_PLAIN": "1"}
NETBOOT = ("cortex-netboot.vmlinuz", "cortex-netboot.cpio.zst")  # symlinks to the newest netboot build


@dataclass
class Images:
    disk: Path       # the appliance (cortex_V.raw)
    plain: Path      # the same image minus the agent (cortex-plain_V.raw), the boot-time yardstick
    vmlinuz: Path    # the appliance's kernel, for direct-boot harness checks
    built_in: float  # seconds spent building in this session (0: reused)
    netboot_dir: Path = OUT  # cortex-netboot.vmlinuz + .cpio.zst, as the netboot service serves them
    netboot_built_in: float = 0.0  # the part of built_in that went to the netboot image (build.sh's count)


def newest_source_mtime() -> float:
    newest = 0.0
    for root in SOURCES:
        paths = [root] if root.is_file() else root.rglob("*")
        for path in paths:
            # _proto: stubs generated from proto/ (every wheel build rewrites them, the v2 build of test_issu too)
            if (".build" in path.parts or "__pycache__" in path.parts or "_proto" in path.parts or path.suffix == ".md"
                    or not path.is_file()):
                continue
            newest = max(newest, path.stat().st_mtime)
    return newest


def current() -> Images | None:
    """The newest build, if it has everything the tests need and is newer than every source."""
    disk, plain = OUT / "cortex.raw", OUT / "cortex-plain.raw"
    if not (disk.exists() and plain.exists()):
        return None
    disk, plain = disk.resolve(), plain.resolve()
    vmlinuz = disk.with_suffix(".vmlinuz")
    netboot = [(OUT / name).resolve() for name in NETBOOT]
    if not vmlinuz.exists() or not all(p.exists() for p in netboot):
        return None
    if min(p.stat().st_mtime for p in [disk, plain, *netboot]) < newest_source_mtime():
        return None
    return Images(disk=disk, plain=plain, vmlinuz=vmlinuz, built_in=0.0)


def ensure_built(log: Path) -> Images:
    """Reuse an up-to-date build or run image/build.sh (its output goes to `log`)."""
    if os.environ.get("CORTEX_VM_REBUILD") != "1" and (images := current()):
        return images
    start = time.monotonic()
    done = run([str(REPO / "image/build.sh")], timeout=3000, check=False,
               env={**os.environ, **BUILD_ENV})
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise RuntimeError(f"image/build.sh failed (exit {done.returncode}); log {log}:\n{tail}")
    images = current()
    if images is None:
        raise RuntimeError(f"image/build.sh succeeded but left no complete build in {OUT}; log {log}")
    images.built_in = time.monotonic() - start
    # build.sh's summary: "Cortex image V built in N s (disk N s, netboot N s, plain N s, ...)"
    netboot = re.search(r"netboot (\d+) s", done.stdout + done.stderr)
    images.netboot_built_in = float(netboot.group(1)) if netboot else 0.0
    return images
