"""A real Ray cluster of 3 nodes on this machine, shared by the fleet tests of a run (they run in
one xdist worker: their ``xdist_group``). Each node has its own cache folder (its
``models-cache`` label); each test starts with them empty."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ray_cluster_utils = pytest.importorskip("ray.cluster_utils", reason="the api[fleet] extra")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[tuple[str, list[Path]]]:
    """(the cluster's address, each node's cache folder)."""
    # Ray's sockets live under its temp folder, whose path must stay short (a socket path is at
    # most 107 bytes): one of its own under /tmp, removed at the end.
    root = Path(tempfile.mkdtemp(prefix="fleet-"))
    caches = [root / f"node{i}" / "cache" for i in range(3)]
    saved = dict(os.environ)
    # The nodes' processes (and the agents in them) inherit this environment: loopback only, and
    # a Hub home of their own (never ~/.cache).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["HF_HOME"] = str(root / "hf-home")
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["HF_XET_CLIENT_RETRY_BASE_DELAY"] = "50ms"
    for name in ("HF_HUB_CACHE", "HF_ENDPOINT", "HF_TOKEN", "MODELS_STATE_DIR"):
        os.environ.pop(name, None)
    cluster = ray_cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "node_ip_address": "127.0.0.1",
            "labels": {"models-cache": str(caches[0])},
            "temp_dir": str(root / "ray"),
        },
    )
    try:
        for cache in caches[1:]:
            cluster.add_node(
                num_cpus=1, node_ip_address="127.0.0.1", labels={"models-cache": str(cache)}
            )
        cluster.wait_for_nodes()
        os.environ.clear()
        # Kept for the drivers of the tests (the services join the cluster): without it Ray
        # takes the machine's external address as theirs, which nothing here can reach.
        os.environ.update({**saved, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
        yield cluster.address, caches
    finally:
        cluster.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def node_caches(ray_cluster: tuple[str, list[Path]]) -> list[Path]:
    """Each node's cache folder, empty (and its state folder beside it)."""
    _, caches = ray_cluster
    for cache in caches:
        shutil.rmtree(cache.parent, ignore_errors=True)
        cache.mkdir(parents=True)
    return caches
