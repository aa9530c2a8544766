"""The zygote against the standard library's forkserver (issue 28): start-up time, CPU, and cancel
latency of a download worker.

Both start a process that has imported ``api.models.hub.worker`` once and fork a worker from it
per request; each worker runs the real ``worker.main`` with its stdin and stdout on pipes of the
caller's:

- zygote: ``api.models.hub.zygote.Zygote`` (what the service uses);
- forkserver: ``multiprocessing``'s forkserver context with
  ``set_forkserver_preload(["api.models.hub.worker"])``, the pipes passed as ``Connection``s.

Measured for each, in a process of its own (so that its CPU, children included, is its alone):

- start-up: from the request to the worker's first message (a job it cannot read: it answers
  ``failed`` at once, the first thing a worker does with its stdin);
- cancel: from SIGKILL to the caller knowing the worker ended;
- CPU: user + system of the caller, the server process and every worker, for the whole run
  (the server's start included).

Usage: python bench/forkserver.py [ROUNDS]   (default 40)
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 40
WORKER_ENV = {"MODELS_WORKER_NICE": "0"}


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _first_line(fd: int) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        piece = os.read(fd, 65536)
        if not piece:
            break
        data += piece
    return data


# -- the zygote ---------------------------------------------------------------------------------


async def _zygote() -> dict[str, Any]:
    from api.models.hub.zygote import Zygote

    env = {**os.environ, **WORKER_ENV}
    zygote = Zygote(env)
    started = time.perf_counter()
    await zygote.start()
    ready = time.perf_counter() - started
    startup, cancel = [], []
    for _ in range(ROUNDS):
        began = time.perf_counter()
        worker = await zygote.spawn(env)
        worker.stdin.write(b"\n")  # no job: the worker answers failed at once
        line = await worker.stdout.readline()
        startup.append(time.perf_counter() - began)
        assert b"failed" in line, line
        await worker.wait()
    for _ in range(ROUNDS):
        worker = await zygote.spawn(env)
        began = time.perf_counter()
        worker.kill()
        await worker.wait()
        cancel.append(time.perf_counter() - began)
    await zygote.aclose()
    return {"ready": ready, "startup": startup, "cancel": cancel}


# -- the forkserver -----------------------------------------------------------------------------


def _forkserver_worker(
    stdin: multiprocessing.connection.Connection,
    stdout: multiprocessing.connection.Connection,
    env: dict[str, str],
) -> None:
    from api.models.hub import worker

    os.dup2(stdin.fileno(), 0)
    os.dup2(stdout.fileno(), 1)
    stdin.close()
    stdout.close()
    os.environ.clear()
    os.environ.update(env)
    code = worker.main()
    sys.stderr.flush()
    os._exit(code)


def _forkserver() -> dict[str, Any]:
    context = multiprocessing.get_context("forkserver")
    # This script too (its worker function, and what it imports): the child need import nothing.
    context.set_forkserver_preload(["__main__", "api.models.hub.worker"])
    env = {**os.environ, **WORKER_ENV}
    started = time.perf_counter()
    multiprocessing.forkserver.ensure_running()
    ready = time.perf_counter() - started

    def spawn() -> tuple[Any, Any, Any]:
        child_in, our_in = context.Pipe(duplex=False)
        our_out, child_out = context.Pipe(duplex=False)
        process = context.Process(target=_forkserver_worker, args=(child_in, child_out, env))
        process.start()
        child_in.close()
        child_out.close()
        return process, our_in, our_out  # the caller's ends: open while it holds them

    startup, cancel = [], []
    for _ in range(ROUNDS):
        began = time.perf_counter()
        process, stdin, stdout = spawn()
        os.write(stdin.fileno(), b"\n")
        line = _first_line(stdout.fileno())
        startup.append(time.perf_counter() - began)
        assert b"failed" in line, line
        process.join()
        stdin.close()
        stdout.close()
    for _ in range(ROUNDS):
        process, stdin, stdout = spawn()
        began = time.perf_counter()
        process.kill()
        process.join()
        cancel.append(time.perf_counter() - began)
        stdin.close()
        stdout.close()
    multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]  # reaped: counted
    return {"ready": ready, "startup": startup, "cancel": cancel}


def _measure(method: str) -> dict[str, Any]:
    """Run one method in a process of its own; its figures, CPU included."""
    done = subprocess.run(
        [sys.executable, __file__, str(ROUNDS), "--method", method],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def main() -> None:
    if "--method" in sys.argv:
        method = sys.argv[sys.argv.index("--method") + 1]
        before = _cpu()
        figures = asyncio.run(_zygote()) if method == "zygote" else _forkserver()
        figures["cpu"] = _cpu() - before
        print(json.dumps(figures))
        return
    # Imported here, not at the top: a forkserver child imports the main module again (the
    # standard library's ``prepare``), and the figures are the worker's, not this script's.
    from common import machine, median, percentile

    print(f"# {machine()}; {ROUNDS} workers each way, each method in a process of its own")
    results = {method: _measure(method) for method in ("zygote", "forkserver")}
    base = results["zygote"]
    print(f"{'':34}{'zygote':>12}{'forkserver':>12}{'ratio':>8}")
    rows: list[tuple[str, Callable[[dict[str, Any]], float]]] = [
        ("first worker, server start (ms)", lambda r: 1000 * (r["ready"] + r["startup"][0])),
        ("start-up, median (ms)", lambda r: 1000 * median(r["startup"][1:])),
        ("start-up, p90 (ms)", lambda r: 1000 * percentile(r["startup"][1:], 90)),
        ("cancel, median (ms)", lambda r: 1000 * median(r["cancel"])),
        ("cancel, p90 (ms)", lambda r: 1000 * percentile(r["cancel"], 90)),
        (f"CPU, whole run of {2 * ROUNDS} workers (s)", lambda r: r["cpu"]),
    ]
    for name, value in rows:
        ours, theirs = value(base), value(results["forkserver"])
        print(f"{name:34}{ours:12.3f}{theirs:12.3f}{theirs / ours:8.2f}x")


if __name__ == "__main__":
    main()
