"""A capped link: the fake hub sends each response body at most 50 MB/s and answers every request
20 ms late, as a CDN that caps each connection does. One 1 GiB file: the service (API call until
DOWNLOADED, verified) vs `hf download` on the same hub.

Target (issue 17): the service at >= 4 x the speed of `hf download`.
"""

from __future__ import annotations

import shutil
import sys

from common import (
    DATA,
    download_via_service,
    fake_hub,
    machine,
    make_repos,
    median,
    service,
    settle,
    transfer_path,
)
from throughput import hf_download

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
RATE = 50_000_000
LATENCY = 0.02
TARGET = 4.0


def main() -> None:
    repos = make_repos()
    work = DATA / "work-link"
    shutil.rmtree(work, ignore_errors=True)
    print(
        f"capped link ({RATE / 1e6:.0f} MB/s per connection, {LATENCY * 1000:.0f} ms per request),"
        f" {RUNS} runs each, medians, {transfer_path()} ({machine()})"
    )
    times: dict[str, list[float]] = {"service": [], "hf download": []}
    with (
        fake_hub(repos, rate=RATE, latency=LATENCY) as hub,
        service(hub, work / "svc-cache") as svc,
        svc.client() as client,
    ):
        for _ in range(RUNS):
            settle()
            times["hf download"].append(hf_download(hub, "bench/large", work / "hf-cache"))
            client.request("DELETE", "/api/models", json={"hf_repo": "bench/large"})
            settle()
            times["service"].append(download_via_service(client, "bench/large"))
    base = median(times["hf download"])
    for name, values in times.items():
        print(
            f"  {name:<12} median {median(values):7.3f} s   speed vs hf download {base / median(values):5.2f} x"
        )
    ratio = base / median(times["service"])
    print(
        f"  target service >= {TARGET} x hf download: {ratio:.2f} ({'met' if ratio >= TARGET else 'MISSED'})"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
