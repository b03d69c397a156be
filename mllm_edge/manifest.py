"""`manifest.json`: the only contract between export and everything that reads a bundle.

A bundle is a folder: the ONNX graphs with their external weight data, the tokenizer and image
processor files, sample inputs with reference outputs, and this manifest describing all of it with a
sha256 per file. This module needs only the standard library, so the runtime on a Jetson can read it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import MllmEdgeError
from .graphs import bundle_graphs, layer_group
from .integrity import check_files, sha256_file

SCHEMA_VERSION = 3  # 2 added `quantization`; 3 its calibrated form (target, backends, per graph)
READABLE_VERSIONS = (1, 2, 3)  # a version-1 manifest is a version-2 one without quantized weights
QUANTIZED_WEIGHTS = ("int8", "int4", "int4-awq", "fp8")
MANIFEST_NAME = "manifest.json"
DEFAULT_BUNDLE = "bundle"  # where `export` writes and `run` reads when given no folder


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy spelling: float32, float16, int64
    shape: list  # ints for fixed dims, names ("batch", "seq", "past", ...) for dynamic ones


FUSED_SUFFIX = ".onnxruntime.onnx"  # GraphSpec.onnxruntime_file's


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    data_files: list[str] = field(default_factory=list)  # external weight data this graph reads
    # the same graph with ONNX Runtime's fused attention, NAME.onnxruntime.onnx (export/fused_attention.py),
    # over the same data files: what the onnxruntime backend runs; None where nothing was fused
    onnxruntime_file: str | None = None

    def input(self, name: str) -> TensorSpec:
        return self._find(self.inputs, name, "input")

    def output(self, name: str) -> TensorSpec:
        return self._find(self.outputs, name, "output")

    def _find(self, tensors: list[TensorSpec], name: str, side: str) -> TensorSpec:
        found = next((t for t in tensors if t.name == name), None)
        if found is None:
            raise MllmEdgeError(f"{self.file} has no {side} {name}: re-export the bundle")
        return found


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
    quantization: dict | None = None  # what `calibrate` quantized, how, from what (calibration/); None: float
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    schema_version: int = SCHEMA_VERSION
    created_by: str = ""

    @property
    def has_fastv(self) -> bool:
        return "prune" in self.graphs

    @property
    def anyres(self) -> bool:
        """LLaVA-NeXT: a picture is several views, packed into a span whose length varies."""
        return _anyres(self.architecture)

    @property
    def merge(self) -> str:
        """LLaVA-NeXT's FasterVLM merge (pruning.MERGES); "spatial" where there is nothing to merge."""
        return (self.pruning["fastervlm"] or {}).get("merge", "spatial")

    @property
    def definitions(self) -> dict:
        """The definition of each of the bundle's graphs (mllm_edge.graphs), in the order they run."""
        used = self.pruning["method"].split("+")
        return bundle_graphs("fastv" in used, "fastervlm" in used, self.anyres)

    def tokenizer_files(self) -> list[str]:
        return [rel for rel in self.files if rel.startswith(self.tokenizer["folder"] + "/")]

    def graph_files(self) -> list[str]:
        """The ONNX files and their weight data, as the manifest lists them."""
        return sorted(
            {f for g in self.graphs.values() for f in (g.file, *g.data_files, g.onnxruntime_file) if f}
        )

    @property
    def weights(self) -> str:
        """What the quantized graphs' weights are stored as (int8, int4, int4-awq, fp8), else the dtype's name."""
        return self.quantization["weights"] if self.quantization else self.dtype

    @property
    def backends(self) -> list[str]:
        """The backends that can run the bundle: a MatMulNBits bundle is ONNX Runtime's only."""
        return list(self.quantization["backends"]) if self.quantization else ["onnxruntime", "tensorrt"]

    def quantized(self, graph: str) -> bool:
        return bool(self.quantization) and graph in self.quantization["graphs"]

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
                g.get("onnxruntime_file"),
            )
            for name, g in data["graphs"].items()
        }
        return cls(**{**data, "graphs": graphs})


# Bundles without quantized weights are still written as version 1, so that an mllm-edge from
# before version 2 keeps reading them; only a quantized bundle needs a reader that knows.
FLOAT_SCHEMA_VERSION = 1


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


def _tile_multiples(pair, tile: int) -> bool:
    return (
        isinstance(pair, list)
        and len(pair) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 and x % tile == 0 for x in pair)
    )


def _anyres(architecture: dict) -> bool:
    return architecture.get("max_views", 1) > 1  # manifests from before LLaVA-NeXT have no max_views


class _Invalid(Exception):
    """A manifest field that is missing, of the wrong type, out of range or inconsistent."""


def _field(data: dict, path: str, kinds, ok=lambda v: True, want: str = ""):
    value = data
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise _Invalid(f"{path} is missing")
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, kinds):  # no field of ours is a bool
        raise _Invalid(f"{path} must be {want or kinds}, got {value!r}")
    if not ok(value):
        raise _Invalid(f"{path} must be {want}, got {value!r}")
    return value


