"""Exported graphs against our PyTorch modules, in ONNX Runtime on the CPU.

Two checks: each graph alone on its stored sample (max abs and scale-relative error per output,
integer outputs exactly), then the whole chain decoding greedily with a cache, whose tokens must equal
the PyTorch reference's. Error is measured relative to the reference output's largest magnitude,
because elementwise relative error is meaningless where the reference is near zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import MllmEdgeError
from ..manifest import Manifest
from ..parity import (
    CHAIN_TOLERANCE,
    TOLERANCE,
    OutputCheck,
    compare_graph,
    fastv_gather,
    fastv_scores,
    is_tie,
    load_references,
    load_sample,
    span_length,
)
from ..runtime.anyres import AnyRes
from ..runtime.backends.onnxruntime import OnnxRuntimeEngine
from ..runtime.cache import KINDS, CacheBookkeeping
from ..runtime.chain import Chain, place_image_tokens


@dataclass(frozen=True)
class ChainCheck:
    reference: list[int]  # PyTorch's greedy tokens
    onnx: list[int]  # ONNX Runtime's argmax at each step, fed the reference's tokens
    ties: list[int]  # steps whose reference top-two gap is within twice that step's measured error
    max_rel: float  # worst scale-relative logits error over the steps
    tolerance: float
    on_reference_selection: list[str] = field(default_factory=list)  # graphs whose tied selection was fixed

    @property
    def ok(self) -> bool:
        """Logits within the chain tolerance at every step, and the same argmax except at a tie
        (a gap the measured error can close: only there may the two implementations disagree)."""
        same = all(a == b or step in self.ties for step, (a, b) in enumerate(zip(self.reference, self.onnx)))
        return same and self.max_rel <= self.tolerance


def session(path: Path, graph: bytes | None = None) -> OnnxRuntimeEngine:
    """The runtime's ONNX Runtime engine on the CPU, unoptimised and without its memory arena: the
    graph is checked as written, and the CPU provider (no fp16 Gemm) would otherwise keep fp32
    copies of every fp16 weight; unoptimised, weights stay memory-mapped from the data files.
    graph: a changed copy of the file's graph to run instead, over the same data files."""
    return OnnxRuntimeEngine(path, "cpu", low_memory=True, graph=graph)


def graph_tolerance(manifest: Manifest, graph: str) -> float:
    """The dtype's limit, or the quantized weights' for a quantized graph."""
    return TOLERANCE[manifest.weights if manifest.quantized(graph) else manifest.dtype]


def verify_graphs(folder: Path, manifest: Manifest) -> list[OutputCheck]:
    checks = []
    for name, spec in manifest.graphs.items():
        path = folder / manifest.samples[name]
        inputs, outputs = load_sample(path)
        # the graph TensorRT builds, then ONNX Runtime's fused copy (each session closed before the next)
        for file, label in ((spec.file, name), (spec.onnxruntime_file, f"{name} fused")):
            if file is None:
                continue
            results = session(folder / file).run(inputs)
            found = compare_graph(
                name, results, inputs, outputs, load_references(path), graph_tolerance(manifest, name)
            )
            checks += [replace(check, graph=label) for check in found]
    return checks


class ConcatCache(CacheBookkeeping):
    """A plain numpy cache that grows by concatenation: the graphs' cache contract checked by other
    means than the runtime's zero-copy slots (it binds nothing and appends the rows the graphs return)."""

    def __init__(self, num_layers: int, split: int, null_row: np.ndarray):
        super().__init__(num_layers, split, max_len=1 << 62)
        self.null_row = null_row  # [1, B, G, D] zeros
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.rows = {(kind, i): self.null_row for kind in KINDS for i in range(self.num_layers)}

    def truncate(self, name: str, length: int) -> None:
        super().truncate(name, length)
        for i in self.group(name):
            for kind in KINDS:
                self.rows[kind, i] = self.rows[kind, i][: 1 + self.lengths[name]]

    def slots(self, name: str, count: int) -> dict:
        return {}

    def advance(self, name: str, count: int, outputs: dict | None = None) -> None:
        for i in self.group(name):
            for kind in KINDS:
                self.rows[kind, i] = np.concatenate((self.rows[kind, i], outputs[f"new_{kind}.{i}"]), axis=0)
        super().advance(name, count)

    def _view(self, kind: str, layer: int, first: int, rows: int) -> np.ndarray:
        return self.rows[kind, layer][first : first + rows]


