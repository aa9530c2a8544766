"""``JobStore``: the downloads and the last errors that outlive the service, in SQLite.

What is kept: every download accepted and not yet ended (running or queued, in the order they
were accepted, with the name and the file selection they were asked with) and the last error of
each model. A download leaves the store when it ends (completed, failed, cancelled by its user);
a stop of the service (SIGTERM) or its death (kill -9, power loss) leaves it there, and the next
start resumes it. Progress is not kept: what a download fetched is on disk, where the next
attempt finds it (the ranged parts and their records, the complete blobs).

Two services may share one state folder (and one cache). Each holds, for every download it owns,
an exclusive ``flock`` on ``claims/<key>.lock``, taken before the row is written and released by
the kernel when the process dies; a starting service resumes only the rows it can claim, so that a
download is never run twice.

Every method blocks (SQLite, ``fsync``): the manager calls them on one thread of its own, in the
order it submits them, so that a row's removal never overtakes its insertion. Nothing read back
is trusted: a row that does not validate is dropped with a warning, and a file that is not a
database of this version (corrupt, or written by a newer version of the service) is moved aside
with a warning; the service then starts with an empty store, never crashes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from api.models.backend import FileSelection
from api.models.types import Model

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DATABASE = "jobs.sqlite3"
CLAIMS = "claims"
MAX_ERROR_LENGTH = 4096  # an error message is a sentence or two; longer is cut when read back

_TABLES = """
CREATE TABLE IF NOT EXISTS downloads (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    hf_repo TEXT NOT NULL,
    hf_commit TEXT,
    selection TEXT,
    accepted_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS errors (
    task_id TEXT PRIMARY KEY,
    message TEXT NOT NULL,
    failed_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class StoredDownload:
    """A download accepted by a service and not ended: resumed at the next start."""

    key: str  # the row's name, and its claim's
    model: Model  # as it was asked (a branch stays a branch: the resume fetches it as it is now)
    asked: FileSelection | None  # None: the recorded selection, else the default


class JobStore:
    """The state folder's database and claims (blocking; one thread at a time)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._db: sqlite3.Connection | None = None
        self._claims: dict[str, int] = {}  # key -> the fd holding its flock

    @property
    def path(self) -> Path:
        return self.folder / DATABASE

    def open(self) -> None:
        """Open (or create) the database; one that cannot be used is moved aside, with a warning,
        and a new one is made. Raises ``OSError`` or ``sqlite3.Error`` when the folder cannot be
        written at all (the service then runs without a store)."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.folder / CLAIMS).mkdir(mode=0o700, exist_ok=True)
        try:
            self._db = self._connect()
            problem = self._problem()
        except sqlite3.DatabaseError as error:  # not a database, or a damaged one
            problem = f"corrupt ({error})"
        if problem is not None:
            self.close()
            aside = self._move_aside(problem.split(" ", 1)[0])
            logger.warning(
                "event=state_moved_aside path=%s moved_to=%s reason=%s: the downloads it held are"
                " not resumed",
                self.path,
                aside,
                problem,
            )
            self._db = self._connect()
        db = self._connected()
        db.executescript(_TABLES)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        # WAL: a reader (the other service) never blocks a writer; FULL: a commit that returned
        # survives a power loss.
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        return db

    def _problem(self) -> str | None:
        """Why the open database cannot be used, or None."""
        assert self._db is not None
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            return f"newer (schema version {version}; this service knows up to {SCHEMA_VERSION})"
        check = self._db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            return f"corrupt (quick_check: {str(check)[:200]})"
        return None

    def _move_aside(self, why: str) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{DATABASE}.{why}-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
        return aside

    def close(self) -> None:
        """Close the database and release every claim (the rows stay: resumed at next start)."""
        if self._db is not None:
            self._db.close()
            self._db = None
        for fd in self._claims.values():
            os.close(fd)
        self._claims.clear()

    # -- downloads ---------------------------------------------------------------------------

    def add(self, key: str, model: Model, asked: FileSelection | None) -> None:
        """Keep an accepted download (claimed by this process first)."""
        if not self.claim(key):
            raise RuntimeError(f"the claim {key} is held by another process")
        selection = json.dumps(asked.to_json()) if asked is not None else None
        with self._transaction() as db:
            db.execute(
                "INSERT INTO downloads (key, hf_repo, hf_commit, selection, accepted_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (key, model.hf_repo, model.hf_commit, selection, time.time()),
            )

    def remove(self, key: str) -> None:
        """Forget a download that ended (or that is not to be resumed), then its claim."""
        self._delete_row(key)
        if key in self._claims:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._claim_path(key))
            self._release(key)

    def claim_unowned(self) -> list[StoredDownload]:
        """The kept downloads no live process owns, in the order they were accepted, claimed by
        this process now. Rows that do not validate are removed, with a warning."""
        rows = self._read("SELECT key, hf_repo, hf_commit, selection FROM downloads ORDER BY seq")
        found: list[StoredDownload] = []
        for key, repo, commit, selection in rows:
            if not isinstance(key, str) or not key.isalnum() or len(key) > 64:
                self._drop_row(key, "its key is not one this service writes")
                continue
            if not self.claim(key):
                continue  # another service sharing the folder runs it
            # The claim is held: a row still there now is no other process's.
            if not self._read("SELECT 1 FROM downloads WHERE key = ?", (key,)):
                self._release(key)
                continue
            try:
                model = Model.model_validate({"hf_repo": repo, "hf_commit": commit})
                asked = None
                if selection is not None:
                    if not isinstance(selection, str):
                        raise TypeError("its selection is not text")
                    asked = FileSelection.from_json(json.loads(selection))
            except (ValidationError, ValueError, TypeError) as error:
                self.remove(key)
                logger.warning(
                    "event=state_row_dropped key=%s reason=%s",
                    key,
                    str(error).splitlines()[0][:200],
                )
                continue
            found.append(StoredDownload(key, model, asked))
        return found

    def _drop_row(self, key: object, why: str) -> None:
        self._delete_row(key)
        logger.warning("event=state_row_dropped reason=%s", why)

    def _delete_row(self, key: object) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM downloads WHERE key = ?", (key,))

    def claim(self, key: str) -> bool:
        """Hold the download's claim (an exclusive flock) unless another process does."""
        if key in self._claims:
            return True
        fd = os.open(
            self._claim_path(key), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._claims[key] = fd
        return True

    def _release(self, key: str) -> None:
        fd = self._claims.pop(key, None)
        if fd is not None:
            os.close(fd)

    def _claim_path(self, key: str) -> Path:
        return self.folder / CLAIMS / f"{key}.lock"

    # -- errors ------------------------------------------------------------------------------

    def errors(self) -> dict[str, str]:
        """The last error of each model (by task id, and by ``repo:commit``)."""
        rows = self._read("SELECT task_id, message FROM errors")
        return {
            task_id: message[:MAX_ERROR_LENGTH]
            for task_id, message in rows
            if isinstance(task_id, str) and isinstance(message, str) and len(task_id) <= 400
        }

    def set_errors(self, errors: dict[str, str]) -> None:
        now = time.time()
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO errors (task_id, message, failed_at) VALUES (?, ?, ?)",
                [(task_id, message, now) for task_id, message in errors.items()],
            )

    def drop_errors(self, task_ids: list[str]) -> None:
        with self._transaction() as db:
            db.executemany("DELETE FROM errors WHERE task_id = ?", [(t,) for t in task_ids])

    # -- SQLite ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connected()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _read(self, query: str, parameters: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        return list(self._connected().execute(query, parameters).fetchall())

    def _connected(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.ProgrammingError("the job store is not open")
        return self._db
