"""PXE: a VM with no disk boots from the network on a home-style LAN, joins the cluster as an ephemeral
worker with its single-use token, runs a task, loses power and is garbage-collected.

On the lab bridge (tests/qemu/labnet.py):
- a "home router" (a peer namespace on the bridge) whose own dnsmasq hands out the addresses;
- the cluster: one real agent process on the host side of the lab (10.233.0.1), no VM, which also serves
  the netboot HTTP service (plugin `netboot`, option `listen`) with this test's profiles and the session
  build's netboot artifacts (cortex-netboot.vmlinuz + .cpio.zst);
- dnsmasq as proxyDHCP + TFTP beside the router, configured by `cortex netboot dnsmasq --proxy --write`:
  it only adds the boot information, the address comes from the router;
- the PXE VM (Machine(pxe=True): SeaBIOS + the virtio NIC's iPXE ROM, no disk): DHCP -> `boot.ipxe` ->
  its own script with a fresh single-use worker token -> kernel + cpio over HTTP -> the OS in RAM -> the
  agent joins -> `cortex-ephemeral.service` reports in.
Then a shell task targeted at the PXE node runs there (its output carries that boot's id), the VM loses
power, and the leader removes it from membership once it has been offline for gc_offline_after.

One boot only (TCG on shared cores: every boot costs minutes). The isolated-lab mode (dnsmasq as the only
DHCP server, `--lab`) differs in the dnsmasq config alone: its rendering is checked against dnsmasq in
tests/unit/test_netboot_render.py.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.qemu import probes, timings
from tests.qemu.conftest import wait_until
from tests.qemu.hostcmd import in_netns, run
from tests.qemu.labnet import GATEWAY, SUBNET
from tests.support import procs

ROUTER = f"{SUBNET}.254"
GRPC = f"{GATEWAY}:7400"
BASE_URL = f"http://{GATEWAY}:8080"
JOIN_TIMEOUT = 600  # power-on -> member: ~1.5 min alone under TCG, far more on a loaded shared machine
GC_AFTER = 5        # the profile's gc_offline_after (the leader marks a silent node offline after ~10 s)
# The PXE VM's MAC is selected explicitly: there is no default group, so an unknown machine is refused.
PROFILES = """
profiles:
  worker:
    args: [console=ttyS0, panic=-1]
    token_ttl: 10m
    gc_offline_after: {gc}s
    idle_poweroff_after: 0
groups:
  - name: lab
    profile: worker
    selector: {{mac: "{mac}"}}
  - name: named-by-dhcp
    profile: worker
    selector: {{mac: "52:54:00:99:00:02"}}
    node_name: box-{{hostname}}
