"""A real Ray cluster of 3 nodes on this machine, shared by the fleet tests of a run (they run in
one xdist worker: the root conftest groups this folder). It runs in a process of its own
(``fakehub.raycluster``); each node has its own cache folder (its ``models-cache`` label), and
each test starts with them empty."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

# The test process joins the cluster as a driver: it must take 127.0.0.1 as its own address, as
# the nodes do. Ray reads this once, when it is first imported: set before anything imports it.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Found, not imported: every xdist worker loads this file, and importing Ray costs each about
# half a second of CPU, fleet tests selected or not (the fleet's own modules import it when used).
if importlib.util.find_spec("ray") is None:
    pytest.skip("the api[fleet] extra (Ray) is not installed", allow_module_level=True)

from fakehub.raycluster import RayCluster, log_tail, ray_cluster

_LOG: list[Path] = []  # the running cluster's log, for the report of a test that fails


@pytest.fixture(scope="session")
def cluster() -> Iterator[RayCluster]:
    # Ray's sockets live under its temp folder, whose path must stay short (a socket path is at
    # most 107 bytes): one of its own, in the run's temporary folder when its path is short
    # enough, removed at the end. A cluster that fails to start says why (its log's tail).
    base = tempfile.gettempdir()
    root = Path(tempfile.mkdtemp(prefix="fleet-", dir=base if len(base) <= 40 else "/tmp"))
    try:
        with ray_cluster(root, [root / f"node{i}" / "cache" for i in range(3)]) as running:
            _LOG.append(running.log)
            yield running
    finally:
        _LOG.clear()
        shutil.rmtree(root, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A fleet test that fails shows the end of the cluster's log (removed with the cluster)."""
    report = yield
    if report.failed and _LOG:
        report.sections.append(("Ray cluster log (last lines)", log_tail(_LOG[-1], 60)))
        report.sections.append(("the nodes' peer hand-overs", _peer_lines(_LOG[-1].parent)))
    return report


def _peer_lines(root: Path, most: int = 40) -> str:
    """What the download workers said of their peers (a peer that could not serve a file, or
    served other content): in the nodes' worker logs, which a test's own output does not hold."""
    found = []
    for log in sorted(root.glob("ray/session_*/logs/*.err")):
        with contextlib.suppress(OSError):
            found += [
                f"{log.name}: {line}"
                for line in log.read_text(errors="replace").splitlines()
                if "event=peer_" in line
            ]
    return "\n".join(found[-most:]) or "(none)"


@pytest.fixture(autouse=True)
def _three_nodes(cluster: RayCluster) -> None:
    """Each test starts with three nodes, whatever an earlier test that removed one left (a test
    that failed before it added one back must not fail the next)."""
    while len(cluster.nodes) < 3:
        root = next(iter(cluster.caches.values())).parent.parent
        cluster.add_node(root / f"node{len(cluster.caches)}" / "cache")


@pytest.fixture
def node_caches(cluster: RayCluster) -> list[Path]:
    """Each node's cache folder, empty (and its state folder beside it)."""
    caches = [cluster.caches[node] for node in cluster.nodes]
    for cache in caches:
        shutil.rmtree(cache.parent, ignore_errors=True)
        cache.mkdir(parents=True)
    return caches
