"""The `updater` plugin: rolling updates executed by the cluster.

Every node runs two small loops on one thread:

- the node side: report what it runs (`update.report`: version, blessed boot or not, fell back or not, free
  space), and act on its own step of the current rollout: when its step is `installing` it fetches the
  release from the update source over HTTP, verifies signature and checksums against its trusted keys into
  a local directory, installs it into the inactive slot (node_os), records `rebooting` and reboots; when a
  rollback reaches it, it switches back to the previous slot and reboots.
- the driver, on the leader only: runs the pre-flight of a new (`checking`) rollout itself and records the
  verdict (`update.checked`), then reads the rollout from the replicated store and proposes the next
  transition (`update.advance`, checked by rollout.advance inside apply): drain → wait for the node's
  tasks → `installing` → (the node installs and reboots) → the node is back on the new version with a
  blessed boot → `verifying` → the cluster is healthy → `done`, undrain, next node. Before its own step the
  leader hands leadership to another server; the new leader's driver continues from the store.

Everything the driver decides is level-triggered from replicated state, so a leader change at any point
continues the rollout, and a repeated proposal is refused by the state machine instead of applied twice.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

from cortex.plugins import Caller, Plugin, Tool, ToolError, returns, write_with_retry
from cortex.update import releases as updates
from cortex.update import rollout
from cortex.update.node_os import ApplianceOS, Facts, NodeOS, PackageOS, SimulatedOS
from cortex.update.releases import UpdateError

FETCH_TIMEOUT = 30.0
SPACE_FACTOR = 2  # the local verified copy plus what sysupdate writes; refuse below twice the payload


# --- releases over HTTP -----------------------------------------------------------------------------------

def _urlopen(url: str, timeout: float):
    import urllib.request  # with http.client, loaded by the first download rather than by every agent

    return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - http(s) from config


def _get(url: str, timeout: float = FETCH_TIMEOUT) -> bytes:
    try:
        with _urlopen(url, timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UpdateError(f"cannot fetch {url}: {getattr(exc, 'reason', exc)}; is the update source served "
                          "(`cortex update serve`) and reachable from this node?") from None


def fetch_release(source: str, version: str, cache: Path, trusted: list[str]) -> Path:
    """Download <source>/<version>/ into `cache/<version>` and verify it; a verified copy is reused."""
    updates.parse_version(version)
    target = cache / version
    if target.is_dir():
        try:
            updates.verify(target, trusted)
            return target
        except UpdateError:
            shutil.rmtree(target)  # a half-copied or tampered cache is fetched again
    base = source.rstrip("/") + f"/{version}/"
    staging = cache / f".{version}.{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        sums = _get(base + "SHA256SUMS")
        (staging / "SHA256SUMS").write_bytes(sums)
        try:
            (staging / "SHA256SUMS.sig").write_bytes(_get(base + "SHA256SUMS.sig"))
        except UpdateError as exc:
            raise UpdateError(f"{base} is unsigned or its signature is unreachable ({exc}); only releases "
                              "published with `cortex update publish` are installed") from None
        for line in sums.decode(errors="replace").splitlines():
            name = line.partition("  ")[2]
            if not name or "/" in name or name.startswith("."):
                raise UpdateError(f"{base}SHA256SUMS lists a bad file name {name!r}")
        updates.verify_signature(staging, trusted)  # nothing more is downloaded for an unsigned release
        for line in sums.decode().splitlines():
            name = line.partition("  ")[2]
            with _urlopen(base + name, FETCH_TIMEOUT) as response, open(staging / name, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
        manifest = updates.verify(staging, trusted)
        if manifest.get("version") != version:
            raise UpdateError(f"{base}: the signed manifest says version {manifest.get('version')}, not {version}")
        staging.rename(target)
    except (urllib.error.URLError, OSError) as exc:
        raise UpdateError(f"cannot fetch {base}: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --- pre-flight and plan (shared by the tool and the CLI through the tool) --------------------------------

def targets_from(status: dict, reports: list[dict]) -> list[rollout.Target]:
    """Members with what their updater reported; a node without a report cannot be planned."""
    by_node = {r["node_id"]: r for r in reports}
    out = []
    for n in status.get("nodes", []):
        r = by_node.get(n["id"])
        out.append(rollout.Target(
            n["id"], n.get("role", "worker"), r["version"] if r else "0",
            appliance=r is not None and r["kind"] in ("appliance", "simulated"),
            leader=n["id"] == status.get("leader_id"),
            healthy=n.get("liveness") == "alive" and r is not None))
    return out


def preflight_problems(status: dict, reports: list[dict], version: str, allow_downgrade: bool,
                       payload_bytes: int, current: dict | None) -> tuple[list[rollout.Target], list[str]]:
    targets = targets_from(status, reports)
    problems = rollout.preflight(targets, version, allow_downgrade)
    reported = {r["node_id"]: r for r in reports}
    for t in targets:
        r = reported.get(t.node_id)
        if r is None:
            problems.append(f"{t.node_id} has not reported its version: is the updater plugin running there?")
        elif r["fell_back"] and r["previous"] == version:
            problems.append(f"{t.node_id} already fell back from {version} (it never got ready there); "
                            "publish a fixed version")
        elif t.appliance and t.version != version and 0 <= r["free_bytes"] < SPACE_FACTOR * payload_bytes:
            problems.append(f"{t.node_id} has {r['free_bytes'] / 2**20:.0f} MiB free, needs "
                            f"{SPACE_FACTOR * payload_bytes / 2**20:.0f} MiB; free space first")
    if current and current["state"] in rollout.IN_PROGRESS:
        problems.append(f"rollout {current['id']} to {current['version']} is {current['state']}; wait for it or "
                        "roll it back")
    if not status.get("has_quorum", False):
        problems.append("the servers have no quorum")
    return targets, problems


# --- the plugin -------------------------------------------------------------------------------------------

# What each tool answers: its MCP output schema (structuredContent).
_OUT_UPDATE_ROLLOUT = returns(
    {
        "version": "string",
        "source": "string",
        "payload_bytes": ["integer", "null"],
        "steps": "array",
        "preflight": "array",
        "started": "boolean",
        "id": "string",
        "state": "string",
    },
    ("id", "state"),
)
_OUT_UPDATE_STATUS = returns({"rollout": ["object", "null"], "nodes": "array"})
_OUT_UPDATE_ROLLBACK = returns({"id": "string", "state": "string", "error": "string"}, required=())


class UpdaterPlugin(Plugin):
    name: ClassVar[str] = "updater"
    description: ClassVar[str] = "Rolling updates: signed releases, A/B slots, drain-install-reboot-verify per node"
    options_schema: ClassVar[dict] = {
        "type": "object",
        "properties": {
            "source": {"type": "string", "default": "",
                       "description": "the channel URL releases are fetched from, e.g. http://10.0.0.1:8470/stable"},
            "trusted_keys": {"type": "array", "items": {"type": "string"}, "default": [],
                             "description": "publisher keys (ed25519:...) a release must be signed with"},
            "os": {"enum": ["auto", "appliance", "simulated", "package"], "default": "auto",
                   "description": "how this node installs: auto = appliance when booted from the image"},
            "simulate_dir": {"type": "string", "default": "sim-slots",
                             "description": "os=simulated: where the slot state lives (relative: to the cwd)"},
            "simulate_version": {"type": "string", "default": "1.0.0"},
            "interval": {"type": "number", "minimum": 0.05, "maximum": 60, "default": 1.0},
            "drain_timeout": {"type": "number", "minimum": 0, "default": 300},
            "install_timeout": {"type": "number", "minimum": 1, "default": 1800},
            "boot_timeout": {"type": "number", "minimum": 1, "default": 1800,
                             "description": "from `rebooting` until the node reports back (all its boot tries)"},
            "verify_timeout": {"type": "number", "minimum": 1, "default": 300},
            "check_timeout": {"type": "number", "minimum": 1, "default": 900,
                              "description": "how long the rollout tool waits for the leader's own pre-flight"},
            "not_ready_reboot_after": {"type": "number", "minimum": 0.1, "default": 5,
                                       "description": "os=simulated: a boot that never gets ready reboots after"},
        },
        "additionalProperties": False,
    }

    def init(self) -> None:
        self.os: NodeOS | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported: dict | None = None
        self._acted: set[str] = set()
        self._transferred_at = 0.0
        self.progress: list[str] = []  # what the driver did, newest last (status tool)

    def _make_os(self) -> NodeOS:
        from cortex.node import agent

        kind = self.ctx.options["os"]
        if kind == "auto":
            kind = "appliance" if agent.IMAGE_VERSION else "package"
        if kind == "appliance":
            return ApplianceOS(self.ctx.data_dir, agent.IMAGE_VERSION)
        if kind == "simulated":
            return SimulatedOS(Path(self.ctx.options["simulate_dir"]).absolute(), self.ctx.options["simulate_version"])
        return PackageOS(self.ctx.data_dir)

    def start(self) -> None:
        self.os = self._make_os()
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    # --- loop ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        facts = self.os.facts()
        if not facts.ready:
            # this boot never gets ready (cortex-ready's job on the image): no report, no blessing; reboot so
            # boot counting uses up a try and eventually falls back to the previous slot
            self.ctx.log.error("this boot is not ready; rebooting to use up a boot try",
                               extra={"fields": {"version": facts.version}})
            if not self._stop.wait(self.ctx.options["not_ready_reboot_after"]):
                self.os.reboot()
            return
        while not self._stop.wait(self.ctx.options["interval"]):
            try:
                self._node_step()
            except Exception as exc:  # the loop outlives a lost leader or a failed read; next round retries
                self.ctx.log.warning("updater node step failed", extra={"fields": {"error": str(exc)}})
            try:
                if self.ctx.cluster.is_leader():
                    self._drive()
            except Exception as exc:
                self.ctx.log.warning("updater driver step failed", extra={"fields": {"error": str(exc)}})

    def _expected(self) -> dict:
        try:
            return json.loads((self.ctx.data_dir / "expected.json").read_text())
        except (OSError, ValueError):
            return {}

    def _report_doc(self, facts: Facts) -> dict:
        expected = self._expected()
        fell_back = bool(expected) and expected.get("version") != facts.version and facts.blessed
        return {"node_id": self.ctx.cluster.node_id, "version": facts.version, "kind": facts.kind,
                "blessed": facts.blessed, "fell_back": fell_back, "boot_id": facts.boot_id,
                "booted_at": facts.booted_at, "free_bytes": facts.free_bytes,
                "previous": expected.get("version", "") if fell_back else expected.get("from", ""),
                "detail": (f"fell back: {expected.get('version')} did not reach a blessed boot within its tries"
                           if fell_back else "")}

    def _report(self) -> None:
        facts = self.os.facts()
        if facts.ready and not facts.blessed and self._healthy_member():
            self.os.bless()  # the agent is up and in a healthy cluster: this boot is good
            facts = self.os.facts()
        doc = self._report_doc(facts)
        key = {k: v for k, v in doc.items() if k != "free_bytes"}
        if key != self._reported:
            self.ctx.cluster.write("update.report", doc, f"report:{doc['node_id']}:{doc['boot_id']}:"
                                   f"{doc['version']}:{doc['blessed']}:{doc['fell_back']}")
            self._reported = key

    def _healthy_member(self) -> bool:
        s = self.ctx.cluster.status()
        return s.get("state") in ("leader", "follower", "worker") and bool(s.get("leader_id")) \
            and bool(s.get("has_quorum"))

    # --- node side -----------------------------------------------------------------------------------
    def _node_step(self) -> None:
        self._report()
        doc = self.ctx.cluster.read("update.current", {}, level="stale")
        if not doc:
            return
        me = self.ctx.cluster.node_id
        step = next((s for s in doc["steps"] if s["node_id"] == me), None)
        if step is None:
            return
        facts = self.os.facts()
        if doc["state"] == "running" and step["state"] == "installing":
            self._install(doc, facts)
        elif doc["state"] == "rolling_back" and step["state"] == "reverting":
            # the leader drained this node again first (done -> draining -> reverting)
            if facts.version != step["from_version"]:
                self._revert(doc, step)

    def _advance(self, doc: dict, state: str, reason: str = "", boot_id: str = "") -> None:
        me = self.ctx.cluster.node_id
        write_with_retry(self.ctx.cluster, "update.advance", {"rollout_id": doc["id"], "node_id": me,
                                                              "state": state, "reason": reason, "boot_id": boot_id},
                         f"advance:{doc['id']}:{me}:{state}", retry_for=60)

    def _install(self, doc: dict, facts: Facts) -> None:
        version, me = doc["version"], self.ctx.cluster.node_id
        if facts.version == version:
            # installed and rebooted before `rebooting` was recorded (an interrupted step): any boot counts
            self._advance(doc, "rebooting", "already running the new version", "-")
            return
        marker = f"{doc['id']}:{version}:{facts.boot_id}"
        if marker in self._acted:
            return
        self._acted.add(marker)
        try:
            release = fetch_release(doc["source"], version, self.ctx.data_dir / "releases",
                                    self.ctx.options["trusted_keys"])
            self.os.install(release, version)
        except UpdateError as exc:
            self.ctx.log.error("install failed", extra={"fields": {"version": version, "error": str(exc)}})
            self._advance(doc, "failed", f"install on {me}: {exc}")
            return
        (self.ctx.data_dir / "expected.json").write_text(json.dumps(
            {"version": version, "from": facts.version, "rollout": doc["id"]}))
        try:
            self._advance(doc, "rebooting", "", facts.boot_id)
        except ToolError:
            self._acted.discard(marker)  # not recorded: the next round installs (idempotently) and tries again
            raise
        self.ctx.log.info("installed; rebooting", extra={"fields": {"version": version}})
        self.os.reboot()

    def _revert(self, doc: dict, step: dict) -> None:
        marker = f"revert:{doc['id']}:{self.os.facts().boot_id}"
        if marker in self._acted:
            return
        self._acted.add(marker)
        self.os.revert(step["from_version"])
        (self.ctx.data_dir / "expected.json").write_text(json.dumps(
            {"version": step["from_version"], "from": doc["version"], "rollout": doc["id"]}))
        self.ctx.log.info("rolled back; rebooting", extra={"fields": {"version": step["from_version"]}})
        self.os.reboot()

    # --- driver (leader) -----------------------------------------------------------------------------
    def _note(self, message: str) -> None:
        self.ctx.log.info(message)
        self.progress = [*self.progress[-49:], f"{time.strftime('%H:%M:%S')} {message}"]

    def _propose(self, doc: dict, node_id: str, state: str, reason: str = "") -> None:
        # a rollback passes through `draining` again: its own keys, or the forward step's would dedupe it
        phase = "back" if doc["state"] == "rolling_back" else "advance"
        write_with_retry(self.ctx.cluster, "update.advance", {"rollout_id": doc["id"], "node_id": node_id,
                                                              "state": state, "reason": reason},
                         f"{phase}:{doc['id']}:{node_id}:{state}")
        self._note(f"{doc['id']} {node_id}: {state}" + (f" ({reason})" if reason else ""))

    def _check(self, doc: dict) -> None:
        """The leader's own pre-flight of a new rollout: whoever wrote the start, no node moves unless this
        passes (signature, reachability, space, health, quorum, downgrade)."""
        marker = f"check:{doc['id']}"
        if marker in self._acted:
            return
        self._acted.add(marker)
        try:
            _, problems = self._preflight(doc["version"], doc["source"], doc["allow_downgrade"], None)
            self.ctx.cluster.propose("update.checked", {"rollout_id": doc["id"], "problems": problems},
                                     f"checked:{doc['id']}")
        finally:
            self._acted.discard(marker)  # not recorded (lost leadership, say): the next round checks again
        self._note(f"{doc['id']} pre-flight: " + ("; ".join(problems) if problems else "passed"))

    def _drive(self) -> None:
        doc = self.ctx.cluster.read("update.current", {}, level="leader")
        if doc and doc["state"] == "checking":
            self._check(doc)
            return
        if not doc or doc["state"] not in ("running", "rolling_back"):
            return
        step = rollout.next_step(_as_rollout(doc))
        if step is None:
            return
        status = self.ctx.cluster.status()
        reports = {r["node_id"]: r for r in self.ctx.cluster.read("update.nodes", {}, level="leader")}
        report = reports.get(step.node_id)
        since = doc["since"].get(step.node_id, doc["since"].get("_rollout", 0))
        waited = time.time() - since
        o = self.ctx.options
        me = self.ctx.cluster.node_id

        if doc["state"] == "rolling_back":
            if report and report["version"] == step.from_version and report["blessed"]:
                self._propose(doc, step.node_id, "rolled_back", f"back on {step.from_version}")
                self._undrain(step.node_id)
            elif step.node_id == me:
                self._handoff(status)  # the leader is reverted last... first in reverse order: hand it off
            elif step.state == "done":
                self.ctx.cluster.write("task.drain", {"node_id": step.node_id,
                                                      "deadline": float(o["drain_timeout"])},
                                       f"drain-back:{doc['id']}:{step.node_id}")
                self._propose(doc, step.node_id, "draining", "before switching back")
            elif step.state == "draining":
                busy = self.ctx.cluster.read("task.assigned", {"node_id": step.node_id}, level="leader")
                if not busy or waited > o["drain_timeout"]:
                    self._propose(doc, step.node_id, "reverting")
            return

        if step.state == "pending":
            if step.node_id == me:
                self._handoff(status)  # the leader goes last, after leadership moves away
                return
            problem = _health_problem(status)
            if problem:
                return  # wait: one node down at a time, never two
            self.ctx.cluster.write("task.drain", {"node_id": step.node_id, "deadline": float(o["drain_timeout"])},
                                   f"drain:{doc['id']}:{step.node_id}")
            self._propose(doc, step.node_id, "draining")
        elif step.state == "draining":
            busy = self.ctx.cluster.read("task.assigned", {"node_id": step.node_id}, level="leader")
            if not busy or waited > o["drain_timeout"]:
                self._propose(doc, step.node_id, "installing")
        elif step.state == "installing":
            if waited > o["install_timeout"]:
                self._propose(doc, step.node_id, "failed", f"did not install within {o['install_timeout']:.0f} s")
        elif step.state == "rebooting":
            old_boot = doc["since"].get(step.node_id + "@boot", "")
            if report and report["boot_id"] != old_boot:
                if report["version"] == doc["version"] and report["blessed"]:
                    self._propose(doc, step.node_id, "verifying")
                elif report["version"] != doc["version"] and report["blessed"]:
                    self._propose(doc, step.node_id, "failed",
                                  f"came back on {report['version']}: {doc['version']} did not reach a blessed boot "
                                  "within its tries, the node fell back to the previous slot by itself")
                    self._undrain(step.node_id)
                    return
            if waited > o["boot_timeout"]:
                self._propose(doc, step.node_id, "failed", f"did not come back within {o['boot_timeout']:.0f} s")
        elif step.state == "verifying":
            problem = _health_problem(status)
            if not problem:
                self._propose(doc, step.node_id, "done")
                self._undrain(step.node_id)
            elif waited > o["verify_timeout"]:
                self._propose(doc, step.node_id, "failed", f"cluster not healthy after the update: {problem}")

    def _undrain(self, node_id: str) -> None:
        try:
            self.ctx.cluster.write("task.undrain", {"node_id": node_id})
        except Exception as exc:  # the node may not have a task record; the update itself is done
            self.ctx.log.warning("undrain failed", extra={"fields": {"node": node_id, "error": str(exc)}})

    def _handoff(self, status: dict) -> None:
        if time.monotonic() - self._transferred_at < 10:
            return
        if _health_problem(status):
            return
        from cortex._proto.cortex.v1 import cortex_pb2 as pb

        self._transferred_at = time.monotonic()
        self._note("transferring leadership before updating this node")
        self.ctx.cluster.rpc("TransferLeadership", pb.TransferLeadershipRequest())

    # --- tools ---------------------------------------------------------------------------------------
    def _preflight(self, version: str, source: str, allow_downgrade: bool,
                   current: dict | None) -> tuple[dict, list[str]]:
        """Signature, reachability, space, health, quorum, downgrade: the plan and why it must not start."""
        problems: list[str] = []
        payload = 0
        try:
            updates.parse_version(version)
        except UpdateError as exc:
            raise ToolError(str(exc)) from None
        if not source:
            problems.append("no update source: pass source, or set plugins.updater.source")
        else:
            try:
                release = fetch_release(source, version, self.ctx.data_dir / "releases",
                                        self.ctx.options["trusted_keys"])
                payload = sum(json.loads((release / "manifest.json").read_text())["files"].values())
            except UpdateError as exc:
                problems.append(f"release {version}: {exc}")
        status = self.ctx.cluster.status()
        reports = self.ctx.cluster.read("update.nodes", {}, level="leader")
        targets, more = preflight_problems(status, reports, version, allow_downgrade, payload, current)
        problems += more
        plan = rollout.plan("dry-run", targets, version)
        return {"version": version, "source": source, "payload_bytes": payload,
                "steps": [asdict(s) for s in plan.steps], "preflight": problems}, problems

    def start_rollout(self, version: str, source: str = "", allow_downgrade: bool = False,
                      dry_run: bool = False, by: str = "") -> dict:
        """Pre-flight here (a quick answer, a dry run), the replicated start, then wait for the leader's own
        pre-flight verdict: the rollout runs only once the leader checked it too."""
        source = source or self.ctx.options["source"]
        current = self.ctx.cluster.read("update.current", {}, level="leader")
        out, problems = self._preflight(version, source, allow_downgrade, current)
        if dry_run or problems:
            return {**out, "started": False}
        result = self.ctx.cluster.write("update.start", {"version": version, "source": source, "steps": out["steps"],
                                                         "by": by, "allow_downgrade": allow_downgrade},
                                        f"start:{version}:{uuid.uuid4().hex}")
        doc = {"state": result["state"], "reason": ""}
        deadline = time.monotonic() + self.ctx.options["check_timeout"]
        while doc and doc["state"] == "checking" and time.monotonic() < deadline:
            time.sleep(0.2)
            doc = self.ctx.cluster.read("update.current", {"id": result["id"]}, level="leader")
        if doc and doc["state"] == "halted":
            raise ToolError(f"rollout {result['id']}: {doc['reason']}")
        return {**out, "started": True, "id": result["id"], "state": doc["state"] if doc else result["state"]}

    def status_doc(self) -> dict:
        return {"rollout": self.ctx.cluster.read("update.current", {}, level="leader"),
                "nodes": self.ctx.cluster.read("update.nodes", {}, level="leader")}

    def tools(self) -> list[Tool]:
        def rollout_tool(args: dict, caller: Caller) -> Any:
            result = self.start_rollout(args["version"], args.get("source", ""), args.get("allow_downgrade", False),
                                        args.get("dry_run", False), caller.identity)
            if result["preflight"] and not args.get("dry_run", False):
                raise ToolError("pre-flight refuses, no node was touched:\n  " + "\n  ".join(result["preflight"]))
            return result

        def rollback_tool(args: dict, caller: Caller) -> Any:
            try:
                return self.ctx.cluster.write("update.rollback", {"rollout_id": args.get("rollout_id", ""),
                                                                  "by": caller.identity})
            except Exception as exc:
                raise ToolError(f"rollback refused: {exc}") from None

        def rollout_plan(args: dict, caller: Caller) -> str:
            plan = self.start_rollout(args["version"], args.get("source", ""), args.get("allow_downgrade", False),
                                      True, caller.identity)
            if plan["preflight"]:
                return f"nothing: pre-flight refuses {args['version']} ({'; '.join(plan['preflight'])})"
            order = ", ".join(s.get("node_id", "?") for s in plan["steps"])
            return f"update {len(plan['steps'])} node(s) to {args['version']}, one at a time, in this order: {order}"

        def rollback_plan(args: dict, caller: Caller) -> str:
            doc = self.ctx.cluster.read("update.current", {}, level="leader")
            if not doc:
                return "nothing: there is no rollout to roll back"
            back = [s["node_id"] for s in reversed(doc["steps"]) if s["state"] == "done"]
            return (f"roll rollout {doc['id']} ({doc['version']}, {doc['state']}) back: "
                    f"{', '.join(back) or 'no node'} return to their previous slot, in this order")

        return [
            Tool("update_rollout", "Roll a signed release out to the cluster, one node at a time (workers, "
                 "followers, the leader last). Pre-flight refuses unsigned/tampered/unreachable releases, "
                 "downgrades, unhealthy clusters and full disks before touching any node. dry_run shows the plan.",
                 rollout_tool, {"type": "object", "properties": {
                     "version": {"type": "string"}, "source": {"type": "string"},
                     "allow_downgrade": {"type": "boolean"}, "dry_run": {"type": "boolean"}},
                     "required": ["version"], "additionalProperties": False},
                 role="admin", read_only=False, destructive=True, idempotent=False,
                 output_schema=_OUT_UPDATE_ROLLOUT, plan=rollout_plan),
            Tool("update_status", "The current rolling update (steps, states, why it halted) and the version, "
                 "boot state and fallback of every node.", lambda a, c: self.status_doc(),
                 output_schema=_OUT_UPDATE_STATUS),
            Tool("update_rollback", "Return the nodes a rollout already updated to their previous slot, newest "
                 "first (after a halted rollout).", rollback_tool,
                 {"type": "object", "properties": {"rollout_id": {"type": "string"}},
                  "additionalProperties": False}, role="admin", read_only=False, destructive=True,
                 output_schema=_OUT_UPDATE_ROLLBACK, plan=rollback_plan),
        ]


def _as_rollout(doc: dict) -> rollout.Rollout:
    return rollout.Rollout(doc["id"], doc["version"], tuple(rollout.Step(**s) for s in doc["steps"]), doc["state"],
                           doc["reason"])


def _health_problem(status: dict) -> str:
    if not status.get("has_quorum"):
        return "no quorum"
    down = [n["id"] for n in status.get("nodes", []) if n.get("liveness") != "alive"]
    return f"not alive: {', '.join(down)}" if down else ""
