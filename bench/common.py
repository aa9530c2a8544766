"""Shared pieces of the benchmarks: the fake hub and the service as separate processes.

Every figure is measured against its baseline in the same run, on this machine; scripts print
medians and ratios, never compare with a stored number.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from fakehub import Generated, RepoBuilder

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / ".data"
PYTHON = sys.executable
GB = 1024**3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def make_repos() -> Path:
    """The benchmark repos (made once, kept in bench/.data): one 1 GiB file, 300 small files,
    and 200 small models for the list benchmark."""
    repos = DATA / "repos"
    marker = repos / ".complete-v1"
    if marker.exists():
        return repos
    builder = RepoBuilder(repos)
    builder.commit("bench/large", {"model.safetensors": Generated(GB, seed=11)})
    for n in (2, 3):
        builder.commit(f"bench/large-{n}", {"model.safetensors": Generated(GB, seed=11 + n)})
    pad = "x" * 4000
    builder.commit(
        "bench/many", {f"f/{i:03d}.json": json.dumps({"i": i, "pad": pad}) for i in range(300)}
    )
    for i in range(200):
        builder.commit(
            f"bench/small-{i:03d}", {"config.json": json.dumps({"i": i}), "w.bin": b"w" * 1000}
        )
    marker.touch()
    return repos


@contextlib.contextmanager
def fake_hub(
    repos: Path,
    rate: int = 0,
    latency: float = 0.0,
    send_buffer: int | None = None,
    uplink: int = 0,
) -> Iterator[str]:
    """The fake hub as a process of its own; ``rate``/``latency``: a capped link (each response
    body of content at most ``rate`` bytes per second, each request ``latency`` seconds late)."""
    port = free_port()
    # The hub stands for a remote server: at the lowest CPU priority, so that on a small machine
    # its work is not charged to the service (every figure and its baseline share it alike).
    # BENCH_XET=1: LFS files through Xet (the hub client's Xet path, hf_xet) instead of /resolve.
    xet = ["--xet"] if os.environ.get("BENCH_XET") == "1" else []
    process = subprocess.Popen(
        [
            "nice",
            "-n",
            "19",
            PYTHON,
            "-m",
            "fakehub",
            "--repos",
            str(repos),
            "--port",
            str(port),
            *xet,
            *(["--rate", str(rate)] if rate else []),
            *(["--latency", str(latency)] if latency else []),
            *(["--send-buffer", str(send_buffer)] if send_buffer else []),
            *(["--uplink", str(uplink)] if uplink else []),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/api/models/none/none")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@dataclass
class Service:
    url: str
    process: subprocess.Popen[bytes]
    cache: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)


@contextlib.contextmanager
def service(hub_url: str, cache: Path, **env: str) -> Iterator[Service]:
    port = free_port()
    full_env = {
        **os.environ,
        "HF_ENDPOINT": hub_url,
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(cache.parent / "hf-home"),
        **env,
    }
    process = subprocess.Popen(
        [PYTHON, "-m", "uvicorn", "api.app:app", "--port", str(port), "--log-level", "warning"],
        env=full_env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/api/health")
        yield Service(url, process, cache)
    finally:
        process.terminate()
        process.wait(timeout=30)


def download_via_service(client: httpx.Client, repo: str, poll: float = 0.05) -> float:
    """Seconds from the API call until the status says DOWNLOADED."""
    body = {"hf_repo": repo}
    started = time.perf_counter()
    answer = client.post("/api/models/download", json=body)
    answer.raise_for_status()
    while True:
        status = client.post("/api/models/status", json=body).json()
        if status["status"] == "DOWNLOADED":
            return time.perf_counter() - started
        if status["status"] != "DOWNLOADING":
            raise RuntimeError(f"download of {repo} ended {status}")
        time.sleep(poll)


def resumed_via_service(client: httpx.Client, repo: str, poll: float = 0.05) -> float:
    """Seconds until a download the service resumed by itself at its start is DOWNLOADED."""
    started = time.perf_counter()
    while True:
        status = client.post("/api/models/status", json={"hf_repo": repo}).json()
        if status["status"] == "DOWNLOADED":
            return time.perf_counter() - started
        if status["status"] != "DOWNLOADING":
            raise RuntimeError(f"the resumed download of {repo} ended {status}")
        time.sleep(poll)


def transfer_path() -> str:
    return "Xet (BENCH_XET=1)" if os.environ.get("BENCH_XET") == "1" else "plain HTTP"


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    """Seconds each of ``runs`` calls of ``fn`` took."""
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def row(name: str, value: float, unit: str = "s", baseline: float | None = None) -> str:
    text = f"  {name:<44} {value:10.4f} {unit}"
    if baseline:
        text += f"   ratio {value / baseline:6.3f}"
    return text


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {cpu}, Python {sys.version.split()[0]}"


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of the machine's CPU that was busy between two ``cpu_times``."""
    return (after[0] - before[0]) / max(1, after[1] - before[1])


def rss_mb(pid: int) -> float:
    """The resident memory of process ``pid``, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def served(hub_url: str) -> int:
    """Content bytes the fake hub has sent so far (its ``/_fakehub/served``)."""
    return int(httpx.get(f"{hub_url}/_fakehub/served", timeout=10).json()["bytes"])


def settle() -> None:
    """Write the dirty pages of the runs before out (and wait for it), so that no figure pays for
    the writeback of another's bytes: every run starts from the same state."""
    os.sync()
