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
from tests.support import procs
from tests.support.wait import wait_until

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
    daemon = procs.popen(["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def bus_listening() -> bool:
        assert daemon.poll() is None, daemon.stderr.read().decode()
        return socket_path.exists()

    wait_until(bus_listening, 10, "the private dbus-daemon's socket", interval=0.02)
    address = f"unix:path={socket_path}"
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
    yield address
    daemon.kill()
    daemon.wait(10)


def emit(address: str, who: str, what: str) -> None:
    procs.run([sys.executable, "-c", EMIT, who, what], check=True, timeout=30,
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
    wait_until(lambda: len(seen) >= 2, 10, f"two signals seen (so far {seen})", interval=0.02)
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

    wait_until(lambda: liveness() == "alive" and "watching logind" in open(worker.log_path).read(), 30,
               "the worker to come back with its logind watch", interval=0.1)
    os.kill(worker.pid, signal.SIGSTOP)  # "asleep"
    try:
        wait_until(lambda: liveness() != "alive", 15, "the sleeping worker to be suspected", interval=0.1)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    woke = time.monotonic()
    emit(system_bus, "logind", "wake")
    wait_until(lambda: liveness() == "alive", 10, "the worker alive after logind's wake", interval=0.02)
    print(f"logind wake -> alive: {time.monotonic() - woke:.2f}s")
    def rejoined_on_loginds_word() -> bool:
        lines = [json.loads(line) for line in open(worker.log_path) if '"resumed: rejoining"' in line]
        return any(line.get("trigger") == "logind" for line in lines)

    try:
        wait_until(rejoined_on_loginds_word, 10, "a rejoin triggered by logind", interval=0.1)
    except AssertionError as exc:
        raise AssertionError(open(worker.log_path).read()[-3000:]) from exc

