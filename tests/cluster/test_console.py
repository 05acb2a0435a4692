"""The web console in a real browser (Debian's headless Chromium through Selenium) against real agents.

One module-scoped cluster (1 server, 2 workers; each console on a port of its own) and one browser serve
every test; the tests run in file order and the last ones kill workers. Screenshots go under
$CORTEX_TEST_ARTIFACTS or a fresh directory in /tmp, printed at the start (`pytest -s`), never into the tree.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cortex.dev import cluster as devcluster
from tests.support import procs
from tests.support.browser import Browser, missing
from tests.support.cluster import Cluster, free_base_port
from tests.support.wait import wait_until

pytestmark = pytest.mark.skipif(bool(missing()), reason=missing() or "browser present")

# each page and the heading it draws
PAGES = {"": "Cluster overview", "node/w1": "Node w1", "node/n1": "Node n1", "services": "Services", "tasks": "Tasks",
         "dlq": "Dead-letter queue", "workflows": "Workflows", "rollouts": "Rollouts", "memory": "Memory threads"}


def shown(browser, page: str) -> None:
    """Wait until the page is drawn: its own heading, nothing loading."""
    def drawn():
        headings = browser.driver.find_elements("css selector", "main h1")
        return headings and headings[0].text == PAGES[page] and "Loading" not in main_text(browser)
    wait_until(drawn, 60, f"page {page!r}", interval=0.2, ignore=(Exception,), detail=lambda: main_text(browser)[:500])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """1 server, 2 workers; every console on a port of its own. The real services and sentinel plugins run
    everywhere but on w1, whose console shows those pages as not available. The sentinel reads every second and assesses every 2 s (10 s and 30 s by default),
    so its history has points to chart within the first test."""
    directory = tmp_path_factory.mktemp("console")

    def extra(node: devcluster.DevNode) -> str:
        # offline after 5 s without heartbeats (10 s by default): the killed worker's test waits less
        return ("liveness:\n  suspect_after: 2\n  offline_after: 5\n"
                "plugins:\n  console:\n    listen: 127.0.0.1:0\n"
                + ("  services:\n    enabled: false\n  sentinel:\n    enabled: false\n" if node.id == "w1"
                   else "  sentinel:\n    interval: 1\n    evaluate_every: 2\n"))

    try:
        dc = devcluster.up(directory, 1, 2, free_base_port(), timeout=60, extra_config=extra)
        for node in dc.nodes:  # plugins start once the node is in the cluster
            wait_until(lambda node=node: (Path(node.dir) / "data/plugins/console/console.json").exists(), 30,
                       f"{node.id}'s console", interval=0.1, detail=lambda node=node: devcluster.tail(node.log_path))
    except BaseException:
        devcluster.down(directory)
        raise
    try:
        yield Cluster(dc)
    finally:
        devcluster.down(directory)


@pytest.fixture(scope="module")
def shots() -> Path:
    """Screenshots outlive the run (pytest's own temporary directories are pruned): under
    $CORTEX_TEST_ARTIFACTS when set (CI collects it), else a fresh directory in /tmp; printed either way."""
    root = os.environ.get("CORTEX_TEST_ARTIFACTS")
    if root:
        Path(root).mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="console-screenshots-", dir=root or None))
    print(f"\nconsole screenshots: {directory}")
    return directory


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium"))
    try:
        yield b
    finally:
        b.close()


def cortex(cluster, node_id: str, *args: str) -> dict:
    done = procs.run([sys.executable, "-m", "cortex", "--addr", cluster.node(node_id).grpc_address, *args, "--json"],
                     capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr or done.stdout
    return json.loads(done.stdout)


def login_url(cluster, node_id: str = "n1", role: str = "reader") -> str:
    return cortex(cluster, node_id, "console", "url", "--via", "addr", "--role", role)["url"]


def http(url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one request, redirects not followed."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args):
            return None

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=30) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw.startswith(b"{") else {"html": raw.decode()}), dict(r.headers)
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, (json.loads(raw) if raw.startswith(b"{") else {}), dict(e.headers)
    except urllib.error.URLError as e:  # nothing listens there
        return 0, {"error": str(e.reason)}, {}


def click(browser, xpath: str, what: str) -> None:
    """Click what `xpath` finds; a redraw between finding and clicking only means finding it again."""
    def once():
        browser.driver.find_element("xpath", xpath).click()
        return True
    wait_until(once, 30, what, interval=0.2, ignore=(Exception,))


def note(browser) -> str:
    return browser.driver.find_element("id", "action-result").text


def main_text(browser) -> str:
    return browser.driver.find_element("id", "main").text


def wait_text(browser, needle: str, what: str, timeout: float = 60) -> str:
    return wait_until(lambda: needle in main_text(browser) and main_text(browser), timeout, what, interval=0.3,
                      ignore=(Exception,), detail=lambda: main_text(browser)[:2000])


def test_without_a_token_the_console_refuses_and_says_why(cluster, browser):
    base = login_url(cluster).split("login?")[0]
    status = cortex(cluster, "n1", "console", "status", "--via", "addr")
    assert (status["state"], status["url"], status["error"]) == ("running", base, "")
    status, body, _ = http(base + "api/whoami")
    assert status == 401 and "cortex console url" in body["error"]
    status, body, _ = http(base + "api/tool/list_nodes", {})
    assert status == 401
    status, body, _ = http(base + "api/whoami", headers={"Authorization": "Bearer not-the-token"})
    assert status == 401 and "not this node's console token" in body["error"]
    status, body, _ = http(base + "api/login", {"token": "x"}, {"Origin": "http://elsewhere.example"})
    assert status == 403 and "may not act on this console" in body["error"]
    browser.driver.get(base)
    assert "not signed in" in wait_text(browser, "Sign in to the Cortex console", "the login page")
    browser.driver.get(base + "login?token=wrong")
    assert "not valid here" in wait_text(browser, "Sign in", "the login page after a wrong token")


def test_the_console_serves_again_after_its_plugin_is_stopped_and_started(cluster):
    node = cluster.node("n1")
    before = login_url(cluster).split("login?")[0]
    for verb in ("stop", "start"):
        done = procs.run([sys.executable, "-m", "cortex", "--socket", str(node.admin_socket), "plugins", verb,
                          "console"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        if verb == "stop":
            status, body, _ = http(before + "api/whoami")
            assert status == 0, "the stopped console still answers"
    url = login_url(cluster)
    status, _, headers = http(url)
    assert status == 200 and "HttpOnly" in headers["Set-Cookie"]


def test_a_login_link_works_once_and_every_page_loads_without_errors(cluster, browser, shots):
    url = login_url(cluster)
    browser.driver.get(url)
    wait_text(browser, "Cluster overview", "the overview after signing in")
    status, _, headers = http(url)  # the same link again: used
    assert status == 303 and "already%20used" in headers["Location"]
    base = url.split("login?")[0]
    cookie = browser.driver.get_cookie(f"cortex_console_{base.rsplit(':', 1)[1].strip('/')}")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    browser.console_errors()
    for page in PAGES:
        browser.driver.get(f"{base}#/{page}")
        shown(browser, page)
        browser.driver.save_screenshot(str(shots / f"{page.replace('/', '-') or 'overview'}.png"))
        assert browser.console_errors() == [], page
    # a phone: one column, nothing wider than the screen (wide tables scroll inside their card)
    browser.driver.set_window_size(390, 844)
    try:
        for page in ("", "workflows", "node/w1", "node/n1"):  # n1's page: health charts as wide as the screen
            browser.driver.get(f"{base}#/{page}")
            shown(browser, page)
            assert browser.driver.execute_script(
                "return document.documentElement.scrollWidth <= window.innerWidth + 1"), page
        browser.driver.save_screenshot(str(shots / "phone-node.png"))
    finally:
        browser.driver.set_window_size(1280, 900)
    # the services plugin's tools light up the services page ...
    browser.driver.get(f"{base}#/services")
    wait_text(browser, "No services deployed", "the services page without services")
    assert browser.console_errors() == []
    # ... and a node without them says so, page by page
    w1 = login_url(cluster, "w1")
    browser.driver.get(w1)
    wait_text(browser, "Cluster overview", "w1's overview")
    browser.driver.get(w1.split("login?")[0] + "#/services")
    assert "Services and HA: not available on this cluster" in wait_text(browser, "not available", "w1's services")
    browser.driver.get(w1.split("login?")[0] + "#/node/w2")
    assert "Health charts (Sentinel): not available" in wait_text(browser, "Health", "w1's node page")
    assert browser.console_errors() == []


def chart_points(browser, signal: str) -> int:
    found = browser.driver.find_elements("css selector", f"figure.chart[data-signal='{signal}']")
    return int(found[0].get_attribute("data-points")) if found and found[0].find_elements("css selector", "canvas") else 0


def test_the_node_page_and_overview_show_the_real_sentinel_health(cluster, browser, shots):
    base = login_url(cluster).split("login?")[0]
    browser.driver.get(login_url(cluster))
    wait_text(browser, "Cluster overview", "the overview")
    browser.console_errors()
    # the node page of the console's own node: the score sentinel_node answers, and its recorded series charted
    browser.driver.get(f"{base}#/node/n1")

    def same_score():
        tool = cortex(cluster, "n1", "tools", "call", "sentinel_node", "--args", '{"node": "n1"}')
        return f"score\n{round(tool['score'])} / 100" in main_text(browser) and tool
    doc = wait_until(same_score, 60, "the score sentinel_node answers", interval=0.5, ignore=(Exception,),
                     detail=lambda: main_text(browser)[:2000])
    assert doc["source"] == "local" and doc["level"] in main_text(browser)
    assert ("Nothing lowers the score." in main_text(browser)) == (not doc["factors"])
    wait_until(lambda: chart_points(browser, "score") >= 2 and chart_points(browser, "mem.avail_pct") >= 2, 60,
               "the score and memory history charted with points", interval=0.3, ignore=(Exception,),
               detail=lambda: main_text(browser)[:2000])
    browser.driver.execute_script("document.querySelector('figure.chart').scrollIntoView()")
    browser.driver.save_screenshot(str(shots / "node-health.png"))
    # another node: the sparklines its published summary carries
    browser.driver.get(f"{base}#/node/w2")
    wait_until(lambda: main_text(browser).startswith("Node w2") and "as published" in main_text(browser)
               and chart_points(browser, "score") >= 1, 60, "w2's published score sparkline", interval=0.3,
               ignore=(Exception,), detail=lambda: main_text(browser)[:2000])
    assert "cortex console url" in main_text(browser)
    # the overview's health column: each node's level and score from sentinel_health; w1 runs no sentinel
    browser.driver.get(base)
    health = cortex(cluster, "n1", "tools", "call", "sentinel_health")
    published = {n["node"]: n for n in health["nodes"]}
    assert set(published) == {"n1", "w2"}

    def row(node_id):
        return next(r.text for r in browser.driver.find_elements("css selector", "main tr")
                    if r.text.startswith(node_id + " "))
    wait_until(lambda: published["w2"]["level"] in row("w2") and "healthy" not in row("w1"), 60, "the health column",
               interval=0.3, ignore=(Exception,), detail=lambda: main_text(browser)[:2000])
    assert browser.driver.find_element("xpath", "//main//th[text()='health']")
    assert browser.console_errors() == []
    # the sentinel plugin stopped: the open page says so at its next redraw, without a reload
    browser.driver.get(f"{base}#/node/n1")
    wait_until(lambda: main_text(browser).startswith("Node n1") and chart_points(browser, "score") >= 2, 60,
               "n1's charts", interval=0.3, ignore=(Exception,))
    admin = [sys.executable, "-m", "cortex", "--socket", str(cluster.node("n1").admin_socket), "plugins"]
    done = procs.run([*admin, "stop", "sentinel"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    try:
        assert "Health charts (Sentinel): not available on this cluster" in wait_text(
            browser, "Health charts (Sentinel): not available", "the node page once the sentinel stopped")
        errors = browser.console_errors()  # the calls the page made while the tools were gone: 404s, nothing else
        assert all("/api/tool/sentinel_" in e["message"] and "404" in e["message"] for e in errors), errors
    finally:
        done = procs.run([*admin, "start", "sentinel"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    wait_until(lambda: chart_points(browser, "score") >= 1, 60, "n1's charts once the sentinel started again",
               interval=0.3, ignore=(Exception,), detail=lambda: main_text(browser)[:2000])
    assert browser.console_errors() == []


def test_a_submitted_task_appears_and_completes_live(cluster, browser, shots):
    base = login_url(cluster).split("login?")[0]
    browser.driver.get(f"{base}#/tasks")
    wait_text(browser, "Recent tasks", "the tasks page")
    submitted = cortex(cluster, "n1", "tools", "call", "tasks_submit", "--args", json.dumps(
        {"tasks": [{"kind": "shell", "name": "console-probe", "spec": {"command": "echo from-the-console"}}]}))
    task_id = submitted["task_ids"][0] if "task_ids" in submitted else submitted["tasks"][0]["id"]
    # no reload: the page redraws on the server's events
    wait_until(lambda: any(task_id in row.text and "succeeded" in row.text
                           for row in browser.driver.find_elements("css selector", "main tr")),
               60, f"task {task_id} shown succeeded", interval=0.3, ignore=(Exception,),
               detail=lambda: main_text(browser)[:2000])
    click(browser, f"//a[text()='{task_id}']", "the task's link")
    wait_text(browser, "from-the-console", "the task's output")
    browser.driver.save_screenshot(str(shots / "task.png"))
    assert browser.console_errors() == []


def test_a_deployed_service_shows_its_placement_health_and_lag(cluster, browser, shots):
    """A small shell service homed on w2 with n1 as its partner (w1 runs no services plugin)."""
    spec = {"name": "probe", "kind": "shell", "command": "exec sleep 3600",
            "placement": {"home": "w2", "partner": "n1"}, "restart": {"backoff": 0.5, "backoff_max": 2}}
    done = cortex(cluster, "n1", "tools", "call", "services_deploy", "--args", json.dumps({"spec": spec}))
    assert done["holder"] == "w2", done
    base = login_url(cluster).split("login?")[0]
    browser.driver.get(login_url(cluster))
    wait_text(browser, "Cluster overview", "the overview")
    browser.driver.get(f"{base}#/services")
    row = wait_until(lambda: " healthy" in service_row(browser, "probe") and service_row(browser, "probe"), 90,
                     "probe running healthy on w2", interval=0.3, ignore=(Exception,),
                     detail=lambda: main_text(browser)[:2000])
    assert row.startswith("probe shell w2 n1 w2"), row
    assert "running" in row and "no volume" in row
    headings = [th.text for th in browser.driver.find_elements("css selector", "main th")]
    for col in ("partners", "holder", "epoch", "ha state", "health", "restarts", "lag", "last downtime"):
        assert col in headings, headings
    browser.driver.save_screenshot(str(shots / "services.png"))
    assert browser.console_errors() == []


def test_an_action_the_role_does_not_allow_is_refused_naming_the_role(cluster, browser):
    base = login_url(cluster).split("login?")[0]
    browser.driver.get(f"{base}#/node/w1")
    wait_text(browser, "Membership", "the node page")
    # the live redraws patch the page in place: the button found before two of them is still the one shown
    button = browser.driver.find_element("xpath", "//button[text()='Drain']")
    renders = lambda: int(browser.driver.find_element("id", "main").get_attribute("data-renders"))  # noqa: E731
    seen = renders()
    wait_until(lambda: renders() >= seen + 2, 30, "two redraws", interval=0.2)
    button.click()
    wait_until(lambda: "needs the operator role" in note(browser), 30, "the refusal naming the operator role",
               interval=0.2, ignore=(Exception,))


def test_operator_actions_need_confirmation_and_run_once_per_key(cluster, browser, shots):
    url = login_url(cluster, role="operator")
    base = url.split("login?")[0]
    token = url.split("token=")[1]
    status, body, headers = http(base + "api/login", {"token": token})
    assert status == 200 and body["role"] == "operator"
    cookie = {"Cookie": headers["Set-Cookie"].split(";")[0]}
    status, body, _ = http(base + "api/tool/nodes_drain", {"node_id": "w1"}, cookie)
    assert status == 428 and "confirm" in body["error"]
    confirmed = {**cookie, "X-Cortex-Confirm": "yes", "Idempotency-Key": "console-test-drain-1"}
    first = http(base + "api/tool/nodes_drain", {"node_id": "w1"}, confirmed)
    again = http(base + "api/tool/nodes_drain", {"node_id": "w1"}, confirmed)
    assert first[0] == 200 and again[:2] == first[:2]
    # the same key sent three times at once (a browser retrying while the first is under way) runs once: a
    # restart of the real service counts one restart (restart_gen), not three
    before = cortex(cluster, "n1", "tools", "call", "services_show", "--args", '{"name": "probe"}')["restart_gen"]
    once = {**cookie, "X-Cortex-Confirm": "yes", "Idempotency-Key": "console-test-restart-1"}
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: http(base + "api/tool/services_restart", {"name": "probe"}, once)[:2],
                                range(3)))
    assert answers[0][0] == 200 and answers == [answers[0]] * 3
    after = cortex(cluster, "n1", "tools", "call", "services_show", "--args", '{"name": "probe"}')["restart_gen"]
    assert after == before + 1, (before, after)
    # in the browser: an operator's Undrain asks first, then runs
    browser.driver.delete_all_cookies()
    browser.driver.get(login_url(cluster, role="operator"))
    wait_text(browser, "Cluster overview", "the overview as operator")
    browser.console_errors()  # the reader's refused Drain (403) of the test before
    browser.driver.get(f"{base}#/node/w1")
    wait_text(browser, "Membership", "the node page")
    click(browser, "//button[text()='Undrain']", "the Undrain button")
    wait_until(lambda: browser.driver.find_element("id", "confirm").is_displayed(), 10, "the confirmation dialog")
    browser.driver.find_element("id", "confirm-ok").click()
    wait_until(lambda: "Undrain: done" in note(browser), 30, "the undrain done", interval=0.2, ignore=(Exception,))
    resources = cortex(cluster, "n1", "tools", "call", "nodes_resources")
    assert not next(r for r in resources if r["id"] == "w1")["drained"]
    # a takeover of the real service from its row: it moves from its home w2 to its partner n1
    browser.driver.get(f"{base}#/services")
    wait_until(lambda: service_row(browser, "probe").startswith("probe shell w2 n1 w2"), 60, "probe held by w2",
               interval=0.3, ignore=(Exception,), detail=lambda: main_text(browser)[:2000])
    click(browser, "//tr[td[1][text()='probe']]//button[text()='Take over']", "the Take over button")
    wait_until(lambda: browser.driver.find_element("id", "confirm").is_displayed(), 10, "the confirmation dialog")
    assert "Planned takeover of w2" in browser.driver.find_element("id", "confirm").text
    assert "probe: n1" in browser.driver.find_element("id", "confirm").text
    browser.driver.find_element("id", "confirm-ok").click()
    wait_until(lambda: "Take over: done" in note(browser), 60, "the takeover done", interval=0.2, ignore=(Exception,),
               detail=lambda: note(browser))
    row = wait_until(lambda: "taken_over" in service_row(browser, "probe") and " healthy" in service_row(
        browser, "probe") and service_row(browser, "probe"), 90, "probe healthy on n1", interval=0.3,
        ignore=(Exception,), detail=lambda: main_text(browser)[:2000])
    assert row.startswith("probe shell w2 n1 n1"), row
    moved = cortex(cluster, "n1", "tools", "call", "ha_status")["services"][0]
    assert (moved["holder"], moved["state"], moved["takeovers"]) == ("n1", "taken_over", 1), moved
    assert "1 takeover, 0 givebacks" in row
    browser.driver.save_screenshot(str(shots / "services-taken-over.png"))
    assert "Give back" in row
    assert browser.console_errors() == []


def service_row(browser, name: str) -> str:
    return next(r.text for r in browser.driver.find_elements("css selector", "main tr")
                if r.find_elements("xpath", f"td[1][text()='{name}']"))


def _contrast(fg: str, bg: str) -> float:
    def lum(rgb: str) -> float:
        parts = [float(x) for x in rgb[rgb.index("(") + 1:rgb.index(")")].split(",")[:3]]
        c = [p / 255 for p in parts]
        c = [x / 12.92 if x <= 0.03928 else ((x + 0.055) / 1.055) ** 2.4 for x in c]
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]
    a, b = sorted((lum(fg), lum(bg)), reverse=True)
    return (a + 0.05) / (b + 0.05)


def test_basic_accessibility_labels_contrast_keyboard(cluster, browser):
    from selenium.webdriver.common.keys import Keys

    base = login_url(cluster).split("login?")[0]
    browser.driver.delete_all_cookies()
    browser.driver.get(base)
    wait_text(browser, "Sign in", "the login page")
    for field in browser.driver.find_elements("css selector", "input, select, textarea"):
        assert browser.driver.find_elements("css selector", f"label[for='{field.get_attribute('id')}']"), field
    browser.driver.get(login_url(cluster))
    wait_text(browser, "Cluster overview", "the overview")
    pairs = browser.driver.execute_script("""
        const out = [];
        const bgOf = (el) => { for (; el; el = el.parentElement) { const c = getComputedStyle(el).backgroundColor;
            if (c && c !== 'rgba(0, 0, 0, 0)') return c; } return 'rgb(255, 255, 255)'; };
        for (const sel of ['body', 'main h1', '.top a', '.badge', 'th', 'td', '.muted', 'button', 'a[href^="#/node"]']) {
            for (const el of document.querySelectorAll(sel)) {
                out.push([sel, getComputedStyle(el).color, bgOf(el)]); } }
        return out;""")
    assert len(pairs) > 10
    low = [(sel, fg, bg, round(_contrast(fg, bg), 2)) for sel, fg, bg in pairs if _contrast(fg, bg) < 4.5]
    assert low == []
    # the first thing a keyboard reaches is the skip link; from the brand, TAB walks the pages with a visible focus
    assert browser.driver.execute_script("return document.querySelector('a, button, input').className") == "skip"
    browser.driver.execute_script("document.querySelector('.brand').focus()")
    seen = []
    for _ in range(6):
        browser.driver.switch_to.active_element.send_keys(Keys.TAB)
        el = browser.driver.switch_to.active_element
        seen.append(el.text)
        assert el.value_of_css_property("outline-style") != "none", el.text
    assert "Overview" in seen and "Services" in seen


def test_a_killed_node_shows_offline_and_a_dead_console_node_shows_a_banner(cluster, browser, shots):
    browser.driver.delete_all_cookies()
    browser.driver.get(login_url(cluster, "w1"))
    wait_text(browser, "Cluster overview", "w1's overview")
    cluster.kill("w2")
    # offline after liveness.offline_after (5 s here) without heartbeats; the deadline is generous for a busy machine
    wait_until(lambda: any("w2" in r.text and "offline" in r.text
                           for r in browser.driver.find_elements("css selector", "main tr")),
               90, "w2 shown offline", interval=0.5, ignore=(Exception,), detail=lambda: main_text(browser)[:2000])
    browser.driver.save_screenshot(str(shots / "offline.png"))
    cluster.kill("w1")  # the node serving this console
    banner = wait_until(lambda: browser.driver.find_element("id", "banner").is_displayed()
                        and browser.driver.find_element("id", "banner").text, 60, "the banner", interval=0.3)
    assert "w1 stopped answering" in banner
    assert "Nodes" in main_text(browser)  # the last data stays on screen
