"""`cortex node install|uninstall`: this machine as a cluster node in one command (appliance/hostinstall.py)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

JOINED_STATES = ("worker", "follower", "leader")


def register(commands) -> None:
    node = commands.group("node", "run the agent on this machine under systemd (laptops, desktops, servers)")
    sp = commands.add("install", cmd_install, "install the agent's systemd unit and sleep hook, join a cluster, "
                                              "start it", node)
    sp.add_argument("--join", required=True, metavar="ADDR", help="HOST:PORT of any member of the cluster")
    sp.add_argument("--token", required=True, help="a join token (`cortex token create --role worker` on a member)")
    sp.add_argument("--name", default="", help="node id (default: this machine's host name)")
    sp.add_argument("--role", default="worker", choices=("worker", "server"),
                    help="worker (default: a laptop that sleeps never counts for quorum) or server")
    sp.add_argument("--address", default="", help="HOST[:PORT] the cluster reaches this node at (default: this "
                                                  "machine's first global address, port 7400)")
    sp.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    sp.add_argument("--wait", type=float, default=90.0, help="seconds to wait for the node to join (0: do not wait)")
    sp.add_argument("--root", default="/", help=argparse_suppress())
    sp = commands.add("uninstall", cmd_uninstall, "leave the cluster, disable the agent and remove what install wrote",
                      node)
    sp.add_argument("--purge", action="store_true", help="also delete the agent's data (/var/lib/cortex)")
    sp.add_argument("--no-leave", action="store_true",
                    help="remove without leaving (the cluster is gone or unreachable; forget the node there)")
    sp.add_argument("--root", default="/", help=argparse_suppress())


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS  # --root: tests write into a directory instead of this machine


def _systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        from cortex.cli.output import UsageError

        raise UsageError(f"systemctl {' '.join(args)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result


def _preflight(root: Path) -> bool:
    """True when this acts on the running system (then it must be root and run systemd)."""
    from cortex.cli.output import UsageError

    live = root == Path("/")
    if live and os.geteuid() != 0:
        raise UsageError("this installs a system service: run it as root (sudo cortex node ...)")
    if live and not Path("/run/systemd/system").is_dir():
        raise UsageError("systemd is not running here: the agent needs it as its service manager")
    return live


def _admin_socket(root: Path) -> Path:
    from cortex.appliance import hostinstall

    return root / hostinstall.DATA_DIR.lstrip("/") / "admin.sock"


def _grpc_address(root: Path) -> str:
    import yaml

    from cortex.appliance import hostinstall

    try:
        return yaml.safe_load((root / hostinstall.CONFIG_PATH).read_text())["listen"]["grpc"]
    except (OSError, TypeError, KeyError, yaml.YAMLError):
        return ""


def _wait_joined(address: str, seconds: float) -> dict:
    """The agent's status once it is a member, or the last one seen when `seconds` ran out. Asked over
    its gRPC address: plaintext before it joined, with the certificate it then keeps in /var/lib/cortex/tls
    (a new client each round finds it)."""
    from cortex.client import Client

    deadline, last = time.monotonic() + seconds, {"state": "not started", "waiting_for": ""}
    while address:
        try:
            with Client(address, timeout=5) as c:
                status = c.status()
            last = {"state": status.state, "waiting_for": getattr(status, "waiting_for", ""),
                    "node_id": status.node_id}
            if status.state in JOINED_STATES:
                return last
        except Exception as exc:  # the agent is still starting
            last["waiting_for"] = str(exc)
        if time.monotonic() >= deadline:
            break
        time.sleep(1)
    return last


def cmd_install(args) -> int:
    from cortex.appliance import hostinstall
    from cortex.appliance.credentials import detect_address
    from cortex.cli.output import UsageError, emit, table

    root = Path(args.root)
    live = _preflight(root)
    options = hostinstall.Options(join=args.join, token=args.token.strip(), name=args.name or hostinstall.default_name(),
                                  role=args.role, address=args.address, log_level=args.log_level)
    problems = hostinstall.check(options)
    if problems:
        raise UsageError("; ".join(problems))
    try:
        wanted = hostinstall.files(options, hostinstall.cli_path(for_systemd=live), "" if args.address else detect_address())
        changed = hostinstall.write(root, wanted)
    except (hostinstall.InstallError, OSError) as exc:
        raise UsageError(str(exc)) from None
    result = {"node_id": options.name, "role": options.role, "join": options.join,
              "changed": changed, "state": "not started"}
    if live:
        if hostinstall.UNIT_PATH in changed:
            _systemctl("daemon-reload")
        _systemctl("enable", "--quiet", hostinstall.SERVICE)
        running = _systemctl("is-active", "--quiet", hostinstall.SERVICE, check=False).returncode == 0
        # A changed unit or config takes effect only on a restart; an unchanged running agent is left alone.
        _systemctl("restart" if running and changed else "start", hostinstall.SERVICE)
        if args.wait > 0:
            result.update(_wait_joined(_grpc_address(root), args.wait))
    rows = [{"file": "/" + rel, "changed": "yes" if rel in changed else "no"} for rel in wanted]
    human = table(rows, ["file", "changed"]) + f"\nnode {options.name} ({options.role}), joining {options.join}: " \
        f"{result['state']}"
    if live and result["state"] not in JOINED_STATES:
        human += (f"\nnot a member yet ({result.get('waiting_for') or 'no answer'}); it keeps trying: "
                  f"`cortex --addr {_grpc_address(root)} status`, `journalctl -u {hostinstall.SERVICE}`")
    emit(args, result, human)
    return 0 if not live or args.wait <= 0 or result["state"] in JOINED_STATES else 1


def cmd_uninstall(args) -> int:
    from cortex.appliance import hostinstall
    from cortex.cli.output import UsageError, emit
    from cortex.client import AdminClient, CortexError

    root = Path(args.root)
    live = _preflight(root)
    unit = root / hostinstall.UNIT_PATH
    left = "not installed"
    if unit.exists() and live and not args.no_leave:
        # Only a running agent can leave: the cluster drops it from membership (and a server from Raft).
        _systemctl("start", hostinstall.SERVICE)
        socket_path = _admin_socket(root)
        deadline = time.monotonic() + 60
        while not socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        try:
            AdminClient(str(socket_path), timeout=60).leave()
            left = "left the cluster"
        except CortexError as exc:
            if "not in a cluster" not in exc.details:
                raise UsageError(f"could not leave the cluster ({exc.details}); nothing was removed. Retry when the "
                                 "cluster is reachable, or `cortex node uninstall --no-leave` and then `cortex nodes "
                                 "forget NODE` on a member") from None
            left = "was in no cluster"
    elif unit.exists():
        left = "did not leave (--no-leave)" if args.no_leave else "not running here"
    if unit.exists() and live:
        _systemctl("disable", "--now", "--quiet", hostinstall.SERVICE, check=False)
        _systemctl("reset-failed", hostinstall.SERVICE, check=False)
    removed = hostinstall.remove(root, args.purge)
    if live and hostinstall.UNIT_PATH in removed:
        _systemctl("daemon-reload")
    emit(args, {"removed": ["/" + r for r in removed], "leave": left, "purged": args.purge},
         (f"removed {', '.join('/' + r for r in removed)}" if removed else "nothing to remove: not installed")
         + f"; {left}" + ("" if args.purge or not removed else
                         f"; the agent's data stays in {hostinstall.DATA_DIR} (--purge deletes it)"))
    return 0
