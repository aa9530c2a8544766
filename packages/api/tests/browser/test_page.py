"""The operator's page (issue 19) in a real browser: Debian's Chromium driven by Playwright,
against the service as its own process and the fake hub.

A newcomer's path (download, watch the bar, verify, delete), cancel, a corrupt model's failed
verification, the API's own words for a 409 and a 429, the API key, and a narrow window with the
longest repo id. ``MODELS_SCREENSHOT=path`` keeps the screenshot of running downloads there
(``make screenshot`` refreshes the one in ``docs/using.md``)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from fakehub import FakeHub, Generated, RepoBuilder, trickle
from tests.helpers import MB, make_revision, running_service, wait_for_status

pytestmark = pytest.mark.browser

CHROMIUM = (
    os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
WAIT = 60_000  # ms: the longest any step may take on a busy machine
KEY = "browser-test-key-0123456789"
expect.set_options(timeout=WAIT)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Chromium for one test: Playwright's sync API would hold an event loop for the whole
    worker, which the asyncio tests sharing the worker then cannot run theirs beside."""
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (`make test` installs it when run as root)")
    async with async_playwright() as driver:
        # As root (CI) Chromium refuses its sandbox; the page is our own.
        launched = await driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    opened = await context.new_page()
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
    await context.close()
    assert errors == [], errors  # no script error on any page of a test


@pytest.fixture
def models(repos: RepoBuilder, hub: FakeHub) -> FakeHub:
    repos.commit("org/small", {"config.json": "{}", "model.safetensors": Generated(2 * MB, seed=1)})
    repos.commit("org/slow", {"config.json": "{}", "model.safetensors": Generated(12 * MB, seed=2)})
    repos.commit("org/other", {"config.json": "{}", "model.safetensors": Generated(8 * MB, seed=3)})
    hub.add_fault(trickle(2 * MB, path="*/org/slow/resolve/*"))
    hub.add_fault(trickle(MB, path="*/org/other/resolve/*"))
    return hub


async def start(page: Page, repo: str) -> None:
    await page.fill("#repo", repo)
    await page.click("#start")


async def test_a_new_user_downloads_watches_verifies_and_removes_a_model(
    page: Page, models: FakeHub, cache_dir: Path, tmp_path: Path
) -> None:
    with running_service(cache_dir, models.url, tmp_path / "service.log") as (url, _):
        answer = await page.goto(url)
        assert answer is not None
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        await expect(page.locator("#connection")).to_have_text("Live")
        await expect(page.locator("#no-models")).to_be_visible()
        await start(page, "org/small")
        await expect(page.locator("#models li.card[data-repo='org/small'] .status")).to_have_text(
            "DOWNLOADED"
        )
        # The size first.
        await page.fill("#repo", "org/slow")
        await page.click("#preview")
        await expect(page.locator("#plan")).to_contain_text("2 of 2 files, 12.6 MB")
        await expect(page.locator("#plan")).to_contain_text("fits")
        await page.click("#start")
        await expect(page.locator("#form-error")).to_be_empty()
        await start(page, "org/other")
        # The bars move (the event stream, no reload).
        bar = page.locator("#downloads li.card[data-task='org/slow:latest'] progress")
        await expect(bar).to_be_visible()
        first = float(await bar.get_attribute("value") or 0)
        await page.wait_for_function(
            f"""() => {{
                const bar = document.querySelector("li.card[data-task='org/slow:latest'] progress");
                return bar && Number(bar.value) > {first} + 2000000;
            }}"""
        )
        await expect(
            page.locator("#downloads li.card[data-task='org/slow:latest'] .figures")
        ).to_contain_text(re.compile(r"downloading: .* of 12\.6 MB \(.*%\), .*/s, .* left"))
        shot = Path(os.environ.get("MODELS_SCREENSHOT") or tmp_path / "page.png")
        await page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # DOWNLOADED: it moves from the downloads to the cache.
        slow = page.locator("#models li.card[data-repo='org/slow']")
        await expect(slow.locator(".status")).to_have_text("DOWNLOADED")
        await expect(page.locator("#downloads li.card[data-task='org/slow:latest']")).to_have_count(
            0
        )
        await expect(slow).to_contain_text("refs main")
        # Verify.
        await slow.get_by_role("button", name="Verify").click()
        await expect(page.locator("#alerts")).to_contain_text("org/slow at")
        await expect(page.locator("#alerts")).to_contain_text("verified, 2 files match")
        # Delete, after a confirmation that says what it frees.
        await slow.get_by_role("button", name="Delete").click()
        await expect(page.locator("#confirm-text")).to_contain_text("frees up to 12.6 MB")
        await page.click("#confirm-ok")
        await expect(page.locator("#models li.card[data-repo='org/slow']")).to_have_count(0)
        await expect(page.locator("#alerts")).to_contain_text("deleted, 12.6 MB freed")


