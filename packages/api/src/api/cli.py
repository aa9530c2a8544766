"""``modelctl``: the models API from a terminal or a script.

Talks to the REST API at ``--url`` (or ``MODELCTL_URL``, default http://127.0.0.1:8000).
Exit codes scripts can rely on: 0 success, 1 failure, 2 usage or invalid input, 3 not found,
4 busy (already downloading, or every download slot taken). ``--json`` prints what the API
answered, as JSON, on stdout.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import signal
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn, TextIO

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from api.units import human_bytes

OK, FAILURE, USAGE, NOT_FOUND, BUSY = 0, 1, 2, 3, 4
_EXIT_BY_STATUS = {404: NOT_FOUND, 409: BUSY, 429: BUSY, 422: USAGE, 400: USAGE, 413: USAGE}

app = typer.Typer(
    name="modelctl",
    help="Fetch, watch, check, list and remove models through the models API.",
    no_args_is_help=True,
    add_completion=False,
)


# No emoji codes (a commit named "fire" printed as an emoji); values from the user or the Hub are
# escaped (``_plain``) wherever markup is on.
# Piped to another program, lines are not hard-wrapped at 80 columns (a table or a file list cut
# in two is no input to grep or awk): no width but the content's.
def _unwrapped(stream: TextIO) -> dict[str, Any]:
    return {} if stream.isatty() else {"soft_wrap": True, "width": 100_000}


out = Console(emoji=False, highlight=False, **_unwrapped(sys.stdout))
err = Console(stderr=True, emoji=False, highlight=False, **_unwrapped(sys.stderr))


@dataclass
class Context:
    url: str
    timeout: float
    as_json: bool = False
    token: str | None = None


JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's answer as JSON")]
CommitOpt = Annotated[
    str | None,
    typer.Option(
        "--revision",
        "-r",
        "--commit",
        "-c",
        help="Commit id or branch/tag, as hf and vLLM say it (--commit: the same) [default: main]",
    ),
]
# For rm: without a revision it deletes every cached revision of the model, not main's alone.
RmRevisionOpt = Annotated[
    str | None,
    typer.Option(
        "--revision",
        "-r",
        "--commit",
        "-c",
        help="Delete only this revision (commit id or branch/tag); without it, every cached"
        " revision of the model (or cancel its running download)",
    ),
]
RepoArg = Annotated[str, typer.Argument(help="Repo id, 'namespace/name'")]
IncludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--include", "-i", help="Glob of files to take (repeatable), as hf download --include"
    ),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude", "-x", help="Glob of files to leave (repeatable), as hf download --exclude"
    ),
]
FilesOpt = Annotated[
    str | None,
    typer.Option(
        "--files",
        "-f",
        help="'all' (every file) or 'vllm' (what vLLM loads: one weight format, config,"
        " tokenizer; nothing under original/)",
    ),
]


def _version(asked: bool) -> None:
    if asked:
        out.print(f"modelctl {_package_version()}", markup=False, highlight=False)
        raise typer.Exit(OK)


def _package_version() -> str:
    try:
        return importlib.metadata.version("api")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@app.callback()
def _options(
    ctx: typer.Context,
    url: Annotated[
        str, typer.Option(envvar="MODELCTL_URL", help="Base URL of the API server")
    ] = "http://127.0.0.1:8000",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each answer")] = 60.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the API's answer as JSON (any command)")
    ] = False,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="MODELCTL_TOKEN",
            help="The service's API key (MODELS_API_KEY, or MODELS_READ_API_KEY for reads);"
            " better in MODELCTL_TOKEN than on a command line others can see",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit"
        ),
    ] = False,
) -> None:
    ctx.obj = Context(url=_base_url(url), timeout=timeout, as_json=as_json, token=token or None)


def _base_url(url: str) -> str:
    """``localhost:8000`` means ``http://localhost:8000``; anything else must be an http(s) URL."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        _fail(f"--url must be like http://127.0.0.1:8000 (got {url!r})", USAGE)
    return url


def _plain(value: object) -> str:
    """A value from the user or the Hub, safe inside markup."""
    return escape(str(value))


def _fail(message: str, code: int) -> NoReturn:
    err.print(f"[red]error:[/red] {_plain(message)}")
    raise typer.Exit(code)


