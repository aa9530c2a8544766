"""The file selection: huggingface_hub's pattern semantics, the vLLM preset on each layout a Hub
repo comes in, the weight groups, and the request's limits."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
from pydantic import ValidationError

from api.models.backend import FileSelection, FilesPreset, RemoteFile
from api.models.hub._compat import filter_repo_objects
from api.models.hub.cache import ModelCache
from api.models.hub.records import selection_name
from api.models.hub.selection import exact_patterns, resolve, resolve_all, weight_groups
from api.models.types import ModelRequest
from fakehub.repos import FileContent, Generated
from fakehub.samples import (
    TEXT_FILES,
    bin_layout,
    gguf_layout,
    llama_layout,
    mistral_layout,
    nested_layout,
    pt_layout,
)

VLLM = FileSelection(FilesPreset.VLLM)
TEXT = TEXT_FILES


def listing(layout: dict[str, FileContent]) -> list[RemoteFile]:
    def size(content: FileContent) -> int:
        return content.size if isinstance(content, Generated) else len(content)

    return [RemoteFile(path, size(content), "0" * 64) for path, content in layout.items()]


@pytest.mark.parametrize(
    ("layout", "weights"),
    [
        # safetensors first; the .bin copy and original/ are left.
        (
            llama_layout(1),
            {
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
                "pytorch_model.bin.index.json",
            },
        ),
        # .bin when there is no safetensors, without the training file vLLM drops.
        (bin_layout(1), {"pytorch_model.bin"}),
        # .pt last, without the optimizer state.
        (pt_layout(1), {"model.pt"}),
        # The Mistral format when consolidated*.safetensors is there (vLLM's `auto`).
        (
            mistral_layout(1),
            {"consolidated.safetensors", "params.json", "model.safetensors.index.json"},
        ),
        # Weights at the top only; text files anywhere; another framework's weights never.
        (
            nested_layout(1),
            {"model.safetensors", "onnx/config.json", "extra/more/notes.txt"},
        ),
    ],
    ids=["safetensors+bin+original", "bin only", "pt only", "mistral", "nested"],
)
def test_the_vllm_preset_takes_one_format_and_every_other_file(
    layout: dict[str, FileContent], weights: set[str]
) -> None:
    resolved = resolve(VLLM, listing(layout))
    assert resolved.problem is None
    assert resolved.paths == TEXT | weights
    assert not any(p.startswith("original/") for p in resolved.paths)


def test_the_vllm_preset_refuses_a_repo_of_gguf_files_and_says_what_to_do() -> None:
    resolved = resolve(VLLM, listing(gguf_layout(1)))
    assert resolved.paths == {"config.json", "README.md"}
    assert resolved.problem is not None
    assert "gguf" in resolved.problem
    assert "allow_patterns" in resolved.problem
    # Naming the quantization is the way: the preset's files and those.
    chosen = resolve(
        FileSelection(FilesPreset.VLLM, allow=("*Q4_K_M*.gguf",)), listing(gguf_layout(1))
    )
    assert chosen.problem is None
    assert chosen.paths == {"config.json", "README.md", "model-Q4_K_M.gguf"}


@pytest.mark.parametrize(
    ("allow", "ignore"),
    [
        (["*.json"], []),
        (["original/"], []),  # a folder: the library adds '*'
        (["*.safetensors", "tokenizer*"], ["model-00002*"]),
        ([], ["*.bin", "original/*"]),
        (["[mp]*.bin"], []),
        (["*"], ["*.pth"]),
    ],
)
def test_patterns_mean_what_they_mean_to_huggingface_hub(
    allow: list[str], ignore: list[str]
) -> None:
    files = listing(llama_layout(1))
    paths = [f.path for f in files]
    selection = FileSelection(None if allow else FilesPreset.ALL, tuple(allow), tuple(ignore))
    expected = set(
        filter_repo_objects(paths, allow_patterns=allow or None, ignore_patterns=ignore or None)
    )
    assert resolve(selection, files).paths == expected


def test_a_preset_and_patterns_add_up_then_ignore_patterns_remove() -> None:
    files = listing(llama_layout(1))
    selection = FileSelection(
        FilesPreset.VLLM, allow=("original/params.json",), ignore=("README.md",)
    )
    paths = resolve(selection, files).paths
    assert "original/params.json" in paths
    assert "README.md" not in paths
    assert "model-00001-of-00002.safetensors" in paths


def test_a_selection_that_matches_nothing_says_so() -> None:
    resolved = resolve(FileSelection(None, allow=("*.gguf",)), listing(llama_layout(1)))
    assert resolved.paths == frozenset()
    assert resolved.problem is not None
    assert "matches no file" in resolved.problem


def test_recorded_selections_add_up() -> None:
    files = listing(gguf_layout(1))
    one = FileSelection(None, allow=("*Q8_0*",))
    two = FileSelection(None, allow=("*.json",))
    assert resolve_all([one, two], files).paths == {"model-Q8_0.gguf", "config.json"}


def test_weight_groups_offer_each_format_and_quantization() -> None:
    groups = {
        (g.format, g.quantization, g.folder): g for g in weight_groups(listing(gguf_layout(1)))
    }
    assert set(groups) == {
        ("gguf", "Q4_K_M", ""),
        ("gguf", "Q8_0", ""),
        ("gguf", "F16", ""),
        ("gguf", "Q2_K", ""),
    }
    assert groups[("gguf", "Q2_K", "")].files == (
        "model-Q2_K-00001-of-00002.gguf",
        "model-Q2_K-00002-of-00002.gguf",
    )
    # Each group's pattern selects exactly its files.
    paths = [f.path for f in listing(gguf_layout(1))]
    for group in groups.values():
        assert tuple(sorted(fnmatch.filter(paths, group.pattern))) == group.files
    llama = {(g.format, g.folder) for g in weight_groups(listing(llama_layout(1)))}
    assert llama == {("safetensors", ""), ("bin", ""), ("pth", "original/")}


def test_exact_patterns_match_their_path_only() -> None:
    paths = ["a[1].bin", "a1.bin", "what?.json", "whatx.json", "star*.txt", "stars.txt"]
    patterns = exact_patterns(["a[1].bin", "what?.json", "star*.txt"])
    assert set(filter_repo_objects(paths, allow_patterns=patterns)) == {
        "a[1].bin",
        "what?.json",
        "star*.txt",
    }


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"allow_patterns": ["*"] * 65}, "at most 64"),
        ({"ignore_patterns": ["x" * 257]}, "longer than 256"),
        ({"allow_patterns": ["a\nb"]}, "control character"),
        ({"allow_patterns": ["ok", "\x00"]}, "allow_patterns[1] contains a control character"),
        ({"allow_patterns": [""]}, "empty"),
        ({"files": "some"}, "'all' or 'vllm'"),
        ({"allow_patterns": "*.json"}, "valid list"),
    ],
)
def test_the_request_limits_name_the_rule(body: dict[str, object], words: str) -> None:
    with pytest.raises(ValidationError) as error:
        ModelRequest.model_validate({"hf_repo": "org/model", **body})
    assert words in str(error.value)


def test_a_request_without_selection_fields_names_none() -> None:
    assert ModelRequest(hf_repo="org/model").selection is None
    request = ModelRequest.model_validate({"hf_repo": "org/model", "ignore_patterns": ["*.bin"]})
    assert request.selection == FileSelection(None, (), ("*.bin",))


def test_the_record_is_a_union_and_all_covers_the_rest(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    commit = "a" * 40
    gguf = FileSelection(None, allow=("*Q8_0*",))
    cache.records.record_selection("org/model", commit, VLLM)
    cache.records.record_selection("org/model", commit, gguf)
    cache.records.record_selection("org/model", commit, VLLM)  # already there: nothing added
    assert cache.records.read_selections("org/model", commit) == (VLLM, gguf)
    cache.records.record_selection("org/model", commit, FileSelection())
    assert cache.records.read_selections("org/model", commit) == (FileSelection(),)
    cache.records.record_selection("org/model", commit, gguf)  # covered by everything
    assert cache.records.read_selections("org/model", commit) == (FileSelection(),)


@pytest.mark.parametrize(
    "planted",
    [
        "not json",
        '{"format_version": 1, "selections": [{"files": "vllm", "allow_patterns": ["*"], "ignore_patterns": 3}]}',
        '{"format_version": 1, "selections": [{"files": "everything"}]}',
        '{"format_version": 1, "selections": [{"files": null, "allow_patterns": ["'
        + "x" * 300
        + '"]}]}',
        '{"format_version": 1, "selections": [{"files": null, "allow_patterns": ['
        + ",".join(['"*"'] * 65)
        + "]}]}",
        '{"format_version": 1, "selections": [{"files": null, "allow_patterns": ["a\\u0000b"]}]}',
        '{"format_version": 2, "selections": []}',
    ],
)
def test_a_record_that_does_not_hold_to_the_rules_counts_as_none(
    tmp_path: Path, planted: str
) -> None:
    cache = ModelCache(tmp_path)
    commit = "b" * 40
    record = cache.locks_folder("org/model") / selection_name(commit)
    record.parent.mkdir(parents=True)
    record.write_text(planted)
    assert cache.records.read_selections("org/model", commit) == ()
