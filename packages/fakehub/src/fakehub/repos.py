"""Repositories served by the fake hub, and a builder that makes them on disk.

On-disk layout of a repos folder (what ``python -m fakehub --repos DIR`` serves)::

    DIR/<namespace>/<name>/repo.json        refs, commits and their file lists, access flags
    DIR/<namespace>/<name>/objects/<sha256> the content of every file, stored once

A commit's file entry records the git blob id of what git stores for that path (the content for a
regular file, the LFS pointer for an LFS file) and, for LFS files, the sha256 of the content: the same
identifiers the real Hub serves as ``oid`` and ``lfs.oid`` in its tree listing and as ``ETag`` /
``X-Linked-Etag`` on ``/resolve``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

LFS_POINTER_TEMPLATE = (
    "version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
)
DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files of 10 MiB and more in LFS
_CHUNK = 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    """The git blob id of ``data``: sha1 of ``blob <size>\\0`` followed by the content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return LFS_POINTER_TEMPLATE.format(sha256=sha256, size=size).encode()


@dataclass(frozen=True)
class Generated:
    """Content made on the fly: ``size`` bytes of seeded pseudo-random data, fast to write.

    A random 1 MiB block is repeated with the block number written into its first 8 bytes, so every
    MiB differs (corruption anywhere changes the hash) and a 1 GB file takes about a second to make.
    """

    size: int
    seed: int = 0

    def write_to(self, path: Path, blob_id: bool) -> tuple[str, str | None]:
        """Write the content to ``path``; return its sha256 and, with ``blob_id``, its git blob
        sha1 (only a file stored in git itself, not in LFS, is named by it: a third of the CPU)."""
        block = bytearray(random.Random(self.seed).randbytes(_CHUNK))
        sha256 = hashlib.sha256()
        sha1 = hashlib.sha1(b"blob %d\0" % self.size, usedforsecurity=False) if blob_id else None
        remaining = self.size
        index = 0
        with path.open("wb") as out:
            while remaining > 0:
                block[:8] = index.to_bytes(8, "little")
                piece = memoryview(block)[: min(_CHUNK, remaining)]
                out.write(piece)
                sha256.update(piece)
                if sha1 is not None:
                    sha1.update(piece)
                remaining -= len(piece)
                index += 1
        return sha256.hexdigest(), None if sha1 is None else sha1.hexdigest()


FileContent = bytes | str | Generated


@dataclass(frozen=True)
class RepoFile:
    """One file of one commit."""

    path: str
    size: int
    blob_id: str  # git blob id of what git stores (content, or the LFS pointer)
    sha256: str  # sha256 of the content; the object's name in objects/
    lfs: bool

    @property
    def etag(self) -> str:
        """The ETag the Hub serves for this file on /resolve."""
        return self.sha256 if self.lfs else self.blob_id

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))

    def to_json(self) -> dict[str, object]:
        return {
            "size": self.size,
            "blob_id": self.blob_id,
            "sha256": self.sha256,
            "lfs": self.lfs,
        }

    @classmethod
    def from_json(cls, path: str, info: dict[str, object]) -> RepoFile:
        return cls(
            path=path,
            size=int(str(info["size"])),
            blob_id=str(info["blob_id"]),
            sha256=str(info["sha256"]),
            lfs=bool(info["lfs"]),
        )


@dataclass
class Repo:
    """A model repository: its commits, refs (branches and tags) and access flags."""

    repo_id: str
    folder: Path
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, RepoFile]] = field(default_factory=dict)
    private: bool = False
    gated: bool = False

    def object_path(self, entry: RepoFile) -> Path:
        return self.folder / "objects" / entry.sha256

    def resolve(self, revision: str) -> str | None:
        """Commit id for a branch, tag or commit id; None when the repo has no such revision."""
        if revision in self.refs:
            return self.refs[revision]
        if revision in self.commits:
            return revision
        return None

    def save(self) -> None:
        data = {
            "repo_id": self.repo_id,
            "private": self.private,
            "gated": self.gated,
            "refs": self.refs,
            "commits": {
                sha: {path: entry.to_json() for path, entry in files.items()}
                for sha, files in self.commits.items()
            },
        }
        tmp = self.folder / "repo.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.folder / "repo.json")

    @classmethod
    def load(cls, folder: Path) -> Repo:
        data = json.loads((folder / "repo.json").read_text())
        return cls(
            repo_id=data["repo_id"],
            folder=folder,
            refs=dict(data["refs"]),
            commits={
                sha: {path: RepoFile.from_json(path, info) for path, info in files.items()}
                for sha, files in data["commits"].items()
            },
            private=bool(data.get("private", False)),
            gated=bool(data.get("gated", False)),
        )


