# Cortex tasks. Run ./bootstrap.sh once first (the README's commands do).
set shell := ["bash", "-euo", "pipefail", "-c"]

bin := justfile_directory() / ".venv/bin"

# list the recipes
default:
    @just --list

# start a local cluster of real agents on loopback (3 servers, 2 workers)
up servers="3" workers="2":
    {{bin}}/cortex dev up --servers {{servers}} --workers {{workers}}

# stop the local cluster (`just down --purge` also deletes its data)
down *args:
    {{bin}}/cortex dev down {{args}}

# every tier as CI runs it: unit, cluster (agents on loopback), system, and as root the VMs; 25 slowest listed
test *args:
    {{bin}}/python -m cortex.dev.protogen --check
    {{bin}}/python -m pytest --durations=25 {{args}}

# the unit tier alone: no agent processes, well under two minutes
test-fast *args:
    {{bin}}/python -m pytest tests/unit {{args}}

# benchmarks, Cortex beside etcd on loopback, then membership and the task engine, printed as tables;
# --json PATH writes one document (python -m bench --help)
bench *args:
    ./bootstrap.sh
    {{bin}}/python -m bench {{args}}

# MCP tool-call latency (stdio and HTTP, read and forwarded write) on a local cluster
bench-mcp *args:
    {{bin}}/python -m bench.mcp {{args}}

# the web console: page weight gzipped and first render in headless Chromium on a local cluster
bench-console *args:
    {{bin}}/python -m bench.console {{args}}

# static checks and stub freshness
lint:
    {{bin}}/ruff check src tests bench
    {{bin}}/python -m cortex.dev.protogen --check
    PATH="{{bin}}:$PATH" {{bin}}/ansible-lint --offline --profile production ansible/

# regenerate the gRPC stubs after editing proto/
proto:
    {{bin}}/python -m cortex.dev.protogen

# build the appliance image (mkosi; installs its own build tools): image/README.md
image *args:
    ./image/build.sh {{args}}

# write the image to a USB stick or disk, with optional first-boot credentials: image/README.md
[positional-arguments]
flash device *args:
    ./image/flash.sh "$@"

# boot a built image under QEMU (software emulation here): image/README.md
[positional-arguments]
qemu name *args:
    ./image/qemu.sh "$@"

# the VM tests alone (root; builds the image when it is older than the sources): one table of timings
qemu-test *args:
    {{bin}}/python -m pytest tests/qemu {{args}}

# regenerate the reference (docs/reference: commands, config keys, MCP tools) from the code
docs:
    {{bin}}/python -m cortex.dev.reference
