"""The CLI's structure: every command that talks to a node reaches the endpoint its flags name (--addr, or the
admin socket given by --socket), and packages add commands through the `cortex.cli` entry-point group."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from cortex.cli.main import build_parser, main

PLUGIN_SITE = Path(__file__).parent / "fixtures" / "cli_plugin_site"


class Recorder(grpc.GenericRpcHandler):
    """A real gRPC endpoint that answers every method with FAILED_PRECONDITION (not retried by the client) and
    remembers which methods were called, so a test sees where a command went."""

    def __init__(self):
        self.calls: list[str] = []

    def service(self, details):
        method = details.method

        def refuse(request, context):
            self.calls.append(method)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"recorded {method}")

        return grpc.unary_unary_rpc_method_handler(refuse)


@pytest.fixture
def endpoints(tmp_path, monkeypatch):
    # plaintext to the recorders: no client certificate is found anywhere
    (tmp_path / "tls").mkdir()
    monkeypatch.setenv("CORTEX_TLS_DIR", str(tmp_path / "tls"))
    monkeypatch.setenv("CORTEX_DEV_TRUST_DIR", str(tmp_path / "trust"))
    by_addr, by_socket = Recorder(), Recorder()
    server_addr = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[by_addr])
    port = server_addr.add_insecure_port("127.0.0.1:0")
    server_socket = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[by_socket])
    sock = tmp_path / "admin.sock"
    server_socket.add_insecure_port(f"unix:{sock}")
    server_addr.start()
    server_socket.start()
    yield {"addr": (f"127.0.0.1:{port}", by_addr), "socket": (str(sock), by_socket), "dir": tmp_path}
    server_addr.stop(None)
    server_socket.stop(None)


# Every command that talks to a node, with arguments that get it as far as its first call, and where that call
# must go. `update rollout|status|rollback` take the admin socket when it exists (it does here).
REACHES = {
    "status": ([], "addr"), "state": ([], "addr"), "leader transfer": ([], "addr"),
    "nodes": ([], "addr"), "nodes list": ([], "addr"), "nodes pending": ([], "addr"),
    "nodes approve": (["n1", "--retry", "0"], "addr"), "nodes reject": (["n1", "--retry", "0"], "addr"),
    "nodes remove": (["n1"], "addr"), "nodes forget": (["n1", "--retry", "0"], "addr"),
    "nodes promote": (["n1"], "addr"), "nodes drain": (["n1"], "addr"), "nodes undrain": (["n1"], "addr"),
    "kv put": (["k", "v", "--retry", "0"], "addr"), "kv get": (["k"], "addr"), "kv delete": (["k"], "addr"),
    "kv list": ([], "addr"),
    "token create": ([], "addr"), "token list": ([], "addr"), "token revoke": (["t1"], "addr"),
    "secrets rotate": ([], "addr"), "secrets ca": ([], "addr"),
    "update plan": (["1.2.3"], "addr"),
    "update rollout": (["1.2.3"], "socket"), "update status": ([], "socket"), "update rollback": ([], "socket"),
    "k8s contexts": ([], "addr"), "k8s capacity": ([], "addr"),
    "netboot machines": ([], "addr"),
    "netboot serve": (["--listen", "127.0.0.1:0", "--join-address", "10.0.0.1:7400"], "addr"),
    "netboot ephemeral leave": ([], "socket"),
    "plugins": ([], "addr"), "plugins list": ([], "addr"),
    "plugins start": (["p"], "socket"), "plugins stop": (["p"], "socket"),
    "tools list": ([], "addr"), "tools call": (["t"], "addr"),
    "init": ([], "socket"), "join": (["10.0.0.1:7400", "--token", "x"], "socket"), "leave": ([], "socket"),
    "tasks submit": (["--", "true"], "addr"), "tasks list": ([], "addr"), "tasks show": (["t1"], "addr"),
    "tasks logs": (["t1"], "addr"), "tasks cancel": (["t1"], "addr"), "tasks retry": (["t1"], "addr"),
    "tasks run": (["--all", "--", "true"], "addr"), "tasks nodes": ([], "addr"),
    "dlq": ([], "addr"), "dlq list": ([], "addr"), "dlq show": (["t1"], "addr"), "dlq replay": (["--all"], "addr"),
    "workflows submit": (["{workflow}"], "addr"), "workflows show": (["w1"], "addr"),
    "workflows list": ([], "addr"), "workflows cancel": (["w1"], "addr"),
    "health": ([], "addr"),
    "console url": ([], "socket"), "console status": ([], "socket"),
    "services deploy": (["{service}"], "addr"), "services list": ([], "addr"), "services show": (["web"], "addr"),
    "services logs": (["web"], "addr"), "services restart": (["web"], "addr"), "services remove": (["web"], "addr"),
    "ha": ([], "addr"), "ha status": ([], "addr"), "ha takeover": (["w1"], "addr"), "ha giveback": (["w1"], "addr"),
    "audit log": ([], "addr"), "audit policies": ([], "addr"),
    "audit set": (["kv", "--change-roles", "admin"], "addr"), "audit clear": (["kv"], "addr"),
}
# Commands that talk to no node, or only as long-running services whose loops are tested where they live
# (agent, mcp, netboot ephemeral run), or only after reading a backup (backup restore: test_memory_cluster.py).
ELSEWHERE = {
    "agent", "config check", "dev up", "dev down", "mcp", "netboot ephemeral run", "netboot dnsmasq",
    "netboot profiles check", "netboot fetch", "backup list", "backup restore", "update keygen",
    "update publish", "update list", "update verify", "update serve", "update apply-local",
    # the local agent's fixed admin socket under systemd (unit: test_node_install.py; nspawn: test_ansible.py)
    "node install", "node uninstall",
}
ELSEWHERE |= {"fence status", "fence off", "fence on"}  # they talk to BMCs: tests/unit/test_fence.py


def command_paths() -> set[str]:
    """Every runnable command of the parser, as a path below `cortex`."""
    found = set()

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if parser.get_default("fn") is not None:
            found.add(" ".join(path))
        for group in groups:
            for name, child in group.choices.items():
                walk(child, path + [name])

    walk(build_parser(), [])
    return found


def test_every_command_is_classified():
    assert command_paths() == set(REACHES) | ELSEWHERE


@pytest.mark.parametrize("path", sorted(REACHES))
def test_command_reaches_the_endpoint_its_flags_name(endpoints, path, capsys):
    extra, where = REACHES[path]
    workflow = endpoints["dir"] / "wf.yaml"
    workflow.write_text(json.dumps({"name": "w", "steps": []}))
    service = endpoints["dir"] / "web.yaml"
    service.write_text(json.dumps({"name": "web", "command": "true", "placement": {"home": "n1"}}))
    extra = [str(workflow) if a == "{workflow}" else str(service) if a == "{service}" else a for a in extra]
    addr, by_addr = endpoints["addr"]
    sock, by_socket = endpoints["socket"]
    code = main(["--addr", addr, "--socket", sock, "--timeout", "5", *path.split(), *extra])
    reached, other = (by_socket, by_addr) if where == "socket" else (by_addr, by_socket)
    assert reached.calls, f"`cortex {path}` did not reach its {where} (exit {code}): {capsys.readouterr()}"
    assert not other.calls, f"`cortex {path}` also called {other.calls}"
    # every call was refused, and the command says so; a netbooted node that is "not in a cluster" (what the
    # refusal says) has nothing to leave at shutdown
    assert code == (0 if path == "netboot ephemeral leave" else 1)


def test_socket_commands_name_the_missing_socket(endpoints, capsys, monkeypatch):
    addr, by_addr = endpoints["addr"]
    missing = str(endpoints["dir"] / "absent.sock")
    for argv in (["init"], ["leave"], ["join", "10.0.0.1:7400"], ["plugins", "start", "p"]):
        assert main([*argv, "--socket", missing, "--addr", addr]) == 2
        assert f"no agent admin socket at {missing}" in capsys.readouterr().err
    # without a socket, the update tools go to --addr (the network role)
    assert main(["update", "status", "--socket", missing, "--addr", addr]) == 1
    assert by_addr.calls == ["/cortex.v1.Plugins/CallTool"]
    # an explicit --socket wins over $CORTEX_SOCKET for the shutdown leave of a netbooted node
    monkeypatch.setenv("CORTEX_SOCKET", endpoints["socket"][0])
    assert main(["netboot", "ephemeral", "leave", "--socket", missing]) == 0
    assert f"no agent admin socket at {missing}: nothing to leave" in capsys.readouterr().out
    assert not endpoints["socket"][1].calls


def _cortex(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGIN_SITE), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "cortex", *argv], capture_output=True, text=True, env=env,
                          timeout=60)


def test_an_installed_package_adds_commands():
    greet = _cortex("hello", "greet", "world", "--json")
    assert greet.returncode == 0, greet.stderr
    assert json.loads(greet.stdout) == {"greeting": "hello world"}
    assert _cortex("hello", "greet").returncode == 2  # its UsageError is the CLI's
    wave = _cortex("nodes", "wave", "n1")
    assert (wave.returncode, wave.stdout) == (0, "waved at n1\n")
    # the extension that registers `cortex status` a second time is refused by name; the rest still works
    assert "commands from twice (cortex_hello_cli:register_status_again) not loaded: `cortex status` is " \
           "registered twice" in wave.stderr
    assert "wave" in _cortex("nodes", "--help").stdout


def test_registry_refuses_unknown_groups_and_duplicates():
    from cortex.cli.output import common_options
    from cortex.cli.registry import CommandRegistry

    root = argparse.ArgumentParser()
    commands = CommandRegistry(root.add_subparsers(dest="command"), common_options(defaults=False))
    group = commands.group("things", "things")
    commands.add("one", lambda a: 0, "one thing", group)
    with pytest.raises(ValueError, match="`cortex things one` is registered twice"):
        commands.add("one", lambda a: 0, "again", group)
    with pytest.raises(ValueError, match="no command group `cortex nothing`"):
        commands.add("two", lambda a: 0, "two", "nothing")
    assert root.parse_args(["things", "one", "--json"]).json is True


def test_dev_up_says_where_the_certificate_is_and_how_to_add_the_mcp_server(tmp_path):
    from cortex.cli.dev import connect_info, next_steps
    from cortex.dev.cluster import DevCluster, DevNode

    nodes = [DevNode("n1", "server", "127.0.0.1:25400", "127.0.0.1:25401", str(tmp_path / "n1")),
             DevNode("w1", "worker", "127.0.0.1:25403", "", str(tmp_path / "w1"))]
    mcp = tmp_path / "n1" / "data" / "plugins" / "mcp"
    mcp.mkdir(parents=True)
    (mcp / "mcp.json").write_text(json.dumps({"url": "http://127.0.0.1:25480/mcp", "token_file": str(mcp / "token")}))
    cluster = DevCluster(str(tmp_path), nodes)
    info = connect_info(cluster)
    text = next_steps(cluster, info, str(tmp_path))
    assert f"export CORTEX_TLS_DIR={tmp_path / 'n1' / 'data' / 'tls'}" in text
    assert f"claude mcp add cortex -- cortex --socket {tmp_path / 'n1' / 'data' / 'admin.sock'} mcp" in text
    assert "'http://127.0.0.1:25480/mcp?profile=operator'" in text and f"$(cat {mcp / 'token'})" in text
    assert "cortex --addr 127.0.0.1:25400 kv get hello" in text  # every hint names the node it talks to
    assert f"cortex dev down --dir {tmp_path}" in text and "just down" not in text
