"""`cortex netboot ...`: serve, machines, dnsmasq, profiles check, fetch, ephemeral run|leave."""

from __future__ import annotations

import ipaddress
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

IPXE_DIR = Path("/usr/lib/ipxe")  # Debian's ipxe package
# TFTP names the dnsmasq templates use -> the file of Debian's ipxe package.
TFTP_FILES = {"undionly.kpxe": "undionly.kpxe", "ipxe.efi": "ipxe.efi"}


def register(commands) -> None:
    netboot = commands.group("netboot", "netboot provisioning (iPXE, dnsmasq, ephemeral nodes)")

    def add(name, fn, help, parent=netboot):
        return commands.add(name, fn, help, parent)

    sp = add("serve", cmd_serve, "serve iPXE scripts and netboot artifacts (HTTP), minting a token per boot")
    sp.add_argument("--listen", default="0.0.0.0:8080", help="HOST:PORT to listen on (default 0.0.0.0:8080)")
    sp.add_argument("--base-url", default="", help="how machines reach this service (default http://<this "
                                                   "host's address>:PORT)")
    sp.add_argument("--join-address", default="", help="cluster member HOST:PORT the machines join "
                                                       "(default: --addr when it is not loopback)")
    sp.add_argument("--artifacts", default="image/.build/out", help="directory with the netboot kernel + cpio")
    sp.add_argument("--profiles", default="", help="profiles YAML (default: one worker profile for everyone)")

    sp = add("machines", cmd_machines, "list netbooted machines and their enrollment state")
    sp.add_argument("--all", action="store_true", help="every boot, not only the latest per machine")

    sp = add("dnsmasq", cmd_dnsmasq, "print or write the dnsmasq config for PXE on this network")
    mode = sp.add_mutually_exclusive_group(required=True)
    mode.add_argument("--proxy", action="store_true", help="proxyDHCP beside an existing DHCP server (home router)")
    mode.add_argument("--lab", action="store_true", help="full DHCP + TFTP for an isolated lab network")
    sp.add_argument("--network", default="", help="CIDR, e.g. 192.168.1.0/24 (default: this host's first network)")
    sp.add_argument("--interface", default="", help="interface to serve on (default: the one with this host's "
                                                    "address in --network; 'all': every interface)")
    sp.add_argument("--base-url", default="", help="provisioning service URL (default http://<this host's address "
                                                   "in --network>:8080)")
    sp.add_argument("--tftp-root", default="/srv/cortex-tftp", help="TFTP directory for the iPXE binaries")
    sp.add_argument("--router", default="", help="--lab: default gateway to hand out (default: none)")
    sp.add_argument("--range", default="", help="--lab: DHCP range START-END (default: upper half)")
    sp.add_argument("--host", action="append", default=[], help="--lab: fixed lease MAC,IP[,NAME] (repeatable)")
    sp.add_argument("--write", default="", help="write the config to this file and fill --tftp-root with iPXE")

    profiles = commands.group("profiles", "netboot profiles", netboot)
    sp = add("check", cmd_profiles_check, "validate a profiles YAML file", profiles)
    sp.add_argument("file")

    sp = add("fetch", cmd_fetch, "mirror a provisioning service's artifacts, verifying SHA-256")
    sp.add_argument("url", help="the service, e.g. http://10.0.0.5:8080")
    sp.add_argument("dir")

    eph = commands.group("ephemeral", "on a netbooted node (cortex-ephemeral.service)", netboot)
    sp = add("run", cmd_ephemeral_run, "report this node as ephemeral, power off when idle", eph)
    sp.add_argument("--poll", type=float, default=2.0)
    add("leave", cmd_ephemeral_leave, "leave the cluster cleanly (on shutdown)", eph)


# --- serve ----------------------------------------------------------------------------------------------------

class ClientPort:
    """service.ClusterPort over the gRPC client: the service runs next to an agent, not inside it."""

    def __init__(self, address: str, timeout: float):
        from cortex.client import Client

        self._client = Client(address, timeout=timeout)
        self.node_id = self._client.status().node_id or "unknown"

    def create_token(self, role: str, ttl_seconds: float, uses: int) -> tuple[str, str, float]:
        response = self._client.create_token(role, ttl_seconds, uses)
        return response.token, response.token_id, response.expires_at

    def revoke_token(self, token_id: str) -> None:
        self._client.revoke_token(token_id)

    def write(self, command_type: str, args: dict, idempotency_key: str = "") -> dict:
        return self._client.write(command_type, args, idempotency_key=idempotency_key or None, retry_for=10)

    def read(self, query: str, args: dict | None = None, level: str = "leader") -> Any:
        return self._client.read(query, args, level=level)

    def close(self) -> None:
        self._client.close()


