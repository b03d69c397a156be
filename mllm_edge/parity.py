"""Graph outputs against reference outputs: the comparison export's verification and build's share.

Numpy only, so `mllm-edge build --verify` checks engines on a Jetson without torch. Error is
measured relative to the reference output's largest magnitude, because elementwise relative error
is meaningless where the reference is near zero; integer outputs must be equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Scale-relative tolerances: fp32 graphs must match to 1e-4; fp16 ones (two fp16 implementations
# rounding differently, reductions kept in fp32) to 2e-2 per graph, and 5e-2 over the decode chain,
# where the fp16 cache and residual stream carry each step's rounding into the next.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
CHAIN_TOLERANCE = {"float32": 1e-4, "float16": 5e-2}
# Quantized graphs (calibration/) against the float reference. Quantization
# error, not rounding, so these limits catch a broken graph (a wrong weight layout is off by ~100%
# of the scale) or a model the format ruins; they promise nothing about answers (`mllm-edge eval`
# measures those). Measured: the built-in model at most 1.8e-2 (int8) and 2.5e-1 (int4); the random
# test checkpoints, whose weights are far rougher than trained ones, up to 2.1e-1 (int8) and 1.2 (int4).
TOLERANCE.update({"int8": 0.3, "int4": 0.5, "int4-awq": 0.5, "fp8": 0.3})
CHAIN_TOLERANCE.update({"int8": 0.3, "int4": 0.5, "int4-awq": 0.5, "fp8": 0.3})
# TensorRT engines: fp32 ones may use TF32 matmuls (10-bit mantissa) unless told otherwise.
ENGINE_TOLERANCE = {"fp32": 5e-3, "fp16": 2e-2, "bf16": 5e-2}


@dataclass(frozen=True)
class OutputCheck:
    graph: str
    output: str
    max_abs: float
    rel: float  # max_abs / max |reference|; for integer outputs 0 when equal, 1 when not
    ok: bool
    tolerance: float = 0.0  # the limit rel was held to (0: integers, which must be equal)


def compare(graph: str, name: str, got: np.ndarray, ref: np.ndarray, tolerance: float) -> OutputCheck:
    if got.shape != ref.shape:
        return OutputCheck(graph, name, float("inf"), float("inf"), False, tolerance)
    if np.issubdtype(ref.dtype, np.integer):
        equal = bool(np.array_equal(got, ref))
        return OutputCheck(
            graph, name, 0.0 if equal else float(np.abs(got - ref).max()), 0.0 if equal else 1.0, equal
        )
    diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if got.size else 0.0
    scale = float(np.abs(ref.astype(np.float64)).max()) if ref.size else 0.0
    rel = diff / scale if scale > 0 else diff
    return OutputCheck(graph, name, diff, rel, rel <= tolerance, tolerance)


def load_sample(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A graph's saved sample: (inputs, reference outputs) by tensor name."""
    with np.load(path) as data:
        inputs = {k[3:]: data[k] for k in data.files if k.startswith("in.")}
        outputs = {k[4:]: data[k] for k in data.files if k.startswith("out.")}
    return inputs, outputs


def load_references(path: Path) -> dict[str, np.ndarray]:
    """What a sample keeps beside its inputs and outputs to judge a selection ('ref.*'; FasterVLM's
    vision graph: its [CLS] row and every patch projected). Older bundles have none."""
    with np.load(path) as data:
        return {k[4:]: data[k] for k in data.files if k.startswith("ref.")}


# Selections judged by the reference's score gap at the cut (a graph's own TopK over fp16 or TF32
# scores may order near-tied scores differently from PyTorch's), then everything downstream checked
# against the reference fed the graph's own selection.


def tie_gap(scores: np.ndarray, reference: np.ndarray, got: np.ndarray) -> float | None:
    """scores [B, N], kept indices [B, k] -> the largest score gap (relative to the scores' largest
    magnitude) between an index only the reference kept and one only `got` kept: 0 where the sets are
    equal, None where `got` is no valid selection (not ascending, repeated, out of range, other count)."""
    if got.shape != reference.shape or got.size and (got.min() < 0 or got.max() >= scores.shape[1]):
        return None
    if (np.diff(got, axis=1) <= 0).any():
        return None
    worst, scale = 0.0, float(np.abs(scores).max()) or 1.0
    for row, ref, mine in zip(scores.astype(np.float64), reference, got):
        only_ref, only_mine = np.setdiff1d(ref, mine), np.setdiff1d(mine, ref)
        if only_ref.size:
            worst = max(worst, float(row[only_ref].max() - row[only_mine].min()) / scale)
    return worst


