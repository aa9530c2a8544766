"""A fleet of 3 nodes (issue 18): the time to have one 1 GiB model on every node, through the
fleet (one node fetches it from the Hub, the two others copy it from that node), against three
independent services downloading it at once from the same hub; and the bytes the Hub sent for
each.

The 3 nodes are a real Ray cluster on this machine (``fakehub.raycluster``, 127.0.0.1 only), the
service a process of its own joined to it (``MODELS_RAY_ADDRESS``). On one machine the "cluster
network" is loopback, as the link to the hub is: this measures the overhead of the fleet's
orchestration and copies, not the saving of a real uplink. What the uplink pays is the Hub's byte
count: with an uplink of U bytes/s shared by the nodes, three independent downloads need three
times the uplink time of one.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import DATA, GB, fake_hub, machine, make_repos, median, served, service, settle

from fakehub.raycluster import ray_cluster

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 2
REPO = "bench/large"
BODY = {"hf_repo": REPO}


def until_downloaded(client: httpx.Client, started: float, timeout: float = 600) -> float:
    while True:
        status = client.post("/api/models/status", json=BODY).json()
        if status["status"] == "DOWNLOADED":
            return time.perf_counter() - started
        if status["status"] != "DOWNLOADING" or time.perf_counter() - started > timeout:
            raise RuntimeError(f"the download ended {status}")
        time.sleep(0.05)


SCENARIOS = [("loopback", 0), ("the hub's uplink at 100 MB/s", 100_000_000)]


def main() -> None:
    repos = make_repos()
    work = DATA / "work-fleet"
    shutil.rmtree(work, ignore_errors=True)
    # Ray's session folder holds its sockets: a short path of its own.
    root = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    print(
        f"one 1 GiB model on 3 nodes: the fleet vs 3 independent downloads, {RUNS} runs each,"
        f" medians ({machine()})"
    )
    try:
        with ray_cluster(root, [work / f"node{i}" / "cache" for i in range(3)]) as cluster:
            for name, uplink in SCENARIOS:
                with fake_hub(repos, uplink=uplink) as hub:
                    report(name, *measure(hub, cluster.address, work))
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def measure(
    hub: str, address: str, work: Path
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    times: dict[str, list[float]] = {"fleet": [], "independent": []}
    hub_bytes: dict[str, list[int]] = {"fleet": [], "independent": []}
    env = {"MODELS_RAY_ADDRESS": address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with (
        service(hub, work / "fleet-service" / "cache", **env) as fleet,
        fleet.client() as client,
    ):
        for _ in range(RUNS):
            settle()
            before = served(hub)
            started = time.perf_counter()
            client.post("/api/models/download", json=BODY).raise_for_status()
            times["fleet"].append(until_downloaded(client, started))
            hub_bytes["fleet"].append(served(hub) - before)
            client.request("DELETE", "/api/models", json=BODY).raise_for_status()
    caches = [work / f"alone{i}" / "cache" for i in range(3)]
    for _ in range(RUNS):
        settle()
        before = served(hub)
        with (
            service(hub, caches[0]) as a,
            service(hub, caches[1]) as b,
            service(hub, caches[2]) as c,
        ):
            clients = [s.client() for s in (a, b, c)]
            started = time.perf_counter()
            for each in clients:
                each.post("/api/models/download", json=BODY).raise_for_status()
            times["independent"].append(max(until_downloaded(each, started) for each in clients))
            hub_bytes["independent"].append(served(hub) - before)
            for each in clients:
                each.request("DELETE", "/api/models", json=BODY)
                each.close()
    return times, hub_bytes


def report(name: str, times: dict[str, list[float]], hub_bytes: dict[str, list[int]]) -> None:
    print(f" {name}:")
    base = median(times["independent"])
    for kind in ("independent", "fleet"):
        print(
            f"  {kind:<12} median {median(times[kind]):7.2f} s   time vs independent"
            f" {median(times[kind]) / base:5.2f} x   the Hub sent"
            f" {median([float(n) for n in hub_bytes[kind]]) / GB:5.2f} GiB"
        )


if __name__ == "__main__":
    main()