class _Sessions(dict):
    """graph name -> its ONNX Runtime session, opened on first use; with low_memory, for one call only."""

    def __init__(self, folder: Path, manifest: Manifest, low_memory: bool):
        super().__init__()
        self.folder, self.manifest, self.low_memory = folder, manifest, low_memory

    def __missing__(self, graph: str) -> OnnxRuntimeEngine:
        spec = self.manifest.graphs[graph]
        engine = session(self.folder / (spec.onnxruntime_file or spec.file))  # what the CPU runtime runs
        if not self.low_memory:
            self[graph] = engine
        return engine


class OnnxChain:
    """The graphs in ONNX Runtime on the CPU, through the runtime's chain with a concatenating cache."""

    def __init__(self, folder: Path, manifest: Manifest, low_memory: bool = False):
        """low_memory: open each graph's session for one call and close it again, so only one graph's
        weights are mapped at a time (opening an unoptimised session is cheap: weights load lazily)."""
        self.manifest = manifest
        self.sessions = _Sessions(folder, manifest, low_memory)
        if not low_memory:
            for graph in manifest.graphs:
                self.sessions[graph]  # noqa: B018  (open every session now, as the runtime does)
        self.kept_patches = self.kept_image = None  # of the last generate(), when the bundle prunes

    def generate(
        self,
        input_ids: np.ndarray,
        pixel_values: np.ndarray,
        steps: int,
        forced: np.ndarray | None = None,
        image_size: tuple[int, int] | None = None,
    ):
        """Greedy: -> token ids [B, steps] and logits [B, steps, V].

        With forced [B, steps], step t is fed forced[:, t - 1] instead of its own previous choice
        (teacher forcing), so a tie broken differently at one step does not derail the rest.
        LLaVA-NeXT: pixel_values are one picture's views, image_size its (height, width).
        """
        text = self.manifest.architecture["text"]
        spec = self.manifest.graphs["llm_tail"].input(f"past_key.{text['num_layers'] - 1}")
        null_row = np.zeros((1, input_ids.shape[0], *spec.shape[2:]), spec.dtype)  # sequence-first
        cache = ConcatCache(text["num_layers"], self.manifest.pruning["split_layer"], null_row)
        split = self.manifest.pruning["split_layer"]
        anyres = AnyRes.of_bundle(self.manifest)
        chain = Chain(self.sessions, cache, split, anyres=anyres, merge=self.manifest.merge)
        vision = chain.encode_image(pixel_values, image_size)
        self.kept_patches = vision.get("kept_patches")
        image_token = self.manifest.tokenizer["image_token_id"]
        ids, start = place_image_tokens(input_ids, image_token, vision["image_embeds"].shape[1])
        prefilled = chain.prefill(ids, vision["image_embeds"], start)
        self.kept_image, logits = prefilled.kept_image, prefilled.logits
        tokens, all_logits = [], []
        for step in range(steps):
            token = logits.argmax(axis=-1)
            tokens.append(token)
            all_logits.append(logits)
            if step + 1 == steps:
                break
            logits = chain.decode_step(token if forced is None else forced[:, step], prefilled.length + step)
        return np.stack(tokens, axis=1), np.stack(all_logits, axis=1)


class _Fixed:
    """A graph whose selection is the reference's: vision's outputs taken from its sample, prune's
    gathered from its own inputs by the reference's kept set."""

    def __init__(self, graph: str, reference: dict, num_image: int = 0):
        self.graph, self.reference, self.num_image = graph, reference, num_image

    def run(self, inputs: dict, outputs: dict | None = None) -> dict:
        if self.graph == "vision":
            return dict(self.reference)
        return fastv_gather(inputs, self.reference["kept_image"], self.num_image)


def _run_chain(folder: Path, manifest: Manifest, chain: dict, fixed: dict | None = None):
    onnx = OnnxChain(folder, manifest, low_memory=True)
    onnx.sessions.update(fixed or {})
    size = tuple(int(v) for v in chain["image_size"]) if "image_size" in chain else None
    tokens, logits = onnx.generate(
        chain["input_ids"], chain["pixel_values"], chain["token_ids"].shape[1], chain["token_ids"], size
    )
    return onnx, tokens, logits