async def test_cancel_and_the_apis_words_for_a_409_and_a_429(
    page: Page, models: FakeHub, cache_dir: Path, tmp_path: Path
) -> None:
    with running_service(
        cache_dir, models.url, tmp_path / "service.log", MODELS_MAX_CONCURRENT_DOWNLOADS="1"
    ) as (url, _):
        await page.goto(url)
        await start(page, "org/slow")
        running = page.locator("#downloads li.card[data-task='org/slow:latest']")
        await expect(running).to_be_visible()
        # 409: the same revision again.
        await start(page, "org/slow")
        await expect(page.locator("#form-error")).to_have_text(
            "org/slow:latest is already downloading; poll POST /api/models/status"
        )
        # 429: every slot taken.
        await start(page, "org/other")
        await expect(page.locator("#form-error")).to_contain_text(
            "all 1 download slots are busy; retry in"
        )
        # Bad input never leaves the page.
        sent: list[str] = []
        page.on("request", lambda request: sent.append(request.url))
        await start(page, "not a repo")
        await expect(page.locator("#form-error")).to_contain_text("namespace/name")
        await expect(page.locator("#repo")).to_have_attribute("aria-invalid", "true")
        await page.fill("#repo", "org/slow")
        await page.fill("#revision", "../etc")
        await page.click("#start")
        await expect(page.locator("#form-error")).to_contain_text("branch or tag name")
        assert not [u for u in sent if "/download" in u]
        # Cancel.
        await running.get_by_role("button", name="Cancel").click()
        await expect(running).to_have_count(0)
        await expect(page.locator("#no-downloads")).to_be_visible()


async def test_a_corrupt_model_fails_its_verification_on_the_page(
    page: Page, models: FakeHub, cache_dir: Path, tmp_path: Path
) -> None:
    with running_service(cache_dir, models.url, tmp_path / "service.log") as (url, _):
        await page.goto(url)
        await start(page, "org/small")
        small = page.locator("#models li.card[data-repo='org/small']")
        await expect(small.locator(".status")).to_have_text("DOWNLOADED")
        blob = next(
            p
            for p in (cache_dir / "models--org--small" / "blobs").iterdir()
            if p.stat().st_size == 2 * MB
        )
        with blob.open("r+b") as f:
            f.write(b"rot")
        await small.get_by_role("button", name="Verify").click()
        await expect(page.locator("#alerts")).to_contain_text(
            "verification failed: model.safetensors does not match"
        )
        await expect(page.locator("#problems")).to_contain_text("model.safetensors does not match")


