"""GET /dashboard in a real headless Chromium, against a real Bigpipe node and a real downstream.

The page polls /stats, /metrics and /readyz; the test reads its figures from the DOM (each
carries a data-testid and its raw number in data-value), sends calls, and waits for the
figures to follow. Skipped, with the reason, when selenium, chromium or chromedriver is
missing (`build.sh` installs chromium and chromium-driver when it runs as root).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support import Bigpipe, Downstream, eventually, missing_tool, start_node

CALLS = 20
SCREENSHOT_COPY = Path("/tmp/bigpipe-dashboard.png")
NETWORK_SCHEMES = ("http:", "https:", "ws:", "wss:", "ftp:")
# Reads figures by data-testid: {testid: {"value": data-value or null, "text": textContent}}.
READ_FIGURES = """
const out = {};
for (const id of arguments[0]) {
  const node = document.querySelector('[data-testid="' + CSS.escape(id) + '"]');
  out[id] = node ? {value: node.getAttribute("data-value"), text: node.textContent} : null;
}
return out;
"""


def _executable(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/bin") / name, Path("/usr/lib/chromium") / name) if p.exists()),
        None,
    )


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium driven by chromedriver, with its console and network logs kept."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing_tool("selenium is not installed (pip install 'selenium>=4.20,<5')")
    chromium, chromedriver = _executable("chromium"), _executable("chromedriver")
    if chromium is None or chromedriver is None:
        missing_tool(
            "dashboard test needs chromium and chromedriver "
            "(apt-get install -y chromium chromium-driver; build.sh does it as root)"
        )
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The dashboard as the browser shows it. Every driver call runs in a thread, so the
    event loop (which also runs the downstream) keeps serving while the browser works."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    async def figures(self, *testids: str) -> dict[str, dict[str, str] | None]:
        return await asyncio.to_thread(self.driver.execute_script, READ_FIGURES, list(testids))

    async def value(self, testid: str) -> float | None:
        figure = (await self.figures(testid))[testid]
        if figure is None or not figure["value"]:
            return None
        return float(figure["value"])

    async def shows(self, expected: dict[str, float]) -> bool:
        figures = await self.figures(*expected)
        for testid, want in expected.items():
            figure = figures[testid]
            if figure is None or not figure["value"] or float(figure["value"]) != want:
                return False
            if figure["text"] != f"{want:,.0f}":  # the number is also what a person sees
                return False
        return True


async def test_dashboard_follows_calls_through_a_live_node(
    kafka: str,
    downstream: Downstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    processes: list[Bigpipe],
    browser: Any,
) -> None:
    bigpipe, topic = await start_node(kafka, tmp_path, processes)
    group_id = bigpipe.config["kafka.consumer.list"][0]["groupId"]
    prefix = f"group-{topic}-{group_id}"
    destination = f"destination-{topic}-{group_id}-http://127.0.0.1:{downstream.port}"
    page = Page(browser)

    async with http.get(f"{bigpipe.url}/dashboard") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        html = await response.text()
    absolute = re.findall(r"""(?:https?:)?//[A-Za-z0-9.\[\]-]+[^\s"'<>)]*""", html)
    assert absolute == [], f"the page must be self-contained, but names {absolute}"

    await asyncio.to_thread(browser.get, f"{bigpipe.url}/dashboard")

    async def group_shown() -> bool:
        figures = await page.figures(prefix, f"{prefix}-delivered", "accepted-total")
        return all(f is not None and f["value"] != "" for f in figures.values())

    await eventually(group_shown, 30, "the dashboard to show the consumer group")
    received_before = await page.value("received-total")
    accepted_before = await page.value("accepted-total")
    delivered_before = await page.value(f"{prefix}-delivered")
    assert received_before is not None and accepted_before is not None
    assert delivered_before is not None

    replies = await asyncio.gather(
        *(bigpipe.post_call(http, data=f"call-{i}", url=downstream.url()) for i in range(CALLS))
    )
    assert all((status, reply["errno"]) == (200, 0) for status, reply in replies), replies

    expected = {
        "accepted-total": accepted_before + CALLS,
        "received-total": received_before + CALLS,
        f"topic-{topic}-accepted": accepted_before + CALLS,
        f"{prefix}-delivered": delivered_before + CALLS,
        f"topic-{topic}-delivered": delivered_before + CALLS,
        f"{prefix}-handled": delivered_before + CALLS,
        f"{prefix}-failed": 0,
        f"{prefix}-dead-letter": 0,
        f"{prefix}-in-flight": 0,
        f"{destination}-attempts": CALLS,
        f"{destination}-in-flight": 0,
        f"{destination}-held": 0,
        "overloaded-total": 0,
    }
    await eventually(lambda: page.shows(expected), 60, f"the dashboard to count {CALLS} more calls")
    assert len(downstream.call_ids()) == CALLS

    header = await page.figures(
        "ready-state", f"{prefix}-breaker", "last-update", f"{destination}-breaker"
    )
    assert header["ready-state"] == {"value": "1", "text": "READY"}
    assert header[f"{destination}-breaker"] == {"value": "NORMAL", "text": "NORMAL"}
    breaker, updated = header[f"{prefix}-breaker"], header["last-update"]
    assert breaker is not None and breaker["text"] == "NORMAL"
    assert updated is not None and updated["value"]
    polls = await page.value("poll-count")
    assert polls is not None

    async def polled_again() -> bool:
        return (await page.value("poll-count") or 0) > polls

    await eventually(polled_again, 10, "the page to keep polling")

    # /metrics is served from the start: a page that shows it failing is a failure, and the
    # page's own parser must find the latency histograms in it.
    assert (await page.figures("metrics-state"))["metrics-state"] == {"value": "1", "text": "OK"}
    latencies = (
        f"{prefix}-p50",
        f"{prefix}-p99",
        f"topic-{topic}-ingest-p99",
        f"{destination}-p50",
        f"{destination}-p99",
    )

    async def latencies_shown() -> bool:
        figures = await page.figures(*latencies)
        return all(
            f is not None and f["value"] and f["text"].endswith("s") for f in figures.values()
        )

    await eventually(latencies_shown, 15, "delivery and ingest latencies from /metrics")

    screenshot = tmp_path / "dashboard.png"
    assert await asyncio.to_thread(browser.save_screenshot, str(screenshot))
    await asyncio.to_thread(shutil.copyfile, screenshot, SCREENSHOT_COPY)
    print(f"\ndashboard screenshot: {screenshot} (copy: {SCREENSHOT_COPY})")

    console = await asyncio.to_thread(browser.get_log, "browser")
    # A failed fetch is a console entry from the "network" source; anything else at SEVERE
    # is a JavaScript error or a console.error from the page. Neither may happen.
    errors = [e for e in console if e["level"] == "SEVERE" or e.get("source") == "network"]
    assert errors == [], f"the page logged errors or failed requests: {errors}"

    requests = _requests(await asyncio.to_thread(browser.get_log, "performance"))
    dashboard = f"{bigpipe.url}/dashboard"
    assert (dashboard, f"{bigpipe.url}/stats") in requests
    # Chromium's own chrome:// pages are not the dashboard's doing; any network request is.
    outside = sorted(
        url
        for document, url in requests
        if (document == dashboard or url.startswith(NETWORK_SCHEMES))
        and not url.startswith((f"{bigpipe.url}/", "data:", "blob:"))
    )
    assert outside == [], f"requests outside the node at 127.0.0.1: {outside}"
    assert await bigpipe.stop() == 0


def _requests(performance_log: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(document URL, requested URL) of every request the browser sent."""
    requests = set()
    for entry in performance_log:
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            params = message["params"]
            requests.add((params.get("documentURL", ""), params["request"]["url"]))
    return requests
