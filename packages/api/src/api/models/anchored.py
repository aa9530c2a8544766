"""Anchored file operations: the one module that writes, renames and removes in the cache and in
the service's state folder.

Another user who can write a shared cache can replace any folder of it with a link while the
service works. A path checked and then used may name another file by the time it is used; a path
used at all follows every link among its folders. So nothing here acts through a path: a folder
is opened once (``Folder.anchor``, the configured root) and everything below it is reached from
an open descriptor, one name at a time, each folder opened ``O_DIRECTORY | O_NOFOLLOW``; files
are opened ``O_NOFOLLOW`` (created ``O_EXCL`` where they are new), and removed, renamed and linked
with ``dir_fd=``. A link where a folder or a file is expected is never followed: the operation
raises ``LinkInTheWay`` naming it (the callers answer 409 with that name), or, when removing,
removes the link itself. This is how CPython's ``shutil.rmtree`` walks where
``shutil.rmtree.avoids_symlink_attacks`` is true (``_rmtree_safe_fd``), with the service's policy
for what it meets on the way.

A lint test (``tests/unit/test_anchored.py``) fails when code of the service outside this module
calls ``unlink``, ``rmtree``, ``rename``, ``replace``, ``mkdir``, ``link`` or opens a file for
writing: every such operation comes through here.

Names passed to these methods are single path components (no ``/``, not ``.`` or ``..``);
``Folder.walk`` takes several. The root's own path, and its parents, are the operator's
configuration: followed when the root is opened, never afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# How often a removal starts over on an entry that keeps changing kind under it (a folder swapped
# for a link and back) before it gives up and says so.
_ATTEMPTS = 20


class LinkInTheWay(OSError):
    """A link (or another kind of file) stands where a folder or a regular file is expected.
    ``where`` is its path, for a message: the operation did not go through it."""

    def __init__(self, where: str, found: str = "a link") -> None:
        super().__init__(errno.ELOOP, f"{where} is {found}, not followed")
        self.where = where
        self.found = found


class KeepsChanging(OSError):
    """An entry changed kind under a removal every time it was tried (someone is racing it)."""

    def __init__(self, where: str) -> None:
        super().__init__(errno.EAGAIN, f"{where} kept changing while it was being removed")
        self.where = where


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"not a single path component: {name!r}")


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a file"
    return "a special file"


class Folder:
    """An open folder: every operation acts relative to its descriptor. ``where`` is its path as
    reached (for messages only; nothing acts through it). Close it, or use it as a context."""

    def __init__(self, fd: int, where: str) -> None:
        self.fd = fd
        self.where = where

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def anchor(cls, path: Path | str, *, create: bool = False, mode: int = 0o777) -> Folder | None:
        """The root of a tree: the configured folder (links in its path are the operator's and
        are followed). None when it does not exist, unless ``create``. Entries below it are
        named relative to it in messages (``where``): no local path reaches a client."""
        if create:
            os.makedirs(path, mode=mode, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        return cls(fd, "")

    def _child_where(self, name: str) -> str:
        return f"{self.where}/{name}" if self.where else name

    def sub(
        self, name: str, *, create: bool = False, mend: bool = False, mode: int = 0o777
    ) -> Folder | None:
        """The child folder ``name``, never through a link: None when there is none (unless
        ``create``, which makes it); ``LinkInTheWay`` when the name is a link or a file, unless
        ``mend``: then that link or file is removed (never followed) and a folder made in its
        place, for the cache's own bookkeeping folders, where nothing but folders belongs."""
        _check_name(name)
        for _ in range(_ATTEMPTS):
            try:
                return Folder(os.open(name, _DIRECTORY, dir_fd=self.fd), self._child_where(name))
            except FileNotFoundError:
                if not create:
                    return None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, mode, dir_fd=self.fd)
            except OSError as error:
                if error.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                if not mend:
                    raise LinkInTheWay(self._child_where(name), self._found(name)) from None
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(name, dir_fd=self.fd)
        raise KeepsChanging(self._child_where(name))

    def walk(
        self, *names: str, create: bool = False, mend: bool = False, mode: int = 0o777
    ) -> Folder | None:
        """The folder ``names`` below this one (each opened as ``sub``); None when one is absent
        (unless ``create``). The folders on the way are closed again."""
        current: Folder = self
        for name in names:
            nxt = current.sub(name, create=create, mend=mend, mode=mode)
            if current is not self:
                current.close()
            if nxt is None:
                return None
            current = nxt
        return current if current is not self else self.dup()

    def dup(self) -> Folder:
        """The same folder under a descriptor of its own (to close independently)."""
        return Folder(os.dup(self.fd), self.where)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Folder:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------------

    def names(self) -> list[os.DirEntry[str]]:
        """The entries of the folder (none when it was removed meanwhile)."""
        try:
            with os.scandir(self.fd) as scan:
                return list(scan)
        except FileNotFoundError:
            return []

    def lstat(self, name: str) -> os.stat_result | None:
        _check_name(name)
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def readlink(self, name: str) -> str | None:
        """What the link ``name`` says (None when it is no link, or gone)."""
        _check_name(name)
        try:
            return os.readlink(name, dir_fd=self.fd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            if error.errno == errno.EINVAL:
                return None  # not a link
            raise

    def _found(self, name: str) -> str:
        info = self.lstat(name)
        return _kind(info.st_mode) if info is not None else "gone"

    def open(self, name: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
        """A descriptor of the file ``name``, never through a link (``LinkInTheWay``); with
        ``O_CREAT`` the file is made when absent. The caller closes it."""
        _check_name(name)
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.fd)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise LinkInTheWay(self._child_where(name)) from None
            raise
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise LinkInTheWay(self._child_where(name), _kind(info.st_mode))
        return fd

    def read(self, name: str, limit: int) -> bytes | None:
        """The content of the regular file ``name``, at most ``limit`` bytes (``ValueError``
        beyond), or None when it does not exist. A link or a folder raises ``LinkInTheWay``."""
        try:
            fd = self.open(name)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            data = bytearray()
            # What fstat says is there, and one byte more (a file that grew meanwhile is still
            # bounded): one read for a file that holds still. Never a read of ``limit`` bytes at
            # once: each allocates a buffer of that size (256 MiB for a file list).
            step = min(limit + 1, os.fstat(fd).st_size + 1)
            while chunk := os.read(fd, step):
                data += chunk
                if len(data) > limit:
                    raise ValueError(f"{self._child_where(name)} is larger than {limit} bytes")
                if len(chunk) < step:
                    break  # a short read: the end of the file
                step = min(limit + 1 - len(data), 1024 * 1024)
            return bytes(data)
        finally:
            os.close(fd)

    # -- writing -----------------------------------------------------------------------------

    def write_atomic(
        self, name: str, data: bytes, *, mode: int = 0o644, durable: bool = True
    ) -> None:
        """``data`` as the file ``name``, whole or not at all: written to a new file of a random
        name (``O_EXCL``), flushed to disk when ``durable``, then renamed over ``name`` (a rename
        replaces a link of that name itself, never what it points to)."""
        _check_name(name)
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        fd = self.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.unlink(tmp)
            raise
        os.close(fd)
        try:
            os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            self.unlink(tmp)
            raise
        if durable:
            with contextlib.suppress(OSError):
                os.fsync(self.fd)

    def create(self, name: str, mode: int = 0o644, flags: int = os.O_RDWR) -> int:
        """A new, empty file ``name`` (``O_EXCL``: ``FileExistsError`` when anything has that name)."""
        return self.open(name, flags | os.O_CREAT | os.O_EXCL, mode)

    def rename(self, name: str, new: str) -> None:
        """Rename the entry ``name`` (whatever it is: a link is renamed, never followed) to
        ``new`` in this folder, replacing what has that name."""
        _check_name(name)
        _check_name(new)
        os.rename(name, new, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def move_to(self, name: str, other: Folder, new: str) -> None:
        """Rename the entry ``name`` of this folder to ``new`` in ``other`` (one atomic step on
        one filesystem; a link is moved, never followed); ``FileExistsError`` when ``new`` is
        there (a non-empty folder; the caller picks a fresh name)."""
        _check_name(name)
        _check_name(new)
        os.rename(name, new, src_dir_fd=self.fd, dst_dir_fd=other.fd)

    def link(self, name: str, new: str) -> None:
        """A second name ``new`` for the file ``name`` (the entry itself: never a link's target)."""
        _check_name(name)
        _check_name(new)
        os.link(name, new, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)

    def chmod(self, mode: int) -> None:
        os.fchmod(self.fd, mode)

    # -- removing ----------------------------------------------------------------------------

    def unlink(self, name: str) -> bool:
        """Remove the file or link ``name`` (a link itself, never its target); False when there
        was none. A folder of that name is left (``IsADirectoryError``)."""
        _check_name(name)
        try:
            os.unlink(name, dir_fd=self.fd)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def remove_empty(self, name: str) -> bool:
        """Remove the folder ``name`` only while it is empty (never a link, never what was
        added to it meanwhile); whether it was removed."""
        _check_name(name)
        try:
            os.rmdir(name, dir_fd=self.fd)
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                return False
            raise
        return True

    def remove(self, name: str) -> int:
        """Remove the entry ``name`` whatever it is, and return the bytes of the regular files
        removed with it: a file or a link is unlinked (a link never followed); a folder is
        emptied through descriptors, then removed. An entry that changes kind meanwhile is
        looked at again; one that never stops changing raises ``KeepsChanging``."""
        _check_name(name)
        for _ in range(_ATTEMPTS):
            info = self.lstat(name)
            if info is None:
                return 0
            if not stat.S_ISDIR(info.st_mode):
                try:
                    os.unlink(name, dir_fd=self.fd)
                except FileNotFoundError:
                    return 0
                except IsADirectoryError:
                    continue  # a folder now: look again
                return info.st_size if stat.S_ISREG(info.st_mode) else 0
            try:
                inner = self.sub(name)
            except LinkInTheWay:
                continue  # a link (or file) now: look again, and unlink it
            if inner is None:
                return 0
            with inner:
                if not os.path.samestat(info, os.fstat(inner.fd)):
                    continue  # another folder than the one looked at: look again
                freed = inner.clear()
            try:
                os.rmdir(name, dir_fd=self.fd)
            except FileNotFoundError:
                return freed
            except OSError as error:
                if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    continue  # something was added, or it was swapped: again
                raise
            return freed
        raise KeepsChanging(self._child_where(name))

    def clear(self) -> int:
        """Remove everything in this folder; the bytes of the regular files removed. A file or
        a link, as the listing says it is, is unlinked at once (a link needs no ``lstat``: it
        frees nothing); a folder, or an entry that changed kind since the listing, goes
        through ``remove``."""
        freed = 0
        for entry in self.names():
            try:
                kind_known = not entry.is_dir(follow_symlinks=False)
                size = (
                    entry.stat(follow_symlinks=False).st_size
                    if entry.is_file(follow_symlinks=False)
                    else 0
                )
            except FileNotFoundError:
                continue
            except OSError:
                kind_known = False
            if kind_known:
                try:
                    os.unlink(entry.name, dir_fd=self.fd)
                except FileNotFoundError:
                    continue
                except IsADirectoryError:
                    pass  # a folder now: looked at again below
                else:
                    freed += size
                    continue
            freed += self.remove(entry.name)
        return freed

    # -- locks -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def flock(
        self, name: str, *, exclusive: bool = True, create: bool = True, wait: bool = True
    ) -> Iterator[bool]:
        """Hold the ``flock`` of the file ``name`` (the library's lock files are flocks too, so
        the two agree); yields whether it is held (False only without ``wait``, when another
        process holds it). Without ``create`` an absent file yields True: nobody ever locked it.
        The file is opened read-only when not created, so that a read-only cache works."""
        flags = os.O_RDWR | os.O_CREAT if create else os.O_RDONLY
        try:
            fd = self.open(name, flags, 0o664)
        except (FileNotFoundError, NotADirectoryError):
            yield True
            return
        try:
            operation = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            try:
                fcntl.flock(fd, operation if wait else operation | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # releases the lock

    def lock_free(self, name: str) -> bool:
        """Whether nobody holds the flock of the file ``name`` now (taken and let go at once; no
        such file: nobody ever locked it). Opened read-only: a read-only cache works. A link in
        its place raises ``LinkInTheWay`` (never opened)."""
        with self.flock(name, create=False, wait=False) as free:
            return free


def held(folder: Folder | None) -> AbstractContextManager[Folder | None]:
    """``with held(folder.sub(name)) as inner``: closes ``inner`` after, when there is one."""
    return folder if folder is not None else contextlib.nullcontext(None)


def walk_files(folder: Folder, prefix: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of every file and link below ``folder``, through descriptors:
    folders are entered only as folders (a link is listed, never entered)."""
    for entry in folder.names():
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        rel = f"{prefix}{entry.name}"
        if stat.S_ISDIR(info.st_mode):
            try:
                inner = folder.sub(entry.name)
            except LinkInTheWay:
                continue  # swapped for a link meanwhile: not entered
            if inner is not None:
                with inner:
                    yield from walk_files(inner, f"{rel}/")
        else:
            yield rel, info


def resolve_link(
    at: tuple[str, ...], target: str, root: str | None = None
) -> tuple[str, ...] | None:
    """Where a link found in the folder ``at`` (names below a root) points, as names below that
    root, by its text alone (as the library's own ``_shared_blob_target`` reads links); None
    when it leads out of the root. An absolute target counts only when it lies under ``root``
    (the root's own path, as configured)."""
    if target.startswith("/"):
        if root is None:
            return None
        base = os.path.normpath(root)
        normal = os.path.normpath(target)
        if not normal.startswith(base + "/"):
            return None
        parts = tuple(normal[len(base) + 1 :].split("/"))
    else:
        joined = os.path.normpath("/".join((*at, target)) if at else target)
        if joined.startswith("/") or joined == ".." or joined.startswith("../"):
            return None
        parts = tuple(joined.split("/"))
    return None if any(p in ("", ".", "..") for p in parts) else parts
