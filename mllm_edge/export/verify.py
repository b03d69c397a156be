"""Exported graphs against our PyTorch modules, in ONNX Runtime on the CPU.

Two checks: each graph alone on its stored sample (max abs and scale-relative error per output,
integer outputs exactly), then the whole chain decoding greedily with a cache, whose tokens must equal
the PyTorch reference's. Error is measured relative to the reference output's largest magnitude,
because elementwise relative error is meaningless where the reference is near zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MllmEdgeError
from ..manifest import NO_IMAGE, Manifest
from ..parity import CHAIN_TOLERANCE, TOLERANCE, OutputCheck, compare, load_sample
from ..runtime.backends.onnxruntime import OnnxRuntimeEngine


@dataclass(frozen=True)
class ChainCheck:
    reference: list[int]  # PyTorch's greedy tokens
    onnx: list[int]  # ONNX Runtime's argmax at each step, fed the reference's tokens
    ties: list[int]  # steps whose reference top-two gap is within twice that step's measured error
    max_rel: float  # worst scale-relative logits error over the steps
    tolerance: float

    @property
    def ok(self) -> bool:
        """Logits within the chain tolerance at every step, and the same argmax except at a tie
        (a gap the measured error can close: only there may the two implementations disagree)."""
        same = all(a == b or step in self.ties for step, (a, b) in enumerate(zip(self.reference, self.onnx)))
        return same and self.max_rel <= self.tolerance


def session(path: Path) -> OnnxRuntimeEngine:
    """The runtime's ONNX Runtime engine on the CPU, unoptimised and without its memory arena: the
    graph is checked as written, and the CPU provider (no fp16 Gemm) would otherwise keep fp32
    copies of every fp16 weight; unoptimised, weights stay memory-mapped from the data files."""
    return OnnxRuntimeEngine(path, "cpu", low_memory=True)


def graph_tolerance(manifest: Manifest, graph: str) -> float:
    """The dtype's limit, or the quantized weights' for a quantized graph."""
    quantized = manifest.quantization and graph in manifest.quantization["graphs"]
    return TOLERANCE[manifest.weights if quantized else manifest.dtype]


def verify_graphs(folder: Path, manifest: Manifest) -> list[OutputCheck]:
    checks = []
    for name, spec in manifest.graphs.items():
        inputs, outputs = load_sample(folder / manifest.samples[name])
        results = session(folder / spec.file).run(inputs)  # the session closes before the next opens
        checks += [
            compare(name, out, results[out], ref, graph_tolerance(manifest, name))
            for out, ref in outputs.items()
        ]
    return checks


class OnnxChain:
    """The graphs joined with a plain numpy cache (concatenation): an independent check of the
    graphs' cache contract, simple on purpose. The runtime's zero-copy cache is a separate thing."""

    def __init__(self, folder: Path, manifest: Manifest, low_memory: bool = False):
        """low_memory: open each graph's session for one call and close it again, so only one graph's
        weights are mapped at a time (opening an unoptimised session is cheap: weights load lazily)."""
        self.manifest = manifest
        self.folder, self.low_memory = folder, low_memory
        self.sessions = (
            {}
            if low_memory
            else {name: session(folder / spec.file) for name, spec in manifest.graphs.items()}
        )
        self.split = manifest.pruning["split_layer"]
        self.num_layers = manifest.architecture["text"]["num_layers"]
        self.kept_patches = self.kept_image = None  # of the last generate(), when the bundle prunes

    def _empty_past(self, start: int, stop: int, batch: int) -> dict[str, np.ndarray]:
        spec = self.manifest.graphs["llm_tail"].input(f"past_key.{self.num_layers - 1}")
        shape = (1, batch, *spec.shape[2:])  # sequence-first: the null row alone
        return {
            f"past_{kind}.{i}": np.zeros(shape, spec.dtype)
            for i in range(start, stop)
            for kind in ("key", "value")
        }

    def _run_llm(self, name, hidden_name, hidden, positions, past, start, stop):
        feeds = {
            hidden_name: hidden,
            "position_ids": positions,
            **{k: past[k] for k in self._past_names(start, stop)},
        }
        values = self._run(name, feeds)
        for i in range(start, stop):
            for kind in ("key", "value"):
                past[f"past_{kind}.{i}"] = np.concatenate(
                    (past[f"past_{kind}.{i}"], values[f"new_{kind}.{i}"]), axis=0
                )
        return values

    def _run(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        engine = self.sessions.get(name) or session(self.folder / self.manifest.graphs[name].file)
        return engine.run(feeds)

    @staticmethod
    def _past_names(start, stop):
        return [f"past_{kind}.{i}" for i in range(start, stop) for kind in ("key", "value")]

    def generate(
        self, input_ids: np.ndarray, pixel_values: np.ndarray, steps: int, forced: np.ndarray | None = None
    ):
        """Greedy: -> token ids [B, steps] and logits [B, steps, V].

        With forced [B, steps], step t is fed forced[:, t - 1] instead of its own previous choice
        (teacher forcing), so a tie broken differently at one step does not derail the rest.
        """
        image_token = self.manifest.tokenizer["image_token_id"]
        vision = self._run("vision", {"pixel_values": pixel_values})
        image_embeds = vision["image_embeds"]
        self.kept_patches = vision.get("kept_patches")
        is_image = input_ids[0] == image_token
        start, num_full = int(np.argmax(is_image)), int(is_image.sum())
        run = np.full((input_ids.shape[0], image_embeds.shape[1]), image_token, input_ids.dtype)
        ids = np.concatenate((input_ids[:, :start], run, input_ids[:, start + num_full :]), axis=1)
        b, t = ids.shape
        hidden = self._run(
            "embed",
            {"input_ids": ids, "image_embeds": image_embeds, "image_start": np.array(start, np.int64)},
        )["inputs_embeds"]
        positions = np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy()
        past = self._empty_past(0, self.num_layers, b)
        if self.split:
            head = self._run_llm("llm_head", "inputs_embeds", hidden, positions, past, 0, self.split)
            pruned = self._run(
                "prune",
                {
                    "hidden_states": head["hidden_states"],
                    "last_row": head["last_row"],
                    "position_ids": positions,
                    "image_start": np.array(start, np.int64),
                },
            )
            hidden, positions, self.kept_image = (
                pruned["kept_hidden_states"],
                pruned["kept_position_ids"],
                pruned["kept_image"],
            )
        logits = self._run_llm(
            "llm_tail", "hidden_states", hidden, positions, past, self.split, self.num_layers
        )["logits"]
        tokens, all_logits = [], []
        no_image = np.zeros((b, 1, image_embeds.shape[2]), image_embeds.dtype)
        for step in range(steps):
            token = logits.argmax(axis=-1)
            tokens.append(token)
            all_logits.append(logits)
            if step + 1 == steps:
                break
            fed = token if forced is None else forced[:, step]
            hidden = self._run(
                "embed",
                {
                    "input_ids": fed[:, None].astype(np.int64),
                    "image_embeds": no_image,
                    "image_start": np.array(NO_IMAGE, np.int64),
                },
            )["inputs_embeds"]
            positions = np.full((b, 1), t + step, np.int64)
            if self.split:
                hidden = self._run_llm("llm_head", "inputs_embeds", hidden, positions, past, 0, self.split)[
                    "hidden_states"
                ]
            logits = self._run_llm(
                "llm_tail", "hidden_states", hidden, positions, past, self.split, self.num_layers
            )["logits"]
        return np.stack(tokens, axis=1), np.stack(all_logits, axis=1)


def verify_chain(folder: Path, manifest: Manifest) -> ChainCheck:
    """The graphs decode the sample with their cache, fed the reference's tokens (teacher forcing,
    so one tie broken the other way does not derail the steps after it)."""
    with np.load(folder / manifest.samples["chain"]) as chain:
        ref_tokens, ref_logits = chain["token_ids"], chain["step_logits"]
        tokens, logits = OnnxChain(folder, manifest, low_memory=True).generate(
            chain["input_ids"], chain["pixel_values"], ref_tokens.shape[1], ref_tokens
        )
    ref, got = ref_logits[0].astype(np.float64), logits[0].astype(np.float64)
    error = np.abs(got - ref).max(axis=-1)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    ties = np.flatnonzero(top2[:, 1] - top2[:, 0] <= 2 * error).tolist()
    rel = float((error / np.maximum(np.abs(ref).max(axis=-1), 1e-30)).max())
    return ChainCheck(
        ref_tokens[0].tolist(), tokens[0].tolist(), ties, rel, CHAIN_TOLERANCE[manifest.weights]
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
