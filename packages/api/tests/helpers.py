"""What the tests share that is not a fixture: constants, the app with its lifespan, waits with
deadlines, the service as a process, and checks used by several test files."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import functools
import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
from fastapi import FastAPI

from api.app import create_app
from api.cli import EventLines
from api.models.anchored import Folder
from api.models.hub.zygote import Zygote
from api.settings import Settings
from tests.forkserver import fork_server

MB = 1024 * 1024
FINAL = {"DOWNLOADED", "PARTIAL", "NOT_FOUND"}


@functools.cache
def tls() -> ssl.SSLContext:
    """The TLS context of this test process's HTTP clients (``verify=tls()``), made once: httpx
    makes one per client, loading the CA bundle (20-30 ms of CPU), though the tests speak plain
    HTTP to 127.0.0.1; the polls that make a client per request made hundreds a run."""
    return httpx.create_ssl_context()


_zygote: Zygote | None = None


def shared_zygote() -> Zygote:
    """One zygote for the apps of this test process, as one service has one: a download worker is
    then forked in milliseconds instead of importing the Hub library (0.5 s of CPU) in every test.
    Each worker gets the environment of its own test; the zygote ends with this process."""
    global _zygote
    if _zygote is None:
        _zygote = Zygote(dict(os.environ))
    return _zygote


def ranged(settings: Settings, **more: Any) -> Settings:
    """Files of 2 MiB and up as parallel ranges, in parts of 1 MiB over 4 connections (the
    defaults are 64 MiB, 16 MiB and 8: the same code, smaller numbers)."""
    return settings.model_copy(
        update={
            "ranged_min_bytes": 2 * MB,
            "ranged_part_bytes": MB,
            "ranged_connections": 4,
            **more,
        }
    )


@contextlib.asynccontextmanager
async def app_and_client(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An app built with ``settings``, its lifespan running (stopped at the end), and a client of
    it; its workers are forked from this process's shared zygote. (In-process, a response is
    read whole: event streams need a service of its own, ``running_service``, or its bus.)"""
    app = create_app(settings, zygote=shared_zygote())
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c,
    ):
        yield app, c


@contextlib.asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app built with ``settings`` (``app_and_client``)."""
    async with app_and_client(settings) as (_, client):
        yield client


def _processes() -> list[tuple[int, int, bytes]]:
    """(pid, parent pid, command line) of every process of the machine."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
            cmdline = (status.parent / "cmdline").read_bytes()
        except OSError:
            continue
        found.append((int(status.parent.name), int(fields.get("PPid", "0").strip()), cmdline))
    return found


def zygote_processes(parent: int | None = None) -> list[int]:
    """Pids of the zygotes (what download workers are forked from) started by ``parent`` (this
    test process by default)."""
    parent = os.getpid() if parent is None else parent
    return [
        pid
        for pid, ppid, cmdline in _processes()
        if ppid == parent and b"api.models.hub.zygote" in cmdline
    ]


def children_of(parent: int) -> list[int]:
    return [pid for pid, ppid, _ in _processes() if ppid == parent]


def worker_processes() -> list[int]:
    """Pids of download workers started by this test process (forked by its zygotes)."""
    zygotes = set(zygote_processes())
    return sorted(pid for pid, ppid, _ in _processes() if ppid in zygotes)


