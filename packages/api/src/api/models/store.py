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
is trusted: a row that does not validate (as a request body would: a repo id, a revision, a
selection, a message of the length and characters the service writes) is dropped with a
warning, and a file that is not a database of this version (corrupt, written by a newer version
of the service, or not a SQLite file at all) is moved aside with a warning; the service then
starts with an empty store, never crashes.

The folder is reached as the cache is (``api.models.anchored``): opened once, required to be the
service's own (owned by its user; group and others lose write access to it), and everything in
it is reached through its descriptor. What the service did not put there is never written
through: a ``jobs.sqlite3`` (or its ``-wal``, ``-shm``, ``-journal``) that is a link, not a
regular file, has another name elsewhere (a hard link) or belongs to another user is moved aside
with a warning, and so is a ``claims`` that is not a folder. SQLite itself opens files by path:
after it has, the store checks that the files it holds open are the very files of this folder,
and gives up the store (the service runs without one, saying so) if they are not.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import sqlite3
import stat
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from api import logfmt
from api.models.anchored import Folder, LinkInTheWay
from api.models.backend import FileSelection
from api.models.types import COMMIT_PATTERN, HistoryEntry, Model

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DATABASE = "jobs.sqlite3"
CLAIMS = "claims"
MAX_ERROR_LENGTH = 4096  # an error message is a sentence or two: a longer one is not ours
SQLITE_HEADER = b"SQLite format 3\x00"
# The database's files: SQLite names its journals after it.
DATABASE_FILES = (DATABASE, f"{DATABASE}-wal", f"{DATABASE}-shm", f"{DATABASE}-journal")

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
CREATE TABLE IF NOT EXISTS uses (
    hf_repo TEXT NOT NULL,
    hf_commit TEXT NOT NULL,
    used_at REAL NOT NULL,
    how TEXT NOT NULL,
    PRIMARY KEY (hf_repo, hf_commit)
);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    entry TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pins (
    hf_repo TEXT NOT NULL,
    revision TEXT NOT NULL,
    pinned_at REAL NOT NULL,
    PRIMARY KEY (hf_repo, revision)
);
"""
USE_KINDS = ("served", "downloaded", "verified")
HISTORY_EVENTS = ("downloaded", "failed", "cancelled", "deleted", "pruned", "evicted")
HISTORY_ROWS = 10_000  # the history keeps this many entries, the latest  # the evidence of a use, strongest first


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
        self._dir: Folder | None = None  # the state folder, opened once
        self._claims_dir: Folder | None = None
        self._claims: dict[str, int] = {}  # key -> the fd holding its flock

    @property
    def path(self) -> Path:
        return self.folder / DATABASE

    def open(self) -> None:
        """Open (or create) the database; one that cannot be used is moved aside, with a warning,
        and a new one is made. Raises ``OSError`` or ``sqlite3.Error`` when the folder cannot be
        written at all, or is not the service's own (the service then runs without a store)."""
        self._dir = _own_folder(self.folder)
        self._claims_dir = self._own_subfolder(CLAIMS)
        for name in DATABASE_FILES:
            problem = _not_ours(self._dir, name)
            if problem is not None:
                self._set_aside(problem)
                break
        else:
            if (problem := self._not_sqlite()) is not None:
                self._set_aside(problem)
        try:
            self._db = self._connect()
            problem = self._problem()
        except sqlite3.DatabaseError as error:  # not a database, or a damaged one
            problem = f"corrupt ({error})"
        if problem is not None:
            self.close_database()
            self._set_aside(problem)
            self._db = self._connect()
        db = self._connected()
        db.executescript(_TABLES)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _set_aside(self, problem: str) -> None:
        aside = self._move_aside(problem.split(" ", 1)[0])
        logfmt.log(
            logger,
            logging.WARNING,
            "state_moved_aside",
            path=self.path,
            moved_to=aside,
            reason=problem,
            downloads_resumed="false",
        )

    def _own_subfolder(self, name: str) -> Folder:
        """A folder of the store's (``claims``): one that is a link, or a file, is moved aside
        (never entered) and a folder made in its place."""
        assert self._dir is not None
        try:
            found = self._dir.sub(name, create=True, mode=0o700)
        except LinkInTheWay as link:
            aside = f"{name}.{link.found.split()[-1]}-{_stamp()}"
            self._dir.rename(name, aside)
            logfmt.log(
                logger,
                logging.WARNING,
                "state_moved_aside",
                path=self.folder / name,
                moved_to=self.folder / aside,
                reason=f"{link.found}, not a folder",
            )
            found = self._dir.sub(name, create=True, mode=0o700)
        assert found is not None
        return found

    def _not_sqlite(self) -> str | None:
        """Why the database file is not one SQLite wrote (empty or absent: a new one)."""
        assert self._dir is not None
        try:
            fd = self._dir.open(DATABASE)
        except FileNotFoundError:
            return None
        try:
            head = os.pread(fd, len(SQLITE_HEADER), 0)
        finally:
            os.close(fd)
        if head and head != SQLITE_HEADER:
            return "foreign (not a SQLite database)"
        return None

    def _connect(self) -> sqlite3.Connection:
        assert self._dir is not None
        db = sqlite3.connect(
            _current_path(self._dir, self.folder) / DATABASE, timeout=10, isolation_level=None
        )
        try:
            # WAL: a reader (the other service) never blocks a writer; FULL: a commit that
            # returned survives a power loss.
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            _check_sqlite_opened(self._dir)
        except BaseException:
            db.close()
            raise
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
        """The database's files renamed (the entries themselves: a link is moved, never
        followed) to ``jobs.sqlite3.<why>-<time>``."""
        assert self._dir is not None
        aside = f"{DATABASE}.{why}-{_stamp()}"
        for name in DATABASE_FILES:
            with contextlib.suppress(FileNotFoundError):
                self._dir.rename(name, aside + name.removeprefix(DATABASE))
        return self.folder / aside

    def close_database(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def close(self) -> None:
        """Close the database and release every claim (the rows stay: resumed at next start)."""
        self.close_database()
        for fd in self._claims.values():
            os.close(fd)
        self._claims.clear()
        for folder in (self._claims_dir, self._dir):
            if folder is not None:
                folder.close()
        self._claims_dir = self._dir = None

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
            self._claims_folder().unlink(_claim_name(key))
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
                # As a request body is: a repo id or revision the API would refuse is dropped.
                model = Model.model_validate({"hf_repo": repo, "hf_commit": commit})
                asked = None
                if selection is not None:
                    if not isinstance(selection, str):
                        raise TypeError("its selection is not text")
                    asked = FileSelection.from_json(json.loads(selection))
            except (ValidationError, ValueError, TypeError) as error:
                self.remove(key)
                logfmt.log(
                    logger,
                    logging.WARNING,
                    "state_row_dropped",
                    key=key,
                    reason=str(error).splitlines()[0][:200],
                )
                continue
            found.append(StoredDownload(key, model, asked))
        return found

    def _drop_row(self, key: object, why: str) -> None:
        self._delete_row(key)
        logfmt.log(logger, logging.WARNING, "state_row_dropped", reason=why)

    def _delete_row(self, key: object) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM downloads WHERE key = ?", (key,))

    def claim(self, key: str) -> bool:
        """Hold the download's claim (an exclusive flock) unless another process does."""
        if key in self._claims:
            return True
        fd = self._claims_folder().open(_claim_name(key), os.O_RDWR | os.O_CREAT, 0o600)
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

    def _claims_folder(self) -> Folder:
        if self._claims_dir is None:
            raise sqlite3.ProgrammingError("the job store is not open")
        return self._claims_dir

    # -- errors ------------------------------------------------------------------------------

    def errors(self) -> dict[str, str]:
        """The last error of each model (by task id, and by ``repo:commit``). A row the service
        would not have written (a key that is not a task id of a valid repo and revision, a
        message longer than ``MAX_ERROR_LENGTH`` or with control characters) is dropped, with a
        warning: it would reach status answers."""
        rows = self._read("SELECT task_id, message FROM errors")
        kept: dict[str, str] = {}
        dropped = 0
        for task_id, message in rows:
            if _task_id_ok(task_id) and _message_ok(message):
                assert isinstance(task_id, str)
                assert isinstance(message, str)
                kept[task_id] = message
            else:
                dropped += 1
        if dropped:
            logfmt.log(
                logger,
                logging.WARNING,
                "state_row_dropped",
                table="errors",
                count=dropped,
                reason="not a task id and a message this service writes",
            )
        return kept

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

    # -- uses and pins (the cache budget) ------------------------------------------------------

    def uses(self) -> dict[tuple[str, str], tuple[float, str]]:
        """The last use of each revision: (repo, commit) -> (Unix time, how). A row the service
        would not have written is dropped, with a warning."""
        kept: dict[tuple[str, str], tuple[float, str]] = {}
        dropped = 0
        for repo, commit, at, how in self._read(
            "SELECT hf_repo, hf_commit, used_at, how FROM uses"
        ):
            if (
                _revision_ok(repo, commit, commit_only=True)
                and isinstance(at, float)
                and how in USE_KINDS
            ):
                assert isinstance(repo, str)
                assert isinstance(commit, str)
                assert isinstance(how, str)
                kept[(repo, commit)] = (at, how)
            else:
                dropped += 1
        _warn_dropped("uses", dropped)
        return kept

    def record_uses(self, uses: list[tuple[str, str, float, str]]) -> None:
        """(repo, commit, time, how) each: kept unless a later use is recorded already."""
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO uses (hf_repo, hf_commit, used_at, how) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (hf_repo, hf_commit) DO UPDATE SET used_at = excluded.used_at,"
                " how = excluded.how WHERE excluded.used_at >= uses.used_at",
                uses,
            )

    def pins(self) -> set[tuple[str, str]]:
        """Every pin: (repo, revision as it was asked: a commit, a branch or a tag)."""
        kept: set[tuple[str, str]] = set()
        dropped = 0
        for repo, revision in self._read("SELECT hf_repo, revision FROM pins"):
            if _revision_ok(repo, revision):
                assert isinstance(repo, str)
                assert isinstance(revision, str)
                kept.add((repo, revision))
            else:
                dropped += 1
        _warn_dropped("pins", dropped)
        return kept

    def pin(self, repo: str, revision: str) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO pins (hf_repo, revision, pinned_at) VALUES (?, ?, ?)",
                (repo, revision, time.time()),
            )

    def unpin(self, repo: str, revision: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM pins WHERE hf_repo = ? AND revision = ?", (repo, revision))

    # -- history -------------------------------------------------------------------------------

    def add_history(self, entry: HistoryEntry) -> None:
        """One entry; the oldest beyond ``HISTORY_ROWS`` go."""
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO history (entry) VALUES (?)", (entry.model_dump_json(),)
            )
            db.execute(
                "DELETE FROM history WHERE seq <= ?", ((cursor.lastrowid or 0) - HISTORY_ROWS,)
            )

    def history(self, limit: int) -> list[HistoryEntry]:
        """The latest ``limit`` entries, newest first. A row that does not validate as an entry
        the service writes is left out, with a warning."""
        rows = self._read("SELECT entry FROM history ORDER BY seq DESC LIMIT ?", (limit,))
        kept: list[HistoryEntry] = []
        dropped = 0
        for (text,) in rows:
            try:
                entry = HistoryEntry.model_validate_json(str(text))
                Model(hf_repo=entry.model.hf_repo, hf_commit=entry.model.hf_commit)
            except ValidationError:
                dropped += 1
                continue
            if entry.event in HISTORY_EVENTS and all(
                _message_ok(value) for value in (entry.detail, entry.by) if value is not None
            ):
                kept.append(entry)
            else:
                dropped += 1
        _warn_dropped("history", dropped)
        return kept

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


