"""Which files of a revision a ``FileSelection`` selects (part of the Hub/cache adapter).

The patterns mean exactly what they mean to ``huggingface_hub`` (``snapshot_download``'s
``allow_patterns``/``ignore_patterns``): the library's own ``filter_repo_objects`` applies them.
The ``vllm`` preset is what vLLM's default model loader reads from a Hugging Face repo
(``vllm/model_executor/model_loader/default_loader.py``, ``DefaultModelLoader._prepare_weights``,
and ``weight_utils.py``, ``download_weights_from_hf`` and ``filter_files_not_needed_for_inference``;
``planning/file-selection.md`` cites the lines):

- the weights in one format only: ``consolidated*.safetensors`` when the repo has them (vLLM's
  ``auto`` format then loads the Mistral format), else the first of ``*.safetensors``, ``*.bin``,
  ``*.pt`` that matches a file at the top of the repo (the order of ``allow_patterns`` in
  ``_prepare_weights``; ``download_weights_from_hf`` keeps the first that matches); of those, the
  files at the top of the repo (the loader globs ``<folder>/<pattern>``), less the training files
  vLLM drops (``training_args.bin``, ``optimizer.bin``, ...);
- every file that is not a weight file (config, tokenizer, generation config, chat template, the
  index files), wherever it is;
- nothing under ``original/`` (Llama repos keep a second copy of the weights there).

GGUF files are not read by the default loader (vLLM loads one GGUF file given by path), so the
preset selects none: a GGUF repo needs ``allow_patterns`` naming the quantization wanted.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from api.models.backend import FileSelection, FilesPreset, RemoteFile, WeightGroup
from api.models.hub._compat import filter_repo_objects  # the library's own matcher

# vLLM's order of preference for the `hf` format (``_prepare_weights``: "*.safetensors", "*.bin",
# then "*.pt" with fall_back_to_pt), and the Mistral format it prefers when present.
VLLM_MISTRAL_PATTERN = "consolidated*.safetensors"
VLLM_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")
# ``filter_files_not_needed_for_inference``: training state, not weights.
VLLM_NOT_FOR_INFERENCE = (
    "training_args.bin",
    "optimizer.bin",
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
)
# Files holding weights in some format (vLLM's or another framework's): the preset takes none of
# these but the chosen format's.
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".gguf",
    ".ggml",
    ".h5",
    ".msgpack",
    ".onnx",
    ".onnx_data",
    ".ot",
    ".tflite",
    ".npz",
    ".pkl",
    ".mlmodel",
    ".nemo",
)
IGNORED_FOLDER = "original/"

_FORMAT_OF_SUFFIX = {
    ".safetensors": "safetensors",
    ".bin": "bin",
    ".pt": "pt",
    ".pth": "pth",
    ".gguf": "gguf",
}
# A GGUF file's quantization, from its name: Q4_K_M, IQ2_XXS, Q8_0, F16, BF16, ...
_GGUF_QUANT = re.compile(
    r"(?<![A-Za-z0-9])((?:I?Q[1-8](?:_[0-9A-Z]+)*)|BF16|F16|F32|FP16|FP32)(?![A-Za-z0-9])",
    re.IGNORECASE,
)
# A split GGUF's part: name-00001-of-00003.gguf
_GGUF_PART = re.compile(r"-\d{5}-of-\d{5}(?=\.gguf$)")


@dataclass(frozen=True)
class Resolved:
    """What a selection selects in one file list, and why it may be unusable."""

    paths: frozenset[str]
    problem: str | None = None  # set when the selection cannot be what the user wants


def is_weight_file(path: str) -> bool:
    return path.lower().endswith(WEIGHT_SUFFIXES)


def _top_level(path: str) -> bool:
    return "/" not in path


def vllm_weight_files(paths: Iterable[str]) -> tuple[str | None, list[str]]:
    """(the pattern vLLM's default loader would use, the weight files it reads) for a repo."""
    top = [p for p in paths if _top_level(p)]
    if mistral := fnmatch.filter(top, VLLM_MISTRAL_PATTERN):
        return VLLM_MISTRAL_PATTERN, sorted(mistral)
    for pattern in VLLM_WEIGHT_PATTERNS:
        if found := fnmatch.filter(top, pattern):
            if pattern != "*.safetensors":
                found = [p for p in found if not p.endswith(VLLM_NOT_FOR_INFERENCE)]
            return pattern, sorted(found)
    return None, []


def vllm_files(paths: Iterable[str]) -> set[str]:
    """The files vLLM's default loader reads (see the module's docstring)."""
    listed = [p for p in paths if not p.startswith(IGNORED_FOLDER)]
    _, weights = vllm_weight_files(listed)
    return {p for p in listed if not is_weight_file(p)} | set(weights)


def resolve(selection: FileSelection, files: Iterable[RemoteFile]) -> Resolved:
    """The paths ``selection`` selects among ``files``: the preset's files, plus those an allow
    pattern matches (only those when there is no preset), less those an ignore pattern matches."""
    paths = [f.path for f in files]
    chosen: set[str] = set()
    if selection.preset is FilesPreset.ALL:
        chosen = set(paths)
    elif selection.preset is FilesPreset.VLLM:
        chosen = vllm_files(paths)
    if selection.allow:
        chosen |= set(filter_repo_objects(paths, allow_patterns=list(selection.allow)))
    if selection.ignore:
        chosen -= set(filter_repo_objects(paths, allow_patterns=list(selection.ignore)))
    problem = None
    if not chosen:
        problem = f"the selection ({selection.describe()}) matches no file of this revision"
    elif (
        selection.preset is FilesPreset.VLLM
        and not selection.allow
        and not any(is_weight_file(p) for p in chosen)
    ):
        formats = sorted({g.format for g in weight_groups(files)})
        found = f" (its weights are {', '.join(formats)})" if formats else ""
        problem = (
            "files: vllm selects no weight file vLLM's default loader reads in this repo"
            f'{found}; name the files wanted with allow_patterns, e.g. ["*Q4_K_M*.gguf"]'
        )
    return Resolved(frozenset(chosen), problem)


def resolve_all(selections: Iterable[FileSelection], files: Iterable[RemoteFile]) -> Resolved:
    """The union of what each selection selects; a problem only when there is one selection
    (a union of recorded selections is what downloads fetched, whatever each alone was)."""
    listed = list(files)
    results = [resolve(s, listed) for s in selections]
    if len(results) == 1:
        return results[0]
    paths = frozenset().union(*(r.paths for r in results))
    return Resolved(paths, None if paths else "no recorded selection matches a file of it")


def weight_groups(files: Iterable[RemoteFile]) -> list[WeightGroup]:
    """The repo's weight files grouped by format and, for GGUF, by quantization, with sizes: the
    choices a frontend can offer. ``original/`` is a group of its own."""
    groups: dict[tuple[str, str | None, str], list[RemoteFile]] = {}
    for f in files:
        if not is_weight_file(f.path):
            continue
        suffix = "." + f.path.rsplit(".", 1)[-1].lower()
        fmt = _FORMAT_OF_SUFFIX.get(suffix, suffix[1:])
        folder = f.path.rsplit("/", 1)[0] + "/" if "/" in f.path else ""
        quantization = None
        if fmt == "gguf":
            name = _GGUF_PART.sub("", f.path.rsplit("/", 1)[-1])
            match = _GGUF_QUANT.search(name)
            quantization = match.group(1).upper() if match else name
        groups.setdefault((fmt, quantization, folder), []).append(f)
    out = []
    for (fmt, quantization, folder), members in sorted(
        groups.items(), key=lambda item: (item[0][2], item[0][0], item[0][1] or "")
    ):
        if quantization is not None:
            pattern = f"{folder}*{quantization}*.gguf"
        else:
            pattern = f"{folder}*.{members[0].path.rsplit('.', 1)[-1]}"
        out.append(
            WeightGroup(
                format=fmt,
                quantization=quantization,
                folder=folder,
                pattern=pattern,
                files=tuple(sorted(m.path for m in members)),
                size=sum(m.size for m in members),
            )
        )
    return out


def exact_patterns(paths: Iterable[str]) -> list[str]:
    """Patterns that match exactly these paths under ``filter_repo_objects`` (fnmatch): the
    characters fnmatch reads as wildcards are escaped as one-character classes."""
    return [re.sub(r"([*?\[])", r"[\1]", p) for p in sorted(paths)]
