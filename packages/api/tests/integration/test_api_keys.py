"""API keys (issue 16): with MODELS_API_KEY set, a stranger changes nothing; with
MODELS_READ_API_KEY set, a stranger sees nothing; keys rotate, never show, and Swagger knows the
scheme."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from api.auth import listening_host, warn_if_open
from api.settings import Settings
from fakehub import FakeHub, Generated, RepoBuilder
from tests.helpers import FINAL, MB, app_client, running_service, wait_for_status

WRITE = "write-key-0123456789abcdef"
OLD_WRITE = "old-write-key-0123456789ab"
READ = "read-key-0123456789abcdef"
BODY = {"hf_repo": "org/model"}

WRITES = [
    ("POST", "/api/models/download", BODY),
    ("DELETE", "/api/models", BODY),
    ("POST", "/api/models/verify", BODY),
    ("POST", "/api/models/prune", {"dry_run": False}),
    ("PUT", "/api/models/settings/bandwidth", {"max_bytes_per_second": 1_000_000}),
]
READS = [
    ("POST", "/api/models/status", BODY),
    ("GET", "/api/models/list", None),
    ("GET", "/api/models/space", None),
    ("POST", "/api/models/plan", BODY),
    ("GET", "/api/models/updates", None),
    ("GET", "/api/models/downloads", None),
    ("GET", "/api/models/settings/bandwidth", None),
    ("GET", "/api/models/events", None),
    ("GET", "/metrics", None),
]


def keyed(settings: Settings, write: str | None = None, read: str | None = None) -> Settings:
    return settings.model_copy(
        update={
            "api_key": SecretStr(write) if write else None,
            "read_api_key": SecretStr(read) if read else None,
        }
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def call(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    body: object,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return await client.request(method, path, json=body, headers=headers)


def allowed(reads: Sequence[tuple[str, str, object]]) -> list[tuple[str, str, object]]:
    """The reads that answer and end in-process: an event stream never ends, and the test
    transport waits for the end (its allowed case is modelctl's ``--wait`` below)."""
    return [r for r in reads if not r[1].endswith("/events")]


def assert_refused(response: httpx.Response, kind: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == "Bearer"
    detail = response.json()["detail"]
    assert kind in detail
    assert "Authorization: Bearer" in detail


async def test_with_a_write_key_a_stranger_changes_nothing_and_reads_stay_open(
    settings: Settings, repos: RepoBuilder, hub: FakeHub, cache_dir: Path
) -> None:
    repos.commit("org/model", {"config.json": "{}", "w.bin": Generated(MB, seed=1)})
    async with app_client(keyed(settings, write=WRITE)) as client:
        for method, path, body in WRITES:
            for headers in (None, bearer("wrong-key-0123456789abcdef"), bearer(READ)):
                assert_refused(await call(client, method, path, body, headers), "MODELS_API_KEY")
        # Nothing was started, fetched or written.
        assert hub.count("GET", "*") == 0
        assert not cache_dir.exists() or not any(cache_dir.rglob("models--*"))
        for method, path, body in allowed(READS):
            response = await call(client, method, path, body)
            assert response.status_code != 401, (path, response.text)
        started = await client.post("/api/models/download", json=BODY, headers=bearer(WRITE))
        assert started.status_code == 202
        assert (await wait_for_status(client, BODY, FINAL))["status"] == "DOWNLOADED"


async def test_with_a_read_key_a_stranger_sees_nothing(
    settings: Settings, repos: RepoBuilder
) -> None:
    repos.commit("org/model", {"config.json": "{}"})
    async with app_client(keyed(settings, write=WRITE, read=READ)) as client:
        for method, path, body in READS:
            assert_refused(await call(client, method, path, body), "MODELS_READ_API_KEY")
        for method, path, payload in allowed(READS):
            for key in (READ, WRITE):  # the write key grants reads too
                response = await call(client, method, path, payload, bearer(key))
                assert response.status_code != 401, (path, response.text)
        # The read key changes nothing.
        assert_refused(
            await client.post("/api/models/download", json=BODY, headers=bearer(READ)),
            "MODELS_API_KEY",
        )
        assert (await client.get("/api/health")).status_code == 200  # liveness stays open
        assert (await client.get("/openapi.json")).status_code == 200


async def test_several_keys_rotate_and_no_key_is_ever_shown(
    settings: Settings, repos: RepoBuilder, caplog: pytest.LogCaptureFixture
) -> None:
    repos.commit("org/model", {"config.json": "{}"})
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    async with app_client(keyed(settings, write=f"{OLD_WRITE}, {WRITE}", read=READ)) as client:
        client.headers.update(bearer(READ))  # reads (the waits); each write sends its own key
        for key in (OLD_WRITE, WRITE):
            answer = await client.post("/api/models/download", json=BODY, headers=bearer(key))
            seen.append(answer.text)
            seen.append((await wait_for_status(client, BODY, FINAL))["status"])
            deleted = await client.request("DELETE", "/api/models", json=BODY, headers=bearer(key))
            assert deleted.json()["status"] == "deleted"
        for method, path, body in [*WRITES, *READS]:
            seen.append(
                (await call(client, method, path, body, bearer("nope-0123456789abcdef"))).text
            )
        seen.append((await client.get("/metrics", headers=bearer(READ))).text)
        seen.append((await client.get("/openapi.json")).text)
    seen.append(caplog.text)
    everything = "\n".join(seen)
    for key in (OLD_WRITE, WRITE, READ):
        assert key not in everything
    assert "DOWNLOADED" in everything


async def test_openapi_declares_the_bearer_scheme_on_every_guarded_endpoint(
    client: httpx.AsyncClient,
) -> None:
    spec = (await client.get("/openapi.json")).json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["type"] == "http"
    assert schemes["HTTPBearer"]["scheme"] == "bearer"
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            guarded = path.startswith("/api/models") or path == "/metrics"
            assert (operation.get("security") == [{"HTTPBearer": []}]) == guarded, (path, method)
            if path.startswith("/api/models"):
                assert "401" in operation["responses"], (path, method)


@pytest.mark.parametrize("value", ["short", "has space inside 0123456789", " , "])
def test_a_weak_or_empty_key_stops_the_start_without_showing_it(value: str) -> None:
    with pytest.raises(ValueError, match="MODELS_API_KEY") as refused:
        Settings(api_key=SecretStr(value))
    assert value.strip(" ,") not in str(refused.value) or not value.strip(" ,")


def test_the_listening_address_is_read_as_uvicorn_reads_it() -> None:
    assert listening_host(["uvicorn", "api.app:app", "--host", "0.0.0.0"], {}) == "0.0.0.0"
    assert listening_host(["uvicorn", "api.app:app", "--host=::"], {}) == "::"
    assert listening_host(["/x/bin/uvicorn", "api.app:app"], {}) == "127.0.0.1"
    assert listening_host(["/x/bin/uvicorn", "api.app:app"], {"UVICORN_HOST": "10.0.0.2"}) == (
        "10.0.0.2"
    )
    assert listening_host(["pytest"], {}) is None


def test_an_open_service_beyond_loopback_is_warned_of(
    caplog: pytest.LogCaptureFixture, cache_dir: Path
) -> None:
    open_settings = Settings(cache_dir=cache_dir)
    argv = ["/x/bin/uvicorn", "api.app:app", "--host", "0.0.0.0"]
    assert warn_if_open(open_settings, argv, {}) is True
    assert "event=open_api host=0.0.0.0" in caplog.text
    assert warn_if_open(open_settings, ["/x/bin/uvicorn", "api.app:app"], {}) is False
    assert warn_if_open(keyed(open_settings, write=WRITE), argv, {}) is False


def test_modelctl_sends_the_token_from_its_environment(
    hub: FakeHub, repos: RepoBuilder, cache_dir: Path, tmp_path: Path
) -> None:
    repos.commit("org/model", {"config.json": "{}"})
    log = tmp_path / "service.log"
    keys = {"MODELS_API_KEY": WRITE, "MODELS_READ_API_KEY": READ}
    with running_service(cache_dir, hub.url, log, **keys) as (url, _):
        env = {**os.environ, "MODELCTL_URL": url, "COLUMNS": "120"}
        env.pop("MODELCTL_TOKEN", None)
        refused = subprocess.run(
            [sys.executable, "-m", "api.cli", "download", "org/model"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 1
        assert "MODELCTL_TOKEN" in refused.stderr
        done = subprocess.run(
            [sys.executable, "-m", "api.cli", "download", "org/model", "--wait"],
            env={**env, "MODELCTL_TOKEN": WRITE},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "org/model: DOWNLOADED" in done.stdout
        assert WRITE not in done.stdout + done.stderr
    assert "event=open_api" not in log.read_text()  # loopback: no warning
    assert WRITE not in log.read_text()
