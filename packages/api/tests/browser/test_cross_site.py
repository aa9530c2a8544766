"""A foreign site cannot drive the service through a real browser (no key set, the default).

Chromium resolves a foreign name to 127.0.0.1 (``--host-resolver-rules``: what DNS rebinding
does), and a foreign page on another origin sends the requests a page can send without CORS (a
``no-cors`` fetch, a form). The service starts nothing, deletes nothing, and shows that page
nothing."""

from __future__ import annotations

import http.server
import os
import shutil
import socketserver
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, async_playwright

from fakehub import FakeHub, RepoBuilder
from tests.helpers import running_service

pytestmark = pytest.mark.browser

CHROMIUM = (
    os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
ATTACKER = "evil.example"


@pytest.fixture
async def rebinding_browser() -> AsyncIterator[Browser]:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (`make test` installs it when run as root)")
    async with async_playwright() as driver:
        launched = await driver.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", f"--host-resolver-rules=MAP {ATTACKER} 127.0.0.1"],
        )
        yield launched
        await launched.close()


@pytest.fixture
def foreign_site(tmp_path: Path) -> Iterator[str]:
    """A page of another origin (another port of 127.0.0.1), served as any web site is."""
    root = tmp_path / "site"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Quiet)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}|{root}"
    finally:
        server.shutdown()
        server.server_close()


async def test_dns_rebinding_and_foreign_pages_drive_nothing(
    rebinding_browser: Browser,
    hub: FakeHub,
    repos: RepoBuilder,
    cache_dir: Path,
    tmp_path: Path,
    foreign_site: str,
) -> None:
    repos.commit("org/model", {"config.json": "{}"})
    site, folder = foreign_site.split("|")
    with running_service(cache_dir, hub.url, tmp_path / "service.log") as (url, _):
        port = url.rsplit(":", 1)[1]
        rebound = f"http://{ATTACKER}:{port}"
        context = await rebinding_browser.new_context()
        page = await context.new_page()
        # The rebound name: the browser takes the service for that site, and sends its name.
        opened = await page.goto(f"{rebound}/")
        assert opened is not None
        assert opened.status == 400
        read = await page.evaluate(
            """async (base) => {
                const answer = await fetch(base + "/api/models/list");
                return [answer.status, await answer.text()];
            }""",
            rebound,
        )
        assert read[0] == 400
        assert "org/model" not in read[1]
        started = await page.evaluate(
            """async (base) => (await fetch(base + "/api/models/download", {
                method: "POST", headers: {"Content-Type": "application/json"},
                body: JSON.stringify({hf_repo: "org/model"})})).status""",
            rebound,
        )
        assert started == 400
        # A page of another site: what it may send without reading the answer.
        Path(folder, "attack.html").write_text(
            f"""<!doctype html><form id=f method=POST action="{url}/api/models/prune"
            enctype="text/plain"><input name='{{"dry_run": false, "x": "' value='"}}'></form>
            <script>
            fetch("{url}/api/models/download", {{method: "POST", mode: "no-cors",
              headers: {{"Content-Type": "text/plain"}}, body: '{{"hf_repo": "org/model"}}'}})
              .finally(() => document.getElementById("f").submit());
            </script>"""
        )
        hub.reset_counts()
        await page.goto(f"{site}/attack.html")
        await page.wait_for_url("**/api/models/prune")  # the form, submitted after the fetch
        await page.wait_for_load_state()
        assert "another site" in (await page.content())
        await context.close()
        # Nothing was started: the Hub heard nothing, and the model is not there.
        assert hub.count() == 0
        assert not (cache_dir / "models--org--model").exists()