async def test_a_prune_a_silent_vllm_refuses_is_a_warning_that_offers_the_forced_prune(
    page: Page, models: FakeHub, repos: RepoBuilder, cache_dir: Path, tmp_path: Path
) -> None:
    """With a vLLM server that does not answer, a prune is refused unless forced: the page says so
    as a warning (it was green, and named an API flag the page did not offer), offers the forced
    prune, and confirms it first. The header says which service the page looks at (issue 30)."""
    commit = repos.commit("org/old", {"config.json": "{}"})
    env = {"MODELS_VLLM_URLS": "http://127.0.0.1:9", "MODELS_VLLM_TIMEOUT_SECONDS": "1"}
    with running_service(cache_dir, models.url, tmp_path / "service.log", **env) as (url, _):
        # A revision downloaded by its commit: no branch names it, prune takes it.
        async with httpx.AsyncClient(base_url=url) as client:
            body = {"hf_repo": "org/old", "hf_commit": commit}
            assert (await client.post("/api/models/download", json=body)).status_code == 202
            assert (await wait_for_status(client, body, {"DOWNLOADED"}))["status"] == "DOWNLOADED"
        await page.goto(url)
        host = url.removeprefix("http://")
        await expect(page.locator("#about")).to_contain_text(f"{host}, version ")
        await expect(page.locator("#about a[href='/docs']")).to_have_text("API docs")
        await expect(page.locator("#about a[href='/metrics']")).to_have_text("Metrics")
        await expect(page.locator("#models li.card[data-repo='org/old']")).to_be_visible()
        await page.click("#prune")
        warning = page.locator("#alerts .alert.warn")
        await expect(warning).to_contain_text("did not answer")
        await expect(warning).not_to_contain_text("?force=true")
        await warning.get_by_role("button", name="Prune anyway").click()
        await expect(page.locator("#confirm-text")).to_contain_text("may be among them")
        await page.click("#confirm-ok")
        await expect(page.locator("#alerts .alert.info")).to_contain_text("Pruned 1 revision(s)")
        await expect(page.locator("#models li.card[data-repo='org/old']")).to_have_count(0)


async def test_a_pin_from_the_page_and_an_eviction_seen_live(
    page: Page, models: FakeHub, repos: RepoBuilder, cache_dir: Path, tmp_path: Path
) -> None:
    """Issue 31 on the page: a revision pinned with its button says so; an eviction (a download
    that needed room in the budget) is told as it happens, and the evicted card goes, with no
    download card made of the event."""
    repos.commit("org/a", {"w.bin": Generated(2 * MB, seed=11)})
    repos.commit("org/b", {"w.bin": Generated(2 * MB, seed=12)})
    repos.commit("org/c", {"w.bin": Generated(2 * MB, seed=13)})
    with running_service(cache_dir, models.url, tmp_path / "fill.log") as (url, _):
        async with httpx.AsyncClient(base_url=url) as client:
            for name in ("org/a", "org/b"):
                body = {"hf_repo": name}
                assert (await client.post("/api/models/download", json=body)).status_code == 202
                assert (await wait_for_status(client, body, {"DOWNLOADED"}))[
                    "status"
                ] == "DOWNLOADED"
            usage = (await client.get("/api/models/budget")).json()["usage_bytes"]
    budget = {"MODELS_CACHE_BUDGET_BYTES": str(usage + MB)}
    with running_service(cache_dir, models.url, tmp_path / "service.log", **budget) as (url, _):
        await page.goto(url)
        card_a = page.locator("#models li.card[data-repo='org/a']")
        await card_a.get_by_role("button", name="Pin").click()
        await expect(card_a.locator(".note.pinned")).to_have_text(
            "pinned: never evicted nor pruned"
        )
        await expect(card_a.get_by_role("button", name="Unpin")).to_be_visible()
        async with httpx.AsyncClient(base_url=url) as client:
            status = (await client.post("/api/models/status", json={"hf_repo": "org/a"})).json()
            assert status["pinned"] is True
        await start(page, "org/c")
        # org/a is pinned: org/b, the other least recently used, makes room.
        evicted = page.locator("#alerts .alert.info", has_text="Evicted org/b")
        await expect(evicted).to_contain_text("room for org/c:latest")
        await expect(page.locator("#models li.card[data-repo='org/b']")).to_have_count(0)
        await expect(page.locator("#models li.card[data-repo='org/c'] .status")).to_have_text(
            "DOWNLOADED"
        )
        await expect(card_a).to_be_visible()
        await expect(page.locator("#downloads li.card")).to_have_count(0)