def _tied_selections(
    folder: Path, manifest: Manifest, onnx: OnnxChain, chain: dict, tolerance: float
) -> dict:
    """Graphs whose selection in the chain run differs from the reference's only by a tie at the cut
    (judged by the reference's own scores, as per-graph verification does) -> their fixed stand-in."""
    fixed = {}
    vision_in, vision_out = load_sample(folder / manifest.samples["vision"])
    refs = load_references(folder / manifest.samples["vision"])
    same_image = np.array_equal(vision_in["pixel_values"], chain["pixel_values"])
    if onnx.kept_patches is not None and "cls_row" in refs and same_image:
        if is_tie(refs["cls_row"], vision_out["kept_patches"], onnx.kept_patches, tolerance):
            fixed["vision"] = _Fixed("vision", vision_out)
    if onnx.kept_image is not None and same_image:
        prune_in, prune_out = load_sample(folder / manifest.samples["prune"])
        n = span_length(prune_in, prune_out)
        if is_tie(fastv_scores(prune_in, n), prune_out["kept_image"], onnx.kept_image, tolerance):
            fixed["prune"] = _Fixed("prune", {"kept_image": prune_out["kept_image"]}, n)
    return fixed


def verify_chain(folder: Path, manifest: Manifest) -> ChainCheck:
    """The graphs decode the sample with their cache, fed the reference's tokens (teacher forcing,
    so one tie broken the other way does not derail the steps after it). Where a graph's selection
    differed from the reference's only by a tie at the cut (already judged per graph), the chain is
    checked again on the reference's selection, so every graph after it is compared on equal terms."""
    with np.load(folder / manifest.samples["chain"]) as data:
        chain = dict(data)
    onnx, tokens, logits = _run_chain(folder, manifest, chain)
    check = _chain_check(chain, tokens, logits, CHAIN_TOLERANCE[manifest.weights])
    if not check.ok:
        fixed = _tied_selections(folder, manifest, onnx, chain, graph_tolerance(manifest, "vision"))
        if fixed:
            _, tokens, logits = _run_chain(folder, manifest, chain, fixed)
            check = _chain_check(chain, tokens, logits, CHAIN_TOLERANCE[manifest.weights], sorted(fixed))
    return check


def _chain_check(chain: dict, tokens, logits, tolerance: float, on_reference_selection=()) -> ChainCheck:
    ref, got = chain["step_logits"][0].astype(np.float64), logits[0].astype(np.float64)
    error = np.abs(got - ref).max(axis=-1)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    ties = np.flatnonzero(top2[:, 1] - top2[:, 0] <= 2 * error).tolist()
    rel = float((error / np.maximum(np.abs(ref).max(axis=-1), 1e-30)).max())
    return ChainCheck(
        chain["token_ids"][0].tolist(), tokens[0].tolist(), ties, rel, tolerance, list(on_reference_selection)
    )


def failures(checks: list[OutputCheck], chain: ChainCheck | None) -> str | None:
    """None when everything passed, else a message for the user."""
    bad = [c for c in checks if not c.ok]
    lines = [
        f"{c.graph}.{c.output}: error {c.rel:.2e} of its scale (max abs {c.max_abs:.3g}) > {c.tolerance:.0e}"
        if c.tolerance
        else f"{c.graph}.{c.output}: integers differ from PyTorch's"
        for c in bad
    ]
    if chain is not None and chain.max_rel > chain.tolerance:
        lines.append(f"decode chain: logits error {chain.max_rel:.2e} of their scale > {chain.tolerance:.0e}")
    if chain is not None and not chain.ok:
        lines.append(f"greedy tokens: PyTorch {chain.reference}, ONNX Runtime {chain.onnx}")
    if not lines:
        return None
    return "the exported graphs do not match PyTorch:\n  " + "\n  ".join(lines)


def require_onnxruntime() -> None:
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        raise MllmEdgeError(
            "verifying an export needs ONNX Runtime: pip install 'mllm-edge[onnxruntime]' (or pass --no-verify)"
        )
