"""Every line the service writes to its log is logfmt (``api.logfmt``): the service's own records,
uvicorn's (start, access log), the download workers' and the library's warnings. A log shipper
parses each line into fields; no value can forge a field or a line."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import httpx
import pytest

from api import logfmt
from fakehub import FakeHub, Generated, RepoBuilder, http_error
from tests.helpers import FINAL, MB, service_from_its_entry_point, wait_for_status

_PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_.]*)=("(?:[^"\\]|\\.)*"|[^\s"=]+)(?: |$)')
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}


def parse(line: str) -> dict[str, str]:
    """A strict logfmt parser: the whole line is key=value pairs, each value bare or quoted;
    anything else fails."""
    fields: dict[str, str] = {}
    at = 0
    while at < len(line):
        found = _PAIR.match(line, at)
        assert found is not None, f"not logfmt at {at}: {line!r}"
        key, raw = found.groups()
        assert key not in fields, f"{key} twice: {line!r}"
        if raw.startswith('"'):
            raw = re.sub(
                r"\\(x[0-9a-f]{2}|.)",
                lambda m: chr(int(m[1][1:], 16)) if m[1][0] == "x" else _ESCAPES[m[1]],
                raw[1:-1],
            )
        fields[key] = raw
        at = found.end()
    return fields


@pytest.mark.parametrize(
    "raw",
    [
        "plain",
        "two words",
        'a " quote',
        'forged" event=deleted x="y',
        "line\nbreak event=forged",
        "back\\slash",
        "tab\tand\rreturn",
        "é ünïcode ✓",
        "\x00\x1b[31mcontrol",
        "",
        "a=b",
    ],
)
def test_a_value_comes_back_as_itself_and_cannot_forge_a_field(raw: str) -> None:
    fields = parse(logfmt.line("test", value=raw, after="x"))
    assert fields == {"event": "test", "value": raw, "after": "x"}


def test_a_record_with_a_traceback_is_one_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord("api.x", logging.ERROR, __file__, 1, "%s", None, sys.exc_info())
    record.args = (logfmt._Line(logfmt.line("crashed", task_id="org/a:latest")),)
    text = logfmt.Formatter().format(record)
    assert "\n" not in text
    fields = parse(text)
    assert fields["event"] == "crashed"
    assert fields["level"] == "error"
    assert "ValueError: boom\nsecond line" in fields["traceback"]


async def test_every_line_a_service_writes_parses(
    hub: FakeHub, repos: RepoBuilder, cache_dir: Path, tmp_path: Path
) -> None:
    """A service as an operator runs it, through a download retried after a 503, a failed
    download, a verification, a delete with a Hub that does not have a repo, and a prune: every
    line of its log (uvicorn's start and access lines included) is logfmt."""
    repos.commit("org/model", {"config.json": "{}", "w.bin": Generated(2 * MB, seed=61)})
    repos.commit("org/gated", {"config.json": "{}"}, gated=True)  # no token here: it fails
    hub.add_fault(http_error(503, path="*/w.bin", method="GET", times=1))
    log = tmp_path / "service.log"
    body = {"hf_repo": "org/model"}
    # The entry point itself: uvicorn's first lines are written before it imports the app.
    with service_from_its_entry_point(
        cache_dir,
        hub.url,
        log,
        MODELS_RETRY_MIN_BACKOFF_SECONDS="0.05",
        MODELS_RETRY_MAX_BACKOFF_SECONDS="0.2",
    ) as (url, _):
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.post("/api/models/download", json=body)).status_code == 202
            assert (await wait_for_status(client, body, FINAL))["status"] == "DOWNLOADED"
            assert (await client.post("/api/models/verify", json=body)).json()["verified"]
            gated = {"hf_repo": "org/gated"}
            await client.post("/api/models/download", json=gated)
            await wait_for_status(client, gated, FINAL)
            assert (await client.request("DELETE", "/api/models", json=body)).status_code == 200
            assert (await client.post("/api/models/prune", json={"dry_run": True})).is_success
    lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line]
    parsed = [parse(line) for line in lines]
    for fields in parsed:
        assert {"time", "level", "logger"} <= set(fields), fields
        assert ("event" in fields) != ("msg" in fields), fields
    events = {f.get("event") for f in parsed}
    assert {"started", "retrying", "completed", "failed", "verified", "deleted"} <= events
    assert {"request"} <= events  # uvicorn's access log, as fields
    assert any(f["logger"].startswith("uvicorn") and "msg" in f for f in parsed)  # its start