def _json_wanted(ctx: typer.Context, as_json: bool) -> bool:
    return as_json or (isinstance(ctx.obj, Context) and ctx.obj.as_json)


@functools.cache
def _tls() -> ssl.SSLContext:
    """The TLS context of this process's clients, httpx's default one (it reads ``SSL_CERT_FILE``
    and ``SSL_CERT_DIR``), made once: httpx makes one per client, loading the CA bundle (20-30 ms
    of CPU), and a process that runs many commands (the tests run them in theirs) paid it each
    time."""
    return httpx.create_ssl_context()


@contextmanager
def _client(ctx: typer.Context) -> Iterator[httpx.Client]:
    context: Context = ctx.obj
    try:
        headers = {"Authorization": f"Bearer {context.token}"} if context.token else {}
        with httpx.Client(
            base_url=context.url, timeout=context.timeout, headers=headers, verify=_tls()
        ) as client:
            yield client
    except httpx.TransportError as error:
        _fail(f"cannot reach {context.url}: {error}", FAILURE)


def _call(client: httpx.Client, method: str, path: str, body: Any = None) -> Any:
    """One request; a 4xx or 5xx exits with the API's words (its ``?force=true`` said as the
    command's ``--force``) and the exit code the status maps to."""
    return _call_answered(client.request(method, path, json=body))


def _call_answered(response: httpx.Response) -> Any:
    """The answer's JSON; a 4xx or 5xx exits (``_call``)."""
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        if isinstance(detail, list):  # a validation error: say which field and why
            detail = "; ".join(
                f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail
            )
        detail = str(detail).replace("add ?force=true", "run it again with --force")
        if response.status_code == 401 and "API key" in detail:
            detail += " (modelctl: --token, or MODELCTL_TOKEN)"
        _fail(detail, _EXIT_BY_STATUS.get(response.status_code, FAILURE))
    return response.json()


def _ask(ctx: typer.Context, method: str, path: str, body: Any = None) -> Any:
    """One call to the API; exits with the code its answer maps to when it fails."""
    with _client(ctx) as client:
        return _call(client, method, path, body)


def _show(answer: Any, as_json: bool, human: Callable[[], None]) -> None:
    """The API's answer as JSON, or in words."""
    if as_json:
        _print_json(answer)
    else:
        human()


def _model(repo: str, commit: str | None) -> dict[str, str]:
    return {"hf_repo": repo} if commit is None else {"hf_repo": repo, "hf_commit": commit}


def _request(
    repo: str,
    commit: str | None,
    include: list[str] | None,
    exclude: list[str] | None,
    files: str | None,
) -> dict[str, Any]:
    """A model and the files chosen (the API's allow_patterns, ignore_patterns and files)."""
    body: dict[str, Any] = _model(repo, commit)
    if include:
        body["allow_patterns"] = include
    if exclude:
        body["ignore_patterns"] = exclude
    if files is not None:
        body["files"] = files
    return body


def _selection_words(selection: list[dict[str, Any]] | None) -> str:
    """``vllm``, ``all``, ``*.gguf - original/*``...: a selection in a few words."""
    if not selection:
        return "default"
    words = []
    for one in selection:
        parts = [one["files"]] if one.get("files") else []
        parts += list(one.get("allow_patterns") or [])
        word = " + ".join(parts)
        if one.get("ignore_patterns"):
            word += " - " + " - ".join(one["ignore_patterns"])
        words.append(word)
    return ", ".join(words)


def _say(line: str) -> None:
    """A line of data (names, messages from the API) printed as it is: no markup, no emoji."""
    out.print(line, markup=False, emoji=False, highlight=False)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _size(n: int | None) -> str:
    return "-" if n is None else human_bytes(n, decimal=True)


