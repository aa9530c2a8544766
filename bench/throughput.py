"""Throughput on the local link: the service (API call until DOWNLOADED, verified) vs curl writing
the same bytes to disk (the machine's limit) vs `hf download`.

Targets (issue 17): one 1 GiB file at >= 0.8 x curl's speed (plain HTTP, and Xet with
BENCH_XET=1); 300 small files >= 1.0 x `hf download`. `MODELS_RANGED_MIN_BYTES=0` in the
environment measures the library's own single stream instead of parallel ranges.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import (
    DATA,
    PYTHON,
    download_via_service,
    fake_hub,
    machine,
    make_repos,
    median,
    service,
    settle,
    transfer_path,
)

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
HF = str(Path(PYTHON).parent / "hf")


def hf_download(hub: str, repo: str, cache: Path) -> float:
    shutil.rmtree(cache, ignore_errors=True)
    env = {
        "HF_ENDPOINT": hub,
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HOME": str(cache.parent / "hf-home"),
        "PATH": "/usr/bin:/bin",
    }
    started = time.perf_counter()
    subprocess.run(
        [HF, "download", repo, "--cache-dir", str(cache)], env=env, check=True, capture_output=True
    )
    return time.perf_counter() - started


def curl_files(hub: str, repo: str, files: list[str], target: Path) -> float:
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    urls = []
    for i, name in enumerate(files):
        urls += ["-o", str(target / f"{i}"), f"{hub}/{repo}/resolve/main/{name}"]
    started = time.perf_counter()
    subprocess.run(
        ["curl", "-s", "--no-progress-meter", "--parallel", "--parallel-max", "8", *urls],
        check=True,
    )
    return time.perf_counter() - started


def main() -> None:
    repos = make_repos()
    work = DATA / "work"
    shutil.rmtree(work, ignore_errors=True)
    # repo: (files, baseline, target speed vs the baseline)
    cases = {
        "bench/large": (["model.safetensors"], "curl", 0.8),
        "bench/many": ([f"f/{i:03d}.json" for i in range(300)], "hf download", 1.0),
    }
    print(f"throughput, {RUNS} runs each, medians, {transfer_path()} ({machine()})")
    with fake_hub(repos) as hub, service(hub, work / "svc-cache") as svc, svc.client() as client:
        for repo, (files, baseline, target) in cases.items():
            times: dict[str, list[float]] = {"service": [], "hf download": [], "curl": []}
            for _ in range(RUNS):
                settle()
                times["curl"].append(curl_files(hub, repo, files, work / "curl"))
                settle()
                times["hf download"].append(hf_download(hub, repo, work / "hf-cache"))
                client.request("DELETE", "/api/models", json={"hf_repo": repo})
                settle()
                times["service"].append(download_via_service(client, repo))
            base = median(times[baseline])
            print(f"{repo}:")
            for name, values in times.items():
                print(
                    f"  {name:<12} median {median(values):7.3f} s   speed vs {baseline}"
                    f" {base / median(values):5.2f} x"
                )
            ratio = base / median(times["service"])
            verdict = "met" if ratio >= target else "MISSED"
            print(f"  target service >= {target} x {baseline}: {ratio:.3f} ({verdict})")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
