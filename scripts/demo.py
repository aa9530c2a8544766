"""``make demo``: the fake hub with sample repos and the service pointed at it, both on 127.0.0.1,
started and stopped together.

Each port is checked first (a busy one fails loudly: the service would otherwise talk to whatever
listens there); both servers die with this process (Ctrl-C, SIGTERM from make, kill -9); when one
of them exits, the other is stopped too. ``make fleet-demo`` adds a Ray cluster of 3 nodes on
this machine (each with its own cache folder) and joins the service to it; the cluster stops with
the demo.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent


def _port_free(host: str, port: int) -> bool:
    """Whether a server could listen on the port now. SO_REUSEADDR, as the servers themselves
    bind: the connections of a demo just stopped (in TIME_WAIT for a minute) do not count, a
    server still listening there does."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _wait_http(url: str, process: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            raise SystemExit(f"demo: {url} exited before it answered (code {process.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: {url} did not answer within {seconds:g} s") from None
            time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="the service's port")
    parser.add_argument("--hub-port", type=int, default=8900, help="the fake hub's port")
    parser.add_argument("--folder", type=Path, default=ROOT / ".demo")
    parser.add_argument(
        "--fleet",
        type=int,
        default=0,
        metavar="N",
        help="a fleet: a Ray cluster of N nodes on this machine (127.0.0.1 only), each with its"
        " own cache folder, and the service joined to it",
    )
    args = parser.parse_args()
    for name, host, port in (
        ("hub", "127.0.0.1", args.hub_port),
        ("service", args.host, args.port),
    ):
        if not _port_free(host, port):
            print(
                f"demo: port {port} ({name}) is in use; pick another with"
                f" {'HUB_PORT' if name == 'hub' else 'PORT'}=... make demo",
                file=sys.stderr,
            )
            return 1
    args.folder.mkdir(exist_ok=True)
    hub_url = f"http://127.0.0.1:{args.hub_port}"
    hub = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fakehub",
            "--repos",
            str(args.folder / "repos"),
            "--port",
            str(args.hub_port),
            "--samples",
        ],
        preexec_fn=_die_with_parent,
    )
    children = [hub]

    def stop() -> None:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=10)
        for child in children:
            if child.poll() is None:
                child.kill()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # the same end as Ctrl-C: stop both (below)

    signal.signal(signal.SIGTERM, on_sigterm)
    with contextlib.ExitStack() as stack:
        return _serve(args, hub, hub_url, children, stop, stack)


def _serve(
    args: argparse.Namespace,
    hub: subprocess.Popen[bytes],
    hub_url: str,
    children: list[subprocess.Popen[bytes]],
    stop: Callable[[], None],
    stack: contextlib.ExitStack,
) -> int:
    try:
        _wait_http(f"{hub_url}/api/models/demo/tiny-model", hub, 120)
        env = {
            **os.environ,
            "HF_ENDPOINT": hub_url,
            "HF_HUB_CACHE": str(args.folder / "cache"),
        }
        if args.fleet:
            from fakehub.raycluster import ray_cluster

            # Ray's sockets live in its session folder: a short path of its own.
            root = Path(tempfile.mkdtemp(prefix="fleet-demo-"))
            stack.callback(shutil.rmtree, root, ignore_errors=True)
            caches = [args.folder / "fleet" / f"node{i}" / "cache" for i in range(args.fleet)]
            print(f"demo: starting a Ray cluster of {args.fleet} nodes", file=sys.stderr)
            cluster = stack.enter_context(ray_cluster(root, caches))
            env["MODELS_RAY_ADDRESS"] = cluster.address
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the service's node: 127.0.0.1
            for node, cache in cluster.caches.items():
                print(f"demo: node {node[:12]} caches in {cache}", file=sys.stderr)
        service = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "api.app:app",
                "--host",
                args.host,
                "--port",
                str(args.port),
            ],
            env=env,
            preexec_fn=_die_with_parent,
        )
        children.append(service)
        _wait_http(f"http://{args.host}:{args.port}/api/health", service, 180)
        # Its process id, for whoever wants to stop (or crash) exactly this service.
        pid_file = args.folder / "service.pid"
        pid_file.write_text(f"{service.pid}\n")
        print(
            f"demo: the service is at http://{args.host}:{args.port} (Swagger UI at /docs, pid"
            f" {service.pid} in {pid_file}), the fake hub at {hub_url}; Ctrl-C stops both",
            file=sys.stderr,
            flush=True,
        )
        while all(child.poll() is None for child in children):
            time.sleep(0.2)
        print("demo: one server exited; stopping the other", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop()
        (args.folder / "service.pid").unlink(missing_ok=True)  # no stale id for a later kill


if __name__ == "__main__":
    sys.exit(main())
