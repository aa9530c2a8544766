"""What the service downloads is what transformers loads (issue 30): the demo's real tiny Llama,
fetched through the service (with the selection vLLM loads), then read offline by transformers
(config and tokenizer) and by the safetensors library (the weights, as vLLM's loader reads them),
in a process of its own with ``HF_HUB_OFFLINE=1`` and the service's cache as its only source."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from fakehub import RepoBuilder
from fakehub.samples import TINY_LLAMA_CONFIG, tiny_llama, tiny_llama_shapes
from tests.helpers import FINAL, wait_for_status

LOAD = """
import json, sys
from huggingface_hub import constants
from safetensors.numpy import load_file
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import cached_file

repo = sys.argv[1]
for revision in sys.argv[2:]:
    config = AutoConfig.from_pretrained(repo, revision=revision)
    tokenizer = AutoTokenizer.from_pretrained(repo, revision=revision)
    ids = tokenizer("Hello world the model loads")["input_ids"]
    weights = load_file(cached_file(repo, "model.safetensors", revision=revision))
    print(json.dumps({
        "offline": constants.HF_HUB_OFFLINE,
        "config": config.to_dict(),
        "ids": ids,
        "text": tokenizer.decode(ids),
        "shapes": {name: list(t.shape) for name, t in weights.items()},
        "finite": all(bool((abs(t) < 10).all()) for t in weights.values()),
    }))
"""


def load_offline(cache_dir: Path, home: Path, repo: str, *revisions: str) -> list[dict[str, Any]]:
    """Run ``LOAD`` in a new interpreter: offline, the cache its only source, no token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))} | {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache_dir),
        "HF_HOME": str(home),
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens: a request would fail
        "TRANSFORMERS_VERBOSITY": "error",
    }
    done = subprocess.run(
        [sys.executable, "-c", LOAD, repo, *revisions],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.strip().splitlines()[-len(revisions) :]]


async def test_the_demo_model_loads_offline_from_what_the_service_downloaded(
    client: httpx.AsyncClient, repos: RepoBuilder, cache_dir: Path, tmp_path: Path
) -> None:
    commit = repos.commit("demo/tiny-llama", tiny_llama())
    body = {"hf_repo": "demo/tiny-llama", "files": "vllm"}
    assert (await client.post("/api/models/download", json=body)).status_code == 202
    assert (await wait_for_status(client, body, FINAL))["status"] == "DOWNLOADED"

    # By its branch (refs/main) and by its commit.
    answers = load_offline(cache_dir, tmp_path / "home", "demo/tiny-llama", "main", commit)
    assert len(answers) == 2
    for loaded in answers:
        assert loaded["offline"] is True
        config = loaded["config"]
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert config["hidden_size"] == TINY_LLAMA_CONFIG["hidden_size"]
        # Each word known (lower-cased by the tokenizer's normalizer), none taken for <unk> (0).
        ids = loaded["ids"]
        assert len(ids) == 5
        assert 0 not in ids
        assert loaded["text"] == "hello world the model loads"
        # Every tensor LlamaForCausalLM loads, with its shape, and nothing else.
        assert loaded["shapes"] == tiny_llama_shapes()
        assert loaded["finite"] is True
