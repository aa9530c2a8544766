"""The operator's page (issue 19) in a real browser: Debian's Chromium driven by Playwright,
against the service as its own process and the fake hub.

A newcomer's path (download, watch the bar, verify, delete), cancel, a corrupt model's failed
verification, the API's own words for a 409 and a 429, the API key, and a narrow window with the
longest repo id. ``MODELS_SCREENSHOT=path`` keeps the screenshot of running downloads there
(``make screenshot`` refreshes the README's)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

from fakehub import FakeHub, Generated, RepoBuilder, trickle
from tests.helpers import MB, running_service

pytestmark = pytest.mark.browser

CHROMIUM = (
    os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
WAIT = 60_000  # ms: the longest any step may take on a busy machine
KEY = "browser-test-key-0123456789"
expect.set_options(timeout=WAIT)


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (`make test` installs it when run as root)")
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
def browser(playwright: Playwright) -> Iterator[Browser]:
    assert CHROMIUM is not None
    # As root (CI) Chromium refuses its sandbox; the page is our own.
    launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    yield launched
    launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(WAIT)
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    # A refused answer logs "Failed to load resource" (expected: the tests make some); anything
    # the page's security policy blocked would be a broken page.
    opened.on(
        "console",
        lambda message: errors.append(message.text) if "Content Security" in message.text else None,
    )
    yield opened
    context.close()
    assert errors == [], errors  # no script error on any page of a test


@pytest.fixture
def models(repos: RepoBuilder, hub: FakeHub) -> FakeHub:
    repos.commit("org/small", {"config.json": "{}", "model.safetensors": Generated(2 * MB, seed=1)})
    repos.commit("org/slow", {"config.json": "{}", "model.safetensors": Generated(12 * MB, seed=2)})
    repos.commit("org/other", {"config.json": "{}", "model.safetensors": Generated(8 * MB, seed=3)})
    hub.add_fault(trickle(2 * MB, path="*/org/slow/resolve/*"))
    hub.add_fault(trickle(MB, path="*/org/other/resolve/*"))
    return hub


def start(page: Page, repo: str) -> None:
    page.fill("#repo", repo)
    page.click("#start")


def test_a_new_user_downloads_watches_verifies_and_removes_a_model(
    page: Page, models: FakeHub, cache_dir: Path, tmp_path: Path
) -> None:
    with running_service(cache_dir, models.url, tmp_path / "service.log") as (url, _):
        answer = page.goto(url)
        assert answer is not None
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        expect(page.locator("#connection")).to_have_text("Live")
        expect(page.locator("#no-models")).to_be_visible()
        start(page, "org/small")
        expect(page.locator("#models li.card[data-repo='org/small'] .status")).to_have_text(
            "DOWNLOADED"
        )
        # The size first.
        page.fill("#repo", "org/slow")
        page.click("#preview")
        expect(page.locator("#plan")).to_contain_text("2 of 2 files, 12.6 MB")
        expect(page.locator("#plan")).to_contain_text("fits")
        page.click("#start")
        expect(page.locator("#form-error")).to_be_empty()
        start(page, "org/other")
        # The bars move (the event stream, no reload).
        bar = page.locator("#downloads li.card[data-task='org/slow:latest'] progress")
        expect(bar).to_be_visible()
        first = float(bar.get_attribute("value") or 0)
        page.wait_for_function(
            f"""() => {{
                const bar = document.querySelector("li.card[data-task='org/slow:latest'] progress");
                return bar && Number(bar.value) > {first} + 2000000;
            }}"""
        )
        expect(
            page.locator("#downloads li.card[data-task='org/slow:latest'] .figures")
        ).to_contain_text(re.compile(r"downloading: .* of 12\.6 MB \(.*%\), .*/s, .* left"))
        shot = Path(os.environ.get("MODELS_SCREENSHOT") or tmp_path / "page.png")
        page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # DOWNLOADED: it moves from the downloads to the cache.
        slow = page.locator("#models li.card[data-repo='org/slow']")
        expect(slow.locator(".status")).to_have_text("DOWNLOADED")
        expect(page.locator("#downloads li.card[data-task='org/slow:latest']")).to_have_count(0)
        expect(slow).to_contain_text("refs main")
        # Verify.
        slow.get_by_role("button", name="Verify").click()
        expect(page.locator("#alerts")).to_contain_text("org/slow at")
        expect(page.locator("#alerts")).to_contain_text("verified, 2 files match")
        # Delete, after a confirmation that says what it frees.
        slow.get_by_role("button", name="Delete").click()
        expect(page.locator("#confirm-text")).to_contain_text("frees up to 12.6 MB")
        page.click("#confirm-ok")
        expect(page.locator("#models li.card[data-repo='org/slow']")).to_have_count(0)
        expect(page.locator("#alerts")).to_contain_text("deleted, 12.6 MB freed")


def test_cancel_and_the_apis_words_for_a_409_and_a_429(
    page: Page, models: FakeHub, cache_dir: Path, tmp_path: Path
) -> None:
    with running_service(
        cache_dir, models.url, tmp_path / "service.log", MODELS_MAX_CONCURRENT_DOWNLOADS="1"
    ) as (url, _):
        page.goto(url)
        start(page, "org/slow")
        running = page.locator("#downloads li.card[data-task='org/slow:latest']")
        expect(running).to_be_visible()
        # 409: the same revision again.
        start(page, "org/slow")
        expect(page.locator("#form-error")).to_have_text(
            "org/slow:latest is already downloading; poll POST /api/models/status"
        )
        # 429: every slot taken.
        start(page, "org/other")
        expect(page.locator("#form-error")).to_contain_text(
            "all 1 download slots are busy; retry in"
        )
        # Bad input never leaves the page.
        sent: list[str] = []
        page.on("request", lambda request: sent.append(request.url))
        start(page, "not a repo")
        expect(page.locator("#form-error")).to_contain_text("namespace/name")
        expect(page.locator("#repo")).to_have_attribute("aria-invalid", "true")
        page.fill("#repo", "org/slow")
        page.fill("#revision", "../etc")
        page.click("#start")
        expect(page.locator("#form-error")).to_contain_text("branch or tag name")
        assert not [u for u in sent if "/download" in u]
        # Cancel.
        running.get_by_role("button", name="Cancel").click()
        expect(running).to_have_count(0)
        expect(page.locator("#no-downloads")).to_be_visible()


def test_a_corrupt_model_fails_its_verification_on_the_page(
    page: Page, models: FakeHub, cache_dir: Path, tmp_path: Path
) -> None:
    with running_service(cache_dir, models.url, tmp_path / "service.log") as (url, _):
        page.goto(url)
        start(page, "org/small")
        small = page.locator("#models li.card[data-repo='org/small']")
        expect(small.locator(".status")).to_have_text("DOWNLOADED")
        blob = next(
            p
            for p in (cache_dir / "models--org--small" / "blobs").iterdir()
            if p.stat().st_size == 2 * MB
        )
        with blob.open("r+b") as f:
            f.write(b"rot")
        small.get_by_role("button", name="Verify").click()
        expect(page.locator("#alerts")).to_contain_text(
            "verification failed: model.safetensors does not match"
        )
        expect(page.locator("#problems")).to_contain_text("model.safetensors does not match")


def test_with_an_api_key_it_asks_for_it_and_keeps_it_in_the_tab_only(
    page: Page, models: FakeHub, cache_dir: Path, tmp_path: Path
) -> None:
    with running_service(
        cache_dir,
        models.url,
        tmp_path / "service.log",
        MODELS_API_KEY=KEY,
        MODELS_READ_API_KEY=KEY,
    ) as (url, _):
        page.goto(url)
        expect(page.locator("#key-dialog")).to_be_visible()
        page.fill("#key", KEY)
        page.click("#key-ok")
        expect(page.locator("#connection")).to_have_text("Live")
        expect(page.locator("#no-models")).to_be_visible()
        start(page, "org/small")
        expect(page.locator("#models li.card[data-repo='org/small'] .status")).to_have_text(
            "DOWNLOADED"
        )
        assert page.evaluate("sessionStorage.getItem('models-api-key')") == KEY
        assert page.evaluate("localStorage.length") == 0


def test_a_narrow_window_the_longest_repo_id_and_the_keyboard(
    browser: Browser, repos: RepoBuilder, hub: FakeHub, cache_dir: Path, tmp_path: Path
) -> None:
    longest = "n" * 96 + "/" + "m" * 96  # 193 characters, the longest repo id there is
    repos.commit(longest, {"config.json": "{}"})
    context = browser.new_context(viewport={"width": 360, "height": 740})
    page = context.new_page()
    page.set_default_timeout(WAIT)
    with running_service(cache_dir, hub.url, tmp_path / "service.log") as (url, _):
        page.goto(url)
        expect(page.locator("#connection")).to_have_text("Live")
        # Keyboard only: focus the field, type, Enter submits.
        page.focus("#repo")
        page.keyboard.type(longest)
        page.keyboard.press("Enter")
        item = page.locator(f"#models li.card[data-repo='{longest}']")
        expect(item.locator(".status")).to_have_text("DOWNLOADED")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 360, f"the page is {width} px wide in a 360 px window"
        # The delete confirmation: reachable and answerable with the keyboard (Escape cancels).
        item.get_by_role("button", name="Delete").focus()
        page.keyboard.press("Enter")
        expect(page.locator("#confirm")).to_be_visible()
        page.keyboard.press("Escape")
        expect(page.locator("#confirm")).to_be_hidden()
        expect(item).to_have_count(1)
    context.close()
