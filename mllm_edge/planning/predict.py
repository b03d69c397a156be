"""What a setting (pruning and precision) of a model needs and gives on a device.

Memory, against what the device gives one process:
  weights      every graph's bytes (costs.py): vision tower and projector, embedding table, LLM
               layers in the precision, LM head
  kv_cache     the runtime's preallocated cache: every layer, max context positions
  activations  the largest prefill's live tensors at max context (one layer's input, output, q/k/v
               and MLP rows; the logits row), what the engines' profiles reserve for
  overhead     the process around them (the device's figure: CUDA context and TensorRT's kernels
               on a GPU, ONNX Runtime and Python on the CPU)
Times, from a roofline with fitted efficiencies (efficiency.json, benchmarks/plan_fit.py):
  vision_ms    tower FLOPs / (the float type's dense peak x vision efficiency) + a fixed overhead
  prefill_ms   max(LLM FLOPs / (peak x compute efficiency), weight bytes / (bandwidth x bandwidth
               efficiency)) + a per-layer overhead
  decode       bytes a step reads / (bandwidth x bandwidth efficiency) + the per-layer overhead
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import MllmEdgeError
from ..pruning.params import keep_count
from . import costs
from .devices import Device

GB = 1e9
WEIGHT_ONLY = {"int4-awq"}  # weights dequantized to fp16 before the product: fp16 compute
EFFICIENCY = Path(__file__).with_name("efficiency.json")


@dataclass(frozen=True)
class Setting:
    method: str  # none | fastv | fastervlm
    ratio: float
    precision: str
    k: int = 2  # FastV's layer
    merge: str = "spatial"  # LLaVA-NeXT: how FasterVLM's kept tokens of the views enter (pruning.MERGES)


@dataclass
class Prediction:
    setting: dict
    fits: bool
    memory_gb: dict
    vision_ms: float
    prefill_ms: float
    ttft_ms: float
    decode_tokens_per_s: float
    image_tokens: dict = field(default_factory=dict)  # vision (leaving the tower), llm (after FastV)

    def to_dict(self) -> dict:
        return asdict(self)


UNFITTED = {  # rates as measured, no overheads: what the CPU gets before plan_vs_bench.py has fitted it
    "bandwidth": {"fp32": 1.0},
    "compute": {"fp32": 1.0},
    "vision_compute": 1.0,
    "vision_overhead_ms": 0.0,
    "layer_overhead_ms": 0.0,
    "prefill_layer_overhead_ms": 0.0,
}


@lru_cache(maxsize=None)
def efficiency(kind: str = "gpu") -> dict:
    """The fitted factors of a kind of device ("gpu": benchmarks/plan_fit.py, "cpu":
    benchmarks/plan_vs_bench.py)."""
    return json.loads(EFFICIENCY.read_text()).get(kind, UNFITTED)


def has_factors(device: Device, precision: str) -> bool:
    """Whether efficiency.json has the device kind's factors for the precision's bytes and products."""
    eff = efficiency(device.kind)
    return precision in eff["bandwidth"] and _compute(precision) in eff["compute"]


def keep_counts(model: costs.Model, setting: Setting) -> tuple[int, int]:
    from ..pruning.params import PruningConfig

    if setting.method == "none":
        return model.image_tokens, model.image_tokens
    merge = setting.merge if setting.method == "fastervlm" else "spatial"
    config = PruningConfig.from_method(setting.method, setting.ratio, k=setting.k, merge=merge)
    if merge == "unpad" and model.grids:  # the most any picture puts in, as export sizes the bundle
        return max(
            (
                config.keep_counts(model.image_tokens, (views, model.view_patches), rows)
                for views, rows in model.grids
            ),
            key=lambda counts: counts[0],
        )
    views = (model.views, model.view_patches) if model.views > 1 else None
    return config.keep_counts(model.image_tokens, views)


def predict(
    model: costs.Model,
    device: Device,
    setting: Setting,
    max_context: int,
    text_tokens: int = 64,
    decode_context: int | None = None,
) -> Prediction:
    """text_tokens: the prompt's text beside the image (TTFT's prompt); decode_context: the
    positions a decode step sees (default: the prompt plus 64 generated tokens)."""
    float_type = device.float_type
    precision = setting.precision
    if precision not in costs.PRECISIONS + costs.CPU_PRECISIONS:
        raise MllmEdgeError(f"unknown precision '{precision}' (choose from {', '.join(device.precisions)})")
    if device.min_sm_for(precision) is not None:
        raise MllmEdgeError(device.min_sm_for(precision))
    if not has_factors(device, precision):
        raise MllmEdgeError(
            f"no efficiency factors fitted for {precision} on a {device.kind} (efficiency.json)"
        )
    if setting.method == "fastervlm" and not model.vision_has_cls:
        raise MllmEdgeError("FasterVLM ranks by the [CLS] token's attention: this vision tower has none")
    vision_keep, llm_keep = keep_counts(model, setting)
    k = setting.k if setting.method == "fastv" else 0
    prompt = text_tokens + vision_keep
    if prompt + 1 > max_context:
        raise MllmEdgeError(f"the prompt ({prompt} tokens) does not fit the max context {max_context}")
    t = model.text
    f = costs.FLOAT_BYTES[float_type]

    llm = costs.llm_bytes(model, precision, float_type)
    weights = costs.vision_params(model) * f + llm["layers"] + llm["embed"] + llm["lm_head"]
    kv = costs.kv_bytes(model, max_context, 0, 0, float_type)  # preallocated for every layer
    rows = (
        2 * t["hidden_size"]
        + (t["num_heads"] + 2 * t["num_kv_heads"]) * t["head_dim"]
        + 3 * t["intermediate_size"]
    )
    v = model.vision
    vision_rows = model.views * (model.view_patches + 1) * (4 * v["hidden_size"] + 2 * v["intermediate_size"])
    activations = f * (max(max_context * rows, vision_rows) + t["vocab_size"])
    total = weights + kv + activations + device.overhead_gb * GB
    memory = {
        "weights": weights / GB,
        "kv_cache": kv / GB,
        "activations": activations / GB,
        "overhead": device.overhead_gb,
        "total": total / GB,
        "available": device.available_gb,
    }

    eff = efficiency(device.kind)
    peak = device.peak_flops(precision) * eff["compute"][_compute(precision)]
    vision_peak = device.peak_flops(float_type) * eff["vision_compute"]
    bandwidth = device.bandwidth_gb_s * GB * eff["bandwidth"][precision]
    layers = t["num_layers"]

    if setting.method != "fastervlm":
        projected = model.views * model.view_patches
    elif model.views > 1:  # each view's kept patches: the unpad merge's newline tokens are not projected
        projected = model.views * keep_count(model.view_patches, setting.ratio)
    else:
        projected = vision_keep
    vision_s = costs.vision_flops(model, projected) / vision_peak + eff["vision_overhead_ms"] / 1000
    prefill_compute = costs.prefill_flops(model, text_tokens, vision_keep, llm_keep, k) / peak
    prefill_memory = (llm["layers"] + (llm["lm_head"] or llm["embed"])) / bandwidth
    prefill_s = max(prefill_compute, prefill_memory) + layers * eff["prefill_layer_overhead_ms"] / 1000
    context = decode_context or prompt + 64
    pruned = vision_keep - llm_keep
    step_s = (
        costs.decode_bytes(model, precision, float_type, context, pruned, k) / bandwidth
        + layers * eff["layer_overhead_ms"] / 1000
    )
    return Prediction(
        setting={
            "method": setting.method,
            "ratio": setting.ratio,
            "k": k or None,
            "precision": precision,
            **({"merge": setting.merge} if setting.method == "fastervlm" and model.views > 1 else {}),
        },
        fits=total / GB <= device.available_gb,
        memory_gb={key: round(value, 3) for key, value in memory.items()},
        vision_ms=round(vision_s * 1000, 3),
        prefill_ms=round(prefill_s * 1000, 3),
        ttft_ms=round((vision_s + prefill_s) * 1000, 3),
        decode_tokens_per_s=round(1.0 / step_s, 2),
        image_tokens={"vision": vision_keep, "llm": llm_keep},
    )


def _compute(precision: str) -> str:
    """The arithmetic a precision's products run in: weight-only int4 computes in fp16."""
    return "fp16" if precision in WEIGHT_ONLY else precision