def host_address() -> str:
    """This host's first global IPv4 address (over netlink; no traffic sent)."""
    from cortex.appliance.credentials import detect_address

    return detect_address()


def cmd_serve(args) -> int:
    from cortex.cli.output import UsageError
    from cortex.netboot import profiles
    from cortex.netboot.service import HttpService, Provisioner, ServiceConfig, split_listen

    try:
        prof = profiles.load(args.profiles) if args.profiles else profiles.default_profiles()
        host, port = split_listen(args.listen)
    except (profiles.ProfileError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    base = args.base_url or f"http://{host if host not in ('0.0.0.0', '::', '') else host_address()}:{port}"
    join = args.join_address or args.addr
    if not args.join_address and join.startswith(("127.", "localhost", "[::1]")):
        raise UsageError(f"machines cannot join through {join}: pass --join-address HOST:PORT (a member's "
                         "address on their network)")
    # Tokens are minted through the cluster with a client certificate (the agent's DATA_DIR/tls, which
    # CORTEX_TLS_DIR names beside a node); without one the client's error says where it looked.
    port_ = ClientPort(args.addr, args.timeout)
    try:
        provisioner = Provisioner(ServiceConfig(base, join, Path(args.artifacts), prof), port_)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    service = HttpService(provisioner, host, port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    service.start()
    missing = provisioner.artifacts.missing()
    print(f"cortex netboot: serving on {args.listen} as {base}; machines join through {join}", flush=True)
    if missing:
        print(f"cortex netboot: WARNING: missing artifacts in {args.artifacts}: {', '.join(missing)} "
              "(build them with `just image`)", flush=True)
    print(f"  iPXE: chain {base}/boot.ipxe   netboot.xyz: custom_url {base}/   "
          f"dnsmasq: cortex netboot dnsmasq --proxy --base-url {base}", flush=True)
    stop.wait()
    service.stop()
    port_.close()
    return 0


# --- machines ---------------------------------------------------------------------------------------------------

def _when(ts) -> str:
    return "-" if not ts else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def display_state(row: dict, now: float) -> str:
    if row["state"] == "issued" and row.get("token_expires_at") and row["token_expires_at"] < now:
        return "expired"  # the boot never joined and its token can no longer be used
    return row["state"]


def cmd_machines(args) -> int:
    from cortex.cli.output import cluster_client, emit, table

    with cluster_client(args) as c:
        rows = c.read("netboot.enrollments" if args.all else "netboot.machines",
                      {"limit": 1000} if args.all else {}, level="leader")
    now = time.time()
    for row in rows:
        row["display_state"] = display_state(row, now)
    human = table([{**r, "state": r["display_state"], "enrolled": _when(r["created_at"]),
                    "changed": _when(r["updated_at"]), "ephemeral": "yes" if r["ephemeral"] else "no"}
                   for r in rows],
                  ["machine", "node_id", "group", "profile", "state", "ephemeral", "boots", "enrolled", "changed",
                   "token_id"] if not args.all else
                  ["machine", "node_id", "group", "profile", "state", "enrolled", "changed", "token_id"])
    emit(args, rows, human if rows else "no netbooted machines yet")
    return 0


# --- dnsmasq ----------------------------------------------------------------------------------------------------

def first_network(within: str = "") -> tuple[str, str, str]:
    """(network CIDR, address, interface) of this host's first global IPv4 address, or of its first address
    inside the network `within` ('' for each part it has none there)."""
    from cortex.appliance.addresses import global_addresses

    try:
        addresses = global_addresses(socket.AF_INET)
    except OSError:
        addresses = []
    try:
        wanted = ipaddress.ip_network(within, strict=False) if within else None
    except ValueError:
        return within, "", ""  # render words the error
    for addr in addresses:
        net = ipaddress.ip_interface(f"{addr.address}/{addr.prefixlen}").network
        if wanted is None:
            return str(net), addr.address, addr.interface
        if ipaddress.ip_address(addr.address) in wanted:
            return within, addr.address, addr.interface
    return within, "", ""


def install_tftp(tftp_root: Path, ipxe_dir: Path = IPXE_DIR) -> list[str]:
    """Symlink Debian's iPXE binaries into the TFTP directory under the names the configs use."""
    tftp_root.mkdir(parents=True, exist_ok=True)
    missing = [src for src in set(TFTP_FILES.values()) if not (ipxe_dir / src).exists()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing in {ipxe_dir}: install Debian's ipxe package "
                                "(./bootstrap.sh does)")
    for name, src in TFTP_FILES.items():
        link = tftp_root / name
        link.unlink(missing_ok=True)
        link.symlink_to(ipxe_dir / src)
    return sorted(TFTP_FILES)


def cmd_dnsmasq(args) -> int:
    from cortex.cli.output import UsageError, emit
    from cortex.netboot import render

    # The interface and the service's address default to this host's own on the network (`--lab` on a
    # bridge the host is part of, `--proxy` on the home network); `all` serves on every interface.
    network, address, detected_if = first_network(args.network)
    if not network:
        raise UsageError("no IPv4 network found on this host: pass --network CIDR")
    interface = "" if args.interface == "all" else (args.interface or detected_if)
    base = args.base_url or (f"http://{address}:8080" if address else "")
    if not base:
        raise UsageError(f"this host has no address in {network}, so the machines' provisioning URL is unknown: "
                         "pass --base-url http://HOST:PORT (where they reach `cortex netboot serve`)")
    problem = render.base_url_problem(base)
    if problem:
        raise UsageError(f"--base-url {problem}")
    boot_url = f"{base.rstrip('/')}/boot.ipxe"
    try:
        if args.proxy:
            text = render.dnsmasq_proxy(network, boot_url, args.tftp_root, interface)
        else:
            hosts = []
            for spec in args.host:
                parts = spec.split(",")
                if len(parts) not in (2, 3):
                    raise UsageError(f"--host {spec!r}: expected MAC,IP[,NAME]")
                hosts.append(render.LabHost(*parts))
            start, _, end = args.range.partition("-")
            text = render.dnsmasq_lab(network, boot_url, args.tftp_root, interface, start, end, args.router,
                                      hosts=tuple(hosts))
    except (render.IpxeEscapeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if not args.write:
        print(text, end="")
        return 0
    Path(args.write).write_text(text)
    files = install_tftp(Path(args.tftp_root))
    emit(args, {"config": args.write, "tftp_root": args.tftp_root, "tftp_files": files},
         f"wrote {args.write}; {args.tftp_root}: {', '.join(files)}\n"
         f"run: dnsmasq --keep-in-foreground --conf-file={args.write}")
    return 0


# --- profiles, fetch, ephemeral ------------------------------------------------------------------------------

def cmd_profiles_check(args) -> int:
    from cortex.cli.output import emit
    from cortex.netboot import profiles

    try:
        prof = profiles.load(args.file)
    except profiles.ProfileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    groups = [{"name": g.name, "profile": g.profile, "selector": g.selector, "node_name": g.node_name,
               "default": g.is_default} for g in prof.groups]
    default = next((g["name"] for g in groups if g["default"]), "")
    fallback = f"default group {default}" if default else "no default group: unknown machines are refused"
    emit(args, {"ok": True, "profiles": sorted(prof.profiles), "groups": groups},
         f"{args.file}: ok ({len(prof.profiles)} profiles, {len(groups)} groups, {fallback})")
    return 0


def cmd_fetch(args) -> int:
    from cortex.cli.output import emit
    from cortex.netboot.artifacts import ArtifactError, fetch_all

    try:
        paths = fetch_all(args.url, Path(args.dir))
    except ArtifactError as exc:
        print(f"cortex: {exc}", file=sys.stderr)
        return 1
    emit(args, [str(p) for p in paths], "\n".join(f"verified {p}" for p in paths))
    return 0


def cmd_ephemeral_run(args) -> int:
    from cortex.netboot import ephemeral

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    return ephemeral.run(args.addr, poll=args.poll, stop=stop.is_set)


def cmd_ephemeral_leave(args) -> int:
    from cortex.netboot import ephemeral

    return ephemeral.leave(args.socket)  # --socket, else $CORTEX_SOCKET (its default), else the node's path
