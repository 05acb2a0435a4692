"""Web console benchmark: page weight and first render in a real browser against a live local cluster.

    python -m bench.console [--quick] [--json PATH] [--base-port N] [--trials N]

Starts a dev cluster (1 server + 1 worker, real agent processes on 127.0.0.1), signs headless Chromium into
the server's console with a `cortex console url` link, then measures:

- page weight: the bytes a first visit downloads (index.html, app.js, app.css, favicon), gzipped as served;
- first render: from the start of navigation to the overview drawn with the cluster's data (the page's
  `cortex-first-render` performance mark), cold (first visit, empty cache) and warm (reloads).

Targets: page weight <= 500 KB gzipped, first render <= 1 s on loopback. Prints one table on stdout, progress
on stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from cortex.dev import cluster as devcluster

_T0 = time.monotonic()
ASSETS = ("", "app.js", "app.css", "favicon.svg")


def progress(msg: str) -> None:
    print(f"[bench.console {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def page_weight(base: str) -> dict:
    sizes = {}
    for name in ASSETS:
        request = urllib.request.Request(base + name, headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(request, timeout=30) as r:
            sizes[name or "index.html"] = len(r.read())
    return sizes


def first_render_ms(driver) -> float:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        marks = driver.execute_script(
            "return performance.getEntriesByName('cortex-first-render').map(e => e.startTime)")
        if marks:
            return float(marks[0])
        time.sleep(0.02)
    raise RuntimeError("the console drew nothing within 30 s")


def run(base_port: int, trials: int, directory: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.support.browser import Browser, missing

    if missing():
        raise SystemExit(f"bench.console: {missing()}")
    progress(f"starting a cluster on 127.0.0.1:{base_port}")
    cluster = devcluster.up(directory / "cluster", 1, 1, base_port, timeout=60,
                            plugins={"console": {"listen": "127.0.0.1:0"}})
    browser = None
    try:
        node = cluster.nodes[0]
        out = subprocess.run([sys.executable, "-m", "cortex", "--addr", node.grpc_address, "console", "url",
                              "--via", "addr", "--json"], capture_output=True, text=True, timeout=60, check=True)
        link = json.loads(out.stdout)
        sizes = page_weight(link["console"])
        progress(f"page weight {sum(sizes.values())} bytes gzipped; starting Chromium")
        browser = Browser(directory / "chromium")
        driver = browser.driver
        driver.get(link["url"])
        cold = first_render_ms(driver)
        warm = []
        for _ in range(trials):
            driver.get(link["console"] + "#/")
            driver.refresh()
            warm.append(first_render_ms(driver))
        progress(f"first render cold {cold:.0f} ms, warm p50 {statistics.median(warm):.0f} ms over {trials}")
        return {"page_weight_gzip_bytes": sum(sizes.values()), "assets_gzip_bytes": sizes,
                "first_render_cold_ms": round(cold, 1), "first_render_warm_p50_ms": round(statistics.median(warm), 1),
                "first_render_warm_max_ms": round(max(warm), 1), "trials": trials,
                "targets": {"page_weight_gzip_bytes": 500 * 1024, "first_render_ms": 1000}}
    finally:
        if browser is not None:
            browser.close()
        devcluster.down(directory / "cluster")


def table(result: dict) -> str:
    rows = [("page weight (gzip)", f"{result['page_weight_gzip_bytes'] / 1024:.1f} KB", "<= 500 KB"),
            ("first render, cold", f"{result['first_render_cold_ms']:.0f} ms", "<= 1000 ms"),
            ("first render, warm p50", f"{result['first_render_warm_p50_ms']:.0f} ms", "<= 1000 ms"),
            ("first render, warm max", f"{result['first_render_warm_max_ms']:.0f} ms", "")]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{width}}  {'value':>10}  target", f"{'-' * width}  {'-' * 10}  ------"]
    lines += [f"{m:<{width}}  {v:>10}  {t}" for m, v, t in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.console", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few reloads (a smoke run)")
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.add_argument("--base-port", type=int, default=27400)
    parser.add_argument("--trials", type=int, default=0, help="warm reloads (default 20, 3 with --quick)")
    args = parser.parse_args(argv)
    trials = args.trials or (3 if args.quick else 20)
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        result = run(args.base_port, trials, Path(tmp))
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
