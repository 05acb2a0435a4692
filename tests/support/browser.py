"""A real browser for the web console's tests and benchmark: Debian's headless Chromium driven by Selenium.

chromedriver and Chromium are started through wrappers that set PR_SET_PDEATHSIG (setpriv): chromedriver dies
with the test process however that dies (Selenium forks it from the test's own thread), and Chromium dies
with chromedriver, so a killed pytest leaves no browser behind.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def missing() -> str:
    """Why no browser test can run here ('' when one can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is missing: apt-get install chromium chromium-driver (./bootstrap.sh does)"
    if not shutil.which("setpriv"):
        return "setpriv (util-linux) is missing"
    return ""


class Browser:
    """One headless Chromium; `driver` is the Selenium WebDriver."""

    def __init__(self, directory: Path, width: int = 1280, height: int = 900):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        directory.mkdir(parents=True, exist_ok=True)
        wrappers = {}
        for name, binary in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)):
            wrappers[name] = directory / name
            wrappers[name].write_text(f"#!/bin/sh\nexec setpriv --pdeathsig KILL -- {binary} \"$@\"\n")
            wrappers[name].chmod(wrappers[name].stat().st_mode | stat.S_IXUSR)
        options = webdriver.ChromeOptions()
        options.binary_location = str(wrappers["chromium"])
        for arg in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={width},{height}",
                    f"--user-data-dir={directory / 'profile'}", "--no-first-run", "--disable-extensions",
                    "--disable-background-networking", "--disable-component-update"):
            options.add_argument(arg)
        if os.geteuid() == 0:
            options.add_argument("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.log = open(directory / "chromedriver.log", "ab")
        service = Service(str(wrappers["chromedriver"]), log_output=self.log)
        self.driver = webdriver.Chrome(service=service, options=options)
        self.driver.set_page_load_timeout(60)

    def console_errors(self) -> list[dict]:
        """Console messages of level SEVERE since the last call (JavaScript errors, failed loads)."""
        return [e for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]

    def close(self) -> None:
        try:
            self.driver.quit()
        except Exception:
            pass
        self.log.close()


def screenshot(addr: str, out: Path, page: str = "", width: int = 1200, height: int = 720) -> Path:
    """Sign into the console of the node at `addr` (a running cluster, `just up`) and save one page as PNG."""
    import json
    import subprocess
    import sys
    import tempfile

    link = json.loads(subprocess.run([sys.executable, "-m", "cortex", "--addr", addr, "console", "url", "--via",
                                      "addr", "--json"], capture_output=True, text=True, check=True).stdout)
    with tempfile.TemporaryDirectory(prefix="console-shot-") as tmp:
        browser = Browser(Path(tmp), width, height)
        try:
            browser.driver.get(link["url"])
            if page:
                browser.driver.get(f"{link['console']}#/{page}")
            deadline = time.monotonic() + 30
            while "Loading" in browser.driver.find_element("id", "main").text or \
                    not browser.driver.find_elements("css selector", "main h1"):
                if time.monotonic() > deadline:
                    raise RuntimeError("the console drew nothing within 30 s")
                time.sleep(0.2)
            time.sleep(1)
            browser.driver.save_screenshot(str(out))
        finally:
            browser.close()
    return out


if __name__ == "__main__":
    # python -m tests.support.browser ADDR OUT.png [PAGE]: the README's screenshot, against `just up`
    import sys

    print(screenshot(sys.argv[1], Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else ""))
