"""A fleet of N nodes (issue 29): the rollout time of one 1 GiB model for N = 1, 2, 4, 8, each
node's peer uplink and the Hub's uplink capped at the same rate, the bytes the Hub sent, and the
fan-out latency of status, list and space with N nodes.

The nodes are a real Ray cluster on this machine (``fakehub.raycluster``, 127.0.0.1 only), the
service a process of its own joined to it. Each run downloads to the first N nodes (the
``nodes`` field); the baseline is N = 1 (one node, from the Hub alone) in the same run. Every node
caps what it sends to the others (``MODELS_PEER_UPLINK_BYTES_PER_SECOND``) at the Hub's uplink,
so that the figure says what a fleet whose links are all alike would see: with the copies made one
after another from one node it would take about N times one node's time, with a doubling schedule
log2(N) times; a pipeline that passes on every part as it arrives stays near one.

On this 2-core machine every node's receiving, hashing and serving share the same two cores: the
uplink is set low (``BENCH_UPLINK``, 40 MB/s), and the report says how busy the machine's CPU was
during each rollout (a rollout that keeps it near 100% measures the machine, not the fleet).

    python bench/fleet_scale.py [runs]      # BENCH_UPLINK=40000000 BENCH_NODES=1,2,4,8
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from common import (
    DATA,
    GB,
    busy_share,
    cpu_times,
    fake_hub,
    machine,
    make_repos,
    median,
    percentile,
    rss_mb,
    served,
    service,
)
from common import settle as write_back

from fakehub.raycluster import ray_cluster

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 1
UPLINK = int(os.environ.get("BENCH_UPLINK", "40000000"))
COUNTS = [int(n) for n in os.environ.get("BENCH_NODES", "1,2,4,8").split(",")]
REPO = "bench/large"
BODY = {"hf_repo": REPO}
CALLS = 30  # of each read, per N


def until_downloaded(client: httpx.Client, nodes: list[str], started: float) -> float:
    body = {**BODY, "nodes": nodes}
    while True:
        status = client.post("/api/models/status", json=body).json()
        if status["status"] == "DOWNLOADED":
            return time.perf_counter() - started
        if status["status"] != "DOWNLOADING" or time.perf_counter() - started > 900:
            raise RuntimeError(f"the download ended {status}")
        time.sleep(0.1)


def reads(client: httpx.Client, nodes: list[str]) -> dict[str, list[float]]:
    """Seconds per call of status, list and space, the fleet asking ``nodes`` (status) or every
    alive node (list, space: they always ask all)."""
    calls: dict[str, Callable[[], httpx.Response]] = {
        "status": lambda: client.post("/api/models/status", json={**BODY, "nodes": nodes}),
        "list": lambda: client.get("/api/models/list"),
        "space": lambda: client.get("/api/models/space"),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(CALLS):
        for name, call in calls.items():
            started = time.perf_counter()
            call().raise_for_status()
            times[name].append(time.perf_counter() - started)
    return times


def main() -> None:
    repos = make_repos()
    work = DATA / "work-fleet-scale"
    shutil.rmtree(work, ignore_errors=True)
    root = Path(tempfile.mkdtemp(prefix="fleet-scale-"))
    largest = max(COUNTS)
    print(
        f"one 1 GiB model on N nodes, the Hub's uplink and each node's peer uplink at"
        f" {UPLINK / 1e6:.0f} MB/s, {RUNS} run(s) each, medians ({machine()})"
    )
    try:
        caches = [work / f"node{i}" / "cache" for i in range(largest)]
        with (
            ray_cluster(root, caches) as cluster,
            fake_hub(repos, uplink=UPLINK) as hub,
            service(
                hub,
                work / "service" / "cache",
                MODELS_RAY_ADDRESS=cluster.address,
                RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                MODELS_PEER_UPLINK_BYTES_PER_SECOND=str(UPLINK),
            ) as fleet,
            fleet.client() as client,
        ):
            ids = sorted(n["node_id"] for n in client.get("/api/models/space").json()["nodes"])
            assert len(ids) == largest, ids
            baseline = 0.0
            print(
                f"  {'N':>2} {'rollout s':>10} {'vs N=1':>7} {'Hub GiB':>8}"
                f" {'status p50/p99 ms':>18} {'list p50/p99 ms':>16} {'space p50/p99 ms':>17}"
                f" {'head RSS MB':>11} {'CPU busy':>8}"
            )
            for count in COUNTS:
                nodes = ids[:count]
                times, hub_bytes, busy = [], [], []
                for _ in range(RUNS):
                    write_back()
                    before = served(hub)
                    cpu_before = cpu_times()
                    started = time.perf_counter()
                    client.post(
                        "/api/models/download", json={**BODY, "nodes": nodes}
                    ).raise_for_status()
                    times.append(until_downloaded(client, nodes, started))
                    cpu_after = cpu_times()
                    busy.append(busy_share(cpu_before, cpu_after))
                    hub_bytes.append(float(served(hub) - before))
                    latency = reads(client, nodes)
                    client.request("DELETE", "/api/models", json=BODY).raise_for_status()
                took = median(times)
                baseline = baseline or took
                figures = " ".join(
                    f"{median(latency[name]) * 1000:8.1f}/{percentile(latency[name], 99) * 1000:<7.1f}"
                    for name in ("status", "list", "space")
                )
                print(
                    f"  {count:>2} {took:10.2f} {took / baseline:6.2f}x"
                    f" {median(hub_bytes) / GB:8.2f}  {figures}"
                    f" {rss_mb(fleet.process.pid):11.1f} {median(busy):8.0%}"
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