def _status_line(answer: dict[str, Any]) -> str:
    model = answer["model"]
    name = model["hf_repo"] + (f"@{model['hf_commit']}" if model.get("hf_commit") else "")
    line = f"{name}: {answer['status']}"
    progress = answer.get("progress")
    if progress and progress.get("phase") == "queued":
        line += f" (queued, #{progress.get('queue_position')} in line)"
    elif progress and progress.get("percent") is not None:
        line += f" {progress['percent']:.1f}% ({_size(progress.get('downloaded_bytes'))}"
        line += f" of {_size(progress.get('total_bytes'))}, {progress.get('phase')})"
    if answer.get("selection"):
        line += f" [files: {_selection_words(answer['selection'])}]"
    if answer.get("coming_commit"):
        line += (
            f" [update: serves {answer['served_commit'][:12]}, then {answer['coming_commit'][:12]}]"
        )
    if answer.get("in_use_by"):
        users = ", ".join(f"{u['server']} ({u['model']})" for u in answer["in_use_by"])
        line += f" [in use by {users}]"
    if progress and progress.get("bandwidth_limit_bytes_per_second"):
        line += f" [capped at {_size(round(progress['bandwidth_limit_bytes_per_second']))}/s]"
    if progress and progress.get("bandwidth_note"):
        line += f" [{progress['bandwidth_note']}]"
    if answer.get("error_message"):
        line += f" - {answer['error_message']}"
    return line


@app.command()
def download(
    ctx: typer.Context,
    repo: RepoArg,
    commit: CommitOpt = None,
    wait: Annotated[
        bool,
        typer.Option("--wait", "-w", help="Follow the download to its end, with a progress bar"),
    ] = False,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    files: FilesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start downloading a model (its files chosen with --files, --include, --exclude); with
    --wait, follow it to its end."""
    as_json = _json_wanted(ctx, as_json)
    body = _request(repo, commit, include, exclude, files)
    with _client(ctx) as client:
        if not wait:
            answer = _call(client, "POST", "/api/models/download", body)
            _show(answer, as_json, lambda: _say(f"{answer['task_id']}: {answer['status']}"))
            return
        # Subscribe before starting, so that no event is missed.
        with client.stream(
            "GET",
            "/api/models/events",
            params={"hf_repo": repo},
            timeout=httpx.Timeout(ctx.obj.timeout, read=None),
        ) as stream:
            if stream.status_code != 200:
                stream.read()
                _fail(stream.text, _EXIT_BY_STATUS.get(stream.status_code, FAILURE))
            try:
                answer = _start_or_join(client, repo, commit, body)
                if answer["status"] == "DOWNLOADED":
                    final = _call(client, "POST", "/api/models/status", body)
                    _finish(final, as_json)
                    return
                _follow(stream, answer["task_id"], as_json)
            except KeyboardInterrupt:
                # Ctrl-C stops the watching, not the download: say so, and how to stop it. It
                # may come before the service's answer was read: ask the service what runs.
                _detached(client, repo, commit, body)
                raise typer.Exit(130) from None
        final = _call(client, "POST", "/api/models/status", body)
        _finish(final, as_json)


def _start_or_join(
    client: httpx.Client, repo: str, commit: str | None, body: dict[str, Any]
) -> Any:
    """The download's start; when this revision downloads already (409), the running download
    to follow instead (as ``ollama pull`` joins a pull under way), said on stderr."""
    response = client.post("/api/models/download", json=body)
    if response.status_code == 409:
        running = client.get("/api/models/downloads").json().get("downloads", [])
        ours = [d for d in running if d["model"]["hf_repo"] == repo]
        wanted = commit or "main"
        named = [
            d for d in ours if wanted in (d["model"].get("hf_commit") or "main", d.get("commit"))
        ]
        chosen = named or (ours if len(ours) == 1 else [])
        if chosen:
            task_id = f"{repo}:{chosen[0]['model'].get('hf_commit') or 'latest'}"
            err.print(f"{_plain(task_id)} is already downloading: following it")
            return {"task_id": task_id, "status": "DOWNLOADING"}
    return _call_answered(response)


def _detached(client: httpx.Client, repo: str, commit: str | None, body: dict[str, Any]) -> None:
    """After Ctrl-C on ``download --wait``: whether the download goes on, and how to stop it."""
    try:
        current = client.post("/api/models/status", json=body, timeout=5).json()
    except (httpx.HTTPError, ValueError):
        current = {}
    if current.get("status") == "DOWNLOADING":
        again = f"modelctl cancel {repo}" + (f" --commit {commit}" if commit else "")
        task_id = repo + ":" + (commit or "latest")
        err.print(
            f"detached: {_plain(task_id)} goes on downloading in the service;"
            f" `{_plain(again)}` stops it"
        )
    else:
        err.print(f"interrupted; `modelctl status {_plain(repo)}` says what the service has")


class EventLines:
    """The service's Server-Sent Events, read a line at a time: ``feed`` gives an ``(event,
    data)`` pair when a line ends one; ``comment`` is the last comment line's text (the service
    sends ``connected`` once the stream is subscribed). The one parser of ``modelctl`` and of the
    tests."""

    def __init__(self) -> None:
        self.event, self.data, self.comment = "message", "", ""

    def feed(self, line: str) -> tuple[str, dict[str, Any]] | None:
        if line.startswith(":"):
            self.comment = line[1:].strip()
        elif line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            self.data += line[5:].strip()
        elif line == "" and self.data:
            done = (self.event, json.loads(self.data))
            self.event, self.data = "message", ""
            return done
        return None


def _events(stream: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    lines = EventLines()
    for line in stream.iter_lines():
        if (done := lines.feed(line)) is not None:
            yield done


def _follow(stream: httpx.Response, task_id: str, as_json: bool) -> None:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    bar = Progress(*columns, console=err, disable=as_json, transient=False)
    # The bar refreshes from a thread of its own. A Ctrl-C the kernel hands to that thread would
    # wait for the next event to reach the main thread, blocked reading the stream: the thread
    # is started with SIGINT blocked, so the signal interrupts the read.
    with _sigint_blocked():
        bar.start()
    with bar:
        task = bar.add_task(_plain(task_id), total=None)
        for event, data in _events(stream):
            if data.get("task_id") != task_id:
                continue
            progress = data.get("progress") or {}
            if event == "verifying":
                bar.update(task, description=f"{_plain(task_id)} (verifying)")
            elif event == "retrying":
                err.print(f"retrying: {_plain(data.get('retry_reason'))}")
            if progress.get("total_bytes") is not None:
                done = progress.get("downloaded_bytes") or 0
                bar.update(task, total=progress["total_bytes"], completed=done)
            if event in ("completed", "failed", "cancelled"):
                if event == "completed":
                    bar.update(task, completed=progress.get("total_bytes") or 0)
                return


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread (and the threads it starts) for the ``with`` block."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _finish(final: dict[str, Any], as_json: bool) -> None:
    _show(final, as_json, lambda: _say(_status_line(final)))
    if final["status"] != "DOWNLOADED":
        raise typer.Exit(FAILURE)


@app.command()
def status(
    ctx: typer.Context,
    repo: RepoArg,
    commit: CommitOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    files: FilesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A model's status, for the files it was downloaded with or those chosen (exit 3 when
    NOT_FOUND)."""
    as_json = _json_wanted(ctx, as_json)
    body = _request(repo, commit, include, exclude, files)
    answer = _ask(ctx, "POST", "/api/models/status", body)
    _show(answer, as_json, lambda: _say(_status_line(answer)))
    if answer["status"] == "NOT_FOUND":
        raise typer.Exit(NOT_FOUND)


