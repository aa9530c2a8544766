"""Responsiveness: p50/p99 latency of GET /space and POST /status, idle vs during 3 downloads,
and idle vs during 6 concurrent POST /verify of 1 GiB models (at most
MODELS_MAX_CONCURRENT_VERIFICATIONS run, the others get 429).

Target: p99 under load at most 50 ms and at most 3 x idle.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time

import httpx
from common import DATA, fake_hub, machine, make_repos, percentile, service

SAMPLES = int(sys.argv[1]) if len(sys.argv) > 1 else 300
LARGE = ["bench/large", "bench/large-2", "bench/large-3"]


def sample(
    client: httpx.Client, samples: int, stop: threading.Event | None = None
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"GET /space": [], "POST /status": []}
    for i in range(samples):
        if stop is not None and stop.is_set():
            break
        started = time.perf_counter()
        client.get("/api/models/space").raise_for_status()
        out["GET /space"].append(time.perf_counter() - started)
        started = time.perf_counter()
        client.post("/api/models/status", json={"hf_repo": LARGE[i % 3]}).raise_for_status()
        out["POST /status"].append(time.perf_counter() - started)
        time.sleep(0.005)
    return out


def report(idle: dict[str, list[float]], loaded: dict[str, list[float]], label: str) -> None:
    for name in idle:
        p50i, p99i = percentile(idle[name], 50) * 1000, percentile(idle[name], 99) * 1000
        p50l, p99l = percentile(loaded[name], 50) * 1000, percentile(loaded[name], 99) * 1000
        ok = p99l <= 50 and p99l <= 3 * p99i
        print(
            f"  {name:<13} idle p50 {p50i:6.2f} ms p99 {p99i:6.2f} ms | {label} p50 {p50l:6.2f} ms"
            f" p99 {p99l:6.2f} ms | p99 ratio {p99l / p99i:5.2f} ({'met' if ok else 'MISSED'})"
        )


def main() -> None:
    repos = make_repos()
    work = DATA / "work"
    shutil.rmtree(work, ignore_errors=True)
    print(f"responsiveness, {SAMPLES} samples per figure ({machine()})")
    with fake_hub(repos) as hub, service(hub, work / "cache") as svc, svc.client() as client:
        idle = sample(client, SAMPLES)
        for repo in LARGE:
            client.post("/api/models/download", json={"hf_repo": repo}).raise_for_status()
        loaded = sample(client, SAMPLES)
        states = [
            client.post("/api/models/status", json={"hf_repo": r}).json()["status"] for r in LARGE
        ]
        print(
            f"  (downloads still running at the end of the loaded samples: {states.count('DOWNLOADING')} of 3)"
        )
        report(idle, loaded, "3 downloads")
        for repo in LARGE:
            while client.post("/api/models/status", json={"hf_repo": repo}).json()["status"] == (
                "DOWNLOADING"
            ):
                time.sleep(0.2)
        answers: list[int] = []
        stop = threading.Event()

        def verify_loop(repo: str) -> None:
            with svc.client() as own:
                while not stop.is_set():
                    code = own.post(
                        "/api/models/verify", json={"hf_repo": repo}, timeout=120
                    ).status_code
                    answers.append(code)
                    if code == 429:
                        time.sleep(0.05)

        verifiers = [threading.Thread(target=verify_loop, args=(LARGE[i % 3],)) for i in range(6)]
        idle = sample(client, SAMPLES)
        for thread in verifiers:
            thread.start()
        verifying = sample(client, SAMPLES)
        stop.set()
        for thread in verifiers:
            thread.join()
        print(
            f"  (verify answers during the samples: {answers.count(200)} x 200,"
            f" {answers.count(429)} x 429)"
        )
        report(idle, verifying, "6 verifies")
        for repo in LARGE:
            client.request("DELETE", "/api/models", json={"hf_repo": repo})
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
