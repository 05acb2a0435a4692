"""The agent's idle footprint: libraries only some nodes need are imported when first used.

Loading the agent and every installed plugin class with its options checked (what a server with every default plugin does at
start) must not pull in the heavy optional libraries; each one costs megabytes of resident memory on
every node, most of which never render a netboot menu or talk to Kubernetes.
"""

from __future__ import annotations

import json
import subprocess
import sys

# imported by a plugin only when its feature is used
LAZY = ("jsonschema", "jinja2", "kubernetes", "mcp", "starlette", "uvicorn", "pydantic")
# standard-library modules only downloads (updates) and the netboot HTTP service use
LAZY_MODULES = ("urllib.request", "http.server", "cortex.netboot.service")

PROBE = """
import json, sys
import cortex.cli.main, cortex.node.agent
from cortex.config import PluginSettings
from cortex.plugins import host
for name in sorted(host.discover()):
    cls = host._load_class(name)
    host.validate_options(name, cls.options_schema, PluginSettings(), "probe")
print(json.dumps(sorted(sys.modules)))
"""


def test_agent_and_plugins_load_without_optional_libraries():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    modules = set(json.loads(out.stdout.strip().splitlines()[-1]))
    loaded = {m.split(".")[0] for m in modules}
    assert "cortex.node.agent" in modules and "grpc" in loaded  # the probe really loaded the agent
    assert sorted(loaded & set(LAZY)) == []
    assert sorted(modules & set(LAZY_MODULES)) == []
