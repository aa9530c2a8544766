"""Which requests the service serves at all (``api.perimeter``): a foreign ``Host`` (DNS
rebinding) is a 400 and a request of a foreign site that changes something a 403, both before
any work; the key is checked before the body is read."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import SecretStr

from api.app import create_app
from api.perimeter import AllowedHosts, RedactQuery, host_name
from api.settings import Settings
from fakehub import FakeHub, RepoBuilder

KEY = "perimeter-test-key-0123456789"
BODY = {"hf_repo": "org/model"}


@pytest.fixture
async def asgi(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings.model_copy(update={"allowed_hosts": ["models.example.com"]}))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000"
        ) as client,
    ):
        yield client


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io:8000", ""],
)
async def test_a_foreign_host_is_refused_before_any_work(
    asgi: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder, host: str
) -> None:
    repos.commit("org/model", {"config.json": "{}"})
    hub.reset_counts()
    for method, path, body in (
        ("GET", "/api/models/list", None),
        ("POST", "/api/models/download", BODY),
        ("POST", "/api/models/prune", {"dry_run": False}),
        ("GET", "/", None),
        ("GET", "/docs", None),
        ("GET", "/metrics", None),
    ):
        answer = await asgi.request(method, path, json=body, headers={"Host": host})
        assert answer.status_code == 400, (method, path, answer.text)
        assert "MODELS_ALLOWED_HOSTS" in answer.json()["detail"]
    assert hub.count() == 0  # nothing was started


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "10.1.2.3", "models.example.com:443"],
)
async def test_the_names_the_service_is_reached_by_are_served(
    asgi: httpx.AsyncClient, host: str
) -> None:
    for path in ("/api/models/list", "/", "/docs", "/api/health"):
        answer = await asgi.get(path, headers={"Host": host})
        assert answer.status_code == 200, (host, path, answer.text)


async def test_a_request_of_a_foreign_site_changes_nothing(
    asgi: httpx.AsyncClient, hub: FakeHub, repos: RepoBuilder
) -> None:
    repos.commit("org/model", {"config.json": "{}"})
    hub.reset_counts()
    foreign = {"Origin": "http://evil.example"}
    for method, path, body in (
        ("POST", "/api/models/download", BODY),
        ("POST", "/api/models/prune", {"dry_run": False}),
        ("DELETE", "/api/models", BODY),
        ("PUT", "/api/models/settings/bandwidth", {"bytes_per_second": 1}),
    ):
        answer = await asgi.request(method, path, json=body, headers=foreign)
        assert answer.status_code == 403, (method, path, answer.text)
        assert "another site" in answer.json()["detail"]
    # A browser marks what another site's page fetches: refused, reads included...
    fetched = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}
    assert (await asgi.get("/api/models/list", headers=fetched)).status_code == 403
    # ... but a link to the page from elsewhere still opens it.
    navigated = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    assert (await asgi.get("/", headers=navigated)).status_code == 200
    assert hub.count() == 0
    # The service's own page (same origin), and clients that are not browsers, are served.
    own = {"Origin": "http://127.0.0.1:8000", "Sec-Fetch-Site": "same-origin"}
    assert (await asgi.post("/api/models/plan", json=BODY, headers=own)).status_code == 200
    assert (await asgi.post("/api/models/plan", json=BODY)).status_code == 200


async def test_the_key_is_checked_before_the_body_is_read(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"api_key": SecretStr(KEY)}))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1"
        ) as client,
    ):
        for body in (b"not json at all", b'{"hf_repo": 5}', b"{" * 1000):
            answer = await client.post(
                "/api/models/download", content=body, headers={"Content-Type": "application/json"}
            )
            assert answer.status_code == 401, answer.text
            assert answer.headers["WWW-Authenticate"] == "Bearer"
        keyed = await client.post(
            "/api/models/download",
            content=b"not json at all",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
        )
        assert keyed.status_code == 422  # with the key, the body's own fault


def test_host_names_and_the_allowed_set() -> None:
    assert host_name("Example.COM:8080") == "example.com"
    assert host_name("[::1]:8000") == "::1"
    assert host_name("::1") == "::1"
    allowed = AllowedHosts(["models.example.com"])
    assert allowed.allows("models.example.com:9000")
    assert allowed.allows("192.168.1.20:8000")
    assert allowed.allows("[fe80::1]")
    assert allowed.allows("api.localhost")
    assert not allowed.allows("example.com")
    assert not allowed.allows(None)
    assert AllowedHosts(["*"]).allows("anything.example")


def test_the_access_log_filter_hides_query_secrets() -> None:
    redact = RedactQuery(["the-configured-key-123456"]).redact
    assert redact("/api/models/list") == "/api/models/list"
    assert redact("/api/models/list?limit=5") == "/api/models/list?limit=5"
    assert redact("/x?api_key=abc&limit=5") == "/x?api_key=***&limit=5"
    assert redact("/x?q=the-configured-key-123456") == "/x?q=***"
    assert redact("/x?access_token=t&Authorization=b") == "/x?access_token=***&Authorization=***"


async def test_the_addresses_noted_as_the_service_own_stay_bounded(
    asgi: httpx.AsyncClient,
) -> None:
    """Any IP address is an allowed Host: a client naming thousands of them must not grow what
    the service notes as its own (each worker's job carries it)."""
    from api.models.hub import guard

    for n in range(300):
        await asgi.get("/api/health", headers={"Host": f"10.9.{n // 256}.{n % 256}:8000"})
    await asgi.get("/api/health", headers={"Host": "localhost:8000"})
    noted = guard.own_origins()
    assert not any(host.startswith("10.9.") for host, _ in noted)
    assert ("localhost", 8000) in noted


async def test_every_operation_documents_what_the_perimeter_answers(
    asgi: httpx.AsyncClient,
) -> None:
    """A foreign Host (400) and a foreign site's request (403) can be the answer of any operation,
    before it runs: each says so in the schema (the fuzzer found a 403 of POST /download that
    the schema did not list, from a generated Origin header)."""
    schema = (await asgi.get("/openapi.json")).json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert {"400", "403"} <= set(responses), (method, path, sorted(responses))
    plan = schema["paths"]["/api/models/plan"]["post"]["responses"]["403"]["description"]
    assert "gated" in plan  # both causes of this one's 403
    assert "another site" in plan