def _on_own_selection(graph: str, got: dict, inputs: dict, outputs: dict, refs: dict):
    """(selection output, reference scores, downstream outputs recomputed on got's selection) or None."""
    if graph == "vision" and "cls_row" in refs and "kept_patches" in got:
        kept = got["kept_patches"]
        if (
            kept.shape != outputs["kept_patches"].shape
            or kept.min() < 0
            or kept.max() >= refs["cls_row"].shape[1]
        ):
            return None  # no valid selection: judged exactly
        embeds = np.take_along_axis(refs["all_image_embeds"], kept[..., None], axis=1)
        return "kept_patches", refs["cls_row"], {"image_embeds": embeds}
    if graph == "prune":
        n = span_length(inputs, outputs)
        kept = got["kept_image"]
        if kept.shape != outputs["kept_image"].shape or kept.min() < 0 or kept.max() >= n:
            return None
        return "kept_image", fastv_scores(inputs, n), fastv_gather(inputs, kept, n)
    return None


def span_length(inputs: dict, outputs: dict) -> int:
    """The image tokens a prune graph's call ranked: the tokens it dropped plus those it kept."""
    keep = outputs["kept_image"].shape[1]
    return inputs["hidden_states"].shape[1] - outputs["kept_hidden_states"].shape[1] + keep


def image_start(inputs: dict) -> int:
    """Where the image span starts, from the prune graph's inputs: LLaVA-1.5's take image_start,
    LLaVA-NeXT's the span's positions (one run)."""
    if "image_start" in inputs:
        return int(inputs["image_start"])
    return int(inputs["image_positions"][0])


def fastv_scores(inputs: dict, num_image: int) -> np.ndarray:
    """The prune graph's inputs -> the scores FastV ranks: the last token's row over the image span."""
    start = image_start(inputs)
    return inputs["last_row"][:, start : start + num_image]


def is_tie(scores: np.ndarray, reference: np.ndarray, got: np.ndarray, tolerance: float) -> bool:
    """A selection other than the reference's that only a tie at the cut (within tolerance) separates."""
    gap = tie_gap(scores, reference, got)
    return gap is not None and gap <= tolerance and not np.array_equal(reference, got)


def fastv_gather(inputs: dict, kept_image: np.ndarray, num_image: int) -> dict:
    """The prune graph's outputs for a given selection, from its inputs: every text token and the kept
    image tokens, in order, with their original positions (pruning.fastv_select's rule)."""
    hidden, start = inputs["hidden_states"], image_start(inputs)
    text = np.arange(hidden.shape[1])
    positions = np.stack(
        [np.concatenate((text[:start], start + row, text[start + num_image :])) for row in kept_image]
    )
    return {
        "kept_hidden_states": np.take_along_axis(hidden, positions[..., None], axis=1),
        "kept_position_ids": np.take_along_axis(inputs["position_ids"], positions, axis=1),
        "kept_image": kept_image,
    }


def compare_graph(
    graph: str, got: dict, inputs: dict, outputs: dict, refs: dict, tolerance: float
) -> list[OutputCheck]:
    """Every reference output against the graph's; a selection that differs only by a tie at the cut
    (within `tolerance` of the scores' scale) passes, and what follows from it is then checked
    against the reference on the graph's own selection."""
    checks = [compare(graph, name, got[name], ref, tolerance) for name, ref in outputs.items()]
    judged = _on_own_selection(graph, got, inputs, outputs, refs)
    if judged is None:
        return checks
    selection, scores, downstream = judged
    if next(c for c in checks if c.output == selection).ok:
        return checks
    gap = tie_gap(scores, outputs[selection], got[selection])
    if gap is None or gap > tolerance:
        return checks
    fixed = {name: compare(graph, name, got[name], ref, tolerance) for name, ref in downstream.items()}
    fixed[selection] = OutputCheck(graph, selection, 0.0, gap, True, tolerance)  # a tie: rel is its gap
    return [fixed.get(c.output, c) for c in checks]
