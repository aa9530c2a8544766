"""Status and list: median POST /status for a cached 300-file model and a cached 1 GiB model
(target under 20 ms, no network), and GET /list with 200 cached models vs a bare
``scan_cache_dir`` of the same cache (target at most 1.2 x)."""

from __future__ import annotations

import functools
import shutil
import sys

from common import DATA, download_via_service, fake_hub, machine, make_repos, median, service, timed
from huggingface_hub import scan_cache_dir

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 200


def main() -> None:
    repos = make_repos()
    work = DATA / "work"
    shutil.rmtree(work, ignore_errors=True)
    cache = work / "cache"
    print(f"status and list, {RUNS} calls each, medians ({machine()})")
    with fake_hub(repos) as hub, service(hub, cache) as svc, svc.client() as client:
        models = ["bench/many", "bench/large"] + [f"bench/small-{i:03d}" for i in range(198)]
        for repo in models:
            download_via_service(client, repo, poll=0.01)
    # The hub is gone now: status and list must not need it.
    with service("http://127.0.0.1:9", cache) as svc, svc.client() as client:
        for repo in ("bench/many", "bench/large"):
            body = {"hf_repo": repo}
            assert client.post("/api/models/status", json=body).json()["status"] == "DOWNLOADED"
            values = timed(functools.partial(client.post, "/api/models/status", json=body), RUNS)
            ms = median(values) * 1000
            print(
                f"  POST /status {repo:<12} median {ms:6.2f} ms ({'met' if ms < 20 else 'MISSED'} < 20 ms)"
            )
        listed = client.get("/api/models/list").json()["models"]
        assert len(listed) == 200, len(listed)
        list_times = timed(lambda: client.get("/api/models/list"), max(RUNS // 10, 10))
        scan_times = timed(lambda: scan_cache_dir(cache), max(RUNS // 10, 10))
        ratio = median(list_times) / median(scan_times)
        print(
            f"  GET /list (200 models) median {median(list_times) * 1000:7.2f} ms;"
            f" scan_cache_dir {median(scan_times) * 1000:7.2f} ms; ratio {ratio:5.2f}"
            f" ({'met' if ratio <= 1.2 else 'MISSED'} <= 1.2)"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
