"""The messages between the service (``adapter``) and a download worker (``worker``), typed.

One JSON object a line: the service writes one ``Job`` on the worker's stdin; the worker writes
``Started`` when it has the job, then ``Progress`` and ``Verifying`` as it goes, and last ``Done`` or
``Failed`` on its stdout. Both ends encode and parse with this module only; a line that does not
parse raises ``ProtocolError``, which the service treats as a crash of the worker (retryable).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from api.models.backend import DownloadPlan, FileSelection, Peer, RemoteFile
from api.models.errors import FailureKind
from api.models.hub.guard import Limits, check_plan
from api.models.hub.ranged import Ranges


class ProtocolError(Exception):
    """A line from the other end that is not a message of this protocol."""


@dataclass(frozen=True)
class Job:
    repo_id: str
    revision: str
    cache_dir: str
    endpoint: str
    plan: DownloadPlan
    limits: Limits
    ranges: Ranges = field(default_factory=Ranges)
    bytes_per_second: float | None = None  # this download's bandwidth share (None: no cap)
    xet_when_capped: str = "http"  # under a cap, Xet files go by plain HTTP ("http") or not
    peers: tuple[Peer, ...] = ()  # a fleet's nodes to copy the files from first
    # The service's own addresses (host, port): no redirect of the Hub may lead there.
    own_origins: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Started:
    """The worker has its job; from now on the stall watchdog counts."""


@dataclass(frozen=True)
class Progress:
    downloaded_bytes: int  # of the plan's files on disk (those already there included)
    files_done: int  # by this pass
    transferred_bytes: int  # fetched by this attempt so far (network bytes where reported)
    through_xet: bool = False  # some of it came through hf_xet (out of the bandwidth cap's reach)
    from_peers_bytes: int = 0  # of transferred_bytes, those copied from a fleet's peers


@dataclass(frozen=True)
class Verifying:
    verified_bytes: int
    files_done: int


@dataclass(frozen=True)
class Done:
    pass


@dataclass(frozen=True)
class Failed:
    kind: FailureKind
    message: str
    retryable: bool
    retry_after: float | None = None


@dataclass(frozen=True)
class Rate:
    """From the service, while the worker runs: its new bandwidth share (None: no cap)."""

    bytes_per_second: float | None


def encode_rate(rate: Rate) -> bytes:
    return json.dumps({"type": "rate", "bytes_per_second": rate.bytes_per_second}).encode() + b"\n"


def parse_rate(raw: bytes) -> Rate:
    data = _object(raw)
    if data.get("type") != "rate":
        raise ProtocolError("not a rate message")
    try:
        return Rate(_rate_of(data.get("bytes_per_second")))
    except ValueError as error:
        raise ProtocolError("malformed rate message") from error


WorkerMessage = Started | Progress | Verifying | Done | Failed
_TYPES: dict[str, type[WorkerMessage]] = {
    "started": Started,
    "progress": Progress,
    "verifying": Verifying,
    "done": Done,
    "failed": Failed,
}
_NAMES = {cls: name for name, cls in _TYPES.items()}


def encode(message: WorkerMessage) -> bytes:
    fields: dict[str, Any] = asdict(message)
    if isinstance(message, Failed):
        fields["kind"] = message.kind.value
    return json.dumps({"type": _NAMES[type(message)], **fields}).encode() + b"\n"


def parse(raw: bytes) -> WorkerMessage:
    data = _object(raw)
    cls = _TYPES.get(str(data.pop("type", "")))
    if cls is None:
        raise ProtocolError("unknown message type")
    try:
        if cls is Failed:
            data["kind"] = FailureKind(data["kind"])
        if not isinstance(data.get("through_xet", False), bool):
            raise ProtocolError("through_xet is not a boolean")
        for name in (
            "downloaded_bytes",
            "files_done",
            "transferred_bytes",
            "verified_bytes",
            "from_peers_bytes",
        ):
            if name in data and (not isinstance(data[name], int) or isinstance(data[name], bool)):
                raise ProtocolError(f"{name} is not an integer")
        return cls(**data)
    except (KeyError, TypeError, ValueError) as error:
        raise ProtocolError(f"malformed {cls.__name__} message") from error


def encode_job(job: Job) -> bytes:
    plan = {
        "commit": job.plan.commit,
        "files": [[f.path, f.size, f.etag] for f in job.plan.files],
        "selected": sorted(job.plan.selected) if job.plan.selected is not None else None,
        "selections": [s.to_json() for s in job.plan.selections],
    }
    fields = {
        **asdict(job),
        "plan": plan,
        "limits": asdict(job.limits),
        "ranges": asdict(job.ranges),
    }
    return json.dumps(fields).encode() + b"\n"


def parse_job(raw: bytes) -> Job:
    """The job, its plan checked again (``check_plan``: it crossed a pipe, and it names paths)."""
    data = _object(raw)
    try:
        raw_plan = data["plan"]
        files = tuple(RemoteFile(str(p), int(n), str(e)) for p, n, e in raw_plan["files"])
        selected = raw_plan["selected"]
        if selected is not None:
            selected = frozenset(str(p) for p in selected)
            if not selected <= {f.path for f in files}:
                raise ValueError("a selected path is not a file of the plan")
        plan = DownloadPlan(
            commit=str(raw_plan["commit"]),
            files=files,
            selected=selected,
            selections=tuple(FileSelection.from_json(s) for s in raw_plan["selections"]),
        )
        return Job(
            repo_id=str(data["repo_id"]),
            revision=str(data["revision"]),
            cache_dir=str(data["cache_dir"]),
            endpoint=str(data["endpoint"]),
            plan=check_plan(plan),
            limits=Limits(**data["limits"]),
            ranges=Ranges(**data["ranges"]),
            bytes_per_second=_rate_of(data.get("bytes_per_second")),
            xet_when_capped="xet" if data.get("xet_when_capped") == "xet" else "http",
            peers=tuple(_peer_of(p) for p in data.get("peers") or ()),
            own_origins=tuple((str(h), int(p)) for h, p in data.get("own_origins") or ()),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ProtocolError("malformed job") from error


def _peer_of(value: object) -> Peer:
    if not isinstance(value, dict):
        raise ValueError("a peer is an object")
    url, token = value.get("url"), value.get("token")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError("a peer's url is http(s)")
    if not isinstance(token, str):
        raise ValueError("a peer's token is a string")
    tier = value.get("tier", 0)
    if not isinstance(tier, int) or isinstance(tier, bool) or not 0 <= tier < 1000:
        raise ValueError("a peer's tier is a small int")
    return Peer(url, token, tier)


def _rate_of(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError("a rate is a positive number")
    return float(value)


def _object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as error:
        raise ProtocolError("not JSON") from error
    if not isinstance(data, dict):
        raise ProtocolError("not a JSON object")
    return data