"""
# Runs in the task sandbox on the PXE node: this boot's id (compared with what the node reported) and
# the root file system's type (the netboot OS runs from RAM).
TASK = "echo pxe-task boot=$(cat /proc/sys/kernel/random/boot_id | tr -d -) root=$(stat -f -c %T /)"


class Services:
    """Host-side processes in the lab's namespaces, stopped by their PIDs."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.procs: list[subprocess.Popen] = []

    def spawn(self, netns: str, name: str, argv: list[str]) -> subprocess.Popen:
        with (self.dir / f"{name}.log").open("ab") as log:
            proc = procs.popen(in_netns(netns, argv), stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def dnsmasq() -> str:
    found = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin")
    assert found, "dnsmasq is missing (image/build.sh installs dnsmasq-base)"
    return found


# mTLS: the CLI presents the lab server's admin certificate (its data dir's tls/), as it would on that node
SERVER_TLS: dict[str, str] = {}


def cortex(netns: str, *args: str, timeout: float = 60) -> dict | list:
    env = [f"CORTEX_TLS_DIR={SERVER_TLS['dir']}"] if SERVER_TLS else []
    out = run(in_netns(netns, ["env", *env, sys.executable, "-m", "cortex", "--addr", GRPC, "--json", *args]),
              timeout=timeout).stdout
    return json.loads(out)


def http_status(netns: str, path: str) -> int:
    out = run(in_netns(netns, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", BASE_URL + path]),
              check=False).stdout
    return int(out or 0)


def start_cluster(lab, services: Services, directory: Path, profiles: str) -> None:
    """One server on the host side of the lab; its agent serves the netboot HTTP service too."""
    (directory / "profiles.yaml").write_text(profiles)
    config = directory / "agent.yaml"
    config.write_text(f"""node: {{id: lab-server, role: server}}
data_dir: {directory / 'data'}
listen: {{grpc: "{GRPC}", raft: "{GATEWAY}:7401"}}
log: {{level: info, format: json}}
bootstrap: {{init: true}}
plugins:
  netboot:
    listen: "{GATEWAY}:8080"
    artifacts: "{lab.images.netboot_dir}"
    profiles: "{directory / 'profiles.yaml'}"
    reconcile_interval: 1
""")
    SERVER_TLS["dir"] = str(directory / "data" / "tls")
    probes.use_credentials(directory / "data" / "tls")
    services.spawn(lab.netns, "agent", [sys.executable, "-m", "cortex", "agent", "--config", str(config)])

    def leader() -> bool:
        try:
            return cortex(lab.netns, "status", timeout=20)["state"] == "leader"
        except Exception:  # noqa: BLE001 - not up yet
            return False

    wait_until(leader, 120, f"the lab server leads its cluster (log {directory / 'agent.log'})", interval=1)
    wait_until(lambda: http_status(lab.netns, "/healthz") == 200, 60, "the netboot service is healthy")


def refusals_enroll_nothing(lab, directory: Path) -> None:
    """Bad input on the live service: an unknown machine (no default group) and a hostile DHCP host name
    for a group that names nodes after it are refused and logged; nothing is enrolled."""
    assert http_status(lab.netns, "/ipxe?mac=52-54-00-99-00-01&uuid=&serial=&hostname=") == 404
    hostile = "x%3B%20reboot%20%24%7Bip%7D"  # "x; reboot ${ip}"
    assert http_status(lab.netns, f"/ipxe?mac=52-54-00-99-00-02&uuid=&serial=&hostname={hostile}") == 403
    assert cortex(lab.netns, "netboot", "machines") == []
    log = (directory / "agent.log").read_text(errors="replace")
    assert log.count("netboot: refused") >= 2, "the refusals are not in the agent's log"


def first(stream: probes.Stream, predicate, since: float = 0.0) -> dict | None:
    return next((d for d in list(stream.lines) if d["t"] >= since and predicate(d)), None)


@pytest.fixture
def pxe_lab(lab):
    directory = lab.workdir / "netboot"
    directory.mkdir()
    services = Services(directory)
    router = lab.network.add_peer("router", ROUTER)
    try:
        yield lab, services, directory, router
    finally:
        services.stop()
        lab.network.remove_peer(router)


def test_pxe_node_joins_runs_a_task_and_is_garbage_collected(pxe_lab):
    lab, services, directory, router = pxe_lab
    vm = lab.machine("pxe", pxe=True, smp=2, memory_mb=2048)
    node_id = "pxe-" + vm.mac.replace(":", "")
    # The home router: addresses for everyone (.100-.150), knows nothing about netboot.
    services.spawn(router, "router-dnsmasq", [
        dnsmasq(), "--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--interface=lan0",
        "--bind-interfaces", f"--dhcp-range={SUBNET}.100,{SUBNET}.150,255.255.255.0,1h",
        f"--dhcp-option=option:router,{ROUTER}", "--user=root", "--group=root", "--log-dhcp",
        f"--dhcp-leasefile={directory / 'router.leases'}", f"--pid-file={directory / 'router.pid'}",
        f"--log-facility={directory / 'router-dhcp.log'}"])
    start_cluster(lab, services, directory, PROFILES.format(gc=GC_AFTER, mac=vm.mac))
    refusals_enroll_nothing(lab, directory)
    # Cortex's side of the LAN: proxyDHCP + TFTP, rendered by the CLI.
    conf, proxy_log = directory / "dnsmasq-proxy.conf", directory / "proxy-dhcp.log"
    run([sys.executable, "-m", "cortex", "netboot", "dnsmasq", "--proxy", "--network", f"{SUBNET}.0/24",
         "--interface", "br0", "--base-url", BASE_URL, "--tftp-root", str(directory / "tftp"),
         "--write", str(conf)])
    services.spawn(lab.netns, "proxy-dnsmasq", [
        dnsmasq(), "--keep-in-foreground", f"--conf-file={conf}", "--user=root", "--group=root",
        f"--pid-file={directory / 'proxy.pid'}", f"--log-facility={proxy_log}"])

    watch = probes.watch(lab.netns, [GRPC], log=directory / "watch.jsonl")
    try:
        def member(doc: dict) -> bool:
            return node_id in doc.get("nodes", {})

        vm.start()
        joined = vm.wait_until(lambda: first(watch, member, vm.powered_on), JOIN_TIMEOUT,
                               f"{node_id} joins the cluster (PXE: DHCP, iPXE, kernel + cpio over HTTP, agent)")
        join_s = joined["t"] - vm.powered_on
        timings.record("netboot", "PXE node (no disk, proxyDHCP): power-on -> joined", join_s)
        # SeaBIOS and iPXE write to the serial console too (Machine: graphics=off)
        _, script_s = vm.wait_for_console(r"Cortex netboot: \S+ \(group lab", timeout=5)
        timings.record("netboot", "PXE node: power-on -> iPXE runs its script (DHCP, proxyDHCP, HTTP)", script_s)
        _, kernel_s = vm.wait_for_console(r"Linux version", timeout=5)
        timings.record("netboot", "PXE node: power-on -> kernel started (kernel + cpio downloaded)", kernel_s)
        _, reported_s = vm.wait_for_console(r"CORTEX-EPHEMERAL node", timeout=300)
        timings.record("netboot", "PXE node: power-on -> reported ephemeral", reported_s)

        # The address came from the router, the boot information from Cortex's proxyDHCP.
        leases = (directory / "router.leases").read_text()
        lease = next(line.split() for line in leases.splitlines() if vm.mac in line)
        assert 100 <= int(lease[2].rsplit(".", 1)[1]) <= 150, lease
        assert f"{BASE_URL}/boot.ipxe" in proxy_log.read_text(errors="replace")
        enrollment = cortex(lab.netns, "netboot", "machines")
        assert len(enrollment) == 1, enrollment
        enrollment = enrollment[0]
        assert (enrollment["machine"], enrollment["node_id"], enrollment["state"]) == (vm.mac, node_id, "reported")
        assert enrollment["ephemeral"] and enrollment["boot_id"]
        node = next(n for n in cortex(lab.netns, "nodes") if n["id"] == node_id)
        assert node["role"] == "worker", node
        # its single-use token is spent: a second join with it would be refused
        tokens = cortex(lab.netns, "token", "list")
        token = next(t for t in tokens if t["id"][:12] == enrollment["token_id"][:12])
        assert token["uses_left"] == 0, token

        # A task for the PXE node runs there: in its sandbox, on this boot, from RAM.
        wait_until(lambda: any(n["id"] == node_id and "shell" in n["kinds"]
                               for n in cortex(lab.netns, "tasks", "nodes")), 120,
                   f"{node_id} offers shell tasks (bubblewrap in the netboot image)", interval=2)
        submitted = time.monotonic()
        result = cortex(lab.netns, "tasks", "submit", "--node", node_id, "--time-limit", "2m", "--wait",
                        "--idempotency-key", f"pxe-task-{enrollment['id']}", "--", TASK, timeout=240)
        timings.record("netboot", "task on the PXE node: submit -> result", time.monotonic() - submitted)
        (ran,) = result["results"]
        print(f"task output from {ran['node']}: {ran['stdout'].strip()}")
        assert ran["node"] == node_id and ran["state"] == "succeeded" and ran["exit_code"] == 0, ran
        assert f"boot={enrollment['boot_id']}" in ran["stdout"], (ran, enrollment)
        assert any(f"root={fs}" in ran["stdout"] for fs in ("tmpfs", "ramfs", "rootfs")), ran

        # Power loss: no clean leave, so the leader's garbage collection has to remove it.
        vm.kill()
        off = time.monotonic()
        gone = watch.wait_for(lambda d: d.get("state") == "leader" and not member(d), 120,
                              f"{node_id} garbage-collected", since=off)
        timings.record("netboot", f"power lost -> garbage-collected (offline + gc_offline_after {GC_AFTER} s)",
                       gone["t"] - off)
        assert first(watch, lambda d: d.get("nodes", {}).get(node_id) == "offline", off), \
            "the node was removed without having been offline first"
        assert cortex(lab.netns, "netboot", "machines")[0]["state"] == "collected"
    finally:
        watch.stop()
        vm.kill()
