"""In-service software update on VMs: the cluster of test_cluster rolls from the booted image (v1) to a
freshly built v2 while a client keeps writing (no acknowledged write lost), then a deliberately broken v3
(its UKI masks the agent, so the node never gets ready) is rolled out: the first node uses up its boot
tries, falls back to v2 by itself, rejoins, and the rollout halts there.

v2 is an incremental image build with a higher CORTEX_IMAGE_VERSION (mkosi's caches are warm from the
session build). v3 costs no build: v2's partition images under v3's names plus v2's UKI with one more
kernel command line word pair (`systemd.mask=cortex-agent.service cortex.ready_timeout=20`), patched in
place in the PE section (no Secure Boot here). Releases are signed with a key made here, served by
`cortex update serve` on the lab bridge's host address, and the nodes learn source and key through the
ESP credentials file (cortex.update_source, cortex.update_keys) and an agent restart.

Costs minutes of TCG (installs write a 1 GiB slot; every reboot is a full boot), so it runs on request:
CORTEX_VM_ISSU=1.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cortex.update import releases as updates
from tests.qemu import images, probes, timings
from tests.qemu.conftest import CORTEX, wait_until
from tests.qemu.hostcmd import in_netns
from tests.qemu.labnet import GATEWAY
from tests.support import procs

pytestmark = pytest.mark.skipif(not os.environ.get("CORTEX_VM_ISSU"),
                                reason="minutes of TCG per node; run with CORTEX_VM_ISSU=1")

SERVERS = ("node1", "node2", "node3")
PORT = 8470
BROKEN_WORDS = b" systemd.mask=cortex-agent.service cortex.ready_timeout=20"


def patch_uki_cmdline(source: Path, target: Path, extra: bytes) -> str:
    """Copy a UKI with `extra` appended to its .cmdline section, in place: the section's file alignment
    padding holds the longer line and its virtual size grows (no Secure Boot signature to keep valid)."""
    data = bytearray(source.read_bytes())
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    sections, optional = struct.unpack_from("<H", data, pe + 6)[0], struct.unpack_from("<H", data, pe + 20)[0]
    table = pe + 24 + optional
    entries = [table + 40 * i for i in range(sections)]
    headers = {bytes(data[e:e + 8]).rstrip(b"\0"): e for e in entries}
    entry = headers[b".cmdline"]
    vsize, vaddr, raw_size, raw_ptr = struct.unpack_from("<IIII", data, entry + 8)
    old = bytes(data[raw_ptr:raw_ptr + vsize]).rstrip(b"\0")
    new = old + extra
    next_vaddr = min(struct.unpack_from("<I", data, e + 12)[0] for e in entries
                     if struct.unpack_from("<I", data, e + 12)[0] > vaddr)
    assert len(new) + 1 <= raw_size and vaddr + len(new) + 1 <= next_vaddr, "no room for the longer command line"
    data[raw_ptr:raw_ptr + raw_size] = (new + b"\0").ljust(raw_size, b"\0")
    struct.pack_into("<I", data, entry + 8, len(new) + 1)
    target.write_bytes(bytes(data))
    return new.decode()


def healthy(vm) -> bool:
    code, out, _ = vm.execute(f"{CORTEX} --json status", timeout=30)
    try:
        doc = json.loads(out) if code == 0 else {}
    except ValueError:
        return False
    return bool(doc.get("has_quorum")) and bool(doc.get("leader_id"))


def save_journals(cluster, directory: Path) -> None:
    """Every node's agent journal of this boot, next to the test's other artifacts (for a failure's reason)."""
    for name, vm in cluster.items():
        _, out, _ = vm.execute("journalctl -b --no-pager -u cortex-agent -u cortex-config -n 400", timeout=60)
        (directory / f"journal-{name}.log").write_text(out)
        print(f"ISSU {name}: agent journal saved to {directory / f'journal-{name}.log'}", flush=True)


def update_status(lab) -> dict:
    """`cortex update status` from the host side of the lab network, through the first server that answers
    (nodes reboot during a rollout), presenting the lab's admin certificate (mutual TLS)."""
    last = ""
    for address in lab.grpc(*SERVERS):
        done = subprocess.run(probes.cortex_cli(lab.netns, "--socket", "/nonexistent", "--addr", address,
                                                "--timeout", "5", "--json", "update", "status"),
                              capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            return json.loads(done.stdout)
        last = done.stderr
    raise AssertionError(f"no server answers `cortex update status`: {last[-500:]}")


@pytest.fixture(scope="module")
def releases(lab, cluster):
    v1 = cluster["node1"].succeed(". /usr/lib/os-release; echo $IMAGE_VERSION").strip()
    v2, v3 = f"{v1}.1", f"{v1}.1.1"
    work = lab.workdir / "issu"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    update_dir = images.OUT / "update"
    if (update_dir / f"cortex_{v2}.efi").exists() and (update_dir / "SHA256SUMS").exists():
        # v2 of this very v1 was built by an earlier run of this session's images (v1 is a fresh timestamped
        # version per image build, so a stale v2 cannot match)
        print(f"ISSU reusing the v2 payload in {update_dir}", flush=True)
    else:
        start = time.monotonic()
        env = {**os.environ, "CORTEX_IMAGE_VERSION": v2, "CORTEX_IMAGE_UPDATE": "1", "CORTEX_IMAGE_NETBOOT": "0",
               "CORTEX_IMAGE_PLAIN": "0"}
        v1_link = os.readlink(images.OUT / "cortex.raw")
        try:
            done = subprocess.run([str(images.REPO / "image/build.sh")], capture_output=True, text=True, env=env,
                                  timeout=3000)
        finally:
            # the build points cortex.raw at v2; the session's base image stays v1 (a later run reuses it)
            (images.OUT / "cortex.raw").unlink(missing_ok=True)
            (images.OUT / "cortex.raw").symlink_to(v1_link)
        (work / "build-v2.log").write_text(done.stdout + done.stderr)
        assert done.returncode == 0, f"v2 build failed: {(done.stdout + done.stderr)[-2000:]}"
        timings.record("issu", f"v2 image build (incremental, with update payload) {v2}", time.monotonic() - start)
    key_path = work / "publisher.pem"
    public = updates.generate_key(key_path)
    key = updates.load_private_key(key_path)
    root = work / "root"
    updates.publish(update_dir, root, "stable", key)
    broken = work / "v3"
    broken.mkdir()
    for path in update_dir.glob(f"cortex_{v2}.usr-*.raw.xz"):
        os.link(path, broken / path.name.replace(f"cortex_{v2}.", f"cortex_{v3}."))
    cmdline = patch_uki_cmdline(update_dir / f"cortex_{v2}.efi", broken / f"cortex_{v3}.efi", BROKEN_WORDS)
    updates.publish(broken, root, "stable", key)
    server = procs.popen(in_netns(lab.netns, [sys.executable, "-m", "cortex", "update", "serve", "--root", str(root),
                                              "--listen", f"{GATEWAY}:{PORT}"]),
                         stdout=subprocess.PIPE, stderr=open(work / "serve.log", "w"), text=True)
    assert "serving" in server.stdout.readline()
    source = f"http://{GATEWAY}:{PORT}/stable"
    # every node learns the source and the key (ESP credentials) and restarts its agent, one at a time
    for name, vm in cluster.items():
        vm.succeed(f"mkdir -p /efi/cortex && printf '%s\\n' 'cortex.update_source={source}' "
                   f"'cortex.update_keys={public}' >> /efi/cortex/credentials.conf "
                   "&& systemctl restart cortex-config.service cortex-agent.service")
        wait_until(lambda vm=vm: healthy(vm), 120, f"{name} back in the cluster after the agent restart",
                   interval=2)
    try:
        wait_until(lambda: len([n for n in reachable_status(lab)["nodes"] if n["version"] == v1]) == 4, 120,
                   "every node reports v1")
    except AssertionError:
        save_journals(cluster, work)
        raise
    try:
        yield {"v1": v1, "v2": v2, "v3": v3, "cmdline": cmdline}
    finally:
        server.terminate()
        server.wait(10)


def reachable_status(lab) -> dict:
    """update_status, or no nodes while no server answers (a restarted agent's port may refuse a moment)."""
    try:
        return update_status(lab)
    except AssertionError as exc:
        print(f"ISSU status not answered yet: {exc}", flush=True)
        return {"nodes": []}


def follow(lab, version: str, timeout: float) -> dict:
    """Poll the rollout until it ends; record when each node's step changed (host clock)."""
    seen: dict[str, tuple[str, float]] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            doc = update_status(lab)
        except AssertionError:
            time.sleep(5)
            continue
        r = doc["rollout"]
        if r and r["version"] == version:
            for s in r["steps"]:
                if seen.get(s["node_id"], ("",))[0] != s["state"]:
                    seen[s["node_id"]] = (s["state"], time.monotonic())
                    print(f"ISSU {version} {s['node_id']}: {s['state']} {s['reason']}", flush=True)
            if r["state"] not in ("checking", "running", "rolling_back"):
                return doc
        time.sleep(3)
    raise AssertionError(f"rollout to {version} not finished within {timeout:.0f} s: {update_status(lab)}")


def test_rolling_update_v1_to_v2_under_writes(lab, cluster, releases):
    v2 = releases["v2"]
    plan = json.loads(cluster["node1"].succeed(f"{CORTEX} --timeout 900 --json update rollout {v2} --dry-run", timeout=600))
    assert plan["preflight"] == [] and [s["state"] for s in plan["steps"]] == ["pending"] * 4
    assert plan["steps"][0]["node_id"] == "node4"  # the worker first
    writer = probes.writer(lab.netns, lab.grpc(*SERVERS), "issu", log=lab.workdir / "issu-writer.jsonl")
    lines: list[dict] = []
    try:
        writer.wait_for(lambda d: d.get("acked") == "issu-20", 120, "20 writes before the rollout")
        start = time.monotonic()
        cluster["node1"].succeed(f"{CORTEX} --timeout 900 --json update rollout {v2}", timeout=600)
        doc = follow(lab, v2, 4 * 900)
        took = time.monotonic() - start
    finally:
        lines = writer.stop()
    r = doc["rollout"]
    assert r["state"] == "done", r
    timings.record("issu", "rollout v1 -> v2, 4 nodes (1 worker, 3 servers), under writes", took)
    t = r["since"]["_rollout"]
    for s in r["steps"]:
        timings.record("issu", f"update-apply {s['node_id']} ({s['role']}): drain -> installed -> rebooted -> "
                               "blessed + cluster healthy", r["since"][s["node_id"]] - t)
        t = r["since"][s["node_id"]]
    assert {n["node_id"]: n["version"] for n in doc["nodes"]} == {n: v2 for n in cluster}
    acked = {d["acked"]: d["value"] for d in lines if "acked" in d}
    values = probes.scan(lab.netns, lab.grpc("node1")[0], "issu-")
    missing = [k for k, v in acked.items() if values.get(k) != v]
    assert not missing, f"{len(missing)} acknowledged writes lost: {missing[:10]}"
    times = [d["t"] for d in lines if "acked" in d]
    gaps = sorted((b - a for a, b in zip(times, times[1:])), reverse=True)
    timings.record("issu", "longest write unavailability during the rollout", gaps[0],
                   note=f"{len(acked)} writes acknowledged, 0 lost; gaps > 2 s: {sum(g > 2 for g in gaps)}")
    assert sum(g > 2 for g in gaps) <= len(SERVERS), "more than one failover per server"


def test_broken_v3_falls_back_by_itself_and_halts(lab, cluster, releases):
    v3 = releases["v3"]
    # what the nodes run now: v2 after the rolling update (v1 when this test runs alone: `-k broken`)
    base = {n["node_id"]: n["version"] for n in update_status(lab)["nodes"]}["node4"]
    start = time.monotonic()
    cluster["node1"].succeed(f"{CORTEX} --timeout 900 --json update rollout {v3}", timeout=600)
    doc = follow(lab, v3, 2400)
    took = time.monotonic() - start
    r = doc["rollout"]
    assert r["state"] == "halted" and r["reason"].startswith(f"node4: came back on {base}"), r
    assert [s["state"] for s in r["steps"]][1:] == ["pending"] * 3
    node4 = next(n for n in doc["nodes"] if n["node_id"] == "node4")
    assert node4["fell_back"] and node4["previous"] == v3 and node4["version"] == base
    fallback = r["since"]["node4"] - r["since"]["_rollout"]
    timings.record("issu", f"broken v3 on node4: rollout start -> fell back to {base} by itself, rollout halted",
                   took)
    timings.record("issu", "broken v3: rollout start -> failure recorded (replicated clock)", fallback)
    # the node rejoined on the version it ran before and the cluster stays healthy; nobody else was touched
    assert healthy(cluster["node4"])
    assert all(n["version"] == base for n in doc["nodes"])
