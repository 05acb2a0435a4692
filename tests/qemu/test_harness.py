"""The harness fails fast on a boot that is lost, with the console tail, instead of waiting out its
deadline: a kernel panic, an emergency shell, firmware that finds nothing to boot. Each case uses the
built image's own kernel/initrd and takes seconds."""

from __future__ import annotations

import time

import pytest

from tests.qemu.hostcmd import run
from tests.qemu.machine import VMError

DEADLINE = 240  # what a hung boot would cost; every case must fail far sooner


def expect_fast_failure(vm, expected: str) -> float:
    start = time.monotonic()
    with pytest.raises(VMError) as failure:
        vm.wait_for_console(r"cortex-ready: CORTEX-READY|login:", timeout=DEADLINE)
    took = time.monotonic() - start
    message = str(failure.value)
    assert expected in message
    assert "last console lines" in message and len(message.splitlines()) > 5, "the console tail is missing"
    assert took < DEADLINE / 2, f"took {took:.0f} s: not fast"
    return took


def test_fails_fast_on_panic_emergency_shell_and_nothing_to_boot(lab):
    initrd = lab.images.disk.with_suffix(".initrd")
    panic = lab.machine("panic", kernel=lab.images.vmlinuz, smp=1, memory_mb=512,
                        append="console=ttyS0 root=/dev/nonexistent panic=-1")
    emergency = lab.machine("emergency", kernel=lab.images.vmlinuz, initrd=initrd, smp=1, memory_mb=1024,
                            append="console=ttyS0 rd.systemd.unit=emergency.target")
    blank = lab.workdir / "blank.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", str(blank), "64M"])
    nothing = lab.machine("blank-disk", disk=blank, smp=1, memory_mb=512)  # OVMF, nothing bootable
    for vm in (panic, emergency, nothing):
        vm.start()
    try:
        for vm, expected in ((panic, "Kernel panic"), (emergency, "emergency"),
                             (nothing, "failed to load Boot")):
            took = expect_fast_failure(vm, expected)
            print(f"{vm.name}: failed after {took:.1f} s with {expected!r}")
    finally:
        for vm in (panic, emergency, nothing):
            vm.kill()
