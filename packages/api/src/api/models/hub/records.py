"""What the service records of a revision in the cache, beside the library's files (adapter):
the journal of revisions not yet verified, and the selections a revision was downloaded with.

Both live in the library's ``.locks/<model folder>/`` (``<commit>.unverified``,
``<commit>.selection.json``): they belong to the cache (processes sharing it must agree), the
library never deletes there, and ``scan_cache_dir`` (so ``hf cache``) skips the folder. They are
in the cache, which others write too: what is read back is checked and bounded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

from api import logfmt
from api.models.anchored import Folder, LinkInTheWay
from api.models.backend import FileSelection
from api.models.hub.guard import path_problem

logger = logging.getLogger(__name__)

SELECTION_FORMAT_VERSION = 1
MAX_RECORDED_SELECTIONS = 32
MAX_RECORD_BYTES = 1024 * 1024  # a journal names at most 1000 files; a selection 32 x 64 patterns
UNREADABLE_JOURNAL: tuple[str, list[str]] = (
    "the revision's verification journal is unreadable",
    [],
)

# The model's folder under ``.locks`` (``ModelCache.locks_of``): (repo id, create) -> the open
# folder, or None when it does not exist.
LocksOf = Callable[[str, bool], AbstractContextManager[Folder | None]]


def unverified_name(commit: str) -> str:
    return f"{commit}.unverified"


def selection_name(commit: str) -> str:
    return f"{commit}.selection.json"


def selection_lock_name(commit: str) -> str:
    return f"{commit}.selection.lock"


class RevisionRecords:
    """The records of one cache, each read and written in the model's folder under ``.locks``
    through its descriptor (``api.models.anchored``): a link planted there is never followed."""

    def __init__(self, locks_of: LocksOf) -> None:
        self.locks_of = locks_of

    # -- the journal of unverified revisions ---------------------------------------------

    def mark_unverified(self, repo_id: str, commit: str, reason: str, files: list[str]) -> None:
        """Record, durably, that the revision's content is not known good: written before a
        download's first byte and kept until every file is verified (a stop at any moment leaves
        it), or by a verification that found bad files (``files``, fetched again first)."""
        body = json.dumps({"reason": reason, "files": files}).encode()
        with self.locks_of(repo_id, True) as locks:
            assert locks is not None  # made when absent
            locks.write_atomic(unverified_name(commit), body, mode=0o664)

    def clear_unverified(self, repo_id: str, commit: str) -> None:
        with self.locks_of(repo_id, False) as locks:
            if locks is not None:
                locks.unlink(unverified_name(commit))

    def read_unverified(self, repo_id: str, commit: str) -> tuple[str, list[str]] | None:
        """(reason, files known bad) when the revision is marked unverified, else None."""
        try:
            with self.locks_of(repo_id, False) as locks:
                return self.unverified_in(locks, repo_id, commit)
        except OSError as error:  # a link in place of the model's folder: never followed
            logfmt.log(
                logger,
                logging.WARNING,
                "journal_unreadable",
                repo=repo_id,
                commit=commit,
                reason=error,
            )
            return UNREADABLE_JOURNAL

    def unverified_in(
        self, locks: Folder | None, repo_id: str, commit: str
    ) -> tuple[str, list[str]] | None:
        """``read_unverified`` from the model's locks folder, already open."""
        try:
            raw = locks.read(unverified_name(commit), MAX_RECORD_BYTES) if locks else None
            if raw is None:
                return None
            data = json.loads(raw.decode("utf-8"))
        except (OSError, ValueError) as error:
            # A link in its place (never followed), a huge or broken file: not known good.
            logfmt.log(
                logger,
                logging.WARNING,
                "journal_unreadable",
                repo=repo_id,
                commit=commit,
                reason=error,
            )
            return UNREADABLE_JOURNAL
        if not isinstance(data, dict):
            return UNREADABLE_JOURNAL
        files = [f for f in data.get("files") or [] if isinstance(f, str) and not path_problem(f)]
        # The file is in the cache, which others can write: its text reaches status answers, so
        # it is bounded.
        return str(data.get("reason") or "the revision is not verified")[:300], files[:1000]

    # -- the selections a revision was downloaded with --------------------------------------

    def read_selections(self, repo_id: str, commit: str) -> tuple[FileSelection, ...]:
        """The selections the revision's downloads recorded (none when none did)."""
        try:
            with self.locks_of(repo_id, False) as locks:
                return self.selections_in(locks, commit)
        except LinkInTheWay as error:
            logfmt.log(
                logger,
                logging.WARNING,
                "selection_record_ignored",
                repo=repo_id,
                commit=commit,
                reason=error,
            )
            return ()

    def selections_in(self, locks: Folder | None, commit: str) -> tuple[FileSelection, ...]:
        """``read_selections`` from the model's locks folder, already open."""
        try:
            raw = locks.read(selection_name(commit), MAX_RECORD_BYTES) if locks else None
            if raw is None:
                return ()
            data = json.loads(raw.decode("utf-8"))
            if data.get("format_version") != SELECTION_FORMAT_VERSION:
                raise ValueError("unknown format")
            found = tuple(FileSelection.from_json(s) for s in data["selections"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            # The cache is written by others too: a record that does not parse counts as none
            # (the default applies), never as a selection of our guessing.
            logfmt.log(
                logger, logging.WARNING, "selection_record_ignored", commit=commit, reason=error
            )
            return ()
        return found[:MAX_RECORDED_SELECTIONS]

    def record_selection(self, repo_id: str, commit: str, selection: FileSelection) -> None:
        """Add ``selection`` to the revision's record (written after its files are verified):
        the revision is then kept as the union of what its downloads asked for."""
        with self.locks_of(repo_id, True) as locks:
            assert locks is not None  # made when absent
            # Read, add, replace, under a lock: two processes sharing the cache may finish
            # downloads of one revision at once, and neither selection may be lost.
            with locks.flock(selection_lock_name(commit)):
                recorded = self.selections_in(locks, commit)
                if selection.is_everything:
                    merged: tuple[FileSelection, ...] = (selection,)  # covers the others
                elif selection in recorded or any(s.is_everything for s in recorded):
                    return
                else:
                    merged = (*recorded, selection)[-MAX_RECORDED_SELECTIONS:]
                body = {
                    "format_version": SELECTION_FORMAT_VERSION,
                    "selections": [s.to_json() for s in merged],
                }
                locks.write_atomic(selection_name(commit), json.dumps(body).encode(), mode=0o664)


def journal_note(reason: str, files: list[str]) -> str:
    """The status's words for a revision the journal holds as not verified."""
    named = f": {name_some(files)}" if files else ""
    return f"{reason}{named}; POST /api/models/download verifies it and fetches what is bad"


def name_some(paths: list[str], shown: int = 5) -> str:
    """The first paths, and how many more: for a status's words."""
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(paths[:shown]) + more