def _safe_path(rel: str) -> bool:
    """A path inside the bundle: relative, posix, no '..'."""
    return bool(rel) and not rel.startswith("/") and "\\" not in rel and ".." not in rel.split("/")


def check_manifest(data) -> None:
    """Types, ranges and consistency of a manifest's fields, before anything uses them; raises _Invalid
    naming the field. The file list is mandatory and covers every graph, data and tokenizer file."""
    if not isinstance(data, dict):
        raise _Invalid("the manifest must be a JSON object")
    positive = lambda v: v > 0  # noqa: E731
    _field(data, "source.model", str)
    _field(data, "created_by", str)
    for key in ("architecture", "preprocessing", "samples", "tokenizer"):
        _field(data, key, dict)
    num_layers = _field(data, "architecture.text.num_layers", int, positive, "a whole number > 0")
    for key in ("hidden_size", "num_kv_heads", "head_dim", "vocab_size"):
        _field(data, f"architecture.text.{key}", int, positive, "a whole number > 0")
    for key in ("image_size", "patch_size"):
        _field(data, f"architecture.vision.{key}", int, positive, "a whole number > 0")
    num_image = _field(data, "architecture.num_image_tokens", int, positive, "a whole number > 0")
    max_views = 1
    if "max_views" in data["architecture"]:
        max_views = _field(data, "architecture.max_views", int, positive, "a whole number > 0")
    if max_views > 1:  # LLaVA-NeXT: the views follow from the pinpoints
        tile = data["architecture"]["vision"]["image_size"]
        pinpoints = _field(
            data,
            "architecture.image_grid_pinpoints",
            list,
            lambda v: len(v) > 0 and all(_tile_multiples(p, tile) for p in v),
            f"[height, width] pairs of whole {tile}-pixel tiles",
        )
        views = 1 + max(h * w for h, w in pinpoints) // (tile * tile)
        if views != max_views:
            raise _Invalid(
                f"architecture.max_views {max_views} disagrees with its image_grid_pinpoints ({views} views)"
            )
    methods = ("none", "fastv", "fastervlm", "fastv+fastervlm")
    method = _field(data, "pruning.method", str, lambda v: v in methods, "one of " + ", ".join(methods))
    split = _field(
        data, "pruning.split_layer", int, lambda v: 0 <= v < num_layers, f"a layer 0 <= K < {num_layers}"
    )
    tokens = {
        k: _field(data, f"pruning.image_tokens.{k}", int, positive, "a whole number > 0")
        for k in ("vision", "llm", "after_fastv")
    }
    if tokens["vision"] != num_image or not tokens["after_fastv"] <= tokens["llm"] <= tokens["vision"]:
        raise _Invalid(f"pruning.image_tokens {tokens} must count down from the {num_image} image tokens")
    for name in ("fastv", "fastervlm"):
        on = name in method.split("+")
        entry = data["pruning"].get(name)
        if on != (entry is not None):
            raise _Invalid(f"pruning.{name} must be {'set' if on else 'null'} for method {method!r}")
        if on:
            _field(data, f"pruning.{name}.ratio", (int, float), lambda v: 0 <= v < 1, "a ratio 0 <= R < 1")
            keep = _field(data, f"pruning.{name}.keep", int, positive, "a whole number > 0")
            expected, counted = tokens["after_fastv"] if name == "fastv" else tokens["llm"], keep
            if name == "fastervlm" and max_views > 1:  # per view
                merge = _field(data, "pruning.fastervlm.merge", str, lambda v: v in ("spatial", "unpad"),
                               "spatial or unpad")  # fmt: skip
                # the spatial merge keeps every view's count; the unpad merge a newline per row too
                counted = keep * max_views if merge == "spatial" else expected
            if counted != expected:
                raise _Invalid(f"pruning.{name}.keep {keep} disagrees with pruning.image_tokens ({expected})")
    used = method.split("+")
    if "fastv" in used:
        _field(
            data, "pruning.fastv.k", int, lambda v: v == split, f"FastV's layer, pruning.split_layer {split}"
        )
    if ("fastv" in used) != (split > 0):
        raise _Invalid(f"pruning.split_layer {split} disagrees with method {method!r}")
    if "fastervlm" not in used and tokens["llm"] != tokens["vision"]:
        raise _Invalid("pruning.image_tokens.llm must equal vision without FasterVLM")
    if "fastv" not in used and tokens["after_fastv"] != tokens["llm"]:
        raise _Invalid("pruning.image_tokens.after_fastv must equal llm without FastV")
    _field(data, "dtype", str, lambda v: v in ("float32", "float16"), "float32 or float16")
    _field(
        data,
        "max_context",
        int,
        lambda v: v > tokens["llm"],
        f"a whole number above the {tokens['llm']} image tokens",
    )
    files = _field(
        data, "files", dict, lambda v: len(v) > 0, "the sha256 of every file (it may not be empty)"
    )
    for rel, sha in files.items():
        if not _safe_path(rel) or not isinstance(sha, str) or len(sha) != 64:
            raise _Invalid(f"files[{rel!r}] must be a path inside the bundle and a sha256")
    graphs = _field(data, "graphs", dict)
    definitions = bundle_graphs("fastv" in used, "fastervlm" in used, max_views > 1)
    if list(graphs) != list(definitions):
        raise _Invalid(
            f"graphs must be {', '.join(definitions)} for method {method!r}, got {', '.join(graphs)}"
        )
    samples = _field(data, "samples", dict)
    if set(samples) != {*definitions, "chain"}:
        raise _Invalid(
            f"samples must name one file per graph and the chain, got {', '.join(map(str, samples))}"
        )
    for name, graph in graphs.items():
        rels = [_field(data, f"graphs.{name}.file", str, _safe_path, "a path inside the bundle")]
        rels += list(graph.get("data_files", []))
        if graph.get("onnxruntime_file") is not None:
            own = rels[0].removesuffix(".onnx") + FUSED_SUFFIX  # export/fused_attention.py's name
            rels.append(_field(data, f"graphs.{name}.onnxruntime_file", str, own.__eq__, own))
        for rel in rels:
            if rel not in files:
                raise _Invalid(f"graphs.{name}: {rel} is not in the file list")
        definition = definitions[name]
        layers = layer_group(definition.cache, split, num_layers) if definition.cache else range(0)
        for side, names in (
            ("inputs", definition.input_names(layers)),
            ("outputs", definition.output_names(layers)),
        ):
            tensors = _field(data, f"graphs.{name}.{side}", list)
            for t in tensors:
                if not (
                    isinstance(t, dict)
                    and isinstance(t.get("name"), str)
                    and isinstance(t.get("shape"), list)
                ):
                    raise _Invalid(f"graphs.{name}.{side} must list {{name, dtype, shape}} entries")
                if t.get("dtype") not in ("float32", "float16", "int64"):
                    raise _Invalid(f"graphs.{name}.{side}: {t['name']} has dtype {t.get('dtype')!r}")
            if sorted(t["name"] for t in tensors) != sorted(names):
                raise _Invalid(f"graphs.{name}.{side} must be the graph's {', '.join(names)}")
    folder = _field(data, "tokenizer.folder", str, _safe_path, "a path inside the bundle")
    if not any(rel.startswith(folder + "/") for rel in files):
        raise _Invalid(f"the file list holds no file of tokenizer.folder {folder!r}")
    _field(data, "tokenizer.image_token_id", int, lambda v: v >= 0, "a token id")
    _field(data, "tokenizer.image_token", str, lambda v: len(v) > 0, "the image placeholder's text")
    template = data["tokenizer"].get("chat_template")
    if template is not None and not isinstance(template, str):
        raise _Invalid(f"tokenizer.chat_template must be text or null, got {type(template).__name__}")
    for name, rel in data["samples"].items():
        if not isinstance(rel, str) or not _safe_path(rel):
            raise _Invalid(f"samples.{name} must be a path inside the bundle")
    _field(
        data,
        "tokenizer.eos_token_ids",
        list,
        lambda v: all(isinstance(i, int) for i in v),
        "a list of token ids",
    )
    q = data.get("quantization")
    if q is not None:
        _field(
            data,
            "quantization.weights",
            str,
            lambda v: v in QUANTIZED_WEIGHTS,
            " or ".join(QUANTIZED_WEIGHTS),
        )
        quantized = _field(
            data, "quantization.graphs", list, lambda v: set(v) <= set(data["graphs"]), "graphs of the bundle"
        )
        _field(
            data,
            "quantization.backends",
            list,
            lambda v: len(v) > 0 and set(v) <= {"onnxruntime", "tensorrt"},
            "a list of onnxruntime and tensorrt",
        )
        if not quantized:
            raise _Invalid("quantization.graphs is empty")


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
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise MllmEdgeError(
            f"{path} has schema version {version!r}; this mllm-edge reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (export the bundle again, or update mllm-edge)"
        )
    try:
        check_manifest(data)
        manifest = Manifest.from_dict(data)
    except _Invalid as e:
        raise MllmEdgeError(f"{path} is damaged: {e}") from None
    except (KeyError, TypeError) as e:
        raise MllmEdgeError(f"{path} is damaged: {e}") from None
    if verify_files:
        verify_bundle_files(folder, manifest)
    return manifest


def verify_bundle_files(
    folder: Path, manifest: Manifest, only: list[str] | None = None, full: bool = False
) -> None:
    """Check the bundle's files (or `only` these, relative paths) against their sha256; a file whose
    verified state is unchanged since its last check is not re-read unless `full` (integrity.py)."""
    expected = (
        manifest.files
        if only is None
        else {rel: manifest.files[rel] for rel in only if rel in manifest.files}
    )
    problem = check_files(folder, expected, full)
    if problem is None:
        return
    kind, rel = problem
    if kind == "missing":
        raise MllmEdgeError(f"bundle {folder} is incomplete: {rel} is missing")
    raise MllmEdgeError(f"bundle {folder} is damaged: {rel} does not match its sha256 in {MANIFEST_NAME}")
