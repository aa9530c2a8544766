"""File selection: bytes and time of a download with ``files: vllm`` against ``files: all``, on a
repo laid out as Llama repos are (safetensors shards, a ``.bin`` copy of the same weights, and
``original/consolidated.00.pth``: three copies of the weights). Both measured in this run, through
the service, against the same fake hub; the ratio is vllm / all."""

from __future__ import annotations

import shutil
import sys
import time
from typing import Any

import httpx
from common import DATA, fake_hub, machine, median, row, service, transfer_path

from fakehub import RepoBuilder
from fakehub.samples import llama_layout

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
SHARD = 256 * 1024 * 1024  # each weight file; the repo holds about 1.5 GiB


def make_repo() -> RepoBuilder:
    builder = RepoBuilder(DATA / "repos-selection")
    marker = builder.root / ".complete-v1"
    if not marker.exists():
        builder.commit("bench/llama-like", llama_layout(SHARD, seed=90))
        marker.touch()
    return builder


def download(client: httpx.Client, body: dict[str, Any]) -> tuple[float, int]:
    """Seconds from the call until DOWNLOADED, and the bytes the revision then holds on disk."""
    started = time.perf_counter()
    client.post("/api/models/download", json=body).raise_for_status()
    while True:
        status = client.post("/api/models/status", json=body).json()
        if status["status"] == "DOWNLOADED":
            elapsed = time.perf_counter() - started
            break
        if status["status"] != "DOWNLOADING":
            raise RuntimeError(f"download ended {status}")
        time.sleep(0.05)
    [item] = client.get("/api/models/list").json()["models"]
    return elapsed, int(item["size_bytes"])


def main() -> None:
    builder = make_repo()
    work = DATA / "work-selection"
    print(f"file selection, {RUNS} runs each, {transfer_path()}, medians ({machine()})")
    results: dict[str, tuple[list[float], int]] = {}
    with fake_hub(builder.root) as hub:
        for preset in ("all", "vllm"):
            times: list[float] = []
            size = 0
            for _ in range(RUNS):
                shutil.rmtree(work, ignore_errors=True)
                with service(hub, work / "cache") as svc, svc.client() as client:
                    body = {"hf_repo": "bench/llama-like", "files": preset}
                    plan = client.post("/api/models/plan", json=body).json()
                    elapsed, size = download(client, body)
                    assert size == plan["selected_bytes"], (size, plan["selected_bytes"])
                    times.append(elapsed)
            results[preset] = (times, size)
    shutil.rmtree(work, ignore_errors=True)
    all_time, all_size = median(results["all"][0]), results["all"][1]
    vllm_time, vllm_size = median(results["vllm"][0]), results["vllm"][1]
    print(row("files: all, seconds", all_time))
    print(row("files: vllm, seconds", vllm_time, baseline=all_time))
    print(row("files: all, GiB on disk", all_size / 1024**3, "GiB"))
    print(row("files: vllm, GiB on disk", vllm_size / 1024**3, "GiB", baseline=all_size / 1024**3))


if __name__ == "__main__":
    main()
