"""The Ansible role `cortex_node`, run for real (root only, as CI runs).

Targets are Debian 12 systems booted with systemd-nspawn (real systemd as PID 1, so the agent's unit with
all its hardening really runs) from a rootfs that debootstrap makes once and `.cache/ansible-test/` keeps
(gitignored). Each container boots the cached tree read-only under a tmpfs overlay (`--volatile=overlay`),
so every run starts from a clean host and the cache is never modified. The containers share the host's
network namespace and everything talks over 127.0.0.1 only: Ansible and testinfra reach each container's
sshd on its own loopback port, and the containers' agents join a real one-server dev cluster
(`cortex.dev.cluster`) with real join tokens (`cortex token create`) kept in an Ansible Vault file.

One server (installed from a wheel file) and one worker (installed by version from a package directory, pip
`--find-links`) go through the role's whole life: install and join, a second run that changes nothing, an
upgrade to a newer version (reinstall + restart, membership kept), and `cortex_node_state=absent` (leave the
cluster, remove everything, and again change nothing on a second run). A third host (lap1) joins without the
role, the way a laptop does: the wheel installed with pip, then `cortex node install`, and `uninstall`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from xml.etree import ElementTree

import pytest
import testinfra
import yaml

from cortex.client import Client
from cortex.dev import cluster as devcluster
from tests.support import procs
from tests.support.cluster import free_base_port
from tests.support.wait import wait_until

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="boots Debian containers with systemd-nspawn and builds their rootfs: needs root"
)

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
VENV_BIN = Path(sys.executable).parent
CACHE = REPO / ".cache" / "ansible-test"
MIRROR = os.environ.get("CORTEX_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What a freshly installed Debian server has that Ansible needs (python3, python3-apt for the apt module,
# sshd), and systemd as init. python3-venv is left out on purpose: the role must install it.
ROOTFS_PACKAGES = ["systemd", "systemd-sysv", "dbus", "python3", "python3-apt", "openssh-server"]
SERVICE = "cortex-agent"
SSH_OPTS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("timeout", 300)
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)


def checked(*args, **kwargs) -> subprocess.CompletedProcess:
    result = run(*args, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


# --- the target hosts ----------------------------------------------------------------------------------------

def build_rootfs() -> Path:
    """A Debian 12 tree with systemd, python3 and sshd; built once per package list, then reused."""
    key = hashlib.sha256(" ".join(["bookworm", "minbase", *ROOTFS_PACKAGES]).encode()).hexdigest()[:12]
    rootfs = CACHE / f"rootfs-bookworm-{key}"
    if (rootfs / "usr/bin/python3").exists():
        return rootfs
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = CACHE / f"{rootfs.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # an interrupted earlier build
    checked("debootstrap", "--variant=minbase", f"--include={','.join(ROOTFS_PACKAGES)}", "bookworm", partial,
            MIRROR, timeout=900)
    (partial / "etc/hostname").unlink(missing_ok=True)  # it would override nspawn's --hostname
    (partial / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
    for deb in (partial / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    partial.rename(rootfs)
    return rootfs


class Container:
    """One booted Debian system: systemd-nspawn -b on the shared rootfs, its writes in a tmpfs overlay."""

    def __init__(self, name: str, rootfs: Path, workdir: Path, ssh_port: int, key: Path, wheelhouse: Path):
        self.name, self.ssh_port, self.key = name, ssh_port, key
        workdir.mkdir(parents=True)
        sshd_conf = workdir / "sshd.conf"
        sshd_conf.write_text(f"Port {ssh_port}\nListenAddress 127.0.0.1\nPermitRootLogin prohibit-password\n")
        self.log = workdir / "console.log"
        with open(self.log, "wb") as log:
            # --register=no --keep-unit: the host needs no systemd-machined (CI machines have no systemd PID 1).
            self.proc = procs.popen(
                ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "--boot", f"--directory={rootfs}",
                 # the machine name keys nspawn's state under /run: unique, so parallel runs do not collide
                 "--volatile=overlay", f"--machine={name}-{ssh_port}", f"--hostname={name}", "--console=passive",
                 f"--bind-ro={sshd_conf}:/etc/ssh/sshd_config.d/cortex-test.conf",
                 f"--bind-ro={key}.pub:/root/.ssh/authorized_keys",
                 f"--bind-ro={wheelhouse}:/srv/wheelhouse"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def ssh(self, command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return run("ssh", *SSH_OPTS.split(), "-i", self.key, "-p", self.ssh_port, "root@127.0.0.1", command,
                   timeout=timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        def booted() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            return self.ssh("systemctl is-system-running --wait", timeout=20).stdout.strip() in ("running", "degraded")

        wait_until(booted, timeout, f"{self.name}: ssh on port {self.ssh_port}", interval=0.5,
                   ignore=(subprocess.TimeoutExpired,), detail=lambda: self.log.read_text()[-3000:])

    def stop(self) -> None:
        """SIGTERM makes nspawn shut the container down (systemd's poweroff); SIGKILL if that hangs."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


# --- what gets installed -------------------------------------------------------------------------------------

def build_wheels(out: Path) -> tuple[str, str, Path, Path, Path]:
    """The working tree's wheel, a copy built as the next version (for the upgrade), and a wheelhouse with
    both plus every dependency, so the targets install offline (pip --no-index --find-links)."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    release = [int(p) for p in re.match(r"\d+(\.\d+)*", version).group(0).split(".")]
    newer = ".".join(map(str, [*release[:-1], release[-1] + 1]))
    dist = out / "dist"
    pip = [VENV_BIN / "python", "-m", "pip", "-q", "--disable-pip-version-check"]
    checked(*pip, "wheel", "--no-build-isolation", "--no-deps", "-w", dist, REPO)
    upgrade_src = out / "next-version"
    upgrade_src.mkdir()
    for name in ("src", "proto", "hatch_build.py", "README.md"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, upgrade_src / name)
    shutil.rmtree(upgrade_src / "src/cortex/_proto", ignore_errors=True)  # build output, regenerated
    pyproject = (REPO / "pyproject.toml").read_text()
    (upgrade_src / "pyproject.toml").write_text(pyproject.replace(f'version = "{version}"', f'version = "{newer}"', 1))
    checked(*pip, "wheel", "--no-build-isolation", "--no-deps", "-w", dist, upgrade_src)
    old_wheel, new_wheel = dist / f"cortex-{version}-py3-none-any.whl", dist / f"cortex-{newer}-py3-none-any.whl"
    assert old_wheel.exists() and new_wheel.exists(), sorted(p.name for p in dist.iterdir())
    # Dependencies as wheels (pysyncobj is an sdist on PyPI: a target without an index could not build it).
    # They are cached between runs (never cortex itself: its wheels come fresh from this run); the index is
    # asked only when the cache lacks something.
    deps = CACHE / "deps-wheelhouse"
    deps.mkdir(parents=True, exist_ok=True)
    wheelhouse = out / "wheelhouse"
    if run(*pip, "wheel", "--no-index", "--find-links", deps, "-w", wheelhouse, old_wheel).returncode != 0:
        checked(*pip, "wheel", "-w", wheelhouse, old_wheel)
        for wheel in wheelhouse.glob("*.whl"):
            if not wheel.name.startswith("cortex-"):
                shutil.copy2(wheel, deps)
    shutil.copy2(new_wheel, wheelhouse)
    return version, newer, old_wheel, new_wheel, wheelhouse


# --- running the playbook ------------------------------------------------------------------------------------

RECAP_RE = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def _without_args(case: str) -> str:
    """A JUnit case is named "[host] play: task key=value, ..."; the arguments only make the lines long."""
    return case.split("=", 1)[0].rsplit(" ", 1)[0] if "=" in case else case


class Playbook:
    def __init__(self, workdir: Path, inventory: Path, vault_password_file: Path):
        self.workdir, self.inventory = workdir, inventory
        self.env = {
            **os.environ,
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),  # pipelining, as the README recommends
            "ANSIBLE_HOME": str(workdir / "ansible-home"),  # its tmp and ssh control sockets stay here
            "ANSIBLE_VAULT_PASSWORD_FILE": str(vault_password_file),
            "ANSIBLE_NOCOLOR": "1",
            # task durations, written per run as JUnit XML: the slowest tasks are logged with each run
            "ANSIBLE_CALLBACKS_ENABLED": "ansible.builtin.junit",
            "JUNIT_OUTPUT_DIR": str(workdir / "junit"),
            "JUNIT_TASK_CLASS": "true",
        }
        self.runs = 0

    def __call__(self, *extra: str) -> tuple[dict, list[str], float]:
        """Run site.yml; returns the recap per host, the 'TASK (host)' lines that changed, the seconds taken."""
        self.runs += 1
        log = self.workdir / f"ansible-run-{self.runs}.log"
        start = time.monotonic()
        result = run(VENV_BIN / "ansible-playbook", "-i", self.inventory, ANSIBLE_DIR / "site.yml", *extra,
                     env=self.env, cwd=self.workdir, timeout=600)
        took = time.monotonic() - start
        log.write_text(result.stdout + result.stderr + "\nslowest tasks:\n" + self.slowest())
        assert result.returncode == 0, f"ansible-playbook failed ({log}):\n{result.stdout[-6000:]}{result.stderr[-2000:]}"
        recap = {m[0]: {"ok": int(m[1]), "changed": int(m[2]), "unreachable": int(m[3]), "failed": int(m[4])}
                 for m in RECAP_RE.findall(result.stdout)}
        changed, task = [], ""
        for line in result.stdout.splitlines():
            if line.startswith(("TASK [", "RUNNING HANDLER [")):
                task = line.split("[", 1)[1].rsplit("]", 1)[0]
            elif line.startswith("changed: ["):
                changed.append(f"{task} ({line.split('[', 1)[1].split(']', 1)[0]})")
        return recap, changed, took

    def slowest(self, count: int = 8) -> str:
        """The newest JUnit report's slowest tasks, one 'seconds task (host)' line each."""
        reports = sorted((self.workdir / "junit").glob("*.xml"), key=lambda p: p.stat().st_mtime)
        if not reports:
            return "(no JUnit report)"
        cases = ElementTree.parse(reports[-1]).getroot().iter("testcase")
        rows = sorted(((float(c.get("time", 0)), _without_args(c.get("name", ""))) for c in cases),
                      reverse=True)[:count]
        return "\n".join(f"{seconds:7.2f} {name}" for seconds, name in rows)

    def host(self, name: str):
        """testinfra over the same inventory (and ssh settings) that Ansible used."""
        return testinfra.get_host(f"ansible://{name}?ansible_inventory={self.inventory}")


def cluster_nodes(address: str) -> dict[str, dict]:
    """The cluster's own view (`cortex status --json` through its first server): node id -> node."""
    doc = json.loads(checked(VENV_BIN / "cortex", "--addr", address, "--json", "status").stdout)
    return {n["id"]: n for n in doc["nodes"]}


# --- the lab -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Two booted targets, a dev cluster, wheels, a vault with join tokens and an inventory over all of it."""
    work = tmp_path_factory.mktemp("ansible")
    timings: dict[str, float] = {}
    start = time.monotonic()
    rootfs = build_rootfs()
    timings["rootfs"] = time.monotonic() - start
    start = time.monotonic()
    version, newer, old_wheel, new_wheel, wheelhouse = build_wheels(work)
    timings["wheels"] = time.monotonic() - start

    key = work / "id_ed25519"
    checked("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
    base = free_base_port()
    cluster_dir = work / "cluster"
    containers: list[Container] = []
    try:
        dc = devcluster.up(cluster_dir, 1, 0, free_base_port(), timeout=60)
        join_address = dc.servers[0].grpc_address

        def token(role: str) -> str:
            out = checked(VENV_BIN / "cortex", "--addr", join_address, "--json", "token", "create", "--role", role,
                          "--ttl", "30m", "--uses", "1").stdout
            return json.loads(out)["token"]

        start = time.monotonic()
        containers = [Container("cs1", rootfs, work / "cs1", base, key, wheelhouse),
                      Container("cw1", rootfs, work / "cw1", base + 1, key, wheelhouse),
                      # a laptop without the role: `cortex node install` (test_node_install_without_the_role)
                      Container("lap1", rootfs, work / "lap1", base + 6, key, wheelhouse)]
        for c in containers:
            c.wait_ready()
        timings["boot"] = time.monotonic() - start

        inventory_dir = work / "inventory"
        (inventory_dir / "group_vars/all").mkdir(parents=True)
        (inventory_dir / "host_vars").mkdir()
        common = {
            "ansible_host": "127.0.0.1", "ansible_user": "root", "ansible_ssh_private_key_file": str(key),
            "ansible_ssh_common_args": SSH_OPTS,
            "cortex_node_listen_address": "127.0.0.1", "cortex_node_join_address": join_address,
            # the targets install offline: dependencies and cortex itself from the bind-mounted wheelhouse
            "cortex_node_pip_extra_args": "--no-index --find-links /srv/wheelhouse",
        }
        (inventory_dir / "group_vars/all/main.yml").write_text(yaml.safe_dump(common))
        inventory = {"all": {"children": {"cortex_servers": {"hosts": {"cs1": None}},
                                          "cortex_workers": {"hosts": {"cw1": None}}}}}
        (inventory_dir / "hosts.yml").write_text(yaml.safe_dump(inventory))
        host_vars = {
            # the server installs a wheel file from the controller ...
            "cs1": {"ansible_port": base, "cortex_node_grpc_port": base + 2, "cortex_node_raft_port": base + 3,
                    "cortex_node_wheel": str(old_wheel),
                    # the dev cluster's own timings, spelled out: renders the nested section the agent validates
                    "cortex_node_raft": {"election_timeout_min": 0.5, "election_timeout_max": 1.0}},
            # ... the worker a pinned version from a package directory; its token admits workers only (its gRPC port
            # skips base + 4: the server's enrollment port, gRPC + 2 — the containers share the host's network)
            "cw1": {"ansible_port": base + 1, "cortex_node_grpc_port": base + 5, "cortex_node_version": version,
                    "vault_cortex_join_token": "{{ vault_worker_join_token }}",
                    "cortex_node_plugins": {"tailscale": {"enabled": False}}},
        }
        for name, doc in host_vars.items():
            (inventory_dir / f"host_vars/{name}.yml").write_text(yaml.safe_dump(doc))
        tokens = {"server": token("server"), "worker": token("worker")}
        vault = inventory_dir / "group_vars/all/vault.yml"
        vault.write_text(yaml.safe_dump({"vault_cortex_join_token": tokens["server"],
                                         "vault_worker_join_token": tokens["worker"]}))
        password = work / "vault-password"
        password.write_text(os.urandom(16).hex())
        password.chmod(0o600)
        checked(VENV_BIN / "ansible-vault", "encrypt", "--vault-password-file", password, vault)
        assert vault.read_text().startswith("$ANSIBLE_VAULT;")

        playbook = Playbook(work, inventory_dir / "hosts.yml", password)
        with pytest.MonkeyPatch.context() as mp:
            # testinfra's ansible backend runs ansible-inventory, which must find the venv and open the vault
            mp.setenv("PATH", playbook.env["PATH"])
            mp.setenv("ANSIBLE_VAULT_PASSWORD_FILE", str(password))
            mp.setenv("ANSIBLE_HOME", playbook.env["ANSIBLE_HOME"])
            yield {
                "playbook": playbook, "containers": {c.name: c for c in containers}, "join_address": join_address,
                "version": version, "newer": newer, "old_wheel": old_wheel, "new_wheel": new_wheel,
                "tokens": tokens, "inventory_dir": inventory_dir, "base": base, "timings": timings,
                "wheelhouse": wheelhouse,
            }
    finally:
        for c in containers:
            c.stop()
        devcluster.down(cluster_dir)
        print("\nansible test timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))


def agent_pid(host) -> int:
    return int(host.run(f"systemctl show -p MainPID --value {SERVICE}").stdout.strip())


def installed_version(host) -> str:
    return host.check_output("/opt/cortex/venv/bin/python -c "
                             "'import importlib.metadata as m; print(m.version(\"cortex\"))'").strip()


@needs_root
@pytest.mark.timeout(900)
def test_role_lifecycle(lab):
    playbook: Playbook = lab["playbook"]
    timings = lab["timings"]
    cs1, cw1 = playbook.host("cs1"), playbook.host("cw1")
    hosts = {"cs1": cs1, "cw1": cw1}

    # --- install and join ------------------------------------------------------------------------------
    recap, changed, timings["first run"] = playbook()
    assert set(recap) == {"cs1", "cw1"} and all(r["failed"] == 0 for r in recap.values()), recap
    assert all(r["changed"] > 0 for r in recap.values()), recap

    nodes = cluster_nodes(lab["join_address"])
    assert nodes["cs1"]["role"] == "server" and nodes["cs1"]["liveness"] == "alive", nodes
    assert nodes["cs1"]["raft_address"] == f"127.0.0.1:{lab['base'] + 3}", nodes
    assert nodes["cw1"]["role"] == "worker" and nodes["cw1"]["liveness"] == "alive", nodes
    assert nodes["cw1"]["grpc_address"] == f"127.0.0.1:{lab['base'] + 5}", nodes

    for name, host in hosts.items():
        service = host.service(SERVICE)
        assert service.is_running and service.is_enabled, name
        # the unit's DynamicUser= took effect: the agent does not run as root
        user = host.check_output(f"stat -c %U /proc/{agent_pid(host)}")
        assert user and user != "root", (name, user)
        config = host.file("/etc/cortex/config.yaml")
        assert config.exists and config.user == "root" and config.mode == 0o644
        doc = yaml.safe_load(config.content_string)
        assert doc["node"] == {"id": name, "role": "server" if name == "cs1" else "worker"}, doc
        assert doc["bootstrap"]["join"] == {"address": lab["join_address"],
                                            "token_file": f"/run/credentials/{SERVICE}.service/join-token"}, doc
        assert ("raft" in doc["listen"]) == (name == "cs1"), doc
        assert doc.get("plugins") == ({"tailscale": {"enabled": False}} if name == "cw1" else None), doc
        assert doc.get("raft") == ({"election_timeout_min": 0.5, "election_timeout_max": 1.0} if name == "cs1"
                                   else None), doc
        assert host.run("cortex config check /etc/cortex/config.yaml").rc == 0  # the CLI is on the PATH
        token = host.file("/etc/cortex/join-token")
        assert token.mode == 0o600 and token.user == "root"
        assert token.content_string.strip() == lab["tokens"]["server" if name == "cs1" else "worker"]
        # the agent's own view, asked on the host itself
        local = json.loads(host.check_output(f"cortex --addr 127.0.0.1:{doc['listen']['grpc'].rsplit(':', 1)[1]} "
                                             "--json status"))
        assert local["node_id"] == name and local["state"] != "uninitialized", local
        assert installed_version(host) == lab["version"], name
    assert cs1.file(f"/opt/cortex/wheels/{lab['old_wheel'].name}").exists

    # --- idempotence -------------------------------------------------------------------------------------
    pids = {name: agent_pid(host) for name, host in hosts.items()}
    recap, changed, timings["second run"] = playbook()
    assert all(r["changed"] == 0 for r in recap.values()), f"a second run changed: {changed}"
    assert {name: agent_pid(host) for name, host in hosts.items()} == pids, "a no-change run restarted the agent"

    # --- upgrade: a newer wheel (server) and a newer pinned version (worker), as an operator edits them ----
    inventory_dir = lab["inventory_dir"]
    for name, key, value in (("cs1", "cortex_node_wheel", str(lab["new_wheel"])),
                             ("cw1", "cortex_node_version", lab["newer"])):
        path = inventory_dir / f"host_vars/{name}.yml"
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), key: value}))
    recap, changed, timings["upgrade run"] = playbook()
    for name, host in hosts.items():
        assert f"cortex_node : Install the agent into its virtualenv ({name})" in changed, changed
        assert f"cortex_node : Restart the agent ({name})" in changed, changed
        assert agent_pid(host) not in (0, pids[name]), f"{name}: the agent was not restarted"
        assert installed_version(host) == lab["newer"], name
    assert not cs1.file(f"/opt/cortex/wheels/{lab['old_wheel'].name}").exists  # the old wheel is cleaned up
    # the same members, alive after the restart: the one-use tokens are spent, so nothing joined again
    def members_alive():
        nodes = cluster_nodes(lab["join_address"])
        return nodes if all(nodes.get(h, {}).get("liveness") == "alive" for h in hosts) else None

    nodes = wait_until(members_alive, 30, "cs1 and cw1 alive after the upgrade", interval=0.5)
    assert set(nodes) == {"n1", "cs1", "cw1"}, nodes

    # --- leave and uninstall -----------------------------------------------------------------------------
    recap, changed, timings["absent run"] = playbook("-e", "cortex_node_state=absent")
    for name in hosts:
        assert f"cortex_node : Ask the agent to leave the cluster ({name})" in changed, changed
    assert set(cluster_nodes(lab["join_address"])) == {"n1"}, "the nodes are still members after leaving"
    for name, host in hosts.items():
        assert not host.service(SERVICE).is_running, name
        for path in (f"/etc/systemd/system/{SERVICE}.service", "/etc/cortex", "/opt/cortex",
                     "/var/lib/private/cortex", "/usr/local/bin/cortex"):
            assert not host.file(path).exists, (name, path)
        assert "could not be found" in host.run(f"systemctl status {SERVICE}").stderr
    recap, changed, timings["second absent run"] = playbook("-e", "cortex_node_state=absent")
    assert all(r["changed"] == 0 for r in recap.values()), f"a second absent run changed: {changed}"


