"""`engines.json`: what an engine folder holds and how it was built.

Written last, after every engine is in place, so a folder without it is an unfinished build. The
runtime reads it to refuse engines of another GPU or TensorRT version, or of another export of the
bundle (the manifest's sha256 is recorded), with a message that says to rebuild.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import MllmEdgeError
from ..manifest import MANIFEST_NAME, sha256_file
from .profiles import Profile
from .target import Target, same_machine

ENGINES_META = "engines.json"
ENGINES_SCHEMA = 1


@dataclass
class EngineEntry:
    file: str  # relative to the engine folder
    onnx: str  # the bundle's graph file it was built from
    sha256: str
    profiles: list[dict]  # [{"name": ..., "shapes": {input: [min, opt, max]}}]


@dataclass
class EngineSet:
    target: dict  # Target.to_dict()
    settings: dict  # BuildSettings.to_dict()
    max_context: int
    bundle_manifest_sha256: str
    engines: dict[str, EngineEntry] = field(default_factory=dict)
    verified: bool = False  # whether --verify ran and passed
    created_by: str = ""
    schema_version: int = ENGINES_SCHEMA

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def profile_record(profiles: list[Profile]) -> list[dict]:
    return [
        {"name": p.name, "shapes": {k: [list(s) for s in v] for k, v in p.shapes.items()}} for p in profiles
    ]


def write_engine_set(folder: Path, meta: EngineSet) -> None:
    tmp = folder / (ENGINES_META + ".tmp")
    tmp.write_text(meta.to_json())
    tmp.replace(folder / ENGINES_META)


def load_engine_set(
    folder: Path, bundle: Path, here: Target | None = None, verify_files: bool = True
) -> EngineSet:
    """Read and check an engine folder: complete, for this bundle, (given `here`) for this machine."""
    path = folder / ENGINES_META
    if not path.is_file():
        raise MllmEdgeError(
            f"{folder} holds no finished engines ({ENGINES_META} is missing): run `mllm-edge build {bundle}`"
        )
    try:
        data = json.loads(path.read_text())
        engines = {k: EngineEntry(**v) for k, v in data.pop("engines").items()}
        meta = EngineSet(**data, engines=engines)
    except (ValueError, TypeError, KeyError) as e:
        raise MllmEdgeError(f"{path} is damaged ({e}): rebuild with `mllm-edge build {bundle}`") from None
    if meta.schema_version != ENGINES_SCHEMA:
        raise MllmEdgeError(
            f"{path} has schema {meta.schema_version}; this mllm-edge reads {ENGINES_SCHEMA}: rebuild with `mllm-edge build {bundle}`"
        )
    if meta.bundle_manifest_sha256 != sha256_file(bundle / MANIFEST_NAME):
        raise MllmEdgeError(
            f"the engines in {folder} were built from another export of this bundle: rebuild with `mllm-edge build {bundle}`"
        )
    if here is not None and (why := same_machine(meta.target, here)):
        raise MllmEdgeError(why)
    if verify_files:
        for entry in meta.engines.values():
            file = folder / entry.file
            if not file.is_file():
                raise MllmEdgeError(
                    f"engine {entry.file} is missing from {folder}: rebuild with `mllm-edge build {bundle}`"
                )
            if sha256_file(file) != entry.sha256:
                raise MllmEdgeError(
                    f"engine {entry.file} in {folder} is damaged (sha256 differs): rebuild with `mllm-edge build {bundle}`"
                )
    return meta
