"""`cortex secrets rotate`: every node replaces its certificate (and servers the local admin one), and the
servers switch the Raft transport to a new key, now.

Both rotations are generation numbers in the replicated key-value store. Each node compares the
certificate generation with the one it last rotated for (<data_dir>/tls/rotation) and renews at its next
check (within a few seconds); each server switches the Raft key when it applies the new Raft generation
(raft_keys.py: the key is derived from the CA key, so no secret travels). No restart: writes keep flowing.
Each replaced certificate is revoked after a short grace (revocation.py). `--ca` rotates the CA itself
(ca_rotation.py), following the phases until done; running it again resumes a rotation in progress.
"""

from __future__ import annotations

import sys
import time
import uuid

from cortex.security import ca_rotation

ROTATION_KEY = "_cortex/tls/rotation"
RAFT_ROTATION_KEY = "_cortex/raft/rotation"  # a generation number; the keys are derived (raft_keys.py)


def _bump(client, key: str) -> int:
    current = client.get(key, level="linearizable")
    generation = (int(current) if current and current.isdigit() else 0) + 1
    client.put(key, str(generation), retry_for=10)
    return generation


def rotate(client) -> dict:
    row = client.read("ca.rotation", {}, level="linearizable")["rotation"]
    if row is not None and row["phase"] != "done":  # both move the Raft key generation: one at a time
        raise SystemExit(f"a CA rotation is in progress (phase {row['phase']}): let it finish first "
                         "(`cortex secrets rotate --ca` shows and resumes it)")
    raft = _bump(client, RAFT_ROTATION_KEY)
    return {"generation": _bump(client, ROTATION_KEY), "raft_generation": raft, "requested_at": time.time()}


def register(sub, add, emit, client_of) -> None:
    secrets = sub.add_parser("secrets", help="rotate the cluster's credentials").add_subparsers(
        dest="sub", required=True)

    def cmd_rotate(args) -> int:
        if args.ca:
            return cmd_rotate_ca(args)
        with client_of(args) as c:
            result = rotate(c)
        emit(args, result, f"rotation {result['generation']} requested: every node renews its certificate and "
                           f"the servers switch to Raft key {result['raft_generation']} within seconds (no "
                           "restart); the replaced certificates are revoked 15 s later. The CA: --ca")
        return 0

    def cmd_rotate_ca(args) -> int:
        with client_of(args) as c:
            if not args.json:
                print("rotating the cluster CA (re-run to resume; phases: trust, reissue, drop)", flush=True)
            result = follow_ca_rotation(c, args.wait, progress_printer(args.json))
        if result.get("timed_out"):
            emit(args, result, f"CA rotation {result['rot_id']} is still in phase {result['phase']}, waiting for "
                               f"{', '.join(result['waiting_for']) or 'the leader'}: it goes on in the cluster; "
                               "bring those nodes up (or remove them) and run this again to follow it")
            return 1
        emit(args, result, f"CA rotation {result['rot_id']} done: every node trusts and holds certificates of "
                           f"CA {result['new_pin']} only (was {result['old_pin']}); Raft key generation "
                           f"{result['raft_generation']}. Make new join tokens (old ones pin the old CA) and copy "
                           "admin credentials again where you copied them")
        return 0

    sp = add("rotate", cmd_rotate, "every node replaces its certificate now (--ca: a new cluster CA)", secrets)
    sp.add_argument("--ca", action="store_true", help="rotate the cluster CA itself (resumable, no downtime)")
    sp.add_argument("--wait", type=float, default=300.0, help="seconds to follow a CA rotation (default 300)")

    def cmd_ca(args) -> int:
        with client_of(args) as c:
            c.status()  # the handshake verified the server against this CA: it is the cluster's
            files = c.tls_files
        if files is None:
            raise SystemExit(f"{args.addr} is not served with TLS (not in a cluster yet): no CA to show")
        doc = ca_info(files.ca)
        emit(args, doc, "\n".join(f"{'signing' if i == 0 else 'trusted'} CA  pin {ca['pin']}  "
                                  f"fingerprint {ca['fingerprint']}  until {ca['not_after']}"
                                  for i, ca in enumerate(doc["cas"]))
             + "\njoin tokens end in the signing CA's pin; a node joining for approval shows the pin it saw")
        return 0

    add("ca", cmd_ca, "show the cluster CA's pin (compare with what a joining node shows)", secrets)


def follow_ca_rotation(client, timeout: float, emit_progress, rot_id: str = "") -> dict:
    """Start (or resume) a rotation and follow it until done or `timeout`."""
    started = client.write("ca.request", {"rot_id": rot_id or uuid.uuid4().hex[:16]},
                           idempotency_key=f"ca-request-{rot_id}" if rot_id else None, retry_for=15)
    deadline = time.monotonic() + timeout
    last = None
    while True:
        doc = client.read("ca.rotation", {}, level="leader")
        members = ca_rotation.active_members(client.read("nodes", {}, level="leader"))
        row = doc["rotation"] or {}
        waiting = ca_rotation.pending(doc, members)
        state = (row.get("phase"), tuple(waiting))
        if state != last:
            emit_progress(row.get("phase", ""), len(members) - len(waiting), len(members), waiting)
            last = state
        if row.get("phase") == "done" and row.get("rot_id") == started["rot_id"]:
            return {"rot_id": row["rot_id"], "phase": "done", "resumed": not started["started"],
                    "old_pin": row["old_pin"], "new_pin": row["new_pin"], "raft_generation": row["raft_generation"]}
        if time.monotonic() > deadline:
            return {"rot_id": row.get("rot_id"), "phase": row.get("phase"), "waiting_for": waiting,
                    "resumed": not started["started"], "timed_out": True}
        time.sleep(0.5)


def progress_printer(as_json: bool):
    """Progress lines on stderr in both modes (with --json, stdout holds only the result)."""
    def show(phase: str, done: int, total: int, waiting: list[str]) -> None:
        tail = f" (waiting for {', '.join(waiting)})" if waiting else ""
        print(f"  {phase:9} {done}/{total} nodes{tail}", file=sys.stderr, flush=True)
    return show


def ca_info(bundle: bytes) -> dict:
    from cortex.security import tls

    cas = [{"pin": tls.ca_pin(pem), "fingerprint": tls.fingerprint(pem), "not_after": str(tls.not_after(pem))}
           for pem in tls.split_pems(bundle)]
    return {"pin": cas[0]["pin"] if cas else "", "cas": cas}
