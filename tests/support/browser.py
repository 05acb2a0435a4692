"""A real browser for the web console's tests and benchmark: Debian's headless Chromium driven by Selenium.

chromedriver and Chromium are started through wrappers that set PR_SET_PDEATHSIG (setpriv): chromedriver dies
with the test process however that dies (Selenium forks it from the test's own thread), and Chromium dies
with chromedriver, so a killed pytest leaves no browser behind.
"""

from __future__ import annotations

import os
import shutil
import stat
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
