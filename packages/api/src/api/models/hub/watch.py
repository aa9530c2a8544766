"""``Watch``: the kernel's word (Linux inotify) that something changed in a folder, so that the
index (``index.py``) need not look at 10,000 model folders to learn that none changed.

A watch is on a folder (never through a link: ``IN_DONT_FOLLOW``), and reports the entries of that
folder created, removed, renamed, closed after a write, or whose metadata changed, and the folder's
own removal. It does not report writes that are not followed by a close (``IN_MODIFY`` is left out
on purpose: a download writes its blobs millions of times, and the folder's entries tell the
index enough). The events wait in the kernel's queue until ``changed()`` reads them; a queue that
overflowed (``IN_Q_OVERFLOW``) says so, and the caller then trusts nothing it kept.

Inotify sees only what is done through this machine's kernel: a cache on NFS, SMB or a FUSE file
system changed from another machine is not reported, so ``Watch.open`` refuses such a file system
(the index then compares the folders' times at each call instead).

huggingface_hub has no watch, and the packages that wrap inotify (``inotify_simple``, watchdog)
are either untyped or a thread and a framework around these same three system calls."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
import sys
import threading
import weakref
from pathlib import Path

IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

CHANGES = (
    IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then the name, len bytes)

# File systems whose every change goes through this kernel (a local disk, memory, an overlay of
# them). Anything else (nfs, cifs, fuse.*, ceph, 9p, ...) may change behind inotify's back.
LOCAL_FILE_SYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "zfs", "overlay", "jfs", "reiserfs"}
)


def file_system_of(path: Path) -> str | None:
    """The type of the file system ``path`` is on (``/proc/self/mountinfo``), or None."""
    try:
        target = os.path.realpath(path)
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    for line in lines:
        fields = line.split()
        if "-" not in fields:
            continue
        mount = fields[4].replace("\\040", " ")
        fstype = fields[fields.index("-") + 1]
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fstype
    return kind


class Watch:
    """One inotify instance: folders watched, each for an owner (a model folder's name)."""

    def __init__(self, fd: int, libc: ctypes.CDLL) -> None:
        self._fd = fd
        self._libc = libc
        self._closed = weakref.finalize(self, os.close, fd)
        self._lock = threading.Lock()
        self._owners: dict[int, str] = {}  # watch descriptor -> owner
        self._of: dict[str, set[int]] = {}  # owner -> its watch descriptors
        self._by_name: set[int] = set()  # folders whose events name their owner

    @classmethod
    def open(cls, root: Path) -> Watch | None:
        """A watch for the cache at ``root``, or None where inotify cannot be trusted there."""
        if not sys.platform.startswith("linux") or file_system_of(root) not in LOCAL_FILE_SYSTEMS:
            return None
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name or "libc.so.6", use_errno=True)
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        except (OSError, AttributeError):
            return None
        return cls(fd, libc) if fd >= 0 else None

    def add(self, owner: str, folder: str) -> bool:
        """Watch ``folder`` for ``owner``: True when it is watched, or does not exist (or is not
        a folder: the owner's parent folder is watched and shows it appear); False when the
        kernel refused (out of watches, no access): the owner cannot rely on events."""
        wd = self._add(folder)
        if wd < 0:
            return -wd in (errno.ENOENT, errno.ENOTDIR)
        with self._lock:
            previous = self._owners.get(wd)
            if previous is not None and previous != owner:
                self._of.get(previous, set()).discard(wd)
            self._owners[wd] = owner
            self._of.setdefault(owner, set()).add(wd)
        return True

    def add_by_name(self, folder: str) -> bool | None:
        """Watch ``folder`` for the owners its entries are named after (``.locks/``, whose folders
        are each a model's): True when this starts the watch (what happened in it before is
        unknown), False when it was watched already, None when it cannot be (absent, refused)."""
        wd = self._add(folder)
        if wd < 0:
            return None
        with self._lock:
            if wd in self._by_name:
                return False
            self._by_name.add(wd)
            return True

    def _add(self, folder: str) -> int:
        """The watch descriptor of ``folder`` (the same one again for a folder watched), or
        minus the error number."""
        wd: int = self._libc.inotify_add_watch(
            self._fd, os.fsencode(folder), CHANGES | IN_ONLYDIR | IN_DONT_FOLLOW
        )
        return wd if wd >= 0 else -ctypes.get_errno()

    def forget(self, owner: str) -> None:
        """Stop watching the folders of ``owner``."""
        with self._lock:
            wds = self._of.pop(owner, set())
            for wd in wds:
                self._owners.pop(wd, None)
        for wd in wds:
            self._libc.inotify_rm_watch(self._fd, wd)  # gone already: EINVAL, nothing to do

    def changed(self) -> set[str] | None:
        """The owners of the folders that changed since the last call; None when the kernel's
        queue overflowed, or a folder watched by name went (anything may have changed)."""
        owners: set[str] = set()
        overflow = False
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                break
            offset = 0
            with self._lock:
                while offset + _EVENT.size <= len(data):
                    wd, mask, _, size = _EVENT.unpack_from(data, offset)
                    name = data[offset + _EVENT.size : offset + _EVENT.size + size]
                    offset += _EVENT.size + size
                    if mask & IN_Q_OVERFLOW:
                        overflow = True
                        continue
                    if wd in self._by_name:
                        if not name.rstrip(b"\0") or mask & IN_IGNORED:
                            overflow = True  # the folder itself changed: it said nothing else
                            self._by_name.discard(wd)
                        else:
                            owners.add(os.fsdecode(name.rstrip(b"\0")))
                        continue
                    owner = self._owners.get(wd)
                    if owner is None:
                        continue
                    owners.add(owner)
                    if mask & IN_IGNORED:  # the folder is gone, and its watch with it
                        del self._owners[wd]
                        self._of.get(owner, set()).discard(wd)
        return None if overflow else owners

    def watching(self) -> int:
        """Folders watched."""
        with self._lock:
            return len(self._owners)

    def close(self) -> None:
        self._closed()
