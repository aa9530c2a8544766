"""Memory: peak resident memory of the service with all its workers during 3 concurrent 1 GiB
downloads (target under 300 MB in all), against 3 concurrent `hf download` processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from common import DATA, PYTHON, download_via_service, fake_hub, machine, make_repos, service

LARGE = ["bench/large", "bench/large-2", "bench/large-3"]
PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_memory(root_pids: list[int]) -> tuple[int, int]:
    """(resident bytes, proportional bytes) of these processes and all their descendants. RSS
    counts a page shared by several processes (a forked worker and its zygote) in each; PSS
    divides it among them: the memory the tree really holds."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(pid)
        rss[pid] = int(fields[21]) * PAGE
    total_rss, total_pss, todo = 0, 0, list(root_pids)
    while todo:
        pid = todo.pop()
        total_rss += rss.get(pid, 0)
        total_pss += _pss(pid)
        todo.extend(children.get(pid, []))
    return total_rss, total_pss


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakSampler(threading.Thread):
    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids, self.peak, self.peak_pss, self.stop_event = pids, 0, 0, threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            rss, pss = tree_memory(self.pids)
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            time.sleep(0.02)


def main() -> None:
    repos = make_repos()
    work = DATA / "work"
    shutil.rmtree(work, ignore_errors=True)
    print(f"memory, peak RSS during 3 concurrent 1 GiB downloads ({machine()})")
    with fake_hub(repos) as hub:
        with service(hub, work / "cache") as svc, svc.client() as client:
            sampler = PeakSampler([svc.process.pid])
            sampler.start()
            threads = [
                threading.Thread(target=download_via_service, args=(client, r)) for r in LARGE
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            sampler.stop_event.set()
            sampler.join()
            service_peak, service_pss = sampler.peak, sampler.peak_pss
        hf = str(Path(PYTHON).parent / "hf")
        env = {"HF_ENDPOINT": hub, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PATH": "/usr/bin:/bin"}
        procs = [
            subprocess.Popen(
                [hf, "download", r, "--cache-dir", str(work / f"hf-{i}")],
                env={**env, "HF_HOME": str(work / f"hf-home-{i}")},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i, r in enumerate(LARGE)
        ]
        sampler = PeakSampler([p.pid for p in procs])
        sampler.start()
        for p in procs:
            p.wait()
        sampler.stop_event.set()
        sampler.join()
    mb = 1024 * 1024
    print(
        f"  service + workers   peak {service_peak / mb:7.1f} MB ({'met' if service_peak < 300 * mb else 'MISSED'} < 300 MB)"
    )
    print(
        f"  3 x hf download     peak {sampler.peak / mb:7.1f} MB   ratio {service_peak / sampler.peak:5.2f}"
    )
    print(
        f"  PSS (shared pages divided): service + workers {service_pss / mb:7.1f} MB,"
        f" 3 x hf download {sampler.peak_pss / mb:7.1f} MB, ratio {service_pss / sampler.peak_pss:5.2f}"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
