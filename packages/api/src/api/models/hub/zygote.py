"""Download workers forked from a process that has already imported them (part of the adapter).

A worker process started from scratch spends about 0.5 s of CPU importing ``huggingface_hub``
before its first request: on a small machine, on every attempt of every download. The zygote
(``python -m api.models.hub.zygote``) imports the worker once, then forks a worker per request in
a few milliseconds. Each worker is still a process of its own, killed on cancel, as before.

The service talks to its zygote over a Unix socket pair (SOCK_SEQPACKET: one message a packet;
the zygote's stdin):

- service -> zygote: one datagram per worker: the worker's environment (JSON) and two file
  descriptors, the read end of the worker's stdin and the write end of its stdout (SCM_RIGHTS);
- zygote -> service: ``pid <n>`` for each worker forked (in the order asked), and ``exit <n>
  <code>`` when one ends (the zygote is their parent: it reaps them).

Lifetimes: the zygote exits when the service's end of the socket closes (the service stopped it,
or died: the kernel closes it then); a worker dies with the zygote (``PR_SET_PDEATHSIG``), and when
its stdin closes (the service died). At fork time the zygote has one thread and has not loaded ``hf_xet``: forking is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import selectors
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

_T = TypeVar("_T")

_MAX_REQUEST = 1024 * 1024  # an environment, in JSON
KILLED = -signal.SIGKILL  # the return code of a worker whose zygote died (so did it)


class ZygoteGone(Exception):
    """The zygote exited (or could not start): the attempt is a crash, and the next one starts
    another zygote."""


# -- the zygote process -------------------------------------------------------------------------


def serve() -> int:
    """The zygote's main loop (``python -m api.models.hub.zygote``)."""
    from api.models.hub import guard, worker  # noqa: F401 - the imports every worker would repeat

    guard.ssl_context()  # and the TLS context each would make (the CA bundle: 20 ms of CPU)

    # No PR_SET_PDEATHSIG here: it follows the parent *thread*, and the service starts the zygote
    # from a pool thread. The socket is enough: when the service dies, the kernel closes its end.
    return serve_forks(_fork_worker)


ForkOne = Callable[[socket.socket, tuple[int, int]], bool]


def serve_forks(fork_one: ForkOne) -> int:
    """A fork server's loop on the socket that is its stdin: ``fork_one(control, own_fds)`` for
    each request (False when the other end closed: the loop ends), and ``exit <pid> <code>`` sent
    for each child that ends (this process reaps them). ``own_fds`` are the loop's own, for a
    child to close. Also the loop of the tests' fork server (``tests/forkserver.py``)."""
    control = socket.socket(fileno=os.dup(0))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # a child's fd 0 is replaced at fork; the server's is the socket's copy
    os.close(devnull)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that the wakeup fd is written
    with selectors.DefaultSelector() as selector:
        selector.register(control, selectors.EVENT_READ)
        selector.register(wake_r, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj is control:
                    if not fork_one(control, (wake_r, wake_w)):
                        return 0  # the other end closed: it stopped, or died
                else:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 4096)
            _reap(control)


def receive(control: socket.socket) -> tuple[Any, list[int]] | None:
    """One request of a fork server: its JSON and its two file descriptors; None when the other
    end closed."""
    try:
        message, fds, _, _ = socket.recv_fds(control, _MAX_REQUEST, 2)
    except ConnectionError:
        return None
    return (json.loads(message), fds) if message else None


def _fork_worker(control: socket.socket, own_fds: tuple[int, int]) -> bool:
    if (request := receive(control)) is None:
        return False
    env, fds = request
    pid = os.fork()
    if pid == 0:  # the worker
        code = 70
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.dup2(fds[0], 0)
            os.dup2(fds[1], 1)
            for fd in (*fds, *own_fds, control.fileno()):
                os.close(fd)
            os.environ.clear()
            os.environ.update(env)
            from api.models.hub import worker

            code = worker.main()
        except BaseException:
            # The service sees the worker end without a message (a crash); the log says why.
            from api import logfmt

            logfmt.install_in_worker()
            logfmt.log(logging.getLogger(__name__), logging.ERROR, "worker_crashed", exc_info=True)
        finally:
            sys.stderr.flush()
            os._exit(code)
    for fd in fds:
        os.close(fd)
    control.sendall(f"pid {pid}\n".encode())
    return True