async def test_the_history_and_the_failures_outlive_a_reload_and_a_restart(
    page: Page, models: FakeHub, repos: RepoBuilder, cache_dir: Path, tmp_path: Path
) -> None:
    """Issue 30: what happened (a download, a failure) is in the history table, named by the key
    that asked (never the key), and a failure stays among the failures after a reload and after
    the service restarted (they had been kept by the tab alone)."""
    repos.commit("org/gated", {"config.json": "{}"}, gated=True)
    env = {"MODELS_API_KEY": f"ops:{KEY}", "MODELS_READ_API_KEY": KEY}

    async def open_with_the_key(url: str) -> None:
        await page.goto(url)
        await expect(page.locator("#key-dialog")).to_be_visible()
        await page.fill("#key", KEY)
        await page.click("#key-ok")
        await expect(page.locator("#connection")).to_have_text("Live")

    with running_service(cache_dir, models.url, tmp_path / "first.log", **env) as (url, _):
        await open_with_the_key(url)
        await expect(page.locator("#no-history")).to_be_visible()
        await start(page, "org/small")
        small = page.locator("#models li.card[data-repo='org/small']")
        await expect(small.locator(".status")).to_have_text("DOWNLOADED")
        await start(page, "org/gated")
        await expect(page.locator("#problems")).to_contain_text("org/gated is gated")
        await expect(page.locator("#history tbody tr").first).to_contain_text("failed")
        downloaded = page.locator("#history tr.downloaded")
        await expect(downloaded).to_contain_text("org/small")
        await expect(downloaded).to_contain_text("ops")
        await page.reload()  # the key stays in the tab
        await expect(page.locator("#problems")).to_contain_text("org/gated is gated")
    with running_service(cache_dir, models.url, tmp_path / "second.log", **env) as (url, _):
        await open_with_the_key(url)  # another port: another origin, the key asked again
        await expect(page.locator("#problems")).to_contain_text("org/gated is gated")
        await expect(page.locator("#history tr.failed")).to_contain_text("org/gated")
        await expect(page.locator("#history tr.downloaded")).to_contain_text("2.1 MB")
        assert KEY not in await page.locator("#history").inner_text()


async def test_the_throughput_chart_and_what_fills_the_disk(
    page: Page, models: FakeHub, repos: RepoBuilder, cache_dir: Path, tmp_path: Path
) -> None:
    """Issue 30: the page charts the service's throughput and each running download's speed, and
    draws what fills the disk: each model's share of the cache, and within a model what each
    revision holds alone and what its revisions share."""
    shared = Generated(4 * MB, seed=21)
    old = repos.commit("org/shared", {"config.json": '{"v": 1}', "w.bin": shared})
    repos.commit("org/shared", {"config.json": '{"v": 2}', "w.bin": shared, "x.bin": "x" * 1000})
    with running_service(cache_dir, models.url, tmp_path / "service.log") as (url, _):
        async with httpx.AsyncClient(base_url=url) as client:
            for body in (
                {"hf_repo": "org/small"},
                {"hf_repo": "org/shared", "hf_commit": old},
                {"hf_repo": "org/shared"},
            ):
                assert (await client.post("/api/models/download", json=body)).status_code == 202
                answer = await wait_for_status(client, body, {"DOWNLOADED", "NOT_FOUND"})
                assert answer["status"] == "DOWNLOADED"
        await page.goto(url)
        rows = page.locator("#usage-rows li")
        await expect(rows).to_have_count(2)
        # Largest first; the weights the two revisions share drawn once, as shared.
        assert await rows.evaluate_all("rows => rows.map(r => r.dataset.repo)") == [
            "org/shared",
            "org/small",
        ]
        both = page.locator("#usage-rows li[data-repo='org/shared']")
        await expect(both.locator("rect.alone")).to_have_count(2)
        await expect(both.locator("rect.shared")).to_have_count(1)
        await expect(both).to_contain_text("4.2 MB shared by its revisions")
        await expect(both).to_contain_text("(main) 1.0 KB alone")
        await expect(page.locator("#usage-bar rect[data-repo]")).to_have_count(2)
        await expect(page.locator("#throughput-text")).to_contain_text("6.3 MB fetched")

        await start(page, "org/slow")  # 12 MiB at 2 MB/s
        card = page.locator("#downloads li.card[data-task='org/slow:latest']")
        await expect(card.locator(".spark svg polyline")).to_have_count(1)
        await expect(page.locator("#throughput-text")).to_contain_text("now")
        # The chart is not flat: some point stands above the baseline.
        heights = await page.locator("#throughput-chart polyline").evaluate(
            "line => line.getAttribute('points').split(' ').map(p => Number(p.split(',')[1]))"
        )
        assert min(heights) < 60
        await expect(page.locator("#models li.card[data-repo='org/slow'] .status")).to_have_text(
            "DOWNLOADED"
        )
        await expect(page.locator("#usage-rows li").first).to_have_attribute(
            "data-repo", "org/slow"
        )
        await expect(card).to_have_count(0)


