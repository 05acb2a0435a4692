"""`cortex update serve`: the update directory over plain HTTP, read-only (any static server works as well).

Integrity does not come from the transport: every node checks the publisher's signature and each checksum
before installing, so plain HTTP inside the cluster's network is enough.
"""

from __future__ import annotations

import functools
import sys
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ReleaseHandler(SimpleHTTPRequestHandler):
    def list_directory(self, path):  # a release is fetched by name from SHA256SUMS; no listings
        self.send_error(404, "no directory listings; fetch <channel>/<version>/SHA256SUMS")
        return None

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        sys.stderr.write(f"update-serve {self.address_string()} {format % args}\n")


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--listen {listen!r}: use HOST:PORT, e.g. 0.0.0.0:8470")
    return host.strip("[]"), int(port)


def make_server(root: Path, listen: str) -> ThreadingHTTPServer:
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory; publish a release there first (`cortex update publish`)")
    handler = functools.partial(ReleaseHandler, directory=str(root))
    return ThreadingHTTPServer(split_listen(listen), handler)


def serve(root: Path, listen: str) -> int:
    server = make_server(root, listen)
    host, port = server.server_address[:2]
    print(f"serving {root} at http://{host}:{port}/ (channels: "
          f"{', '.join(sorted(p.name for p in root.iterdir() if p.is_dir())) or 'none yet'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
