"""What the vLLM servers of this machine serve: their ``GET /v1/models``, asked over HTTP.

vLLM answers ``{"object": "list", "data": [{"id", "root", ...}]}``
(``vllm/entrypoints/openai/serving_models.py``, ``show_available_models``): ``id`` is the served
model name, ``root`` the ``--model`` it was started with (a repo id, or a local path, which may be
a snapshot folder of this cache); a LoRA adapter's card has its own path as ``root``. The manager
maps these to cached revisions (``ModelManager``), and refuses to delete what they serve.

Every answer is untrusted: its size, its shape and its strings are bounded, and a server that
answers something else counts as one that cannot be asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass

import httpx

from api.settings import display_url

logger = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 1024 * 1024
MAX_CARDS = 1000
MAX_STRING = 4096


@dataclass(frozen=True)
class ServedModel:
    """One model card of a vLLM server."""

    server: str  # the server's base URL, without credentials
    model_id: str  # the served model name (``data[].id``)
    root: str  # what it was started with (``data[].root``, else the id)


@dataclass(frozen=True)
class ServedNow:
    """What every configured server serves, and the servers that could not be asked (with why)."""

    served: tuple[ServedModel, ...] = ()
    unreachable: tuple[tuple[str, str], ...] = ()
    time: float = 0.0


def base_url(url: str) -> str:
    """A server's base URL as configured, ``/v1`` (and a trailing ``/``) taken off: both
    ``http://host:8000`` and ``http://host:8000/v1/`` name the same server."""
    url = url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def parse_models(server: str, answer: object) -> tuple[ServedModel, ...]:
    """The cards of a ``/v1/models`` answer; raises ValueError for anything that is not one."""
    if not isinstance(answer, dict) or not isinstance(answer.get("data"), list):
        raise ValueError("the answer has no 'data' list")
    cards = answer["data"]
    if len(cards) > MAX_CARDS:
        raise ValueError(f"the answer lists more than {MAX_CARDS} models")
    served = []
    for card in cards:
        if not isinstance(card, dict):
            raise ValueError("a model card is not an object")
        model_id, root = card.get("id"), card.get("root")
        if not isinstance(model_id, str) or not model_id or len(model_id) > MAX_STRING:
            raise ValueError("a model card has no usable 'id'")
        if root is not None and (not isinstance(root, str) or len(root) > MAX_STRING):
            raise ValueError("a model card has an unusable 'root'")
        served.append(ServedModel(server, model_id, root or model_id))
    return tuple(served)


class VllmServers:
    """Asks the configured vLLM servers what they serve, all at once, each within ``timeout``.

    ``now(max_age)`` gives an answer no older than ``max_age`` seconds: one asking at a time (the
    callers that come meanwhile share it). ``waited`` bounds how long a caller waits for a new
    answer; past it the previous answer is given and the asking goes on for the next caller."""

    def __init__(self, urls: list[str], api_key: str | None, timeout: float) -> None:
        self.urls = [base_url(u) for u in urls if u.strip()]
        self._api_key = api_key
        self._timeout = timeout
        self._last: ServedNow | None = None
        self._asking: asyncio.Task[ServedNow] | None = None
        self._client: httpx.AsyncClient | None = None

    @property
    def configured(self) -> bool:
        return bool(self.urls)

    async def now(self, max_age: float = 0.0, waited: float | None = None) -> ServedNow:
        if not self.urls:
            return ServedNow(time=time.time())
        last = self._last
        if last is not None and time.time() - last.time <= max_age:
            return last
        if self._asking is None or self._asking.done():
            self._asking = asyncio.create_task(self._ask_all(), name="vllm /v1/models")
        asking = self._asking
        if waited is None or last is None:
            return await asyncio.shield(asking)
        try:
            async with asyncio.timeout(waited):  # not wait_for: it can drop a cancel on 3.11
                return await asyncio.shield(asking)
        except TimeoutError:
            return last

    async def _ask_all(self) -> ServedNow:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._client = httpx.AsyncClient(
                headers=headers, timeout=self._timeout, follow_redirects=False, trust_env=False
            )
        answers = await asyncio.gather(*(self._ask(self._client, url) for url in self.urls))
        served: list[ServedModel] = []
        unreachable: list[tuple[str, str]] = []
        for url, answer in zip(self.urls, answers, strict=True):
            if isinstance(answer, str):
                unreachable.append((display_url(url), answer))
            else:
                served.extend(answer)
        self._last = ServedNow(tuple(served), tuple(unreachable), time.time())
        return self._last

    async def _ask(self, client: httpx.AsyncClient, url: str) -> tuple[ServedModel, ...] | str:
        """The server's cards, or why it could not be asked (plain words, no credentials)."""
        shown = display_url(url)
        try:
            async with asyncio.timeout(self._timeout):
                async with client.stream("GET", f"{url}/v1/models") as response:
                    if response.status_code in (401, 403):
                        return f"it refused the request (HTTP {response.status_code}): check MODELS_VLLM_API_KEY"
                    if response.status_code != 200:
                        return f"it answered HTTP {response.status_code}"
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_ANSWER_BYTES:
                            return f"its answer is larger than {MAX_ANSWER_BYTES} bytes"
            return parse_models(shown, json.loads(bytes(body)))
        except TimeoutError:
            return f"no answer within {self._timeout:g} s"
        except httpx.HTTPError as error:
            return f"it cannot be reached ({type(error).__name__})"
        except (ValueError, RecursionError) as error:
            return f"its answer is not vLLM's /v1/models ({error})"

    async def aclose(self) -> None:
        if self._asking is not None and not self._asking.done():
            self._asking.cancel()
            with contextlib.suppress(BaseException):
                await self._asking
        if self._client is not None:
            await self._client.aclose()
