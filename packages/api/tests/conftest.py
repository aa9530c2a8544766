"""Fixtures of the service's tests: settings pointing at the fake hub, and an API client with the
lifespan running. (The fake hub, the repos and a private cache per test come from the root
conftest.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from api.settings import Settings
from fakehub import FakeHub
from tests.helpers import app_client


@pytest.fixture
def settings(hub: FakeHub, cache_dir: Path) -> Settings:
    # Short backoffs keep the retry tests fast; the policy itself is the production one.
    return Settings(
        cache_dir=cache_dir,
        hf_endpoint=hub.url,
        retry_min_backoff_seconds=0.05,
        retry_max_backoff_seconds=0.2,
        # No spare worker here, so that tests can count the workers of downloads exactly;
        # test_warm_worker covers the spare.
        warm_worker=False,
    )


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(settings) as c:
        yield c