class RepoBuilder:
    """Makes repositories on disk for the fake hub to serve.

    Example::

        builder = RepoBuilder(tmp_path / "repos")
        sha = builder.commit("org/model", {"config.json": "{}", "model.bin": Generated(50_000_000)})
    """

    def __init__(self, root: Path, lfs_threshold: int = DEFAULT_LFS_THRESHOLD) -> None:
        self.root = root
        self.lfs_threshold = lfs_threshold
        root.mkdir(parents=True, exist_ok=True)

    def repo(self, repo_id: str, *, private: bool = False, gated: bool = False) -> Repo:
        """Load the repo, or create it empty; set its access flags."""
        folder = self.root / repo_id
        if (folder / "repo.json").exists():
            repo = Repo.load(folder)
        else:
            (folder / "objects").mkdir(parents=True, exist_ok=True)
            repo = Repo(repo_id=repo_id, folder=folder)
        repo.private, repo.gated = private, gated
        repo.save()
        return repo

    def commit(
        self,
        repo_id: str,
        files: dict[str, FileContent],
        *,
        branch: str = "main",
        tags: tuple[str, ...] = (),
        private: bool = False,
        gated: bool = False,
        lfs: set[str] | None = None,
    ) -> str:
        """Add a commit with exactly ``files`` to ``branch`` (created if needed); return its id.

        ``lfs`` names the files stored in LFS; by default every file of at least the builder's
        ``lfs_threshold`` bytes and every ``Generated`` file.
        """
        repo = self.repo(repo_id, private=private, gated=gated)
        entries: dict[str, RepoFile] = {}
        for path, content in sorted(files.items()):
            entries[path] = self._store(repo, path, content, lfs)
        parent = repo.refs.get(branch, "")
        listing = json.dumps(
            {"parent": parent, "files": {p: e.to_json() for p, e in entries.items()}},
            sort_keys=True,
        )
        sha = hashlib.sha1(listing.encode(), usedforsecurity=False).hexdigest()
        repo.commits[sha] = entries
        repo.refs[branch] = sha
        for tag in tags:
            repo.refs[tag] = sha
        repo.save()
        return sha

    def _store(self, repo: Repo, path: str, content: FileContent, lfs: set[str] | None) -> RepoFile:
        objects = repo.folder / "objects"
        tmp = objects / f".tmp-{os.getpid()}"
        sha1: str | None
        if isinstance(content, Generated):
            size = content.size
            is_lfs = self._in_lfs(path, lfs, size, generated=True)
            sha256, sha1 = content.write_to(tmp, blob_id=not is_lfs)
        else:
            data = content.encode() if isinstance(content, str) else content
            size = len(data)
            is_lfs = self._in_lfs(path, lfs, size, generated=False)
            tmp.write_bytes(data)
            sha256, sha1 = hashlib.sha256(data).hexdigest(), git_blob_sha1(data)
        os.replace(tmp, objects / sha256)
        blob_id = git_blob_sha1(lfs_pointer(sha256, size)) if is_lfs else sha1
        assert blob_id is not None  # a file in git itself was hashed as git does
        return RepoFile(path=path, size=size, blob_id=blob_id, sha256=sha256, lfs=is_lfs)

    def _in_lfs(self, path: str, lfs: set[str] | None, size: int, generated: bool) -> bool:
        """Whether a file is stored in LFS: the paths named in ``lfs``, else generated content
        and files of ``lfs_threshold`` bytes and more."""
        if lfs is not None:
            return path in lfs
        return generated or size >= self.lfs_threshold


def load_repos(root: Path) -> dict[str, Repo]:
    """Every repo under ``root`` (``<namespace>/<name>/repo.json``), by repo id."""
    return {
        repo.repo_id: repo
        for repo in (Repo.load(p.parent) for p in sorted(root.glob("*/*/repo.json")))
    }
