"""The zygote download workers are forked from, on its own: a worker it forks gets its own
environment and pipes, a request cancelled mid-fork leaves no worker behind, and a worker's end is
known on the loop that asked for it."""

from __future__ import annotations

import asyncio
import gc
import os
import warnings
from collections.abc import AsyncIterator

import pytest

from api.models.hub import protocol
from api.models.hub.zygote import Zygote
from tests.helpers import children_of


@pytest.fixture
async def zygote() -> AsyncIterator[Zygote]:
    z = Zygote(dict(os.environ))
    await z.start()
    yield z
    await z.aclose()


async def no_children(pid: int, seconds: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while children_of(pid):
        assert loop.time() < deadline, f"children left: {children_of(pid)}"
        await asyncio.sleep(0.02)


async def test_a_forked_worker_speaks_the_protocol_and_its_end_is_known(zygote: Zygote) -> None:
    worker = await zygote.spawn({**os.environ, "MODELS_WORKER_NICE": "0"})
    assert zygote.pid is not None
    assert worker.pid in children_of(zygote.pid)
    worker.stdin.write(b"not a job\n")  # a worker that gets a bad job says so and exits 2
    await worker.stdin.drain()
    failed = protocol.parse(await worker.stdout.readline())
    assert isinstance(failed, protocol.Failed)
    assert failed.message == "bad worker input"
    assert await asyncio.wait_for(worker.wait(), 10) == 2
    assert worker.returncode == 2
    worker.stdin.close()


async def test_a_request_cancelled_while_forking_leaves_no_worker(zygote: Zygote) -> None:
    first = zygote.pid
    assert first is not None
    for _ in range(5):
        request = asyncio.create_task(zygote.spawn(dict(os.environ)))
        await asyncio.sleep(0)  # the fork is under way in its thread
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        # Gone when the cancelled request returns, not some time later: a caller that checks
        # right away (a service stopping) finds nothing left.
        assert children_of(first) == []
    # The pipes the fork was given stayed open until it was done with them: the zygote was never
    # sent a closed descriptor (it would have been stopped), and it forks as before.
    assert zygote.pid == first
    worker = await zygote.spawn(dict(os.environ))
    worker.kill()
    await worker.wait()
    worker.stdin.close()


async def test_a_killed_worker_ends_with_its_signal(zygote: Zygote) -> None:
    worker = await zygote.spawn(dict(os.environ))
    worker.kill()
    assert await asyncio.wait_for(worker.wait(), 10) == -9
    worker.kill()  # already ended: nothing to do, no error
    worker.stdin.close()


async def test_workers_die_with_their_zygote(zygote: Zygote) -> None:
    workers = [await zygote.spawn(dict(os.environ)) for _ in range(2)]
    pid = zygote.pid
    assert pid is not None
    await zygote.aclose()
    for worker in workers:
        assert await asyncio.wait_for(worker.wait(), 10) == -9
        worker.stdin.close()
    await no_children(pid)
    # The next request starts another zygote.
    worker = await zygote.spawn(dict(os.environ))
    assert zygote.pid not in (None, pid)
    worker.kill()
    await worker.wait()


async def test_a_request_cancelled_at_any_moment_of_a_spawn_leaves_no_worker(
    zygote: Zygote,
) -> None:
    """Cancelled at a sweep of moments, from during the fork to the connection of its pipes
    after it (each an await, each a moment a cancel can land): no worker is left behind. Before,
    a cancel during the pipes' connection left a forked worker waiting for ever for its job (a
    later test found it, a download's cancel at its start left it)."""
    first = zygote.pid
    assert first is not None
    returned = 0
    loop = asyncio.get_running_loop()
    for step in range(200):
        request = asyncio.create_task(zygote.spawn(dict(os.environ)))
        # A moment of the spawn, 0.2 ms later at each step, at the loop's finest grain (a sleep
        # of that length would wait a whole scheduler tick and land past the window).
        started = loop.time()
        for _ in range(1_000_000):
            if loop.time() - started >= step * 0.0002:
                break
            await asyncio.sleep(0)
        request.cancel()
        try:
            worker = await request
        except asyncio.CancelledError:
            # Gone when the cancelled request ends, not a moment later (a test that counted the
            # workers as its download's cancel returned found one still there).
            assert children_of(first) == [], step
            continue
        returned += 1  # done before the cancel: the caller owns it, and ends it
        worker.kill()
        await worker.wait()
        worker.stdin.close()
    await no_children(first)
    assert returned < 200  # some of the cancels landed during the spawn
    # Nor a pipe left open: a transport of a cancelled spawn, unclosed, warns when collected.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []
