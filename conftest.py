"""Fixtures shared by every test: a fake hub on 127.0.0.1, repos to serve, a private cache per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fakehub import FakeHub, RepoBuilder

TOKEN = "hf_test_token_0123456789"

# Tests that share one expensive session fixture run in one xdist worker: the fleet's tests share
# one Ray cluster. xdist's own `xdist_group` does not work under pytest 9 (it renames items through
# `_nodeid`, which pytest 9 no longer reads: every test ran in its own worker, four clusters), so
# the grouping is by folder, in the scheduler itself.
_GROUPS = {"/tests/fleet/": "fleet"}


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup`` (the default here), with the folders of ``_GROUPS`` as groups."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling  # type: ignore[import-untyped]

    class ByFolder(LoadGroupScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            for folder, group in _GROUPS.items():
                if folder in nodeid:
                    return group
            scope: str = super()._split_scope(nodeid)
            return scope

    return ByFolder(config, log)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the real ~/.cache, and no Hub variable of the machine leaks in."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # hf_xet retries a failed range itself, by default after seconds: keep its waits short here.
    monkeypatch.setenv("HF_XET_CLIENT_RETRY_BASE_DELAY", "50ms")
    for name in (
        "HF_HUB_CACHE",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "HF_HUB_OFFLINE",
        "MODELS_CACHE_DIR",
        "MODELS_STATE_DIR",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def repos(tmp_path: Path) -> RepoBuilder:
    return RepoBuilder(tmp_path / "repos")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked ``both_paths`` runs twice: LFS files over plain HTTP, then through Xet."""
    if "hub" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_paths"):
        metafunc.parametrize("hub", ["http", "xet"], indirect=True)


@pytest.fixture
def hub(request: pytest.FixtureRequest, repos: RepoBuilder) -> Iterator[FakeHub]:
    xet = getattr(request, "param", "http") == "xet"
    with FakeHub(repos.root, tokens={TOKEN}, gated_access={TOKEN}, xet=xet) as server:
        yield server


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"
