"""The threads the manager's parts run blocking work on, each pool for one kind of work, so that
none waits behind another: cache reads (status, delete), walks of the whole cache (list, prune,
the budget, updates), adding up its size (space, the budget's usage), hashing (verify), and the
job store's writes (one thread: in the order submitted). All but cache reads and the store's
writes run below the event loop's CPU priority.

``Keeper`` is the job store's writer: what outlives the service (downloads to resume, the last
errors) is written on the state thread, after every write submitted before it; a write that fails
is logged, never raised (the download goes on, unkept), and nothing is written while the store is
not open (its folder could not be used)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from api import logfmt
from api.models.store import JobStore

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

CACHE_THREADS = 4  # threads reading the cache for status and delete (tuning)
# Threads for what walks the whole cache (list, prune, the budget's usage, updates): at 10,000
# models a walk takes seconds; on a pool of their own, a status never waits behind one.
# One: a second thread of Python work holding the GIL delays the event loop (status) further.
WALK_THREADS = 1
# Walks (and the list's serialization) run below the event loop's CPU priority: on a busy machine
# the kernel runs the loop's thread first when both are ready, so that a status is not queued
# behind ten thousand list entries (bench/scale.py: status p99 with six lists at once).
WALK_NICE = 10


class Threads:
    def __init__(self, hashing: int, nice: int) -> None:
        self._cache = ThreadPoolExecutor(max_workers=CACHE_THREADS, thread_name_prefix="cache")
        self._walk = background_pool(WALK_THREADS, "walk", WALK_NICE)
        # Adding up the whole cache (GET /space, the budget): most of a second at 10,000 models,
        # of system calls; a thread of its own, so that a list never waits behind it.
        self._usage = background_pool(1, "usage", WALK_NICE)
        self._hash = background_pool(hashing, "hash", nice)

    async def cache(self, function: Callable[..., _T], *args: Any) -> _T:
        """``function(*args)`` on a cache thread."""
        return await asyncio.get_running_loop().run_in_executor(self._cache, function, *args)

    async def walk(self, function: Callable[..., _T], *args: Any) -> _T:
        """``function(*args)`` on a thread for walks of the whole cache."""
        return await asyncio.get_running_loop().run_in_executor(self._walk, function, *args)

    async def usage(self, function: Callable[..., _T], *args: Any) -> _T:
        """``function(*args)`` on the thread that adds up the cache's size."""
        return await asyncio.get_running_loop().run_in_executor(self._usage, function, *args)

    async def hash(self, function: Callable[..., _T], *args: Any) -> _T:
        """``function(*args)`` on a hashing thread (background priority)."""
        return await asyncio.get_running_loop().run_in_executor(self._hash, function, *args)

    def shutdown(self) -> None:
        self._cache.shutdown(wait=False, cancel_futures=True)
        self._walk.shutdown(wait=False, cancel_futures=True)
        self._usage.shutdown(wait=False, cancel_futures=True)
        self._hash.shutdown(wait=False, cancel_futures=True)


class Keeper:
    """The job store, written on a thread of its own (above)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.open = False  # set once the store opened (``run(store.open)`` succeeded)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state")

    async def run(self, function: Callable[..., _T], *args: Any) -> _T:
        """``function(*args)`` on the state thread, its result or its error."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    def keep(self, function: Callable[..., None], *args: Any) -> asyncio.Future[None]:
        """A write, after every write submitted before it; its failure is logged."""
        loop = asyncio.get_running_loop()
        if not self.open:
            done: asyncio.Future[None] = loop.create_future()
            done.set_result(None)
            return done
        future = loop.run_in_executor(self._thread, function, *args)
        future.add_done_callback(_log_failure)
        return future

    async def close(self) -> None:
        """Close the store after every write submitted before (the claims are released last)."""
        await self.run(self.store.close)
        self._thread.shutdown(wait=False, cancel_futures=True)


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and (error := future.exception()) is not None:
        logfmt.log(
            logger,
            logging.WARNING,
            "state_write_failed",
            reason=error,
            resumed_after_restart="maybe not",
        )


def background_pool(workers: int, name: str, nice: int) -> ThreadPoolExecutor:
    """Threads for background work, each at CPU niceness ``nice``: on a busy machine the kernel
    runs the event loop's thread first when both are ready."""
    return ThreadPoolExecutor(
        max_workers=workers,
        thread_name_prefix=name,
        initializer=_lower_thread_priority,
        initargs=(nice,),
    )


def _lower_thread_priority(nice: int) -> None:
    """On Linux a thread has a niceness of its own."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def same_objects(a: Sequence[object], b: Sequence[object]) -> bool:
    """Whether ``a`` and ``b`` hold the very same objects in the same order (a loop in C: 10,000
    in about a tenth of a millisecond)."""
    return len(a) == len(b) and all(map(operator.is_, a, b))