def _stamp() -> str:
    """When, and a few random characters: two files set aside in one second keep both."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def _claim_name(key: str) -> str:
    return f"{key}.lock"


def _own_folder(path: Path) -> Folder:
    """The state folder, made (0700) when absent and opened once. It must be the service's own:
    owned by its user (raises ``PermissionError`` otherwise); group and others lose write
    access to it, so that nobody else can plant anything in it afterwards."""
    folder = Folder.anchor(path, create=True, mode=0o700)
    assert folder is not None
    info = os.fstat(folder.fd)
    if info.st_uid != os.geteuid():
        folder.close()
        raise PermissionError(
            f"the state folder {path} belongs to another user (uid {info.st_uid}): not used"
        )
    if stat.S_IMODE(info.st_mode) & 0o022:
        folder.chmod(stat.S_IMODE(info.st_mode) & ~0o022)
        logfmt.log(logger, logging.WARNING, "state_folder_made_private", path=path)
    return folder


def _not_ours(folder: Folder, name: str) -> str | None:
    """Why the file ``name`` of the state folder is not one the service wrote (None: it is, or
    it is absent): a link, not a regular file, a file with another name elsewhere, another
    user's."""
    info = folder.lstat(name)
    if info is None:
        return None
    if stat.S_ISLNK(info.st_mode):
        return f"link ({name} is a link)"
    if not stat.S_ISREG(info.st_mode):
        return f"foreign ({name} is not a regular file)"
    if info.st_nlink != 1:
        return f"foreign ({name} has another name elsewhere: a hard link)"
    if info.st_uid != os.geteuid():
        return f"foreign ({name} belongs to uid {info.st_uid})"
    return None


