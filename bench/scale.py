"""Ten thousand cached models (issue 29): GET /list against huggingface_hub's ``scan_cache_dir``
of the same cache (target at most 0.1 x), POST /status while six lists run at once (target p99 at
most 20 ms), the prune's dry run (target at most 1 s), a page of the list, and the service's
memory per 1,000 models. The cache is written in the library's layout (blobs, snapshot links,
refs, the service's file lists), built once and kept in bench/.data.

    python bench/scale.py [MODELS]
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import sys
import time
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import httpx
from anchored import C, write_revision
from common import DATA, busy_share, cpu_times, machine, median, percentile, rss_mb, service, timed
from huggingface_hub import scan_cache_dir

MODELS = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000


def build(cache: Path) -> None:
    marker = cache / f".built-{MODELS}"
    if marker.exists():
        return
    shutil.rmtree(cache, ignore_errors=True)
    for i in range(MODELS):
        files = {"config.json": b'{"i": %d}' % i, "w.bin": b"w%d" % i * 16}
        write_revision(cache, f"bench/m{i:05d}", C(i + 1), files)
    marker.touch()


async def page_figures(url: str, runs: int = 3) -> None:
    """The operator's page in Chromium (Debian's, as the browser tests use): from the page asked
    until its first rows are drawn, and from a repo id typed in the search box until the model is
    the one shown (the page searches as one types)."""
    browser_path = (
        os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    if browser_path is None:
        print("  the page: skipped (no chromium; `make browser-deps` installs it)")
        return
    from playwright.async_api import async_playwright

    first_rows, found = [], []
    async with async_playwright() as driver:
        browser = await driver.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        for n in range(runs):
            page = await browser.new_page()
            started = time.perf_counter()
            await page.goto(url)
            await page.wait_for_selector("#models li.card")
            first_rows.append(time.perf_counter() - started)
            repo = f"bench/m{MODELS - 1 - n:05d}"
            started = time.perf_counter()
            await page.fill("#search", repo.removeprefix("bench/"))
            await page.wait_for_function(
                "repo => { const cards = document.querySelectorAll('#models li.card');"
                " return cards.length === 1 && cards[0].dataset.repo === repo; }",
                arg=repo,
            )
            found.append(time.perf_counter() - started)
            await page.close()
        await browser.close()
    print(
        f"  the page: first rows median {median(first_rows) * 1000:6.0f} ms"
        f" ({'met' if median(first_rows) <= 1 else 'MISSED'} <= 1 s); a repo id typed until it"
        f" is the one shown, median {median(found) * 1000:6.0f} ms"
    )


def lister(url: str, stop: EventType, nice: int, served: Synchronized[int]) -> None:
    """GET /list (all of it) again and again until ``stop``: one open page, at CPU priority
    ``nice``; each list received counted in ``served``."""
    os.nice(nice)
    with httpx.Client(base_url=url, timeout=300) as client:
        while not stop.is_set():
            client.get("/api/models/list").raise_for_status()
            with served.get_lock():
                served.value += 1


def status_under_lists(
    svc_url: str, client: httpx.Client, nice: int
) -> tuple[list[float], float, float]:
    """POST /status timed 200 times while six processes list at priority ``nice``: the times,
    the lists served a second, and the share of the machine's CPU the service used."""
    body = {"hf_repo": "bench/m00042"}
    # Six open pages are six clients: processes of their own, so that the status's timer does
    # not wait for the GIL of this process while the listers read 3 MB bodies (with six threads
    # here it measured this process, p99 103-135 ms, as much as the service).
    forking = multiprocessing.get_context("fork")
    stop = forking.Event()
    served = forking.Value("q", 0)
    listers = [forking.Process(target=lister, args=(svc_url, stop, nice, served)) for _ in range(6)]
    for process in listers:
        process.start()
    time.sleep(1.0)  # the lists are under way
    before, cpu, started = served.value, cpu_times(), time.perf_counter()
    busy = timed(lambda: client.post("/api/models/status", json=body).raise_for_status(), 200)
    elapsed = time.perf_counter() - started
    lists, share = served.value - before, busy_share(cpu, cpu_times())
    stop.set()
    for process in listers:
        process.join()
    return busy, lists / elapsed, share


def main() -> None:
    cache = DATA / f"scale-{MODELS}" / "cache"
    started = time.perf_counter()
    build(cache)
    print(
        f"{MODELS} cached models ({machine()}), cache built in {time.perf_counter() - started:.0f} s"
    )
    scan = timed(lambda: scan_cache_dir(cache), 3)
    print(f"  scan_cache_dir                median {median(scan) * 1000:8.1f} ms")
    with service("http://127.0.0.1:9", cache) as svc, svc.client() as client:
        client.timeout = 120
        pid = svc.process.pid
        idle_rss = rss_mb(pid)
        first = timed(lambda: client.get("/api/models/list").raise_for_status(), 1)[0]
        listed = client.get("/api/models/list").json()["models"]
        assert len(listed) == MODELS, len(listed)
        lists = timed(lambda: client.get("/api/models/list").raise_for_status(), 5)
        ratio = median(lists) / median(scan)
        print(f"  GET /list, first call              {first * 1000:8.1f} ms")
        print(
            f"  GET /list                     median {median(lists) * 1000:8.1f} ms;"
            f" ratio to scan_cache_dir {ratio:5.3f} ({'met' if ratio <= 0.1 else 'MISSED'} <= 0.1)"
        )
        page = timed(lambda: client.get("/api/models/list?limit=50").raise_for_status(), 10)
        print(f"  GET /list?limit=50            median {median(page) * 1000:8.1f} ms")
        found = timed(lambda: client.get("/api/models/list?q=m0999").raise_for_status(), 10)
        print(f"  GET /list?q=m0999             median {median(found) * 1000:8.1f} ms")
        body = {"hf_repo": "bench/m00042"}
        idle = timed(lambda: client.post("/api/models/status", json=body).raise_for_status(), 200)
        print(
            f"  POST /status idle             p50 {median(idle) * 1000:6.1f} ms, p99"
            f" {percentile(idle, 99) * 1000:6.1f} ms"
        )
        # The six open pages are browsers on the operators' machines: at nice 19 their processes
        # leave this machine's CPU to the service, as theirs would. At nice 0 they take most of
        # this 2-core machine's CPU (3 MB a list each), and the figure is the machine's.
        for nice, target in ((19, True), (0, False)):
            busy, rate, share = status_under_lists(svc.url, client, nice)
            p99 = percentile(busy, 99) * 1000
            verdict = f" ({'met' if p99 <= 20 else 'MISSED'} <= 20 ms)" if target else ""
            print(
                f"  POST /status, 6 lists at once p50 {median(busy) * 1000:6.1f} ms, p99"
                f" {p99:6.1f} ms{verdict}; the clients at nice {nice:2d}, {rate:4.0f} lists/s,"
                f" machine CPU {share:.0%} busy"
            )
        prune = timed(
            lambda: client.post("/api/models/prune", json={"dry_run": True}).raise_for_status(), 3
        )
        print(
            f"  POST /prune dry run           median {median(prune) * 1000:8.1f} ms"
            f" ({'met' if median(prune) <= 1 else 'MISSED'} <= 1 s)"
        )
        asyncio.run(page_figures(svc.url))
        busy_rss = rss_mb(pid)
        print(
            f"  service RSS {idle_rss:.0f} MB at start, {busy_rss:.0f} MB after the lists:"
            f" {(busy_rss - idle_rss) / (MODELS / 1000):.1f} MB per 1,000 models"
        )


if __name__ == "__main__":
    main()
