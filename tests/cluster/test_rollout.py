"""Rolling updates: the plan, the rollout state machine and the A/B slot model, as properties (hypothesis),
plus publish/verify of real payload files with real Ed25519 signatures."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.client import Client
from cortex.update import releases as updates
from cortex.update import rollout
from cortex.update.releases import UpdateError
from cortex.update.rollout import ACTIVE, Slots, Target


@st.composite
def clusters(draw):
    servers = draw(st.sampled_from([1, 3, 5]))
    workers = draw(st.integers(0, 6))
    leader = draw(st.integers(0, servers - 1))
    targets = [Target(f"n{i}", "server", draw(st.sampled_from(["1.0", "2.0"])), leader=i == leader,
                      appliance=draw(st.booleans()) or i == leader) for i in range(servers)]
    targets += [Target(f"w{i}", "worker", draw(st.sampled_from(["1.0", "2.0"])),
                       appliance=draw(st.booleans())) for i in range(workers)]
    return draw(st.permutations(targets))


@given(clusters())
def test_plan_updates_workers_then_followers_then_the_leader(targets):
    plan = rollout.plan("r1", targets, "2.0")
    order = [s.node_id for s in plan.steps]
    roles = [s.role for s in plan.steps]
    assert roles == sorted(roles, key=lambda r: r == "server")  # every worker before any server
    leader = next(t.node_id for t in targets if t.leader)
    assert order[-1] == leader
    for step, target in ((s, next(t for t in targets if t.node_id == s.node_id)) for s in plan.steps):
        if not target.appliance:
            assert step.state == "skipped" and "package path" in step.reason
        elif target.version == "2.0":
            assert step.state == "skipped" and "already runs" in step.reason
        else:
            assert step.state == "pending"


def _check(r: rollout.Rollout) -> None:
    states = [s.state for s in r.steps]
    assert sum(s in ACTIVE for s in states) <= 1, states  # one node at a time
    for i, s in enumerate(r.steps):
        if s.state in (*ACTIVE, "done", "failed"):  # a node moved only after every earlier one finished
            assert all(e.state in ("done", "skipped", "rolled_back") for e in r.steps[:i]), states
    if r.state == "done":
        assert all(s in ("done", "skipped") for s in states)
    if r.state == "halted":
        assert states.count("failed") == 1


@settings(max_examples=300, deadline=None)
@given(clusters(), st.lists(st.sampled_from(["ok", "ok", "ok", "fail", "stale", "new-leader"]), max_size=60))
def test_rollout_moves_one_node_at_a_time_and_halts_at_the_first_failure(targets, events):
    r = rollout.plan("r1", targets, "2.0")
    replicated = r  # what a new leader would read back from the store
    for event in events:
        step = rollout.next_step(r)
        if step is None:
            break
        if event == "new-leader":
            r = replicated  # the new leader continues from the replicated state: same next step
            assert rollout.next_step(r) == step
            continue
        if event == "stale":  # a report about some other node (late, duplicated, from a deposed leader)
            others = [s for s in r.steps if s.node_id != step.node_id]
            if others:
                with pytest.raises(UpdateError):
                    rollout.advance(r, others[0].node_id, "draining")
            continue
        if event == "fail":
            r = rollout.advance(r, step.node_id, "failed", "agent never became ready")
            assert r.state == "halted" and "agent never became ready" in r.reason
            assert rollout.next_step(r) is None  # halted: nothing else moves
        else:
            r = rollout.advance(r, step.node_id, rollout.STEP_FLOW[rollout.STEP_FLOW.index(step.state) + 1])
        replicated = r
        _check(r)
    if r.state in ("halted", "done") or (r.state == "running" and not any(s.state in ACTIVE for s in r.steps)):
        back = rollout.start_rollback(r)
        updated = [s.node_id for s in r.steps if s.state == "done"]
        walked = []
        while (step := rollout.next_step(back)) is not None:
            walked.append(step.node_id)
            back = rollout.advance(back, step.node_id, "rolled_back")
        assert walked == list(reversed(updated)) and back.state == "rolled_back"


def test_preflight_refuses_before_any_node_is_touched():
    targets = [Target("n1", "server", "2.0", leader=True), Target("n2", "server", "1.0"),
               Target("w1", "worker", "1.0", healthy=False)]
    problems = rollout.preflight(targets, "1.5")
    assert any("n1 runs 2.0, newer than 1.5" in p for p in problems)
    assert any("w1 is not healthy" in p for p in problems)
    assert any("2 servers cannot lose one" in p for p in problems)
    assert not any("newer" in p for p in rollout.preflight(targets, "1.5", allow_downgrade=True))
    with pytest.raises(UpdateError, match="dotted integers"):
        rollout.preflight(targets, "v2")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.just("install"), st.sampled_from(["2", "3", "4"])),
                          st.tuples(st.just("boot"), st.booleans())), max_size=40))
def test_slots_never_lose_the_known_good_version(actions):
    slots = Slots(("1", None), booted=0, good=0)
    for kind, arg in actions:
        good_version = slots.versions[slots.good]
        if kind == "install":
            try:
                after = slots.install(arg)
            except UpdateError:
                continue
            assert after.versions[slots.booted] == slots.versions[slots.booted]  # never the running slot
            assert after.versions[after.good] == good_version  # never the fallback
            slots = after
        else:
            slots = slots.boot(comes_up=arg)
            assert slots.versions[slots.booted] is not None
            if arg:
                assert slots.good == slots.booted  # blessed
            else:
                assert slots.versions[slots.good] == good_version
        assert slots.versions[slots.good] is not None


def test_a_version_that_never_comes_up_falls_back_after_its_tries():
    slots = Slots(("1", None), booted=0, good=0).install("2")
    for _ in range(3):
        slots = slots.boot(comes_up=False)
        assert slots.versions[slots.booted] == "2"
    slots = slots.boot(comes_up=False)  # no tries left: systemd-boot picks the good entry
    assert slots.versions[slots.booted] == "1" and slots.good == 0
    slots = slots.boot(comes_up=True)
    assert slots.versions[slots.booted] == "1"
    again = slots.install("3")  # an update from the fallback slot reuses the failed one's slot
    assert again.versions == ("1", "3")


# --- publish and verify -----------------------------------------------------------------------------------

UUID = "2b8c7a1e-5d4f-4e3a-9c1b-0a2b3c4d5e6f"


def build_output(directory: Path, version: str) -> Path:
    directory.mkdir(parents=True)
    (directory / f"cortex_{version}.usr-x86-64.{UUID}.raw.xz").write_bytes(b"usr" * 1000)
    (directory / f"cortex_{version}.usr-x86-64-verity.{UUID}.raw.xz").write_bytes(b"verity")
    (directory / f"cortex_{version}.efi").write_bytes(b"MZ uki")
    (directory / "cortex.raw").write_bytes(b"not part of the payload")
    return directory


def test_publish_verify_and_refuse_tampering(tmp_path: Path):
    trusted = updates.generate_key(tmp_path / "keys" / "publisher.pem")
    key = updates.load_private_key(tmp_path / "keys" / "publisher.pem")
    root = tmp_path / "updates"
    release = updates.publish(build_output(tmp_path / "out", "0.1.0.202611241200"), root, "stable", key, now=1.0)
    assert release == root / "stable" / "0.1.0.202611241200"
    assert sorted(p.name for p in release.iterdir()) == sorted([
        "cortex_0.1.0.202611241200.efi", f"cortex_0.1.0.202611241200.usr-x86-64.{UUID}.raw.xz",
        f"cortex_0.1.0.202611241200.usr-x86-64-verity.{UUID}.raw.xz", "manifest.json", "SHA256SUMS",
        "SHA256SUMS.sig"])
    assert updates.verify(release, [trusted])["version"] == "0.1.0.202611241200"
    # publishing the same bytes again is a no-op; other bytes under the same version are refused
    assert updates.publish(tmp_path / "out", root, "stable", key) == release
    (tmp_path / "out" / "cortex_0.1.0.202611241200.efi").write_bytes(b"MZ other")
    with pytest.raises(UpdateError, match="already published with other content"):
        updates.publish(tmp_path / "out", root, "stable", key)
    assert [(r.channel, r.version) for r in updates.list_releases(root)] == [("stable", "0.1.0.202611241200")]

    other = updates.generate_key(tmp_path / "keys" / "other.pem")
    with pytest.raises(UpdateError, match="not signed by a trusted key"):
        updates.verify(release, [other])
    with pytest.raises(UpdateError, match="no trusted publisher keys"):
        updates.verify(release, [])
    efi = release / "cortex_0.1.0.202611241200.efi"
    efi.write_bytes(efi.read_bytes()[:3])  # a truncated download
    with pytest.raises(UpdateError, match="does not match its checksum"):
        updates.verify(release, [trusted])
    sums = release / "SHA256SUMS"
    sums.write_text(sums.read_text().replace("a", "b", 1))  # a tampered checksum list
    with pytest.raises(UpdateError, match="not signed by a trusted key"):
        updates.verify(release, [trusted])
    (release / "SHA256SUMS.sig").unlink()
    with pytest.raises(UpdateError, match="unsigned"):
        updates.verify(release, [trusted])


def test_publish_refuses_an_incomplete_or_mixed_build(tmp_path: Path):
    updates.generate_key(tmp_path / "k.pem")
    key = updates.load_private_key(tmp_path / "k.pem")
    out = build_output(tmp_path / "out", "0.2.0.1")
    (out / "cortex_0.2.0.1.efi").unlink()
    with pytest.raises(UpdateError, match="need exactly one /usr image, one verity image and one .efi"):
        updates.publish(out, tmp_path / "u", "stable", key)
    (out / "cortex_0.2.0.2.efi").write_bytes(b"x")
    with pytest.raises(UpdateError, match="different versions"):
        updates.publish(out, tmp_path / "u", "stable", key)
    with pytest.raises(UpdateError, match="channel 'Stable!'"):
        updates.publish(out, tmp_path / "u", "Stable!", key)
    with pytest.raises(UpdateError, match="must look like ed25519"):
        updates.load_public_key("rsa:abc")
    with pytest.raises(UpdateError, match="refusing to overwrite"):
        updates.generate_key(tmp_path / "k.pem")
    assert len(base64.b64decode(updates.generate_key(tmp_path / "k2.pem").removeprefix("ed25519:"))) == 32


def test_update_cli_publishes_lists_verifies_and_plans_against_a_live_cluster(shared_cluster, tmp_path: Path):
    from tests.support.agent import cortex

    key = tmp_path / "publisher.pem"
    public = json.loads(cortex("update", "keygen", "--key", str(key), "--json").stdout)["public"]
    source = build_output(tmp_path / "out", "0.1.0.9")
    root = tmp_path / "updates"
    published = json.loads(cortex("update", "publish", str(source), "--root", str(root), "--key", str(key),
                                  "--json").stdout)
    assert published["version"] == "0.1.0.9" and published["channel"] == "stable"
    listing = json.loads(cortex("update", "list", "--root", str(root), "--json").stdout)
    assert [(r["channel"], r["version"]) for r in listing] == [("stable", "0.1.0.9")]
    assert "signature and checksums good" in cortex("update", "verify", published["path"], "--trust", public).stdout

    addr = shared_cluster.node("n1").grpc_address
    plan = json.loads(cortex("--addr", addr, "update", "plan", "0.1.0.9", "--json").stdout)
    assert plan["preflight"] == []
    steps = [(s["node"], s["role"], s["action"]) for s in plan["steps"]]
    assert [role for _, role, _ in steps] == ["worker", "worker", "server", "server", "server"]
    with Client(addr) as c:
        leader = c.status().leader_id
    assert steps[-1][0] == leader
    # dev nodes are not appliances: the plan says they update through their package path
    assert all(action == "skip" for _, _, action in steps)
    assert all("package path" in s["why"] for s in plan["steps"])
    bad = cortex("--addr", addr, "update", "plan", "latest", check=False)
    assert bad.returncode != 0 and "dotted integers" in bad.stderr
