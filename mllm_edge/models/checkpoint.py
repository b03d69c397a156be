"""Finding a checkpoint (local folder or Hugging Face hub id) and reading its weights.

Weights are read from safetensors; `.bin` files only through `torch.load(weights_only=True)`, which
refuses arbitrary pickled code. Each family maps its checkpoint's key names onto our
modules' (models/families, e.g. both llava-hf layouts, transformers < 5 and >= 5).
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from ..errors import MllmEdgeError

SMALL_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja"]  # config, tokenizer, processor
HUB_PATTERNS = [*SMALL_PATTERNS, "*.safetensors"]


def resolve_checkpoint(model: str | Path, check: Callable[[Path], None] | None = None) -> Path:
    """A local checkpoint folder as given, or a hub id downloaded (or found in the local HF cache).

    check(folder), if given, runs on the config and tokenizer files before any weight is
    downloaded, so a checkpoint it refuses costs a few kilobytes, not gigabytes."""
    path = Path(model).expanduser()
    if path.is_dir():
        if check is not None:
            check(path)
        return path
    if path.exists():
        raise MllmEdgeError(f"{model} is a file; expected a checkpoint folder or a Hugging Face hub id")
    looks_like_path = str(model).startswith((".", "/", "~")) or str(model).count("/") != 1
    looks_like_hub_id = not looks_like_path and re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)) is not None
    if not looks_like_hub_id:
        raise MllmEdgeError(
            f"model folder {model} does not exist (nor is it a hub id like 'llava-hf/llava-1.5-7b-hf')"
        )
    if check is not None:
        check(_download(str(model), SMALL_PATTERNS))
    return _download(str(model), HUB_PATTERNS)


def _download(model: str, patterns: list[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated model: all end the same way for the user
        raise MllmEdgeError(
            f"cannot get '{model}' from the Hugging Face hub ({type(e).__name__}: {e}); "
            "download it elsewhere and pass the local folder"
        ) from None


def _weight_files(folder: Path) -> tuple[list[Path], str]:
    for index_name, kind in (
        ("model.safetensors.index.json", "safetensors"),
        ("pytorch_model.bin.index.json", "bin"),
    ):
        index = folder / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / n for n in names], kind
    for pattern, kind in (("*.safetensors", "safetensors"), ("pytorch_model*.bin", "bin")):
        files = sorted(folder.glob(pattern))
        if files:
            return files, kind
    raise MllmEdgeError(f"no weights (*.safetensors or pytorch_model*.bin) in {folder}")


def iter_weights(
    folder: Path, canonical_key: Callable[[str], str] = str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (canonical key, tensor) for every weight of the checkpoint, one file at a time; the
    family's mapping (models/families) gives the canonical key."""
    files, kind = _weight_files(folder)
    for file in files:
        if not file.is_file():
            raise MllmEdgeError(f"weight file {file.name} listed in the index is missing from {folder}")
        try:
            for key, tensor in _read_file(file, kind):
                yield canonical_key(key), tensor
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
            raise MllmEdgeError(f"weight file {file} cannot be read (truncated or corrupt?): {e}") from None


def _read_file(file: Path, kind: str) -> Iterator[tuple[str, torch.Tensor]]:
    if kind == "safetensors":
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    else:
        # weights_only: refuse pickled code; only tensors and plain containers load.
        yield from torch.load(str(file), map_location="cpu", weights_only=True, mmap=True).items()