def _hardening(unit_text: str) -> list[str]:
    """The [Service] lines from DynamicUser= to UMask=: sandboxing the role must share with the appliance."""
    lines = [line for line in unit_text.splitlines() if line and not line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith("DynamicUser="))
    end = next(i for i, line in enumerate(lines) if line.startswith("UMask="))
    return lines[start:end + 1]


def test_unit_template_keeps_the_appliance_hardening():
    """The role's unit is a copy of the appliance's (a role must stand alone); this keeps them from drifting."""
    appliance = (REPO / "image/tree/usr/lib/systemd/system/cortex-agent.service").read_text()
    role = (ANSIBLE_DIR / "roles/cortex_node/templates/cortex-agent.service.j2").read_text()
    assert _hardening(role) == _hardening(appliance)
    assert "{{" not in "\n".join(_hardening(role))  # nothing host-specific in the sandbox


def test_ansible_lint_production_profile():
    """Galaxy's strictest profile; --offline: nothing to install from Galaxy (the role uses ansible.builtin only)."""
    result = run(VENV_BIN / "ansible-lint", "--offline", "--nocolor", "--profile", "production", "ansible/",
                 cwd=REPO, env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr


@needs_root
@pytest.mark.timeout(300)
def test_node_install_without_the_role(lab):
    """A laptop or desktop that is not an appliance, without Ansible: the user installs the wheel with pip
    (here offline, from the lab's wheelhouse) and runs `cortex node install --join ADDR --token TOKEN`, which
    must leave the agent running under the appliance's hardened unit, joined; the same command again changes
    nothing; `cortex node uninstall` leaves the cluster and removes it all, `--purge` the data too, and a
    repeated uninstall has nothing to do. Its own container (lap1) in the same lab: no second rootfs, boot
    or cluster."""
    lap, join = lab["containers"]["lap1"], lab["join_address"]
    wait_until(lambda: lap.ssh("true", timeout=20).returncode == 0, 60, "lap1: ssh", interval=0.5,
               ignore=(subprocess.TimeoutExpired,))

    def sh(command: str) -> str:
        result = lap.ssh(command, timeout=300)
        assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        return result.stdout

    def members() -> set[str]:
        with Client(join, timeout=15) as c:
            return {n.id for n in c.status().nodes}

    # The rootfs has neither pip nor ensurepip (python3-venv): pip runs from its own wheel (`python pip.whl/pip`).
    pip_wheel = next(iter(sorted((CACHE / "deps-wheelhouse").glob("pip-*.whl"))), None)
    if pip_wheel is None:
        checked(VENV_BIN / "python", "-m", "pip", "-q", "download", "--no-deps", "--only-binary", ":all:", "-d",
                CACHE / "deps-wheelhouse", "pip")
        pip_wheel = next(iter(sorted((CACHE / "deps-wheelhouse").glob("pip-*.whl"))))
    shutil.copy2(pip_wheel, lab["wheelhouse"])
    start = time.monotonic()
    sh(f"python3 -m venv --without-pip /opt/cortex && /opt/cortex/bin/python /srv/wheelhouse/{pip_wheel.name}/pip "
       f"install -q --no-index --find-links /srv/wheelhouse --disable-pip-version-check --no-compile "
       f"cortex=={lab['version']}")
    lab["timings"]["node install: pip"] = time.monotonic() - start
    with Client(join, timeout=15) as c:
        token = c.create_token("worker", 1800, 1).token
    install = (f"/opt/cortex/bin/cortex --json node install --join {join} --token {token} "
               f"--address 127.0.0.1:{lab['base'] + 8} --wait 120")
    start = time.monotonic()
    first = json.loads(sh(install))
    lab["timings"]["node install: joined"] = time.monotonic() - start
    assert first["state"] == "worker" and first["node_id"] == "lap1" and len(first["changed"]) == 4, first
    assert "lap1" in members()
    # the appliance's sandbox really runs: a dynamic user, not root; the sleep hook is where systemd-sleep looks
    unit = f"/etc/systemd/system/{SERVICE}.service"
    pid, user, enabled, hook, token_mode, dynamic = sh(
        f"pid=$(systemctl show -p MainPID --value {SERVICE}); echo $pid; stat -c %U /proc/$pid; "
        f"systemctl is-enabled {SERVICE}; stat -c %a /usr/lib/systemd/system-sleep/cortex; "
        f"stat -c %a /etc/cortex/join-token; grep -c '^DynamicUser=yes$' {unit}").split()
    assert user != "root" and enabled == "enabled" and (hook, token_mode, dynamic) == ("755", "600", "1")

    again = json.loads(sh(install))  # the same command again: nothing changes, the agent keeps running
    assert again["changed"] == [] and again["state"] == "worker", again
    assert sh(f"systemctl show -p MainPID --value {SERVICE}").strip() == pid

    gone = json.loads(sh("/opt/cortex/bin/cortex --json node uninstall"))
    assert gone["leave"] == "left the cluster" and unit in gone["removed"], gone
    assert "lap1" not in members()
    after = sh(f"systemctl is-active {SERVICE}; ls {unit} /etc/cortex /usr/lib/systemd/system-sleep/cortex 2>&1; "
               "test -d /var/lib/private/cortex && echo data-kept; true")
    assert after.splitlines()[0] in ("inactive", "unknown") and after.count("No such") == 3, after
    assert "data-kept" in after  # the data goes only with --purge
    purged = json.loads(sh("/opt/cortex/bin/cortex --json node uninstall --purge"))
    assert "/var/lib/private/cortex" in purged["removed"] and purged["leave"] == "not installed", purged
    assert sh("ls -d /var/lib/private/cortex /var/lib/cortex 2>&1; true").count("No such") == 2
    assert "nothing to remove" in sh("/opt/cortex/bin/cortex node uninstall --purge")