async def wait_for_status(
    client: httpx.AsyncClient, body: dict[str, Any], until: set[str], seconds: float = 60
) -> dict[str, Any]:
    """Poll POST /status until the status is one of ``until``; return the last answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        answer: dict[str, Any] = (await client.post("/api/models/status", json=body)).json()
        if answer["status"] in until or loop.time() > deadline:
            return answer
        await asyncio.sleep(0.05)


async def assert_status_and_list_agree(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    """Every listed revision has the status its own status request answers, and the same error."""
    listed: list[dict[str, Any]] = (await client.get("/api/models/list")).json()["models"]
    for item in listed:
        if item["status"] == "DOWNLOADING" or item["model"]["hf_commit"] is None:
            continue
        status = (await client.post("/api/models/status", json=item["model"])).json()
        assert status["status"] == item["status"], (item, status)
        assert status["error_message"] == item.get("error_message"), (item, status)
    return listed


def parse_python(source: str) -> ast.Module:
    """``ast.parse``, once more when CPython 3.11 says its AST state was disturbed. 3.11 keeps the
    AST constructor's recursion count per interpreter, not per call, and a traceback printed by
    another thread at that moment parses its source line with ``ast`` too (its ``^^^`` marks):
    "AST constructor recursion depth mismatch" (python/cpython#106905; seen in this suite, a fake
    server's handler thread printing). The parse itself is deterministic: a second one is the
    answer."""
    for attempt in range(3):
        try:
            return ast.parse(source)
        except SystemError as error:
            if "recursion depth mismatch" not in str(error) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess(Protocol):
    """What the tests use of a service's process: a ``subprocess.Popen``, or a service forked by
    the tests' fork server (``tests.forkserver``)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


def running_service(
    cache_dir: Path, hub_url: str, log: Path, **env: str
) -> contextlib.AbstractContextManager[tuple[str, ServiceProcess]]:
    """The service as its own process (uvicorn on 127.0.0.1), as an operator runs it; yields its
    URL and process. Stopped with SIGTERM at the end unless the test killed it.

    The process is forked from this test process's fork server, which has imported the service
    already (``tests.forkserver``: about a second of CPU less per service)."""
    return _service(cache_dir, hub_url, log, env, fresh=False)


def service_from_its_entry_point(
    cache_dir: Path, hub_url: str, log: Path, **env: str
) -> contextlib.AbstractContextManager[tuple[str, ServiceProcess]]:
    """``running_service``, started as a new process, ``python -m uvicorn api.app:app``: for the
    tests of that entry point itself (its first log lines, the signal that stops it)."""
    return _service(cache_dir, hub_url, log, env, fresh=True)


@contextlib.contextmanager
def _service(
    cache_dir: Path, hub_url: str, log: Path, env: dict[str, str], fresh: bool
) -> Iterator[tuple[str, ServiceProcess]]:
    # The test binds the socket and hands it to uvicorn (--fd): no other test's server can take
    # the port between a check and the bind.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    full_env = {
        **os.environ,
        "HF_HUB_CACHE": str(cache_dir),
        "HF_ENDPOINT": hub_url,
        "HF_HOME": str(cache_dir.parent / "hf-home"),
        # The zygote starts at the first download, as the in-process apps' do (conftest.py): a
        # quarter of the services tested download nothing, and each zygote is a new process that
        # imports the Hub library (0.4 s of CPU). The one started with the service is tested in
        # test_models_api.py (test_workers_are_forked_from_a_zygote_that_ends_with_the_service).
        "MODELS_WARM_WORKER": "false",
        **env,
    }
    process: ServiceProcess
    with log.open("wb") as out, listener:
        if fresh:
            process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "api.app:app", "--fd", str(listener.fileno())],
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=(listener.fileno(),),
            )
        else:
            process = fork_server().start(full_env, Path.cwd(), listener, out.fileno())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        with httpx.Client(timeout=1, verify=tls()) as client:
            while True:
                try:
                    client.get(f"{url}/api/health")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise RuntimeError(f"the service did not start; see {log}") from None
                    time.sleep(0.05)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=30)


def modelctl(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``modelctl ARGS`` against ``url``, run in this process (its real code, through click's test
    runner, talking HTTP to the service): what a script sees of it (exit code, stdout, stderr),
    without the half second of imports a new process pays per command. The tests of what only a
    process has (signals, its entry point) start ``python -m api.cli`` instead."""
    from typer.testing import CliRunner

    from api.cli import app

    result = CliRunner().invoke(
        app, list(args), env={"MODELCTL_URL": url, **env}, catch_exceptions=True
    )
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # A crash shows as one: its traceback where a test's message will print it.
        import traceback

        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["modelctl", *args], result.exit_code, result.stdout, stderr)


def modelctl_process(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``modelctl ARGS`` as its own process (``python -m api.cli``), its output piped."""
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        env={**os.environ, "MODELCTL_URL": url, "COLUMNS": "80"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def workers_using(cache_dir: Path) -> list[int]:
    """Download workers and zygotes on this machine, whatever their parent, of a service working
    on ``cache_dir`` (a forked worker's environment is its zygote's)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (
                b"api.models.hub.zygote" in (proc / "cmdline").read_bytes()
                and str(cache_dir).encode() in (proc / "environ").read_bytes()
            ):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def downloads_using(cache_dir: Path) -> list[int]:
    """Download workers (not their zygotes) of a service working on ``cache_dir``."""
    found = set(workers_using(cache_dir))
    return sorted(pid for pid, ppid, _ in _processes() if pid in found and ppid in found)


@contextlib.contextmanager
def tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``mount_point`` (made here), unmounted at the end; the
    test is skipped where mounting is not permitted."""
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


async def sse(
    client: httpx.AsyncClient,
    url: str,
    headers: dict[str, str] | None = None,
    connected: asyncio.Event | None = None,
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of a Server-Sent Events stream; ``connected`` is set when the service
    says the stream is subscribed (its ``: connected`` comment), so that a test can act then,
    not after a guessed while."""
    async with client.stream(
        "GET", url, headers=headers, timeout=httpx.Timeout(30, read=60)
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = EventLines()
        async for line in response.aiter_lines():
            done = lines.feed(line)
            if connected is not None and lines.comment == "connected":
                connected.set()
            if done is not None:
                yield done


def anchored(path: Path) -> Folder:
    """The folder ``path``, opened as the service opens its roots (``api.models.anchored``)."""
    folder = Folder.anchor(path)
    assert folder is not None, path
    return folder


def make_revision(
    cache: Path, repo: str, commit: str, files: dict[str, bytes], *, ref: str | None = "main"
) -> Path:
    """Write a revision the way huggingface_hub 2.x lays it out: blobs, links, refs, trees."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = folder / "snapshots" / commit
    tree = {}
    for rel, data in files.items():
        etag = hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
        (folder / "blobs" / etag).write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(folder / "blobs" / etag, link.parent))
        tree[rel] = {"size": len(data), "blob_id": etag}
    (folder / "trees").mkdir(exist_ok=True)
    (folder / "trees" / f"{commit}.json").write_text(
        json.dumps({"format_version": 1, "files": tree})
    )
    if ref:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return folder
