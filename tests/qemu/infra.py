"""pytest-testinfra on the VMs: a testinfra backend whose commands go through the harness's channel
(Machine.execute, i.e. SSH inside the lab namespace), so `host.file(...)`, `host.service(...)`,
`host.mount_point(...)` work against a VM."""

from __future__ import annotations

from typing import Any

import testinfra.host
from testinfra.backend.base import BaseBackend, CommandResult

from tests.qemu.machine import Machine


class MachineBackend(BaseBackend):
    NAME = "cortex-vm"

    def __init__(self, machine: Machine, *args: Any, **kwargs: Any):
        self.machine = machine
        super().__init__(machine.name, *args, **kwargs)

    def run(self, command: str, *args: str, **kwargs: Any) -> CommandResult:
        command = self.get_command(command, *args)
        rc, out, err = self.machine.execute(command)
        return self.result(rc, self.encode(command), out, err)


def host(machine: Machine) -> testinfra.host.Host:
    backend = MachineBackend(machine)
    h = testinfra.host.Host(backend)
    backend.set_host(h)
    return h
