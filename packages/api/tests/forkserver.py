"""Services for the tests, forked from a process that has already imported the service.

A service started as ``python -m uvicorn api.app:app`` spends about 1.4 s of CPU importing
FastAPI, huggingface_hub, pydantic-settings and the service before its first request; the default
tier starts about fifty, on a machine of two cores. This server (one per test process, started on
first use) imports all of it once, then forks a service per request in milliseconds: the child
takes the test's environment, working folder, log and listening socket, and runs uvicorn's own
command line (``uvicorn api.app:app --fd N``), as ``python -m uvicorn`` does. ``api.app`` itself is
imported again in each child, after uvicorn has configured its logging, as in a new process.

What a fork cannot show, a new process does: the tests of the entry point itself (the signal that
stops it, its first log lines, the unit file's command) start ``python -m uvicorn``
(``tests.helpers.service_from_its_entry_point``). The service reads its settings from the environment when
its lifespan starts (``Settings()``), never from what a library read at import, so a forked
service runs with the test's environment as a new one does.

The protocol is the zygote's (``api.models.hub.zygote``), over a socket pair on the server's
stdin: a request is the child's environment and working folder (JSON) with its listening socket
and its log (SCM_RIGHTS); the answers are ``pid <n>`` per request and ``exit <n> <code>`` when a
child ends (the server is its parent and reaps it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

from api.models.hub import worker
from api.models.hub.zygote import receive, serve_forks


def serve() -> int:
    """The server's loop: fork a service per request, report each child's end."""
    import uvicorn.main  # noqa: F401

    import api.app  # noqa: F401 - what every service would import

    # Imported again in each child, after uvicorn's logging is set up (it reformats uvicorn's
    # loggers when it is imported): the rest stays imported.
    del sys.modules["api.app"]
    return serve_forks(_fork_service)


def _fork_service(control: socket.socket, own_fds: tuple[int, int]) -> bool:
    if (received := receive(control)) is None:
        return False
    request, fds = received
    assert threading.active_count() == 1, "forking a process with threads"
    pid = os.fork()
    if pid == 0:
        _run_service(request["env"], request["cwd"], fds[0], fds[1], (*own_fds, control.fileno()))
    for fd in fds:
        os.close(fd)
    control.sendall(f"pid {pid}\n".encode())
    return True


def _run_service(
    env: dict[str, str], cwd: str, listener: int, log: int, close: tuple[int, ...]
) -> None:
    """The child: uvicorn's command line, as ``python -m uvicorn api.app:app --fd N``."""
    code: int = 70
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # Gone with its server (the test process ended) rather than left listening: the download
        # worker's own call (PR_SET_PDEATHSIG).
        worker.die_with_parent()
        os.dup2(log, 1)
        os.dup2(log, 2)
        for fd in (log, *close):
            os.close(fd)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        import uvicorn
        from uvicorn.main import main as command

        sys.argv = [str(Path(uvicorn.__file__).with_name("__main__.py")), "api.app:app"]
        sys.argv += ["--fd", str(listener)]
        try:
            command.main(args=sys.argv[1:], prog_name="python -m uvicorn")
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


# -- the tests' side ------------------------------------------------------------------------------


class ForkedService:
    """A service forked by the server, with what the tests use of a ``subprocess.Popen``."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self._server = server
        self.pid = pid

    @property
    def returncode(self) -> int | None:
        return self._server.ended.get(self.pid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self._server.changed:
            if not self._server.changed.wait_for(
                lambda: self.pid in self._server.ended or self._server.gone, timeout
            ):
                raise subprocess.TimeoutExpired(["service", str(self.pid)], timeout or 0)
        code = self.returncode
        return -signal.SIGKILL if code is None else code

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:  # not a pid the kernel may have given to another
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The server of one test process (``running_service``): started on first use, ended with
    the test process (its socket closes; the services it forked get SIGTERM)."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, __file__], stdin=theirs.fileno(), stdout=subprocess.DEVNULL
            )
        self._socket = ours
        self._lock = threading.Lock()  # one request at a time
        self.changed = threading.Condition()
        self.ended: dict[int, int] = {}
        self.gone = False
        self._pids: list[int] = []
        threading.Thread(target=self._read, daemon=True, name="forkserver").start()

    def start(
        self, env: Mapping[str, str], cwd: Path, listener: socket.socket, log: int
    ) -> ForkedService:
        with self._lock:
            request = json.dumps({"env": dict(env), "cwd": str(cwd)}).encode()
            socket.send_fds(self._socket, [request], [listener.fileno(), log])
            with self.changed:
                if not self.changed.wait_for(lambda: self._pids or self.gone, timeout=60):
                    raise RuntimeError("the test's fork server did not answer")
                if not self._pids:
                    raise RuntimeError("the test's fork server exited")
                return ForkedService(self, self._pids.pop(0))

    def _read(self) -> None:
        with contextlib.suppress(OSError), self._socket.makefile("rb") as lines:
            for line in lines:
                words = line.split()
                with self.changed:
                    if len(words) == 2 and words[0] == b"pid":
                        self._pids.append(int(words[1]))
                    elif len(words) == 3 and words[0] == b"exit":
                        self.ended[int(words[1])] = int(words[2])
                    self.changed.notify_all()
        with self.changed:
            self.gone = True
            self.changed.notify_all()


_server: ForkServer | None = None
_server_lock = threading.Lock()


def fork_server() -> ForkServer:
    """The fork server of this test process."""
    global _server
    with _server_lock:
        if _server is None or _server.gone:
            _server = ForkServer()
        return _server


if __name__ == "__main__":
    # Run as a script: its folder (the tests') is not the service's to import from.
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        del sys.path[0]
    sys.exit(serve())
