"""Sample repositories for the offline demo and for benchmarks."""

from __future__ import annotations

import json
import random
import struct
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


# A real model, as small as one can be: a Llama of 2 layers, 16 wide, with a word-level tokenizer
# of 64 words. transformers reads its config and tokenizer, and the safetensors library its
# weights, as they would a model of the Hub (the other samples are dummies: their bytes are noise).
TINY_LLAMA_WORDS = [
    "the",
    "a",
    "model",
    "cache",
    "file",
    "revision",
    "branch",
    "commit",
    "download",
    "verify",
    "delete",
    "prune",
    "pin",
    "budget",
    "server",
    "fleet",
    "node",
    "hub",
    "mirror",
    "token",
    "byte",
    "blob",
    "snapshot",
    "ref",
    "tag",
    "key",
    "page",
    "list",
    "status",
    "plan",
    "queue",
    "worker",
    "zygote",
    "xet",
    "range",
    "resume",
    "cancel",
    "evict",
    "serve",
    "loads",
    "weight",
    "shard",
    "config",
    "tokenizer",
    "vllm",
    "gpu",
    "disk",
    "space",
    "fast",
    "safe",
    "honest",
    "hello",
    "world",
]
TINY_LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
_SPECIAL = ("<unk>", "<s>", "</s>", "<pad>")


def tiny_llama_shapes(config: Mapping[str, object] = TINY_LLAMA_CONFIG) -> dict[str, list[int]]:
    """The tensors ``LlamaForCausalLM`` loads for ``config``, by name, with their shapes."""
    vocab, hidden, inner = (
        int(str(config[k])) for k in ("vocab_size", "hidden_size", "intermediate_size")
    )
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden]}
    for layer in range(int(str(config["num_hidden_layers"]))):
        at = f"model.layers.{layer}"
        for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{at}.self_attn.{projection}.weight"] = [hidden, hidden]
        shapes[f"{at}.mlp.gate_proj.weight"] = [inner, hidden]
        shapes[f"{at}.mlp.up_proj.weight"] = [inner, hidden]
        shapes[f"{at}.mlp.down_proj.weight"] = [hidden, inner]
        shapes[f"{at}.input_layernorm.weight"] = [hidden]
        shapes[f"{at}.post_attention_layernorm.weight"] = [hidden]
    shapes["lm_head.weight"] = [vocab, hidden]
    return shapes


def safetensors_file(tensors: Mapping[str, tuple[list[int], list[float]]]) -> bytes:
    """A safetensors file of float32 tensors (name -> (shape, values)): an 8-byte header length,
    the JSON header (padded to 8 bytes, as the format asks), then the data."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    data = bytearray()
    for name, (shape, values) in tensors.items():
        start = len(data)
        data += struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [start, len(data)]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + bytes(data)


def _tiny_tokenizer() -> dict[str, object]:
    """A word-level ``tokenizer.json`` (the format of the tokenizers library) of 64 words."""
    words = [*_SPECIAL, *TINY_LLAMA_WORDS][: int(str(TINY_LLAMA_CONFIG["vocab_size"]))]
    special = [
        {
            "id": i,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, token in enumerate(_SPECIAL)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {
            "type": "WordLevel",
            "vocab": {w: i for i, w in enumerate(words)},
            "unk_token": "<unk>",
        },
    }


def tiny_llama(seed: int = 7) -> dict[str, FileContent]:
    """The files of a real tiny Llama (config, tokenizer, weights: about 40 KB)."""
    rng = random.Random(seed)
    tensors = {}
    for name, shape in tiny_llama_shapes().items():
        count = 1
        for dim in shape:
            count *= dim
        norm = name.endswith("norm.weight")
        values = [1.0] * count if norm else [rng.uniform(-0.1, 0.1) for _ in range(count)]
        tensors[name] = (shape, values)
    return {
        "config.json": json.dumps(TINY_LLAMA_CONFIG, indent=2),
        "generation_config.json": json.dumps({"bos_token_id": 1, "eos_token_id": 2}),
        "tokenizer.json": json.dumps(_tiny_tokenizer()),
        "tokenizer_config.json": json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "unk_token": "<unk>",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "model_max_length": 64,
            }
        ),
        "special_tokens_map.json": json.dumps(
            {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
        ),
        "model.safetensors": safetensors_file(tensors),
        "README.md": "# tiny-llama\n\nA real Llama of 2 layers, 16 wide: it loads, it says nothing.\n",
        ".gitattributes": "*.safetensors filter=lfs\n",
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
    add("demo/tiny-llama", tiny_llama())
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