@app.command("ls")
def list_models(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Every cached model and every running download."""
    as_json = _json_wanted(ctx, as_json)
    answer = _ask(ctx, "GET", "/api/models/list")
    if as_json:
        _print_json(answer)
        return
    watched = any(item.get("in_use_by") is not None for item in answer["models"])
    columns = ["MODEL", "COMMIT", "STATUS", "SIZE", "FILES", "REFS"]
    table = Table(*columns, *(["IN USE BY"] if watched else []))
    for item in answer["models"]:
        commit = item["model"].get("hf_commit") or "-"
        size = item.get("size_bytes")
        if item["status"] == "DOWNLOADING" and item.get("progress"):
            size = item["progress"].get("downloaded_bytes")
        state = item["status"]
        if (item.get("progress") or {}).get("phase") == "queued":
            state = f"QUEUED #{item['progress'].get('queue_position')}"
        row: list[Text | str] = [
            Text(item["model"]["hf_repo"]),
            Text(commit[:12]),
            Text(state),
            _size(size),
            Text(_selection_words(item.get("selection"))),
            Text(",".join(item.get("refs") or []) or "-"),
        ]
        if watched:
            users = item.get("in_use_by") or []
            row.append(Text(", ".join(f"{u['server']} ({u['model']})" for u in users) or "-"))
        table.add_row(*row)
    out.print(table)


@app.command("ps")
def running(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """What downloads now, its progress, and where (in a fleet: the nodes), as `ollama ps`."""
    answer = _ask(ctx, "GET", "/api/models/downloads")

    def human() -> None:
        if not answer["downloads"]:
            _say("nothing is downloading")
            return
        table = Table("MODEL", "PHASE", "DONE", "SPEED", "LEFT", "WHERE")
        for item in answer["downloads"]:
            progress = item.get("progress") or {}
            model = item["model"]
            name = f"{model['hf_repo']}:{model.get('hf_commit') or 'latest'}"
            percent = progress.get("percent")
            done = _size(progress.get("downloaded_bytes"))
            if progress.get("total_bytes") is not None:
                done += f" of {_size(progress['total_bytes'])}"
            if percent is not None:
                done += f" ({percent:.1f}%)"
            speed = progress.get("bytes_per_second")
            eta = progress.get("eta_seconds")
            nodes = [n["node_id"][:12] for n in item.get("nodes") or []]
            table.add_row(
                Text(name),
                Text(progress.get("phase") or "-"),
                Text(done),
                Text(f"{_size(round(speed))}/s" if speed else "-"),
                Text(_seconds(eta)),
                Text(", ".join(nodes) or "this service"),
            )
        out.print(table)

    _show(answer, _json_wanted(ctx, as_json), human)


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    whole = int(value)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


@app.command()
def show(
    ctx: typer.Context, repo: RepoArg, commit: CommitOpt = None, as_json: JsonOpt = False
) -> None:
    """One model: its status, and each cached revision with its refs, size, files and who
    serves it, as `ollama show` (exit 3 when nothing of it is cached or downloading)."""
    with _client(ctx) as client:
        status = _call(client, "POST", "/api/models/status", _model(repo, commit))
        listed = _call(client, "GET", "/api/models/list")
    revisions = [m for m in listed["models"] if m["model"]["hf_repo"] == repo]
    answer = {"status": status, "revisions": revisions}

    def human() -> None:
        _say(_status_line(status))
        if not revisions:
            return
        table = Table("COMMIT", "REFS", "STATUS", "SIZE", "FILES", "SERVED BY")
        for item in revisions:
            users = item.get("in_use_by")
            table.add_row(
                Text((item["model"].get("hf_commit") or "-")[:12]),
                Text(",".join(item.get("refs") or []) or "-"),
                Text(item["status"]),
                _size(item.get("size_bytes")),
                Text(_selection_words(item.get("selection"))),
                Text(
                    "not asked (MODELS_VLLM_URLS unset)"
                    if users is None
                    else ", ".join(f"{u['server']} ({u['model']})" for u in users) or "-"
                ),
            )
        out.print(table)

    _show(answer, _json_wanted(ctx, as_json), human)
    if status["status"] == "NOT_FOUND" and not revisions:
        raise typer.Exit(NOT_FOUND)


@app.command()
def plan(
    ctx: typer.Context,
    repo: RepoArg,
    commit: CommitOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    files: FilesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What a download would fetch: every file with its size, the chosen ones marked, and
    whether it fits; nothing is downloaded."""
    as_json = _json_wanted(ctx, as_json)
    answer = _ask(ctx, "POST", "/api/models/plan", _request(repo, commit, include, exclude, files))

    def human() -> None:
        table = Table("", "FILE", "SIZE")
        for entry in answer["files"]:
            table.add_row(
                "*" if entry["selected"] else "", Text(entry["path"]), _size(entry["size"])
            )
        out.print(table)
        if answer["weights"]:
            choices = Table("WEIGHTS", "FILES", "SIZE", "PATTERN", "")
            for group in answer["weights"]:
                name = group["folder"] + group["format"]
                if group.get("quantization"):
                    name += f" {group['quantization']}"
                choices.add_row(
                    Text(name),
                    str(len(group["files"])),
                    _size(group["size_bytes"]),
                    Text(group["pattern"]),
                    "chosen" if group["selected"] else "",
                )
            out.print(choices)
        fits = "fits" if answer["fits"] else "does NOT fit"
        _say(
            f"{repo}@{answer['commit'][:12]} ({_selection_words(answer['selection'])}):"
            f" {answer['selected_files']} of {len(answer['files'])} files,"
            f" {_size(answer['selected_bytes'])}; {_size(answer['missing_bytes'])} to fetch,"
            f" {_size(answer['available_bytes'])} available: {fits}"
        )
        if answer.get("note"):
            _say(f"note: {answer['note']}")

    _show(answer, as_json, human)
    if answer.get("note") or not answer["fits"]:
        raise typer.Exit(FAILURE)


ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Delete even what a vLLM server (MODELS_VLLM_URLS of the service) serves, or while"
        " one does not answer",
    ),
]


