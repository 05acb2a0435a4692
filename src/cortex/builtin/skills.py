"""The skills plugin: SKILL.md folders (YAML front matter + instructions) offered to assistants, hot-reloaded.

A skill is a folder holding `SKILL.md`:

    ---
    name: restart-service
    description: How to restart a systemd service on a node safely
    ---
    1. ...

plus any files it refers to. The plugin scans its folders (`plugins.skills.paths`; default
`<data_dir>/plugins/skills/`) every `reload_seconds`; added, changed and removed skills show up without a
restart, and a broken SKILL.md is listed with its problem instead of hiding the rest. Skills are per node
(files on its disk), like the plugins that run there.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cortex.core.events import Event
from cortex.plugins import Caller, Plugin, Resource, Tool, ToolError, returns

SKILL_FILE = "SKILL.md"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
MAX_SKILL_BYTES = 256 * 1024
MAX_FILES_LISTED = 100


@dataclass(frozen=True)
class Skill:
    name: str
    description: str
    path: str
    body: str
    metadata: dict = field(default_factory=dict)
    files: tuple[str, ...] = ()


def parse_skill(path: Path) -> Skill:
    """One SKILL.md; raises ValueError saying what is wrong with it."""
    raw = path.read_bytes()
    if len(raw) > MAX_SKILL_BYTES:
        raise ValueError(f"{path}: {len(raw)} bytes; a SKILL.md may have at most {MAX_SKILL_BYTES}")
    text = raw.decode("utf-8", errors="replace")
    match = re.match(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", text, re.S)
    if not match:
        raise ValueError(f"{path}: no YAML front matter (start the file with ---, name:, description:, ---)")
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: front matter is not valid YAML: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: front matter must be a mapping")
    name, description = meta.get("name"), meta.get("description")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"{path}: front matter needs name: 1-64 lowercase letters, digits or -")
    if not isinstance(description, str) or not description.strip():
        raise ValueError(f"{path}: front matter needs a description (what the skill is for, when to use it)")
    folder = path.parent
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != SKILL_FILE)
    extra = {k: v for k, v in meta.items() if k not in ("name", "description")}
    return Skill(name, description.strip(), str(folder), text[match.end():].lstrip("\n"), extra,
                 tuple(files[:MAX_FILES_LISTED]))


def scan(roots: list[Path]) -> tuple[dict[str, Skill], list[dict]]:
    """Every skill below the roots, and the problems found (a broken or duplicate skill does not hide others)."""
    skills: dict[str, Skill] = {}
    problems: list[dict] = []
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob(SKILL_FILE)):
            try:
                skill = parse_skill(path)
            except (OSError, ValueError) as exc:
                problems.append({"path": str(path), "problem": str(exc)})
                continue
            if skill.name in skills:
                problems.append({"path": str(path), "problem": f"duplicate skill name {skill.name!r} "
                                                               f"(also in {skills[skill.name].path}); ignored"})
                continue
            skills[skill.name] = skill
    return skills, problems


def signature(roots: list[Path]) -> tuple:
    """Cheap change detector: every file's path, size and mtime under the roots."""
    out = []
    for root in roots:
        if root.is_dir():
            for p in sorted(root.rglob("*")):
                try:
                    st = p.stat()
                except OSError:
                    continue
                out.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(out)


# What each tool answers: its MCP output schema (structuredContent).
_OUT_LIST_SKILLS = returns(
    {
        "node_id": "string",
        "skills": {
            "type": "array",
            "items": returns({"name": "string", "description": "string", "tags": "array"}, "tags"),
        },
        "problems": "array",
        "folders": {"type": "array", "items": {"type": "string"}},
    }
)
_OUT_GET_SKILL = returns(
    {
        "name": "string",
        "description": "string",
        "metadata": "object",
        "instructions": "string",
        "folder": "string",
        "files": "array",
    }
)


class SkillsPlugin(Plugin):
    name = "skills"
    options_schema = {
        "type": "object", "additionalProperties": False,
        "properties": {
            "paths": {"type": "array", "items": {"type": "string"}, "default": [],
                      "description": "folders holding skill folders; default: the plugin's data dir"},
            "reload_seconds": {"type": "number", "minimum": 0.1, "maximum": 3600, "default": 2.0},
        },
    }

    def init(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._skills: dict[str, Skill] = {}
        self._problems: list[dict] = []
        self._signature: tuple = ()
        self._thread: threading.Thread | None = None

    @property
    def roots(self) -> list[Path]:
        return [Path(p) for p in self.ctx.options["paths"]] or [self.ctx.data_dir]

    def reload(self) -> bool:
        """Rescan when anything changed; True when the skills did."""
        sig = signature(self.roots)
        if sig == self._signature:
            return False
        skills, problems = scan(self.roots)
        with self._lock:
            changed = skills != self._skills
            self._skills, self._problems, self._signature = skills, problems, sig
        if changed:
            self.ctx.log.info("skills reloaded", extra={"fields": {"skills": sorted(skills), "problems": len(problems)}})
            self.ctx.events.publish(Event("skills.changed", {"skills": sorted(skills)}))
        return changed

    def start(self) -> None:
        self._stop.clear()  # a plugin may be stopped and started again at run time
        self.reload()
        self._thread = threading.Thread(target=self._watch, name="skills-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self.ctx.options["reload_seconds"]):
            try:
                self.reload()
            except Exception as exc:  # a folder vanishing mid-scan: try again next round
                self.ctx.log.warning("skills scan failed", extra={"fields": {"error": str(exc)}})

    # --- tools -------------------------------------------------------------------------------------------
    def list_skills(self, args: dict, caller: Caller) -> dict:
        query = args.get("query", "").lower()
        with self._lock:
            skills, problems = list(self._skills.values()), list(self._problems)
        found = [{"name": s.name, "description": s.description, **({"tags": s.metadata["tags"]}
                                                                  if "tags" in s.metadata else {})}
                 for s in sorted(skills, key=lambda s: s.name)
                 if not query or query in s.name or query in s.description.lower()]
        return {"node_id": self.ctx.cluster.node_id if self.ctx.cluster else "", "skills": found,
                "problems": problems, "folders": [str(r) for r in self.roots]}

    def get_skill(self, args: dict, caller: Caller) -> dict:
        with self._lock:
            skill = self._skills.get(args["name"])
            names = sorted(self._skills)
        if skill is None:
            raise ToolError(f"no skill {args['name']!r} on this node; known: {', '.join(names) or 'none'} "
                            "(list_skills searches them)")
        return {"name": skill.name, "description": skill.description, "metadata": skill.metadata,
                "instructions": skill.body, "folder": skill.path, "files": list(skill.files)}

    def tools(self) -> list[Tool]:
        return [
            Tool("list_skills", "Skills (SKILL.md instructions) available on this node, by name and description; "
                 "query filters by a word.", self.list_skills,
                 {"type": "object", "additionalProperties": False,
                  "properties": {"query": {"type": "string", "maxLength": 200}}},
                 output_schema=_OUT_LIST_SKILLS),
            Tool("get_skill", "A skill's full instructions, metadata and the files in its folder.", self.get_skill,
                 {"type": "object", "additionalProperties": False, "required": ["name"],
                  "properties": {"name": {"type": "string", "pattern": NAME_RE.pattern}}},
                 output_schema=_OUT_GET_SKILL),
        ]

    def resources(self) -> list[Resource]:
        return [Resource("cluster://skills", "skills", "Skills on this node",
                         lambda: self.list_skills({}, Caller()))]
