"""Hostile input: schemathesis drives every endpoint from the service's own OpenAPI schema against a
real server (uvicorn) whose Hub is the fake hub. No 5xx, no answer outside the schema, and nothing
written or deleted outside the cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fakehub import FakeHub, RepoBuilder
from tests.helpers import running_service

if TYPE_CHECKING:
    # Imported where they are used: schemathesis and hypothesis take about 1.5 s to import, and
    # every xdist worker imports every test module.
    import schemathesis
    from schemathesis import GenerationMode

FUZZ_KEY = "fuzz-write-key-0123456789"
FUZZ_READ_KEY = "fuzz-read-key-0123456789"


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for folder, dirs, files in os.walk(root):
        if Path(folder) == skip or skip in Path(folder).parents:
            dirs.clear()
            continue
        for name in files:
            path = Path(folder, name)
            st = path.lstat()
            out[str(path)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    root = tmp_path_factory.mktemp("hostile")
    builder = RepoBuilder(root / "repos")
    builder.commit("org/model", {"config.json": "{}"})
    cache = root / "cache"
    outside = root / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    # A link planted in the cache that leads outside it.
    planted = cache / "models--org--model" / "snapshots" / ("0" * 40)
    planted.mkdir(parents=True)
    (planted / "evil").symlink_to(outside / "precious.txt")
    with (
        FakeHub(builder.root) as hub,
        # With API keys: every generated request carries the write key, and schemathesis's
        # ignored-auth check sends each one again without it and with a wrong one (401 wanted).
        running_service(
            cache,
            hub.url,
            root / "service.log",
            MODELS_RETRY_ATTEMPTS="1",
            MODELS_API_KEY=FUZZ_KEY,
            MODELS_READ_API_KEY=FUZZ_READ_KEY,
        ) as (url, _),
    ):
        yield url, root, cache


def fuzz_operation(
    operation: schemathesis.APIOperation[Any, Any, Any, Any],
    mode: GenerationMode,
    url: str,
    root: Path,
    cache: Path,
    examples: int = 30,  # the stress tier sends 500 (tests/stress)
    least: int = 1,
) -> int:
    """Run generated requests against one operation, ``examples`` cases at a time, until at least
    ``least`` different requests were sent (three rounds at most); return how many were."""
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import positive_data_acceptance

    sent: set[str] = set()

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case[Any]) -> None:
        # The key, unless the case is about its headers being wrong (a missing Authorization
        # is then what it sends, and 401 the rejection it expects).
        components = case.meta.components if case.meta is not None else {}
        headers_negated = any(
            str(getattr(location, "value", location)) == "header" and info.mode.is_negative
            for location, info in components.items()
        )
        key = {} if headers_negated else {"Authorization": f"Bearer {FUZZ_KEY}"}
        # A request already sent is not sent again. The generated Authorization is replaced by
        # the key: an operation with no other input (GET /api/models/budget) made 30 cases that
        # went out as one request, 30 times over, each with the checks' own requests.
        request = repr(
            (
                case.formatted_path,
                sorted((case.query or {}).items()),
                sorted({**dict(case.headers or {}), **key}.items()),
                sorted((case.cookies or {}).items()),
                case.media_type,
                case.body,
            )
        )
        if request in sent:
            return
        sent.add(request)
        before = _snapshot(root, cache)
        # Not checked: that every schema-valid body is accepted. The schema's patterns say the
        # shape; the validator adds what a JSON pattern cannot (lengths per part, '.git').
        case.call_and_validate(
            base_url=url, headers=key, excluded_checks=[positive_data_acceptance]
        )
        after = _snapshot(root, cache)
        changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        # Outside the cache only the service's own log and state folder may change.
        own = str(root / "model-service") + os.sep
        changed = {k for k in changed if not k.startswith(own)}
        assert changed <= {str(root / "service.log")}, changed
        assert (root / "outside" / "precious.txt").read_text() == "keep me"

    for _ in range(3):
        check()
        if len(sent) >= least:
            break
    return len(sent)


def _ok(result: Any) -> schemathesis.APIOperation[Any, Any, Any, Any]:
    """An operation of the schema (a schema error fails the test that asked for it)."""
    operation: schemathesis.APIOperation[Any, Any, Any, Any] = result.ok()
    return operation


def schema_of(url: str) -> schemathesis.BaseSchema:
    """The service's OpenAPI schema, with the rejections the service may give invalid input."""
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    # A body over the service's limit is refused with 413 before it is read: a rejection too.
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    return schema


def _cases() -> list[tuple[str, str]]:
    """(operation, generation mode) for every operation of the app's routes, read when the tests
    are collected: one test each, so that xdist spreads them over its workers (the whole fuzzing,
    one test, was the suite's longest, 23 s). The event stream never ends by design: its query
    validation is tested in test_operating.py. A GET has no body: only its valid input is made.
    Read from the routes, not the schema (0.2 s of CPU to make, in every xdist worker):
    ``test_every_operation_served_is_fuzzed`` holds the two equal."""
    from fastapi.routing import APIRoute

    from api.app import API_PREFIX, create_app
    from api.models.routes import router

    routes = [(route, "") for route in create_app().routes] + [
        (route, API_PREFIX) for route in router.routes
    ]
    labels = sorted(
        f"{method} {prefix}{route.path}"
        for route, prefix in routes
        if isinstance(route, APIRoute) and route.include_in_schema
        for method in route.methods or ()
        if f"{prefix}{route.path}" != "/api/models/events"
    )
    return [
        (label, mode)
        for label in labels
        for mode in ("positive", "negative")
        if mode == "positive" or not label.startswith("GET ")
    ]


CASES = _cases()


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{m}-{lbl}" for lbl, m in CASES])
def test_every_endpoint_survives_generated_input(
    server: tuple[str, Path, Path], label: str, mode: str
) -> None:
    from schemathesis import GenerationMode

    url, root, cache = server
    schema = schema_of(url)
    if mode == "positive":
        # Valid input carries the key (``fuzz_operation``): a generated Authorization would be
        # replaced, and would only take the place of cases that vary what the operation reads.
        schema.config.generation.update(with_security_parameters=False)
    operation = schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in the served schema"
    least = 15 if mode == "negative" else 1
    sent = fuzz_operation(operation, GenerationMode(mode), url, root, cache, least=least)
    assert sent >= least


def test_every_operation_served_is_fuzzed(server: tuple[str, Path, Path]) -> None:
    url, _, _ = server
    served = {
        f"{op.method.upper()} {op.path}"
        for op in (_ok(result) for result in schema_of(url).get_all_operations())
        if op.path != "/api/models/events"
    }
    assert len(served) >= 7
    assert served == {label for label, _ in CASES}