@app.command("rm")
def remove(
    ctx: typer.Context,
    repo: RepoArg,
    commit: RmRevisionOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete a model from the cache, or cancel its download (exit 4 when a vLLM server serves
    it: --force deletes it anyway)."""
    path = "/api/models?force=true" if force else "/api/models"
    answer = _ask(ctx, "DELETE", path, _model(repo, commit))
    freed = answer.get("freed_bytes")

    def human() -> None:
        if answer["status"] == "cancelled":
            # A DELETE of a running download only stops it: the files it completed stay
            # (PARTIAL); one stopped before its first file left nothing (NOT_FOUND).
            left = _ask(ctx, "POST", "/api/models/status", _model(repo, commit))
            if left["status"] == "NOT_FOUND":
                _say(f"{repo}: download cancelled; no file of it was complete: nothing stays.")
                return
            again = f"modelctl rm {repo}" + (f" --commit {commit}" if commit else "")
            _say(
                f"{repo}: download cancelled; the files it completed stay in the cache"
                f" ({left['status']}). Run `{again}` again to delete them."
            )
        else:
            _say(f"{repo}: {answer['status']}" + (f" ({_size(freed)} freed)" if freed else ""))

    _show(answer, _json_wanted(ctx, as_json), human)


@app.command()
def updates(
    ctx: typer.Context,
    refresh: Annotated[
        bool, typer.Option("--refresh", help="Ask the Hub now, not reusing a recent check")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Which cached branches moved on the Hub, and how much an update would fetch (exit 1 when
    a check failed)."""
    as_json = _json_wanted(ctx, as_json)
    answer = _ask(ctx, "GET", "/api/models/updates" + ("?refresh=true" if refresh else ""))

    def human() -> None:
        table = Table("MODEL", "REF", "CACHED", "HUB", "UPDATE", "TO FETCH")
        for entry in answer["models"]:
            hub = entry.get("hub_commit")
            if entry.get("pending") and entry.get("checked_at") is None:
                verdict = Text("checking")
            elif entry.get("error"):
                verdict = Text(f"unknown: {entry['error']}")
            else:
                verdict = Text("yes" if entry["update_available"] else "up to date")
            table.add_row(
                Text(entry["model"]["hf_repo"]),
                Text(entry["ref"]),
                Text(entry["cached_commit"][:12]),
                Text(hub[:12] if hub else "-"),
                verdict,
                _size(entry.get("bytes_to_download")) if entry["update_available"] else "-",
            )
        out.print(table)
        budget = answer.get("budget") or {}
        checking = sum(1 for e in answer["models"] if e.get("pending"))
        if checking:
            _say(
                f"{checking} still being checked, within {budget.get('calls_per_minute')} Hub"
                " calls a minute: run it again for their answers"
            )
        if budget.get("paused_until"):
            when = time.strftime("%H:%M:%S", time.localtime(budget["paused_until"]))
            _say(f"the Hub answered 429 (too many requests): checks resume at {when}")
        waiting = [e for e in answer["models"] if e["update_available"]]
        if waiting:
            first = waiting[0]
            again = f"modelctl update {first['model']['hf_repo']}"
            if first["model"].get("hf_commit"):
                again += f" --commit {first['model']['hf_commit']}"
            _say(f"{len(waiting)} update(s) available; `{again}` fetches one")

    _show(answer, as_json, human)
    if any(entry.get("error") for entry in answer["models"]):
        raise typer.Exit(FAILURE)


@app.command()
def update(
    ctx: typer.Context,
    repo: RepoArg,
    branch: Annotated[
        str | None, typer.Option("--commit", "-c", help="The branch or tag (default: main)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Download where a branch points on the Hub now, with the files its cached revision has, and
    follow it to its end; the branch switches to it once verified (vLLM keeps what it loaded)."""
    if (
        branch is not None
        and len(branch) == 40
        and all(c in "0123456789abcdefABCDEF" for c in branch)
    ):
        _fail("a commit id never moves: name a branch or a tag (or none, for main)", USAGE)
    download(ctx, repo, branch, wait=True, as_json=as_json)


@app.command()
def prune(
    ctx: typer.Context,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", "-n", help="Only say what would be removed")
    ] = False,
    repo: Annotated[
        str | None, typer.Option("--repo", "-r", help="Only this repo ('namespace/name')")
    ] = None,
    partial: Annotated[
        bool, typer.Option("--partial", help="Also PARTIAL revisions (failed or cancelled)")
    ] = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove the cached revisions no branch or tag names (what updates left behind), keeping
    those that download or that a vLLM server serves."""
    as_json = _json_wanted(ctx, as_json)
    body: dict[str, Any] = {"dry_run": dry_run, "include_partial": partial}
    if repo is not None:
        body["hf_repo"] = repo
    answer = _ask(ctx, "POST", "/api/models/prune" + ("?force=true" if force else ""), body)

    def human() -> None:
        verb = "would remove" if dry_run else "removed"
        for entry in answer["revisions"]:
            model = entry["model"]
            _say(
                f"{verb} {model['hf_repo']}@{(model.get('hf_commit') or '(no revision)')[:12]}"
                f" ({_size(entry['size_bytes'])})"
            )
        for entry in answer["kept"]:
            model = entry["model"]
            _say(
                f"kept {model['hf_repo']}@{(model.get('hf_commit') or '-')[:12]}: {entry['reason']}"
            )
        freed = "would free" if dry_run else "freed"
        _say(f"{len(answer['revisions'])} revision(s), {_size(answer['freed_bytes'])} {freed}")
        if answer.get("note"):
            _say(f"note: {answer['note']}")

    _show(answer, as_json, human)


@app.command()
def pin(
    ctx: typer.Context, repo: RepoArg, commit: CommitOpt = None, as_json: JsonOpt = False
) -> None:
    """Keep a revision from eviction and prune (a branch's or tag's pin follows it)."""
    _pinning(ctx, "PUT", repo, commit, as_json)


@app.command()
def unpin(
    ctx: typer.Context, repo: RepoArg, commit: CommitOpt = None, as_json: JsonOpt = False
) -> None:
    """Remove a pin (named as it was made); exit 3 when there is none."""
    _pinning(ctx, "DELETE", repo, commit, as_json)


def _pinning(ctx: typer.Context, method: str, repo: str, commit: str | None, as_json: bool) -> None:
    as_json = _json_wanted(ctx, as_json)
    answer = _ask(ctx, method, "/api/models/pin", _model(repo, commit))
    _show(answer, as_json, lambda: _say(_pin_line(answer)))


def _pin_line(answer: dict[str, Any]) -> str:
    model = answer["model"]
    name = f"{model['hf_repo']}@{model.get('hf_commit') or 'main'}"
    if not answer["pinned"]:
        return f"{name}: not pinned"
    held = ", ".join(c[:12] for c in answer["commits"]) or "nothing cached yet"
    return f"{name}: pinned (keeps {held})"


@app.command()
def history(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", "-n", help="How many, newest first")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """What happened to the cache: downloads' ends, deletes, prunes, evictions, and who asked."""
    as_json = _json_wanted(ctx, as_json)
    answer = _ask(ctx, "GET", f"/api/models/history?limit={limit}")

    def human() -> None:
        for entry in answer["entries"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["time"]))
            model = entry["model"]
            name = f"{model['hf_repo']}@{(model.get('hf_commit') or 'main')[:12]}"
            size = f" {_size(entry['size_bytes'])}" if entry.get("size_bytes") is not None else ""
            took = (
                f" in {entry['duration_seconds']:.1f} s"
                if entry.get("duration_seconds") is not None
                else ""
            )
            who = f" by {entry['by']}" if entry.get("by") else ""
            detail = f": {entry['detail']}" if entry.get("detail") else ""
            _say(f"{when} {entry['event']} {name}{size}{took}{who}{detail}")
        if not answer["entries"]:
            _say("nothing has happened here yet")

    _show(answer, as_json, human)


@app.command()
def budget(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The cache budget, what the cache holds, and what eviction would remove first."""
    as_json = _json_wanted(ctx, as_json)
    answer = _ask(ctx, "GET", "/api/models/budget")

    def human() -> None:
        limit = answer["budget_bytes"]
        _say(
            f"budget: {_size(limit) if limit is not None else 'none (nothing is evicted)'};"
            f" cache: {_size(answer['usage_bytes'])}; downloads still need"
            f" {_size(answer['reserved_bytes'])}"
        )
        for entry in answer["candidates"]:
            model = entry["model"]
            used = entry.get("last_used_how") or "never used"
            _say(
                f"  {model['hf_repo']}@{model['hf_commit'][:12]}: frees"
                f" {_size(entry['size_bytes'])} (last use: {used})"
            )
        for entry in answer["kept"]:
            model = entry["model"]
            _say(f"  kept {model['hf_repo']}@{model['hf_commit'][:12]}: {entry['reason']}")
        if answer.get("note"):
            _say(f"note: {answer['note']}")

    _show(answer, as_json, human)


@app.command()
def cancel(
    ctx: typer.Context, repo: RepoArg, commit: CommitOpt = None, as_json: JsonOpt = False
) -> None:
    """Stop a running download (exit 3 when none runs)."""
    body = _model(repo, commit)
    with _client(ctx) as client:
        current = _call(client, "POST", "/api/models/status", body)
        if current["status"] != "DOWNLOADING" or current.get("progress") is None:
            _fail(f"{repo} is not downloading in this service ({current['status']})", NOT_FOUND)
        answer = _call(client, "DELETE", "/api/models", body)
    _show(answer, _json_wanted(ctx, as_json), lambda: _say(f"{repo}: {answer['status']}"))


@app.command()
def verify(
    ctx: typer.Context, repo: RepoArg, commit: CommitOpt = None, as_json: JsonOpt = False
) -> None:
    """Check every cached file against its checksum (exit 1 if not)."""
    as_json = _json_wanted(ctx, as_json)
    answer = _ask(ctx, "POST", "/api/models/verify", _model(repo, commit))

    def human() -> None:
        verdict = "verified" if answer["verified"] else "NOT verified"
        checked = answer["files_checked"]
        _say(f"{repo}@{answer['commit'][:12]}: {verdict}, {checked} files checked")
        for path in answer["missing"]:
            _say(f"  missing:    {path}")
        for path in answer["mismatched"]:
            _say(f"  mismatched: {path}")

    _show(answer, as_json, human)
    if not answer["verified"]:
        raise typer.Exit(FAILURE)


@app.command()
def space(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Bytes used by the cache and free on its disk."""
    as_json = _json_wanted(ctx, as_json)
    answer = _ask(ctx, "GET", "/api/models/space")
    _show(
        answer,
        as_json,
        lambda: _say(
            f"cache {answer['cache_path']}: {_size(answer['cache_size_bytes'])} used,"
            f" {_size(answer['available_bytes'])} free"
        ),
    )


_RATE_UNITS = {
    "": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
}


def _rate(text: str) -> int:
    """``50MB/s``, ``50M``, ``400KiB/s``, ``50000000`` -> bytes per second; ``none``/``off``/``0``
    -> 0 (no cap)."""
    words = text.strip().lower().replace(" ", "")
    if words in ("none", "off", "0"):
        return 0
    words = words.removesuffix("/s").removesuffix("b")
    number = words.rstrip("kmgi")
    unit = words[len(number) :]
    try:
        value = float(number) * _RATE_UNITS[unit]
    except (KeyError, ValueError):
        _fail(f"not a rate: {text!r} (e.g. 50MB/s, 400KiB/s, 50000000, or none)", 2)
    return round(value)


@app.command()
def bandwidth(
    ctx: typer.Context,
    rate: Annotated[
        str | None,
        typer.Argument(help="the new cap for all downloads together: 50MB/s, 400KiB/s, or none"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the bandwidth cap and each download's share, or set it (running downloads follow at
    once; it lasts until the service stops)."""
    as_json = _json_wanted(ctx, as_json)
    if rate is None:
        answer = _ask(ctx, "GET", "/api/models/settings/bandwidth")
    else:
        body = {"max_bytes_per_second": _rate(rate)}
        answer = _ask(ctx, "PUT", "/api/models/settings/bandwidth", body)

    def human() -> None:
        cap = answer["max_bytes_per_second"]
        _say(f"bandwidth cap: {_size(cap) + '/s' if cap else 'none'}")
        for share in answer["downloads"]:
            value = share["bytes_per_second"]
            line = f"  {share['task_id']}: {_size(round(value)) + '/s' if value else 'no cap'}"
            _say(line + (f" - {share['note']}" if share.get("note") else ""))

    _show(answer, as_json, human)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
