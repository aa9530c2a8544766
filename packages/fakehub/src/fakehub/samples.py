"""Sample repositories for the offline demo and for benchmarks."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from fakehub.repos import FileContent, Generated, Repo, RepoBuilder

_CONFIG = json.dumps({"architectures": ["DemoForCausalLM"], "hidden_size": 64})
_TEXT = {
    "config.json": _CONFIG,
    "generation_config.json": json.dumps({"max_new_tokens": 64}),
    "tokenizer.json": json.dumps({"vocab": {str(i): i for i in range(200)}}),
    "tokenizer_config.json": json.dumps({"chat_template": "{{ messages }}"}),
    "special_tokens_map.json": "{}",
    "README.md": "# a sample model",
    ".gitattributes": "*.safetensors filter=lfs\n",
}
# The text files at the top of every layout below (config, tokenizer, ...): what any selection
# for vLLM takes besides the weights.
TEXT_FILES = frozenset(_TEXT)


def _index(weights: Mapping[str, FileContent]) -> str:
    return json.dumps({"weight_map": {f"layer.{i}": name for i, name in enumerate(weights)}})


# Repo layouts as they are found on the Hub, for the file selection (``files``, patterns). Sizes
# are per weight file; ``seed`` makes the content of different repos differ.


def llama_layout(size: int, seed: int = 0) -> dict[str, FileContent]:
    """Safetensors shards, a `.bin` copy of the same weights, and an `original/` folder with
    `consolidated.00.pth` (as Llama repos are): three copies of the weights."""
    safetensors = {
        f"model-0000{i}-of-00002.safetensors": Generated(size, seed=seed + i) for i in (1, 2)
    }
    pytorch = {
        f"pytorch_model-0000{i}-of-00002.bin": Generated(size, seed=seed + 10 + i) for i in (1, 2)
    }
    return {
        **_TEXT,
        **safetensors,
        "model.safetensors.index.json": _index(safetensors),
        **pytorch,
        "pytorch_model.bin.index.json": _index(pytorch),
        "original/consolidated.00.pth": Generated(2 * size, seed=seed + 20),
        "original/params.json": json.dumps({"dim": 64}),
        "original/tokenizer.model": "sentencepiece",
    }


def bin_layout(size: int, seed: int = 0) -> dict[str, FileContent]:
    """`.bin` weights only, and a training file vLLM does not load."""
    return {
        **_TEXT,
        "pytorch_model.bin": Generated(size, seed=seed),
        "training_args.bin": b"training arguments",
    }


def pt_layout(size: int, seed: int = 0) -> dict[str, FileContent]:
    """`.pt` weights only (some quantized models)."""
    return {**_TEXT, "model.pt": Generated(size, seed=seed), "optimizer.pt": b"optimizer state"}


def mistral_layout(size: int, seed: int = 0) -> dict[str, FileContent]:
    """Both `consolidated.safetensors` (the Mistral format) and HF shards of the same weights."""
    shards = {f"model-0000{i}-of-00002.safetensors": Generated(size, seed=seed + i) for i in (1, 2)}
    return {
        **_TEXT,
        "params.json": json.dumps({"dim": 64}),
        "consolidated.safetensors": Generated(2 * size, seed=seed + 5),
        **shards,
        "model.safetensors.index.json": _index(shards),
    }


GGUF_QUANTIZATIONS = ("Q4_K_M", "Q8_0", "F16")


def gguf_layout(size: int, seed: int = 0) -> dict[str, FileContent]:
    """Several GGUF quantizations of one model, one of them split in two parts."""
    files: dict[str, FileContent] = {"config.json": _CONFIG, "README.md": "# GGUF"}
    for i, quantization in enumerate(GGUF_QUANTIZATIONS):
        files[f"model-{quantization}.gguf"] = Generated(size * (i + 1), seed=seed + i)
    for part in (1, 2):
        files[f"model-Q2_K-0000{part}-of-00002.gguf"] = Generated(size, seed=seed + 10 + part)
    return files


def nested_layout(size: int, seed: int = 0) -> dict[str, FileContent]:
    """Files in folders: the weights at the top, another framework's below, text files around."""
    return {
        **_TEXT,
        "model.safetensors": Generated(size, seed=seed),
        "onnx/model.onnx": Generated(size, seed=seed + 1),
        "onnx/config.json": _CONFIG,
        "extra/more/notes.txt": "notes",
        "extra/weights/model.safetensors": Generated(size, seed=seed + 2),
    }


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
    add("demo/llama-like", llama_layout(4 * 1024 * 1024, seed=40))
    add("demo/tiny-gguf", gguf_layout(2 * 1024 * 1024, seed=50))
    return made


def move_main(root: Path, repo_id: str) -> str:
    """A new commit on ``main`` of a repo under ``root``, as a release on the Hub: the same files,
    with new content for the largest one and a changed ``config.json`` (the other files are shared
    with the revision before). Returns the new commit."""
    if not (root / repo_id / "repo.json").is_file():
        raise KeyError(f"no repo {repo_id} under {root} (run make demo first)")
    builder = RepoBuilder(root)
    repo = Repo.load(root / repo_id)
    current = repo.refs.get("main")
    if current is None:
        raise KeyError(f"{repo_id} has no main branch under {root}")
    entries = repo.commits[current]
    files: dict[str, FileContent] = {
        path: repo.object_path(entry).read_bytes() for path, entry in entries.items()
    }
    largest = max(entries.values(), key=lambda e: e.size)
    files[largest.path] = Generated(largest.size, seed=len(repo.commits) + 1000)
    files["config.json"] = json.dumps({"revision": len(repo.commits) + 1})
    return builder.commit(repo_id, files, lfs={p for p, e in entries.items() if e.lfs})