def _current_path(folder: Folder, configured: Path) -> Path:
    """Where the open folder is now (SQLite opens by path): read from /proc where there is one."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{folder.fd}"))
    except OSError:
        return configured


def _check_sqlite_opened(folder: Folder) -> None:
    """After SQLite opened the database by path: the process must now hold open the very
    database and WAL files of the open state folder (a folder swapped for a link between the
    store's checks and SQLite's open would have had it open others). Raises ``PermissionError``
    otherwise. Without /proc: not checked."""
    if not os.path.isdir("/proc/self/fd"):
        return
    opened: set[tuple[int, int]] = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            info = os.stat(f"/proc/self/fd/{name}")
            opened.add((info.st_dev, info.st_ino))
    for name in (DATABASE, f"{DATABASE}-wal"):
        mine = folder.lstat(name)
        if mine is None or (mine.st_dev, mine.st_ino) not in opened:
            raise PermissionError(f"SQLite did not open the state folder's {name}: not used")


def _revision_ok(repo: object, revision: object, commit_only: bool = False) -> bool:
    """Whether a stored (repo, revision) is one a request could have named (a commit id when
    ``commit_only``)."""
    if not isinstance(repo, str) or not isinstance(revision, str):
        return False
    try:
        Model(hf_repo=repo, hf_commit=revision)
    except ValidationError:
        return False
    return not commit_only or COMMIT_PATTERN.fullmatch(revision) is not None


def _warn_dropped(table: str, count: int) -> None:
    if count:
        logfmt.log(
            logger,
            logging.WARNING,
            "state_row_dropped",
            table=table,
            count=count,
            reason="not a repo and revision this service writes",
        )


def _task_id_ok(task_id: object) -> bool:
    """Whether ``task_id`` is one the service writes: ``<repo>:<revision or latest>`` with a repo
    id and a revision the API accepts."""
    if not isinstance(task_id, str) or len(task_id) > 400 or ":" not in task_id:
        return False
    repo, _, revision = task_id.rpartition(":")
    try:
        model = Model.model_validate(
            {"hf_repo": repo, "hf_commit": None if revision == "latest" else revision}
        )
    except ValidationError:
        return False
    return model.task_id == task_id


def _message_ok(message: object) -> bool:
    return (
        isinstance(message, str)
        and 0 < len(message) <= MAX_ERROR_LENGTH
        and not any(unicodedata.category(c) == "Cc" for c in message)
    )
