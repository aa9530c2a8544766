"""Cancel: time from the DELETE call to the last byte written to the cache (target under 1 s),
and how long the DELETE call itself takes (it answers once the worker is gone)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx
from common import DATA, fake_hub, machine, make_repos, median, service

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 5


def bytes_on_disk(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def watch(root: Path, stop: threading.Event, growth: list[float]) -> None:
    """Record the times at which the bytes on disk grew."""
    last = bytes_on_disk(root)
    while not stop.is_set():
        now = bytes_on_disk(root)
        if now > last:
            growth.append(time.perf_counter())
        last = now
        time.sleep(0.002)


def downloaded(client: httpx.Client, body: dict[str, str]) -> int:
    progress = client.post("/api/models/status", json=body).json()["progress"] or {}
    return int(progress.get("downloaded_bytes") or 0)


def main() -> None:
    repos = make_repos()
    work = DATA / "work"
    shutil.rmtree(work, ignore_errors=True)
    cache = work / "cache"
    last_byte: list[float] = []
    call: list[float] = []
    print(f"cancel, {RUNS} runs, medians ({machine()})")
    with fake_hub(repos) as hub, service(hub, cache) as svc, svc.client() as client:
        body = {"hf_repo": "bench/large"}
        for _ in range(RUNS):
            client.post("/api/models/download", json=body).raise_for_status()
            while downloaded(client, body) < 200 * 1024 * 1024:
                time.sleep(0.01)
            stop, growth = threading.Event(), list[float]()
            watcher = threading.Thread(target=watch, args=(cache, stop, growth))
            watcher.start()
            time.sleep(0.05)
            started = time.perf_counter()
            answer = client.request("DELETE", "/api/models", json=body).json()
            call.append(time.perf_counter() - started)
            assert answer["status"] == "cancelled", answer
            time.sleep(2.0)
            stop.set()
            watcher.join()
            after = [t - started for t in growth if t >= started]
            last_byte.append(max(after) if after else 0.0)
            client.request("DELETE", "/api/models", json=body)
    ms = median(last_byte) * 1000
    print(f"  DELETE answered after     median {median(call) * 1000:7.1f} ms")
    print(
        f"  last byte written after   median {ms:7.1f} ms, worst {max(last_byte) * 1000:7.1f} ms ({'met' if ms < 1000 else 'MISSED'} < 1000 ms)"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
