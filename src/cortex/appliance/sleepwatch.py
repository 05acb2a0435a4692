"""Know the moment the machine wakes: a jump between CLOCK_BOOTTIME and CLOCK_MONOTONIC, and logind's
PrepareForSleep signal where there is a system bus.

Three ways tell the agent it slept, whichever comes first: the clocks (anywhere; watched every 0.1 s, the
first to know in the VM tests), logind's PrepareForSleep(false) (laptops and desktops with systemd-logind),
and the image's systemd sleep hook (sends SIGUSR1). logind and the hook speak once systemd-sleep is done.

The bus-side match names logind as the sender, so only the owner of org.freedesktop.login1 (which the
system bus's policy reserves for logind) can wake us; jeepney's local filter cannot resolve well-known
names, so it matches on the rest.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("cortex.sleepwatch")

LOGIND = "org.freedesktop.login1"
MANAGER = "org.freedesktop.login1.Manager"
SYSTEM_BUS_SOCKET = "/run/dbus/system_bus_socket"


CLOCK_POLL = 0.1  # how often watch_clock compares the clocks: a wake is noticed within this
SLEPT_THRESHOLD = 1.0  # a jump this large between the two clocks is a suspend (nothing else moves them apart)


def suspended_seconds() -> float:
    """Time spent suspended since boot: CLOCK_BOOTTIME counts it, CLOCK_MONOTONIC does not."""
    monotonic = time.clock_gettime(time.CLOCK_MONOTONIC)  # read first: the difference never comes out negative
    return time.clock_gettime(time.CLOCK_BOOTTIME) - monotonic


def watch_clock(on_wake: Callable[[float], None], stop: threading.Event, interval: float = CLOCK_POLL,
                clock: Callable[[], float] = suspended_seconds) -> None:
    """Call on_wake(seconds slept) whenever the clocks moved apart since the last look, until `stop`. The one
    place that reads the clocks for a wake. Works anywhere (no
    bus, no sleep hook) and is the first to know: two clock reads every 0.1 s, where logind and the sleep
    hook only speak once systemd-sleep has finished (seconds later on a slow machine)."""
    last = clock()
    while not stop.wait(interval):
        now = clock()
        if now - last > SLEPT_THRESHOLD:
            on_wake(now - last)
        last = now


def system_bus_present() -> bool:
    return bool(os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")) or os.path.exists(SYSTEM_BUS_SOCKET)


def watch(on_sleep_change: Callable[[bool], None], stop: threading.Event, ready: threading.Event | None = None) -> None:
    """Call on_sleep_change(True) before suspend and (False) after resume until `stop`; returns at once when
    there is no system bus to listen on."""
    from jeepney import MatchRule, message_bus
    from jeepney.io.blocking import Proxy, open_dbus_connection

    try:
        conn = open_dbus_connection(bus="SYSTEM")
    except (OSError, ValueError, KeyError) as exc:
        log.info("no system bus: resume is detected by the sleep hook and the clock only",
                 extra={"fields": {"error": str(exc)}})
        return
    try:
        on_bus = MatchRule(type="signal", sender=LOGIND, interface=MANAGER, member="PrepareForSleep",
                           path="/org/freedesktop/login1")
        Proxy(message_bus, conn).AddMatch(on_bus)
        local = MatchRule(type="signal", interface=MANAGER, member="PrepareForSleep")
        with conn.filter(local, bufsize=16) as queue:
            log.info("watching logind for sleep and resume")
            if ready is not None:
                ready.set()
            while not stop.is_set():
                try:
                    message = conn.recv_until_filtered(queue, timeout=1.0)
                except TimeoutError:
                    continue
                if message.body and isinstance(message.body[0], bool):
                    log.info("logind: PrepareForSleep", extra={"fields": {"going_to_sleep": message.body[0]}})
                    on_sleep_change(message.body[0])
    except Exception as exc:  # a broken bus must never take the agent down
        log.warning("logind watch stopped", extra={"fields": {"error": f"{type(exc).__name__}: {exc}"}})
    finally:
        conn.close()
