"""Volume pull benchmark: how fast a node copies a service's volume from another (cortex.ha.volumes).

    python -m bench.volumes [--mib 200] [--files 50] [--change 0.05] [--base-port 30600] [--json PATH]

Starts a dev cluster of one server and one worker on 127.0.0.1 (real agents, mutual TLS), fills the
server's volume of service `bench` with `--files` files of random data (`--mib` in all), and has the worker
pull it three times: a full pull into an empty directory, a pull with nothing changed, and an incremental
pull after a `--change` fraction of the blocks was rewritten in place. MB/s is the volume's size over the
pull's time (what a takeover waits for); the bytes column is what crossed the network.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from bench import measure
from cortex.dev import cluster as devcluster
from cortex.ha import volume_files as vf
from cortex.ha.volumes import RemoteVolumeSync
from cortex.security import tls

MIB = 1024 * 1024


def fill(volume: Path, mib: int, files: int, rng: random.Random) -> int:
    volume.mkdir(parents=True, exist_ok=True)
    size = mib * MIB // files
    for i in range(files):
        with open(volume / f"part-{i:03}.bin", "wb") as f:
            for _ in range(0, size, MIB):
                f.write(rng.randbytes(min(MIB, size - f.tell())))
    return size * files


def rewrite_blocks(volume: Path, fraction: float, rng: random.Random) -> int:
    """Rewrite `fraction` of all blocks in place; the number of blocks rewritten."""
    blocks = []
    for path in sorted(volume.iterdir()):
        count = vf.block_count(path.stat().st_size, vf.block_size_for(path.stat().st_size))
        blocks += [(path, i) for i in range(count)]
    chosen = rng.sample(blocks, max(1, int(len(blocks) * fraction)))
    for path, index in chosen:
        block = vf.block_size_for(path.stat().st_size)
        with open(path, "r+b") as f:
            f.seek(index * block)
            f.write(rng.randbytes(min(block, path.stat().st_size - index * block)))
    return len(chosen)


def run(mib: int, files: int, change: float, base_port: int) -> dict:
    directory = Path(tempfile.mkdtemp(prefix="bench-volumes-"))
    dc = devcluster.up(directory, 1, 1, base_port, timeout=60)
    try:
        return pulls(dc, mib, files, change)
    finally:
        devcluster.down(directory)


def pulls(dc: devcluster.DevCluster, mib: int, files: int, change: float) -> dict:
    """The three pulls, by the cluster's first worker from its first server (tests run it on their cluster)."""
    rng = random.Random(7)
    server, worker = dc.servers[0], next(n for n in dc.nodes if n.role == "worker")
    volume = vf.volume_dir(Path(server.dir) / "data", "bench")
    total = fill(volume, mib, files, rng)
    files_of_worker = tls.client_files(Path(worker.dir) / "data" / "tls", ("node",))
    sync = RemoteVolumeSync(lambda node: dc.node(node).grpc_address, lambda: files_of_worker)
    dest = Path(worker.dir) / "data" / "services" / "bench" / "volume"
    results = []
    try:
        for name, prepare in (("full", lambda: 0), ("nothing changed", lambda: 0),
                              (f"incremental ({change:.0%} of blocks)", lambda: rewrite_blocks(volume, change, rng))):
            rewritten = prepare()
            started = time.perf_counter()
            pulled = sync.pull("bench", server.id, dest)
            seconds = time.perf_counter() - started
            results.append({"pull": name, "seconds": seconds, "mb_per_s": total / MIB / seconds,
                            "bytes_copied": pulled.bytes_copied, "files_changed": pulled.files_changed,
                            "blocks_rewritten": rewritten})
    finally:
        sync.close()
    return {"volume_bytes": total, "files": files, "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.volumes", description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=200, help="volume size in MiB (default 200)")
    parser.add_argument("--files", type=int, default=50, help="files in the volume (default 50)")
    parser.add_argument("--change", type=float, default=0.05, help="fraction of blocks changed (default 0.05)")
    parser.add_argument("--base-port", type=int, default=30600)
    parser.add_argument("--json", default="", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.mib < 1 or args.files < 1 or not 0 < args.change <= 1:
        parser.error("--mib and --files must be at least 1, --change in (0, 1]")
    os.environ.setdefault(devcluster.DIE_WITH_PARENT_ENV, "1")
    report(run(args.mib, args.files, args.change, args.base_port), args.json)
    return 0


def report(result: dict, json_path: str = "") -> None:
    print(f"Volume pulls: {result['volume_bytes'] / MIB:.0f} MiB in {result['files']} files, worker from server, "
          "127.0.0.1, mutual TLS")
    measure.table([[r["pull"], r["seconds"], r["mb_per_s"], r["bytes_copied"], r["files_changed"]]
                   for r in result["results"]], ["pull", "seconds", "MiB/s", "bytes copied", "files changed"],
                  file=sys.stdout)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
