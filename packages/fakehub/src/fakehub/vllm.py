"""A stand-in for a vLLM OpenAI-compatible server: ``GET /v1/models`` only, answered as vLLM does.

vLLM's ``OpenAIServingModels.show_available_models`` (``vllm/entrypoints/openai/serving_models.py``)
answers a ``ModelList`` (``protocol.py``): ``{"object": "list", "data": [ModelCard...]}``, a card
being ``id`` (the served model name), ``object: "model"``, ``created``, ``owned_by: "vllm"``,
``root`` (the ``--model`` it was started with: a repo id or a local path; a LoRA adapter's own
path), ``parent`` (a LoRA's base model), ``max_model_len`` and ``permission``. With ``--api-key``,
a request without ``Authorization: Bearer <key>`` gets 401 ``{"error": "Unauthorized"}``.
"""

from __future__ import annotations

import json
import time
import uuid
from http.server import BaseHTTPRequestHandler

from fakehub.loopback import LoopbackServer, QuietHTTPServer


class FakeVllm(LoopbackServer):
    """Serves ``models``: (served name, root) pairs, changeable while it runs."""

    def __init__(
        self,
        models: list[tuple[str, str | None]] | None = None,
        *,
        api_key: str | None = None,
        max_model_len: int = 4096,
        port: int = 0,
    ) -> None:
        self.models = list(models or [])
        self.api_key = api_key
        self.max_model_len = max_model_len
        self.requests = 0
        self.delay = 0.0  # seconds before each answer (a server that is slow to answer)
        self.raw: tuple[int, bytes] | None = None  # answer this instead (a server gone wrong)
        self._server = QuietHTTPServer(("127.0.0.1", port), _Handler)
        self._server.vllm = self  # type: ignore[attr-defined]

    def model_list(self) -> dict[str, object]:
        now = int(time.time())
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": now,
                    "owned_by": "vllm",
                    "root": root,
                    "parent": None,
                    "max_model_len": self.max_model_len,
                    "permission": [
                        {
                            "id": f"modelperm-{uuid.uuid4().hex}",
                            "object": "model_permission",
                            "created": now,
                            "allow_create_engine": False,
                            "allow_sampling": True,
                            "allow_logprobs": True,
                            "allow_search_indices": False,
                            "allow_view": True,
                            "allow_fine_tuning": False,
                            "organization": "*",
                            "group": None,
                            "is_blocking": False,
                        }
                    ],
                }
                for name, root in self.models
            ],
        }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        vllm: FakeVllm = self.server.vllm  # type: ignore[attr-defined]
        vllm.requests += 1
        if vllm.delay:
            time.sleep(vllm.delay)
        if vllm.raw is not None:
            code, data = vllm.raw
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            if code in (301, 302, 307, 308):
                self.send_header("Location", "http://127.0.0.1:9/v1/models")
            self.end_headers()
            self.wfile.write(data)
        elif (
            vllm.api_key is not None
            and self.headers.get("Authorization") != f"Bearer {vllm.api_key}"
        ):
            self._send(401, {"error": "Unauthorized"})
        elif self.path.split("?", 1)[0] == "/v1/models":
            self._send(200, vllm.model_list())
        else:
            self._send(404, {"detail": "Not Found"})

    def _send(self, code: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