def _reap(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        with contextlib.suppress(OSError):
            control.sendall(f"exit {pid} {os.waitstatus_to_exitcode(status)}\n".encode())


# -- the service's side -------------------------------------------------------------------------


class ForkedWorker:
    """A worker forked by the zygote, with what the adapter uses of an asyncio subprocess:
    ``stdin``, ``stdout``, ``pid``, ``returncode``, ``kill()`` and ``wait()``."""

    def __init__(
        self,
        pid: int,
        stdin: asyncio.StreamWriter,
        stdout: asyncio.StreamReader,
        ended: asyncio.Future[int],
    ) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self._ended = ended

    @property
    def returncode(self) -> int | None:
        return self._ended.result() if self._ended.done() else None

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    async def wait(self) -> int:
        return await asyncio.shield(self._ended)


@dataclass
class _Session:
    """One zygote process and what is known of the workers it forked."""

    process: subprocess.Popen[bytes]
    socket: socket.socket
    pids: queue.Queue[int | None] = field(default_factory=queue.Queue)
    ended: dict[int, asyncio.Future[int]] = field(default_factory=dict)
    early: dict[int, int] = field(default_factory=dict)  # ends known before their registration
    gone: bool = False  # the zygote ended: so did every worker it forked


class Zygote:
    """The zygote of a service: started on first use (or ahead, ``start``), started again when
    it died, stopped by ``aclose``.

    It belongs to no event loop: its socket is written under a thread lock and read by a thread of
    its own, which hands each worker's end to the loop that asked for that worker. So one zygote
    can serve several services in one process (the tests' apps, each on its own loop). A worker
    gets its environment from its request, so the zygote's own environment only matters for what
    the library reads when it is imported (``worker_env`` leaves the token out of it).
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = dict(env)
        self._lock = threading.Lock()  # one request at a time on the socket; start and stop
        self._table = threading.Lock()  # the sessions' worker tables (reader thread, callers)
        self._session: _Session | None = None

    @property
    def pid(self) -> int | None:
        session = self._session
        if session is None or session.process.poll() is not None:
            return None
        return session.process.pid

    async def start(self) -> None:
        """Start the zygote if it does not run (it imports the worker: about 0.5 s of CPU)."""
        await asyncio.to_thread(self._locked, self._start)

    async def spawn(self, env: Mapping[str, str]) -> ForkedWorker:
        """A new worker with environment ``env``. Raises ``ZygoteGone``."""
        loop = asyncio.get_running_loop()
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        fork = asyncio.ensure_future(
            asyncio.to_thread(self._locked, self._fork, env, stdin_r, stdout_w)
        )
        try:
            session, pid = await asyncio.shield(fork)
        except BaseException as error:
            try:
                if isinstance(error, asyncio.CancelledError):
                    await self._kill_forked(fork, loop)
            finally:
                for fd in (stdin_w, stdout_r):
                    os.close(fd)
            raise
        finally:
            # After the fork has sent them (a cancel above waits for it): the worker has its own.
            os.close(stdin_r)
            os.close(stdout_w)
        ended = self._register(session, pid, loop)
        # The files own the pipes' ends from here on; connecting them awaits, and a cancel (or a
        # failure) there must not leave the worker behind: it would wait for its job for ever,
        # its stdin held open by this process.
        reader, writer = os.fdopen(stdout_r, "rb", 0), os.fdopen(stdin_w, "wb", 0)
        stdout_transport: asyncio.BaseTransport | None = None
        try:
            stdout = asyncio.StreamReader(limit=2**20)
            stdout_transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(stdout), reader
            )
            transport, protocol = await loop.connect_write_pipe(_WriteProtocol, writer)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            # asyncio closes a transport whose own connection failed; one already made is ours.
            if stdout_transport is not None:
                stdout_transport.close()
            for pipe in (reader, writer):
                with contextlib.suppress(OSError):
                    pipe.close()
            # Gone before the request ends, as a worker killed later is: the zygote reaps it
            # (it had outlived its cancelled download for a moment, seen by a test under load).
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(10):
                    await asyncio.shield(ended)
            raise
        stdin = asyncio.StreamWriter(transport, protocol, None, loop)
        return ForkedWorker(pid, stdin, stdout, ended)

    async def _kill_forked(
        self, fork: asyncio.Future[tuple[_Session, int]], loop: asyncio.AbstractEventLoop
    ) -> None:
        """A request was cancelled while its worker was forked: the fork goes on in its thread,
        and the worker it makes must not outlive the request. Waits for it, kills it, waits for
        its end."""
        with contextlib.suppress(Exception):
            session, pid = await fork
            ended = self._register(session, pid, loop)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            async with asyncio.timeout(10):
                await ended

    def _register(
        self, session: _Session, pid: int, loop: asyncio.AbstractEventLoop
    ) -> asyncio.Future[int]:
        """The future of a worker's end (its return code)."""
        ended: asyncio.Future[int] = loop.create_future()
        with self._table:
            if pid in session.early:
                ended.set_result(session.early.pop(pid))
            elif session.gone:
                ended.set_result(KILLED)
            else:
                session.ended[pid] = ended
        return ended

    async def aclose(self) -> None:
        """Stop the zygote (its workers die with it) and wait for it."""
        await asyncio.to_thread(self._locked, self._stop)

    # -- blocking, under the lock --------------------------------------------------------------

    def _locked(self, function: Callable[..., _T], *args: Any) -> _T:
        with self._lock:
            return function(*args)

    def _start(self) -> _Session:
        session = self._session
        if session is not None and not session.gone and session.process.poll() is None:
            return session
        self._stop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "api.models.hub.zygote"],
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                env=self._env,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        session = self._session = _Session(process, ours)
        threading.Thread(target=self._read, args=(session,), daemon=True, name="zygote").start()
        return session

    def _fork(self, env: Mapping[str, str], stdin_r: int, stdout_w: int) -> tuple[_Session, int]:
        session = self._start()
        try:
            socket.send_fds(session.socket, [json.dumps(dict(env)).encode()], [stdin_r, stdout_w])
            pid = session.pids.get(timeout=60)
        except (OSError, queue.Empty) as error:
            self._stop()
            raise ZygoteGone(f"the zygote did not answer ({error or 'timeout'})") from None
        if pid is None:
            self._stop()
            raise ZygoteGone("the zygote exited")
        return session, pid

    def _stop(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        with contextlib.suppress(OSError):
            session.socket.shutdown(socket.SHUT_RDWR)  # the zygote sees the end and exits
        session.socket.close()
        try:
            session.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            session.process.kill()
            session.process.wait()

    # -- the reader thread ----------------------------------------------------------------------

    def _read(self, session: _Session) -> None:
        """Each line from the zygote: a forked worker's pid, or a worker's end. When the zygote
        ends, its workers have died with it (PR_SET_PDEATHSIG): each ends as killed."""
        with contextlib.suppress(OSError), session.socket.makefile("rb") as lines:
            for line in lines:
                words = line.split()
                if len(words) == 2 and words[0] == b"pid":
                    session.pids.put(int(words[1]))
                elif len(words) == 3 and words[0] == b"exit":
                    self._ended_with(session, int(words[1]), int(words[2]))
        session.pids.put(None)
        with self._table:
            session.gone = True
            pending = list(session.ended)
        for pid in pending:
            self._ended_with(session, pid, KILLED)

    def _ended_with(self, session: _Session, pid: int, code: int) -> None:
        with self._table:
            ended = session.ended.pop(pid, None)
            if ended is None:
                session.early[pid] = code
                return
        with contextlib.suppress(RuntimeError):  # its loop closed meanwhile
            ended.get_loop().call_soon_threadsafe(_settle, ended, code)


def _settle(future: asyncio.Future[int], code: int) -> None:
    if not future.done():
        future.set_result(code)


class _WriteProtocol(asyncio.streams.FlowControlMixin, asyncio.Protocol):
    """What ``StreamWriter`` needs of a protocol to write to a pipe (``drain`` included)."""

    def __init__(self) -> None:
        super().__init__()
        self._closed_future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self._closed_future.done():
            self._closed_future.set_result(None)

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future[None]:
        return self._closed_future


if __name__ == "__main__":
    sys.exit(serve())