async def test_a_large_cache_is_shown_a_page_at_a_time_and_found_as_one_types(
    page: Page, models: FakeHub, cache_dir: Path, tmp_path: Path
) -> None:
    """Issue 29: the page asks for a page of the list at a time (never all of it), finds a model
    as the operator types, sorts, and shows a download that ends among what it shows."""
    for i in range(120):
        make_revision(cache_dir, f"bulk/m{i:03d}", f"{i + 1:040x}", {"w.bin": b"w" * (i + 1)})
    with running_service(cache_dir, models.url, tmp_path / "service.log") as (url, _):
        await page.goto(url)
        cards = page.locator("#models li.card")
        await expect(cards).to_have_count(50)
        await expect(page.locator("#models-count")).to_have_text("50 of 120 shown")
        await page.click("#more-models")
        await expect(cards).to_have_count(100)
        await page.click("#more-models")
        await expect(cards).to_have_count(120)
        await expect(page.locator("#more-models")).to_be_hidden()
        await page.fill("#search", "M07")  # as one types: no button to press
        await expect(cards).to_have_count(10)
        await expect(page.locator("#models-count")).to_have_text("10 revision(s)")
        await page.select_option("#sort", "size")
        await expect(cards.first).to_have_attribute("data-repo", "bulk/m079")
        await page.fill("#search", "org/sm")
        await expect(page.locator("#no-models")).to_have_text("No cached model matches.")
        await start(page, "org/small")
        await expect(cards).to_have_count(1)
        await expect(cards.first.locator(".status")).to_have_text("DOWNLOADED")


async def test_with_an_api_key_it_asks_for_it_and_keeps_it_in_the_tab_only(
    page: Page, models: FakeHub, cache_dir: Path, tmp_path: Path
) -> None:
    with running_service(
        cache_dir,
        models.url,
        tmp_path / "service.log",
        MODELS_API_KEY=KEY,
        MODELS_READ_API_KEY=KEY,
    ) as (url, _):
        await page.goto(url)
        await expect(page.locator("#key-dialog")).to_be_visible()
        await page.fill("#key", KEY)
        await page.click("#key-ok")
        await expect(page.locator("#connection")).to_have_text("Live")
        await expect(page.locator("#no-models")).to_be_visible()
        await start(page, "org/small")
        await expect(page.locator("#models li.card[data-repo='org/small'] .status")).to_have_text(
            "DOWNLOADED"
        )
        assert await page.evaluate("sessionStorage.getItem('models-api-key')") == KEY
        assert await page.evaluate("localStorage.length") == 0


async def test_a_narrow_window_the_longest_repo_id_and_the_keyboard(
    browser: Browser, repos: RepoBuilder, hub: FakeHub, cache_dir: Path, tmp_path: Path
) -> None:
    longest = "n" * 96 + "/" + "m" * 96  # 193 characters, the longest repo id there is
    repos.commit(longest, {"config.json": "{}"})
    context = await browser.new_context(viewport={"width": 360, "height": 740})
    page = await context.new_page()
    page.set_default_timeout(WAIT)
    with running_service(cache_dir, hub.url, tmp_path / "service.log") as (url, _):
        await page.goto(url)
        await expect(page.locator("#connection")).to_have_text("Live")
        # Keyboard only: focus the field, type, Enter submits.
        await page.focus("#repo")
        await page.keyboard.type(longest)
        await page.keyboard.press("Enter")
        item = page.locator(f"#models li.card[data-repo='{longest}']")
        await expect(item.locator(".status")).to_have_text("DOWNLOADED")
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 360, f"the page is {width} px wide in a 360 px window"
        # The delete confirmation: reachable and answerable with the keyboard (Escape cancels).
        await item.get_by_role("button", name="Delete").focus()
        await page.keyboard.press("Enter")
        await expect(page.locator("#confirm")).to_be_visible()
        await page.keyboard.press("Escape")
        await expect(page.locator("#confirm")).to_be_hidden()
        await expect(item).to_have_count(1)
    await context.close()
