"""Build hook: generate the gRPC stubs from proto/ into src/cortex/_proto.

The stubs are build output, never edited by hand and never committed; `cortex.dev.protogen.check()` (run by
`just lint` and the test suite) regenerates them into a temporary folder and fails if the installed ones differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

sys.path.insert(0, str(Path(__file__).parent / "src"))


SHIPPED_FROM_IMAGE = {
    "image/tree/usr/lib/systemd/system/cortex-agent.service": "cortex/appliance/files/cortex-agent.service",
    "image/tree/usr/lib/systemd/system-sleep/cortex": "cortex/appliance/files/cortex-sleep-hook",
}


class ProtoBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        from cortex.dev.protogen import generate

        root = Path(self.root)
        generate(root / "proto", root / "src" / "cortex" / "_proto")
        # `cortex node install` writes the appliance's own agent unit and sleep hook (one source:
        # image/tree); a tree without them (a partial copy) builds a wheel that says so when asked.
        if self.target_name == "wheel":
            for source, target in SHIPPED_FROM_IMAGE.items():
                if (root / source).is_file():
                    build_data["force_include"][str(root / source)] = target
        build_console(root)


def build_console(root: Path) -> None:
    """The web console's bundle (src/cortex/console/static), built with npm when console/ is there (a source
    tree); an sdist or a tree without npm keeps the bundle it has, and the console says when it has none."""
    import shutil
    import subprocess

    source = root / "console"
    built = root / "src" / "cortex" / "console" / "static" / "app.js"
    if not (source / "package.json").exists() or shutil.which("npm") is None:
        return
    try:
        if not (source / "node_modules").exists():
            subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=source, check=True)
        subprocess.run(["npm", "run", "--silent", "build"], cwd=source, check=True)
    except subprocess.CalledProcessError as exc:
        if not built.exists():
            raise RuntimeError(f"building the web console failed ({exc}); run `cd console && npm ci && npm run "
                               "build` (npm needs the registry once) and build again") from None
        print(f"hatch_build: the web console was not rebuilt ({exc}); the wheel keeps the bundle built before",
              file=sys.stderr)
