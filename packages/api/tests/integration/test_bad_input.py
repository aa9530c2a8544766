"""Bad input: a clear 4xx that says what to fix, and nothing written, deleted or fetched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils._validators import validate_repo_id

from api.models.types import repo_id_problem
from fakehub import FakeHub

ENDPOINTS = [
    ("POST", "/api/models/status"),
    ("POST", "/api/models/download"),
    ("DELETE", "/api/models"),
]

BAD_BODIES: list[tuple[Any, str]] = [
    ({"hf_repo": "gpt2"}, "exactly one '/'"),
    ({"hf_repo": "a/b/c"}, "exactly one '/'"),
    ({"hf_repo": "../etc"}, "cannot start or end"),
    ({"hf_repo": "../../x"}, "exactly one '/'"),
    ({"hf_repo": "org/..x"}, "cannot"),
    ({"hf_repo": "org/a--b"}, "'--'"),
    ({"hf_repo": "org/model.git"}, ".git"),
    ({"hf_repo": "org/caf\u00e9"}, "ASCII"),
    ({"hf_repo": "org/a\nb"}, "ASCII"),
    ({"hf_repo": "org/" + "a" * 97}, "1-96"),
    ({"hf_repo": "org/model", "hf_commit": "../../../../tmp/evil"}, "hf_commit"),
    ({"hf_repo": "org/model", "hf_commit": "/abs"}, "hf_commit"),
    ({"hf_repo": "org/model", "hf_commit": "main\x00"}, "hf_commit"),
    ({"hf_repo": "org/model", "hf_commit": "a//b"}, "hf_commit"),
    ({"hf_repo": "org/model", "hf_commit": "feature/"}, "hf_commit"),
    ({"hf_repo": "org/model", "hf_commit": "x" * 129}, "128"),
    ({"hf_repo": "org/model", "hf_commit": ""}, "at least 1"),
    ({"hf_repo": "org/model", "extra": 1}, "Extra inputs are not permitted"),
    ({"hf_repo": 5}, "valid string"),
    ({"hf_commit": "main"}, "Field required"),
    ([], "valid dictionary"),
    ("not json", "JSON"),
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
async def test_bad_bodies_are_422_and_touch_nothing(
    client: httpx.AsyncClient, hub: FakeHub, cache_dir: Path, method: str, path: str
) -> None:
    for body, words in BAD_BODIES:
        if isinstance(body, str):
            response = await client.request(
                method, path, content=body, headers={"Content-Type": "application/json"}
            )
        else:
            response = await client.request(method, path, json=body)
        assert response.status_code == 422, body
        assert words in str(response.json()["detail"]), (body, response.json())
    assert hub.count() == 0
    assert not cache_dir.exists() or not any(cache_dir.rglob("*"))


async def test_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    body = '{"hf_repo": "org/model", "hf_commit": "' + "a" * 100_000 + '"}'
    response = await client.post(
        "/api/models/status", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert "at most" in response.json()["detail"]


async def test_commit_ids_are_normalised(client: httpx.AsyncClient) -> None:
    commit = "ABCDEF0123456789ABCDEF0123456789ABCDEF01"
    response = await client.post(
        "/api/models/status", json={"hf_repo": "org/m", "hf_commit": commit}
    )
    assert response.status_code == 200
    assert response.json()["model"]["hf_commit"] == commit.lower()
    branch = await client.post(
        "/api/models/status", json={"hf_repo": "org/m", "hf_commit": "refs/pr/1"}
    )
    assert branch.status_code == 200


@pytest.mark.parametrize(
    "repo_id",
    [
        "org/model",
        "Org-1/Model_2.5",
        "a/b",
        "_x/y_",
        "org/-bad",
        "org/bad-",
        "org/.bad",
        "org/bad.",
        "org/a..b",
        "org/a--b",
        "org/x.git",
        "org/caf\u00e9",
        "org/a b",
        "org/" + "a" * 96,
        "org/" + "a" * 97,
        "o" * 96 + "/m",
    ],
)
def test_repo_rules_agree_with_the_library(repo_id: str) -> None:
    """Our validator (no huggingface_hub import in the types) accepts what the library accepts."""
    try:
        validate_repo_id(repo_id)
        library_ok = True
    except HFValidationError:
        library_ok = False
    assert (repo_id_problem(repo_id) is None) == library_ok


UNENCODABLE = [
    '{"hf_repo": "org/\\ud800x"}',
    '{"hf_repo": "org/model", "hf_commit": "\\udfff"}',
    '{"hf_repo": NaN}',
    '{"hf_repo": "org/model", "hf_commit": Infinity}',
    '{"hf_repo": 1e999999}',
    '{"hf_repo": "org/model", "\\ud800": 1}',
    '{"hf_repo": -Infinity, "hf_commit": NaN}',
]


@pytest.mark.parametrize(("method", "path"), [*ENDPOINTS, ("POST", "/api/models/verify")])
@pytest.mark.parametrize("body", UNENCODABLE)
async def test_values_json_cannot_echo_get_a_clear_422(
    client: httpx.AsyncClient, hub: FakeHub, method: str, path: str, body: str
) -> None:
    """A lone surrogate or a non-finite number cannot be echoed back in JSON: the 422 names the
    field and the rule without the value (it was a 500 before)."""
    response = await client.request(
        method, path, content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail
    assert all(error["loc"][0] == "body" and error["msg"] for error in detail)
    assert hub.count() == 0


async def test_chunked_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    """No Content-Length (chunked): still 413, not the JSON parser's 400."""

    async def chunks() -> Any:
        yield b'{"hf_repo": "org/model", "hf_commit": "'
        for _ in range(20):
            yield b"a" * 4096
        yield b'"}'

    response = await client.post(
        "/api/models/status", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413, response.text
    assert "at most 65536 bytes" in response.json()["detail"]


async def test_chunked_small_body_is_read(client: httpx.AsyncClient) -> None:
    async def chunks() -> Any:
        yield b'{"hf_repo": '
        yield b'"org/model"}'

    response = await client.post(
        "/api/models/status", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "NOT_FOUND"


async def test_nodes_on_one_machine_are_refused_not_ignored(
    client: httpx.AsyncClient, hub: FakeHub, cache_dir: Path
) -> None:
    """``nodes`` is a fleet's field: a service on one machine says so (422) and does nothing."""
    body = {"hf_repo": "org/model", "nodes": ["0123abcd"]}
    for path in ("/api/models/download", "/api/models/status", "/api/models/plan"):
        answer = await client.post(path, json=body)
        assert answer.status_code == 422, (path, answer.text)
        assert "runs on one machine" in answer.json()["detail"]
    assert hub.count() == 0
    assert not (cache_dir / "models--org--model").exists()
