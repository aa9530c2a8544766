"""The Xet path against the machine's limit, and what hf_xet lets a caller tune: one 1 GiB file
through Xet (the fake hub's CAS), the service with each setting vs curl writing the same bytes
(plain /resolve) in the same run.

hf_xet 1.x reads its settings from the environment of the download worker: adaptive download
concurrency (``HF_XET_CLIENT_AC_*``), a fixed concurrency (``HF_XET_FIXED_DOWNLOAD_CONCURRENCY``)
and ``HF_XET_HIGH_PERFORMANCE``. Results: planning/ranged-downloads.md.
"""

from __future__ import annotations

import contextlib
import os
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
)
from throughput import curl_files, hf_download

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
VARIANTS: dict[str, dict[str, str]] = {
    "hf_xet's defaults (adaptive)": {},
    "HF_XET_HIGH_PERFORMANCE=1": {"HF_XET_HIGH_PERFORMANCE": "1"},
    "fixed concurrency 4": {"HF_XET_FIXED_DOWNLOAD_CONCURRENCY": "4"},
    "fixed concurrency 16": {"HF_XET_FIXED_DOWNLOAD_CONCURRENCY": "16"},
    # glibc's malloc advises huge pages for its mappings: hf_xet maps a fresh 64 MiB buffer per
    # xorb, faulted in page by page (about 260,000 faults per GiB) unless huge pages back it.
    "huge pages (glibc.malloc.hugetlb=1)": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    # The library's own switch: Xet files through /resolve, so as the service's parallel ranges
    # (no chunk dedup across revisions).
    "HF_HUB_DISABLE_XET=1 (ranges)": {"HF_HUB_DISABLE_XET": "1"},
}


def main() -> None:
    os.environ["BENCH_XET"] = "1"
    repos = make_repos()
    work = DATA / "work-xet"
    shutil.rmtree(work, ignore_errors=True)
    print(f"Xet path, one 1 GiB file, {RUNS} runs each, medians, interleaved ({machine()})")
    library = "hf download (Xet, no service)"
    times: dict[str, list[float]] = {name: [] for name in ["curl (plain HTTP)", library, *VARIANTS]}
    with contextlib.ExitStack() as stack:
        hub = stack.enter_context(fake_hub(repos))
        clients = {
            name: stack.enter_context(
                stack.enter_context(service(hub, work / f"svc-{i}", **env)).client()
            )
            for i, (name, env) in enumerate(VARIANTS.items())
        }
        for run in range(RUNS + 1):  # the first round warms up, and is not counted
            settle()
            took = curl_files(hub, "bench/large", ["model.safetensors"], work / "curl")
            if run:
                times["curl (plain HTTP)"].append(took)
            settle()
            took = hf_download(hub, "bench/large", work / "hf-cache")
            if run:
                times[library].append(took)
            for name, client in clients.items():
                client.request("DELETE", "/api/models", json={"hf_repo": "bench/large"})
                settle()
                took = download_via_service(client, "bench/large")
                if run:
                    times[name].append(took)
    curl = median(times["curl (plain HTTP)"])
    for name, values in times.items():
        print(
            f"  {name:<34} median {median(values):7.3f} s   speed vs curl {curl / median(values):5.2f} x"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
