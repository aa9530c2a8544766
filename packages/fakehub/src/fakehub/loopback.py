"""What the fake servers share: an HTTP server on 127.0.0.1 in a thread of its own, started and
stopped as a context manager, or served in the foreground until Ctrl-C (``python -m ...``)."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer
from typing import Any, Self


class QuietHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP server that says nothing of a client gone away mid-answer (a cancel, a
    timeout): normal here, and a traceback printed from a handler thread while a test runs is
    noise at best (on CPython 3.11, printing one can even break an ``ast.parse`` running in the
    test's thread at that moment: see ``tests.helpers.parse_python``)."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class LoopbackServer:
    """Subclasses set ``_server`` (a ``ThreadingHTTPServer``) in their ``__init__``."""

    _server: ThreadingHTTPServer
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Self:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def serve_until_interrupted(self) -> None:
        """Serve in this thread until Ctrl-C (the standalone mode)."""
        try:
            self._server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            pass
        finally:
            self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
