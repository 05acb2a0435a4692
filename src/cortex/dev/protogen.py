"""Generate the Python gRPC stubs from proto/ (build step and freshness check).

Generated modules import each other by package path (`cortex._proto.cortex.v1...`), so protoc runs with the
proto root as include path and writes below `src/cortex/_proto`, then imports are rewritten to be absolute.
"""

from __future__ import annotations

import filecmp
import re
import sys
import tempfile
from pathlib import Path

PACKAGE = "cortex._proto"


def _protos(proto_root: Path) -> list[Path]:
    return sorted(p for p in proto_root.rglob("*.proto"))


def generate(proto_root: Path, out_dir: Path) -> list[Path]:
    """Run protoc over every .proto below proto_root; return the generated files."""
    from grpc_tools import protoc  # build-time dependency only

    out_dir.mkdir(parents=True, exist_ok=True)
    protos = _protos(proto_root)
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {', '.join(map(str, protos))}")
    generated = []
    for path in sorted(out_dir.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        text = path.read_text()
        # protoc writes `from cortex.v1 import x_pb2`; make it resolve inside our package.
        text = re.sub(r"^from cortex\.v1 import", f"from {PACKAGE}.cortex.v1 import", text, flags=re.M)
        path.write_text(text)
        generated.append(path)
    for directory in {out_dir, *(p.parent for p in generated)}:
        while True:
            (directory / "__init__.py").touch()
            if directory == out_dir:
                break
            directory = directory.parent
    return generated


def check(proto_root: Path, out_dir: Path) -> list[str]:
    """Return the stub files that differ from a fresh generation (empty when fresh)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(proto_root, fresh)
        stale = []
        for path in sorted(fresh.rglob("*_pb2*.py*")):
            rel = path.relative_to(fresh)
            installed = out_dir / rel
            if not installed.exists() or not filecmp.cmp(path, installed, shallow=False):
                stale.append(str(rel))
        return stale


def main() -> int:
    root = Path(__file__).resolve().parents[3]
    out = Path(__file__).resolve().parents[1] / "_proto"
    if sys.argv[1:] == ["--check"]:
        stale = check(root / "proto", out)
        if stale:
            print("stale gRPC stubs (run `just proto` or reinstall):", *stale, sep="\n  ")
            return 1
        print("gRPC stubs are fresh")
        return 0
    for path in generate(root / "proto", out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
