"""`manifest.json`: the only contract between export and everything that reads a bundle.

A bundle is a folder: the ONNX graphs with their external weight data, the tokenizer and image
processor files, sample inputs with reference outputs, and this manifest describing all of it with a
sha256 per file. This module needs only the standard library, so the runtime on a Jetson can read it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import MllmEdgeError

SCHEMA_VERSION = 2  # 2 added `quantization`
READABLE_VERSIONS = (1, 2)  # a version-1 manifest is a version-2 one without quantized weights
MANIFEST_NAME = "manifest.json"
DEFAULT_BUNDLE = "bundle"  # where `export` writes and `run` reads when given no folder


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy spelling: float32, float16, int64
    shape: list  # ints for fixed dims, names ("batch", "seq", "past", ...) for dynamic ones


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    data_files: list[str] = field(default_factory=list)  # external weight data this graph reads

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


@dataclass
class Manifest:
    source: dict  # {"model": folder or hub id, "revision": commit or None}
    architecture: dict  # LlavaSpec as a dict, plus num_image_tokens
    pruning: dict  # method, fastv {k, ratio, keep} | None, fastervlm {ratio, keep} | None, image_tokens {...}
    dtype: str  # float32 | float16: the precision of the LLM and vision graphs
    max_context: int  # tokens the KV cache holds: prompt (after pruning) + generated
    graphs: dict[str, GraphSpec]  # vision, embed, [llm_head, prune,] llm_tail
    tokenizer: dict  # folder, special token ids, image token, chat template
    preprocessing: dict  # the checkpoint's image processor settings
    samples: dict  # graph name -> npz of its sample inputs and reference outputs; "chain" -> greedy run
    quantization: dict | None = (
        None  # weight-only int8/int4 LLM graphs (export/quantize.py); None: float weights
    )
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    schema_version: int = SCHEMA_VERSION
    created_by: str = ""

    @property
    def has_fastv(self) -> bool:
        return "prune" in self.graphs

    def tokenizer_files(self) -> list[str]:
        return [rel for rel in self.files if rel.startswith(self.tokenizer["folder"] + "/")]

    def graph_files(self) -> list[str]:
        """The ONNX files and their weight data, as the manifest lists them."""
        return sorted({f for g in self.graphs.values() for f in (g.file, *g.data_files)})

    @property
    def weights(self) -> str:
        """What the LLM's weights are stored as: the dtype's name, or int8 / int4."""
        return self.quantization["weights"] if self.quantization else self.dtype

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        graphs = {
            name: GraphSpec(
                g["file"],
                [TensorSpec(**t) for t in g["inputs"]],
                [TensorSpec(**t) for t in g["outputs"]],
                list(g.get("data_files", [])),
            )
            for name, g in data["graphs"].items()
        }
        return cls(**{**data, "graphs": graphs})


def schema_version(quantized: bool) -> int:
    """Bundles without quantized weights are still written as version 1, so that an mllm-edge
    from before version 2 keeps reading them; only a quantized bundle needs a reader that knows."""
    return SCHEMA_VERSION if quantized else 1


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_files(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder except the manifest, by path relative to folder (posix)."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Hash every file of the bundle into the manifest, then write it (last, so it vouches for all)."""
    manifest.files = hash_files(folder)
    (folder / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")


def load_manifest(folder: str | Path, verify_files: bool = True) -> Manifest:
    """Read a bundle's manifest; with verify_files, check every listed file against its sha256.

    Every failure is an MllmEdgeError that names the bundle and the file at fault.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise MllmEdgeError(
            f"bundle {folder} does not exist: make one with `mllm-edge export` (with no --model it exports the built-in model)"
        )
    if not path.is_file():
        raise MllmEdgeError(f"{folder} is not a bundle: it has no {MANIFEST_NAME}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MllmEdgeError(f"{path} is damaged: not valid JSON ({e})") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version not in READABLE_VERSIONS:
        raise MllmEdgeError(
            f"{path} has schema version {version!r}; this mllm-edge reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (export the bundle again, or update mllm-edge)"
        )
    try:
        manifest = Manifest.from_dict(data)
    except (KeyError, TypeError) as e:
        raise MllmEdgeError(f"{path} is damaged: {e}") from None
    if verify_files:
        verify_bundle_files(folder, manifest)
    return manifest


def verify_bundle_files(folder: Path, manifest: Manifest, only: list[str] | None = None) -> None:
    """Check the bundle's files (or `only` these, relative paths) against their sha256."""
    for rel, expected in manifest.files.items():
        if only is not None and rel not in only:
            continue
        path = folder / rel
        if not path.is_file():
            raise MllmEdgeError(f"bundle {folder} is incomplete: {rel} is missing")
        if sha256_file(path) != expected:
            raise MllmEdgeError(
                f"bundle {folder} is damaged: {rel} does not match its sha256 in {MANIFEST_NAME}"
            )
