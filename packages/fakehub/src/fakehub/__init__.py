"""A Hugging Face Hub-protocol fake server with fault injection (see ``fakehub.server``)."""

from fakehub import xet
from fakehub.faults import (
    Fault,
    FaultKind,
    Lies,
    corrupt,
    drop_after,
    http_error,
    latency,
    rate_limited,
    short_body,
    stall,
    trickle,
)
from fakehub.repos import Generated, Repo, RepoBuilder, RepoFile, git_blob_sha1, load_repos
from fakehub.server import FakeHub
from fakehub.vllm import FakeVllm

__all__ = [
    "FakeHub",
    "FakeVllm",
    "Fault",
    "FaultKind",
    "Generated",
    "Lies",
    "Repo",
    "RepoBuilder",
    "RepoFile",
    "corrupt",
    "drop_after",
    "git_blob_sha1",
    "http_error",
    "latency",
    "load_repos",
    "rate_limited",
    "short_body",
    "stall",
    "trickle",
    "xet",
]
