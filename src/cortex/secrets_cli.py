"""`cortex secrets rotate`: every node replaces its certificate (and servers the local admin one) now.

The rotation is a generation number in the replicated key-value store (ROTATION_KEY). Each node compares
it with the generation it last rotated for (<data_dir>/tls/rotation) and renews at its next certificate
check (within a few seconds), without a restart: writes keep flowing. Not rotated yet: the Raft secret and
the CA itself.
"""

from __future__ import annotations

import time

ROTATION_KEY = "_cortex/tls/rotation"


def rotate(client, wait: float = 0.0) -> dict:
    current = client.get(ROTATION_KEY, level="linearizable")
    generation = (int(current) if current and current.isdigit() else 0) + 1
    client.put(ROTATION_KEY, str(generation), retry_for=10)
    return {"generation": generation, "requested_at": time.time()}


def register(sub, add, emit, client_of) -> None:
    secrets = sub.add_parser("secrets", help="rotate the cluster's credentials").add_subparsers(
        dest="sub", required=True)

    def cmd_rotate(args) -> int:
        with client_of(args) as c:
            result = rotate(c)
        emit(args, result, f"rotation {result['generation']} requested: every node renews its certificate "
                           "within seconds (no restart); the Raft secret and the CA are not rotated yet")
        return 0

    add("rotate", cmd_rotate, "every node replaces its certificate now", secrets)
