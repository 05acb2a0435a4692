"""logind's PrepareForSleep on a real D-Bus: a private dbus-daemon (system-bus type) per test, a process
that owns org.freedesktop.login1 and emits the signal as logind does, and one that does not (an impostor)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cortex.appliance import sleepwatch
from cortex.client import Client

pytestmark = pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon")

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="signal"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

EMIT = """
import sys
from jeepney import DBusAddress, new_signal, message_bus
from jeepney.io.blocking import Proxy, open_dbus_connection
conn = open_dbus_connection(bus="SYSTEM")
if sys.argv[1] == "logind":
    assert Proxy(message_bus, conn).RequestName("org.freedesktop.login1", 4)[0] == 1  # primary owner
manager = DBusAddress("/org/freedesktop/login1", interface="org.freedesktop.login1.Manager")
conn.send(new_signal(manager, "PrepareForSleep", "b", (sys.argv[2] == "sleep",)))
Proxy(message_bus, conn).GetId()  # a round trip: the signal has left before we exit
conn.close()
"""


@pytest.fixture
def system_bus(tmp_path: Path, monkeypatch):
    socket_path = tmp_path / "system_bus_socket"
    config = tmp_path / "bus.conf"
    config.write_text(BUS_CONFIG.format(socket=socket_path))
    daemon = subprocess.Popen(["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not socket_path.exists():
        assert daemon.poll() is None and time.monotonic() < deadline, daemon.stderr.read().decode()
        time.sleep(0.02)
    address = f"unix:path={socket_path}"
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
    yield address
    daemon.kill()
    daemon.wait(10)


def emit(address: str, who: str, what: str) -> None:
    subprocess.run([sys.executable, "-c", EMIT, who, what], check=True, timeout=30,
                   env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address})


def test_only_logind_can_say_the_machine_slept(system_bus):
    seen: list[bool] = []
    stop, ready = threading.Event(), threading.Event()
    watcher = threading.Thread(target=sleepwatch.watch, args=(seen.append, stop, ready), daemon=True)
    watcher.start()
    assert ready.wait(10)
    emit(system_bus, "impostor", "wake")  # anyone may send the signal; only logind's copy counts
    emit(system_bus, "logind", "sleep")
    emit(system_bus, "logind", "wake")
    deadline = time.monotonic() + 10
    while len(seen) < 2:
        assert time.monotonic() < deadline, seen
        time.sleep(0.02)
    time.sleep(0.3)
    assert seen == [True, False]
    stop.set()
    watcher.join(5)
    assert not watcher.is_alive()


def test_without_a_bus_the_watch_returns_quietly(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path / 'nothing-here'}")
    stop = threading.Event()
    started = time.monotonic()
    sleepwatch.watch(lambda going: None, stop)
    assert time.monotonic() - started < 5


def test_a_worker_rejoins_when_logind_says_it_woke(system_bus, make_cluster):
    cluster = make_cluster(1, workers=1)  # its agents inherit DBUS_SYSTEM_BUS_ADDRESS from the bus fixture
    worker = cluster.node("w1")
    leader = cluster.node("n1").grpc_address

    def liveness() -> str:
        with Client(leader) as c:
            return next(n.liveness for n in c.status().nodes if n.id == "w1")

    deadline = time.monotonic() + 30
    while liveness() != "alive" or "watching logind" not in open(worker.log_path).read():
        assert time.monotonic() < deadline, "the worker did not come back with its logind watch"
        time.sleep(0.1)
    os.kill(worker.pid, signal.SIGSTOP)  # "asleep"
    try:
        deadline = time.monotonic() + 15
        while liveness() == "alive":
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    woke = time.monotonic()
    emit(system_bus, "logind", "wake")
    while liveness() != "alive":
        assert time.monotonic() - woke < 10
        time.sleep(0.02)
    print(f"logind wake -> alive: {time.monotonic() - woke:.2f}s")
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in open(worker.log_path) if '"resumed: rejoining"' in line]
        if any(line.get("trigger") == "logind" for line in lines):
            break
        assert time.monotonic() < deadline, open(worker.log_path).read()[-3000:]
        time.sleep(0.1)

