"""Sample repositories for the offline demo and for benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

from fakehub.repos import Generated, RepoBuilder


def make_samples(root: Path) -> dict[str, str]:
    """Create the demo repos under ``root`` (skipping ones already there); return repo id -> main commit."""
    builder = RepoBuilder(root)
    made: dict[str, str] = {}

    def add(repo_id: str, files: dict[str, bytes | str | Generated], gated: bool = False) -> None:
        existing = builder.repo(repo_id, gated=gated)
        made[repo_id] = existing.refs.get("main") or builder.commit(repo_id, files, gated=gated)

    config = json.dumps({"architectures": ["DemoForCausalLM"], "hidden_size": 64})
    add(
        "demo/tiny-model",
        {
            "config.json": config,
            "tokenizer.json": json.dumps({"vocab": {str(i): i for i in range(500)}}),
            "model.safetensors": Generated(8 * 1024 * 1024, seed=1),
        },
    )
    add(
        "demo/big-model",
        {
            "config.json": config,
            "model-00001-of-00002.safetensors": Generated(300 * 1024 * 1024, seed=2),
            "model-00002-of-00002.safetensors": Generated(300 * 1024 * 1024, seed=3),
        },
    )
    add(
        "demo/many-files",
        {
            f"shards/part-{i:03d}.json": json.dumps({"part": i, "pad": "x" * 2000})
            for i in range(300)
        },
    )
    add("demo/gated-model", {"config.json": config, "README.md": "# gated"}, gated=True)
    return made
