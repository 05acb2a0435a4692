"""The secret credentials of one netboot, as a second initrd: a cpio archive iPXE loads after the OS image.

A kernel argument is printed on the console twice at boot (`Command line:` and `Kernel command line:`)
and readable in `/proc/cmdline` by every local user, so the join token does not go there. iPXE
concatenates its initrds; the kernel unpacks each cpio in turn into the RAM root file system, so this
archive adds `/etc/credstore/cortex.join_token` (directory 0700, file 0600, root) over the netboot OS.
`cortex-config.service` imports `cortex.*` credentials (`ImportCredential=`), which systemd also looks
for in `/etc/credstore/`, and `cortex.appliance.credentials render --credstore /etc/credstore` reads the
same directory itself. (`/run/credstore` would be hidden: systemd mounts a tmpfs on `/run`.)

Each archive is served once (`Tickets`), under a random name that is in the iPXE script only, and
forgotten when its token would have expired anyway.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict

CREDSTORE = "etc/credstore"
NAME = "credentials.cpio"  # iPXE names the image after the URL's last part; the kernel argument initrd= uses it
_TRAILER = "TRAILER!!!"
MAX_PENDING = 1024  # archives minted but not fetched yet; the oldest go first beyond this


def _entry(name: str, mode: int, data: bytes, ino: int, mtime: int) -> bytes:
    """One `newc` (SVR4, no CRC) cpio member: the format the kernel's initramfs unpacker reads."""
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, mtime, len(data), 0, 0, 0, 0, len(encoded), 0)
    header = b"070701" + b"".join(f"{value:08X}".encode() for value in fields)
    out = header + encoded
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def credentials_cpio(credentials: dict[str, str], mtime: int | None = None) -> bytes:
    """A cpio archive with one file per credential under /etc/credstore (names are credential names)."""
    when = int(time.time() if mtime is None else mtime)
    out = _entry(CREDSTORE, 0o040700, b"", 1, when)
    for ino, (name, value) in enumerate(sorted(credentials.items()), start=2):
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"{name!r} is not a credential name")
        out += _entry(f"{CREDSTORE}/{name}", 0o100600, value.encode(), ino, when)
    out += _entry(_TRAILER, 0, b"", 0, 0)
    return out + b"\0" * (-len(out) % 512)


class Tickets:
    """Archives waiting for their one download: ticket -> (expires_at, bytes)."""

    def __init__(self, clock=time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def mint(self, credentials: dict[str, str], expires_at: float) -> str:
        ticket = secrets.token_hex(16)
        data = credentials_cpio(credentials)
        with self._lock:
            self._pending[ticket] = (expires_at, data)
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)
        return ticket

    def take(self, ticket: str) -> bytes | None:
        """The archive, once; None when unknown, already fetched or past its token's expiry."""
        now = self._clock()
        with self._lock:
            for stale in [t for t, (exp, _) in self._pending.items() if exp and exp < now]:
                del self._pending[stale]
            entry = self._pending.pop(ticket, None)
        return entry[1] if entry else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)
