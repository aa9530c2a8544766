"""Interrupted: one 1 GiB file, the service killed (kill -9) once 60 % of it is on disk, started
again (the download is resumed by the service itself: its job store). How much of the file the hub sends after the restart,
counted by the fake hub itself.

With BENCH_XET=1 the file comes through Xet: the worker keeps what hf_xet writes, and the rest comes
by ranges after the restart.

Target (issue 17): <= 45 % of the file fetched again (the 40 % still missing, and at most 5 %
more). The hub caps each connection at 100 MB/s here, so that the 60 % mark can be caught.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time

import httpx
from common import (
    DATA,
    fake_hub,
    machine,
    make_repos,
    resumed_via_service,
    served,
    service,
    transfer_path,
)

GB = 1024**3
RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
TARGET = 0.45


def on_disk(client: httpx.Client) -> int:
    answer = client.post("/api/models/status", json={"hf_repo": "bench/large"}).json()
    return int((answer.get("progress") or {}).get("downloaded_bytes") or 0)


def main() -> None:
    repos = make_repos()
    work = DATA / "work-resume"
    print(f"resume after kill -9 at 60 %, {RUNS} runs, {transfer_path()} ({machine()})")
    worst = 0.0
    with fake_hub(repos, rate=100_000_000) as hub:
        for run in range(RUNS):
            shutil.rmtree(work, ignore_errors=True)
            with service(hub, work / "cache") as svc, svc.client() as client:
                client.post("/api/models/download", json={"hf_repo": "bench/large"})
                while (done := on_disk(client)) < 0.6 * GB:
                    time.sleep(0.02)
                svc.process.send_signal(signal.SIGKILL)
                svc.process.wait()
            time.sleep(1)  # the worker dies with the service; the hub ends what it was sending
            before = served(hub)
            with service(hub, work / "cache") as svc, svc.client() as client:
                seconds = resumed_via_service(client, "bench/large")
            again = (served(hub) - before) / GB
            worst = max(worst, again)
            print(
                f"  run {run + 1}: killed with {done / GB:.0%} on disk (as the status said);"
                f" after the restart {again:.1%} of the file fetched again, done in {seconds:.2f} s"
            )
    verdict = "met" if worst <= TARGET else "MISSED"
    print(f"  target <= {TARGET:.0%} fetched again: worst {worst:.1%} ({verdict})")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
