"""A real multi-node Ray cluster on this machine, for the fleet's tests and benchmark.

Each node is a real raylet with its own cache folder (its Ray node label ``models-cache``), all
bound to 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: without it Ray takes the machine's
external address, which these machines cannot reach).

The cluster lives in a process of its own (``python -m fakehub.raycluster``), never in the test
process: Ray's head would otherwise share the test's signal handlers, pipes and event loop, and a
fleet test hung there. Its daemons write to a log file, not to the caller's pipes (a reader of
the caller's output would otherwise wait for ever), and the whole process group is killed at the
end, so that no raylet outlives a run.

The runner speaks lines on stdin/stdout: it prints ``{"address": ..., "nodes": [...]}`` once up;
``add <cache>`` adds a node and prints its id; ``remove <node id>`` removes one and prints
``removed``; end of input shuts everything down.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

LABEL = "models-cache"


def _environment(root: Path) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("HF_HUB_CACHE", "HF_ENDPOINT", "HF_TOKEN", "MODELS_STATE_DIR")
    }
    env.update(
        {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            # Ray keeps files of its own outside the session folder it is given: the address of
            # the last cluster (``$RAY_TMPDIR/ray/ray_current_cluster``, default ``/tmp/ray``),
            # written into a folder nothing creates. Its own root here, made first
            # (``ray_cluster``): a machine that never ran Ray has no ``/tmp/ray``.
            "RAY_TMPDIR": str(root),
            # The agents' library home: never ~/.cache.
            "HF_HOME": str(root / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
    )
    return env


def _serve(root: Path, caches: list[str]) -> None:
    """The runner's body (in its own process)."""
    protocol_out = os.fdopen(os.dup(1), "w", buffering=1)
    protocol_in = os.fdopen(os.dup(0), "r")
    log = os.open(root / "cluster.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)

    import ray.cluster_utils

    # No CPUs to schedule on: the fleet's agents ask for none (as on a vLLM cluster, where the
    # CPUs are vLLM's), and a node with CPUs starts an idle Python worker per CPU, which on this
    # small machine costs every test its share of two cores.
    cluster = ray.cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_log_monitor": False,
            "node_ip_address": "127.0.0.1",
            "labels": {LABEL: caches[0]},
            "temp_dir": str(root / "ray"),
            "include_dashboard": False,
        },
    )
    head = cluster.head_node
    assert head is not None
    nodes: dict[str, Any] = {head.node_id: head}
    for cache in caches[1:]:
        node = cluster.add_node(
            num_cpus=0,
            include_log_monitor=False,
            node_ip_address="127.0.0.1",
            labels={LABEL: cache},
        )
        nodes[node.node_id] = node
    cluster.wait_for_nodes()
    protocol_out.write(json.dumps({"address": cluster.address, "nodes": list(nodes)}) + "\n")
    for line in protocol_in:
        command, _, argument = line.strip().partition(" ")
        if command == "add":
            node = cluster.add_node(
                num_cpus=0,
                include_log_monitor=False,
                node_ip_address="127.0.0.1",
                labels={LABEL: argument},
            )
            cluster.wait_for_nodes()
            nodes[node.node_id] = node
            protocol_out.write(node.node_id + "\n")
        elif command == "remove":
            node = nodes.pop(argument)
            # A machine that leaves takes every process on it at once: its raylet and what runs
            # under it (an agent, its blob server, its download workers) are killed first, then
            # Ray is told. Ray's own remove waits seconds before it kills the raylet, and the
            # node went on serving its peers meanwhile.
            raylets = [info.process.pid for info in node.all_processes.get("raylet", [])]
            doomed = [pid for raylet in raylets for pid in _descendants(raylet)] + raylets
            print(f"removing node {argument}: killing {doomed}", file=sys.stderr, flush=True)
            for pid in doomed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            cluster.remove_node(node, allow_graceful=False)
            protocol_out.write("removed\n")
    # End of input: the caller is done (or died). The caller kills the process group anyway.
    with contextlib.suppress(Exception):
        cluster.shutdown()


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found.extend(children)
        frontier.extend(children)
    return found


@dataclass
class RayCluster:
    """The caller's side: a handle on the runner process."""

    address: str
    nodes: list[str]
    caches: dict[str, Path]
    process: subprocess.Popen[str]
    log: Path
    _lines: IO[str] = field(repr=False)

    def _ask(self, line: str, timeout: float = 120.0) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return _read_line(self.process, self._lines, timeout, self.log)

    def add_node(self, cache: Path) -> str:
        """A new node whose cache folder is ``cache``; its id."""
        node = self._ask(f"add {cache}")
        self.nodes.append(node)
        self.caches[node] = cache
        return node

    def remove_node(self, node: str) -> None:
        """The node's raylet and every process on it are killed (a machine that left)."""
        assert self._ask(f"remove {node}") == "removed"
        self.nodes.remove(node)


def _read_line(process: subprocess.Popen[str], lines: IO[str], timeout: float, log: Path) -> str:
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(lines, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise RuntimeError(
                f"the Ray cluster did not answer within {timeout:g} s; {log} ends:\n{log_tail(log)}"
            )
    line = lines.readline()
    if not line:
        raise RuntimeError(
            f"the Ray cluster's runner ended (exit {process.wait()}); {log} ends:\n{log_tail(log)}"
        )
    return line.strip()


def log_tail(log: Path, lines: int = 40) -> str:
    """The last lines of the cluster's log, for an error that would otherwise only name it (the
    folder holding it may be removed before anyone reads it)."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(unreadable: {error})"


@contextlib.contextmanager
def ray_cluster(root: Path, caches: list[Path], timeout: float = 180.0) -> Iterator[RayCluster]:
    """A cluster of ``len(caches)`` nodes, each with its own cache folder, up until the end of the
    block; ``root`` holds Ray's session folder (keep its path short: a socket path is at most 107
    bytes) and the cluster's log."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "ray").mkdir(exist_ok=True)  # $RAY_TMPDIR/ray: see ``_environment``
    log = root / "cluster.log"
    with log.open("ab") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "fakehub.raycluster", str(root), *map(str, caches)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env=_environment(root),
            start_new_session=True,
        )
    assert process.stdout is not None
    try:
        first: dict[str, Any] = json.loads(_read_line(process, process.stdout, timeout, log))
        nodes: list[str] = first["nodes"]
        yield RayCluster(
            address=first["address"],
            nodes=list(nodes),
            caches=dict(zip(nodes, caches, strict=True)),
            process=process,
            log=log,
            _lines=process.stdout,
        )
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[str]) -> None:
    """End of input (a clean shutdown), then the whole process group killed: no raylet, GCS or
    worker of the cluster outlives it."""
    with contextlib.suppress(OSError):
        if process.stdin is not None:
            process.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    if process.stdout is not None:
        process.stdout.close()
    deadline = time.monotonic() + 10
    while _group_alive(process.pid) and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        time.sleep(0.05)


def _group_alive(group: int) -> bool:
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            # Field 5 of stat is the process group (after the command in parentheses).
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group and fields[0] != "Z":
                return True
    return False


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), sys.argv[2:])
