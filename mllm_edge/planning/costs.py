"""Bytes and FLOPs of a LLaVA model's parts, counted from its architecture alone.

The architecture is the manifest's `architecture` dict (what export writes: `vision`, `text`,
`num_image_tokens`), or the same made from a checkpoint's config.json. Counts, not estimates: every
weight matrix, norm and table the graphs hold, and the multiply-adds (2 FLOPs each) of every matrix
product the graphs run. No torch; LLaVA-NeXT's geometry comes from runtime/anyres.py (numpy).

Precisions are of the LLM's weight matrices (what `calibrate` quantizes); the embedding table, the
norms and the vision tower stay in the float type, and so do the KV cache and the activations. The
LM head stays in the float type on the tensorrt target (calibrate leaves it out there) and is
quantized with the layers on the onnxruntime target (the CPU's: `export --quantize`, MatMulNBits).
"""

from __future__ import annotations

from dataclasses import dataclass

FLOAT_BYTES = {"fp32": 4, "fp16": 2}
INT4_BLOCK = 128  # calibrate's int4-awq block: one fp16 scale per 128 weights of a column
PRECISIONS = ("fp32", "fp16", "fp8", "int8", "int4-awq")  # the tensorrt target's (GPUs)
CPU_PRECISIONS = ("fp32", "int8", "int4")  # the onnxruntime target's (the CPU): fp32 and MatMulNBits
NBITS = {"int8": 8, "int4": 4}
NBITS_BLOCK = 32  # MatMulNBits' block (calibration/precisions.py): one scale per 32 weights of a column


@dataclass(frozen=True)
class Model:
    """The numbers plan needs. text: hidden_size, intermediate_size, num_layers, num_heads,
    num_kv_heads, head_dim, vocab_size, tie_word_embeddings; vision: image_size, patch_size,
    hidden_size, intermediate_size, num_layers (those that run), has_cls."""

    text: dict
    vision: dict
    image_tokens: int  # entering the LLM unpruned, per image (LLaVA-NeXT: the most a picture gives)
    vision_has_cls: bool
    views: int = 1  # tower runs per image at most (LLaVA-NeXT: the base view and the tiles)
    # LLaVA-NeXT: (views, newline tokens) of a picture of each pinpoint's own shape (nothing unpadded)
    grids: tuple[tuple[int, int], ...] = ()

    @property
    def view_patches(self) -> int:
        return (self.vision["image_size"] // self.vision["patch_size"]) ** 2

    @classmethod
    def from_architecture(cls, architecture: dict) -> Model:
        vision = architecture["vision"]
        grids = ()
        if architecture.get("image_grid_pinpoints") and int(architecture.get("max_views", 1)) > 1:
            from ..runtime.anyres import AnyRes  # the one definition of LLaVA-NeXT's geometry

            anyres = AnyRes.from_config(
                architecture["image_grid_pinpoints"], vision["image_size"], vision["patch_size"]
            )
            grids = tuple((anyres.view_count(h, w), anyres.packed_grid(h, w)[0]) for h, w in anyres.pinpoints)
        return cls(
            text=architecture["text"],
            vision=vision,
            image_tokens=int(
                architecture.get("num_image_tokens") or (vision["image_size"] // vision["patch_size"]) ** 2
            ),
            vision_has_cls=vision.get("has_cls", vision["arch"].startswith("clip")),  # SigLIP has no [CLS]
            views=int(architecture.get("max_views", 1)),
            grids=grids,
        )


def weight_bytes(columns: int, rows: int, precision: str, float_type: str, target: str = "tensorrt") -> int:
    """A [rows, columns] weight matrix (rows = its input dimension K) stored in `precision`, with the
    scales calibrate writes: on the tensorrt target per output column for int8 and fp8, per block of
    128 rows for int4-awq; on the onnxruntime target (MatMulNBits, symmetric: no zero points) the
    rows packed in blocks of 32, the last one padded, and a scale per block."""
    scale = FLOAT_BYTES[float_type]
    if precision in FLOAT_BYTES:
        return columns * rows * FLOAT_BYTES[precision]
    if target == "onnxruntime":
        blocks = -(-rows // NBITS_BLOCK)
        return columns * blocks * (NBITS_BLOCK * NBITS[precision] // 8 + scale)
    if precision in ("int8", "fp8"):
        return columns * rows + columns * scale
    if precision == "int4-awq":
        return columns * rows // 2 + -(-rows // INT4_BLOCK) * columns * scale
    raise ValueError(f"unknown precision {precision}")


def layer_matrices(text: dict) -> list[tuple[int, int]]:
    """(input K, output N) of each weight matrix of one decoder layer: q, k, v, o, gate, up, down."""
    d, m, hd = text["hidden_size"], text["intermediate_size"], text["head_dim"]
    q, kv = text["num_heads"] * hd, text["num_kv_heads"] * hd
    return [(d, q), (d, kv), (d, kv), (q, d), (d, m), (d, m), (m, d)]


def layer_biases(text: dict) -> int:
    """Bias values of one decoder layer, where the config has them (Qwen2: q, k, v)."""
    (_, q), (_, kv), _, (_, o), (_, m), _, (_, down) = layer_matrices(text)
    attention = (q + 2 * kv) if text.get("attention_bias") else 0
    output = o if text.get("o_proj_bias", text.get("attention_bias")) else 0
    mlp = (2 * m + down) if text.get("mlp_bias") else 0
    return attention + output + mlp


def layer_params(text: dict) -> int:
    return sum(k * n for k, n in layer_matrices(text))


def target_of(float_type: str) -> str:
    """The calibrate target planned for a float type: the CPU's bundles are fp32 (onnxruntime)."""
    return "onnxruntime" if float_type == "fp32" else "tensorrt"


def llm_bytes(model: Model, precision: str, float_type: str) -> dict[str, int]:
    """The language model's bytes: its layers (matrices in `precision`, two norms each in the float
    type), the final norm, the embedding table and the LM head (none when tied to the table and kept
    in the float type; quantized on the onnxruntime target, a copy of its own)."""
    t, f = model.text, FLOAT_BYTES[float_type]
    target = target_of(float_type)
    per_layer = sum(weight_bytes(n, k, precision, float_type, target) for k, n in layer_matrices(t))
    per_layer += layer_biases(t) * f
    table = t["vocab_size"] * t["hidden_size"] * f
    if target == "onnxruntime" and precision in NBITS:
        head = weight_bytes(t["vocab_size"], t["hidden_size"], precision, float_type, target)
    else:
        head = 0 if t["tie_word_embeddings"] else table
    return {
        "layers": t["num_layers"] * (per_layer + 2 * t["hidden_size"] * f) + t["hidden_size"] * f,
        "embed": table,
        "lm_head": head,
    }


def vision_params(model: Model) -> int:
    """The tower's layers that run (attention and MLP with biases, two norms each), patch and
    position embeddings, and the two-layer projector."""
    v, d = model.vision, model.text["hidden_size"]
    h, i = v["hidden_size"], v["intermediate_size"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    per_layer = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h
    embeddings = (
        3 * v["patch_size"] ** 2 * h + (patches + model.vision_has_cls) * h + model.vision_has_cls * h
    )
    projector = h * d + d + d * d + d
    newline = d if model.views > 1 else 0  # LLaVA-NeXT's image_newline, after each row of the tile grid
    return v["num_layers"] * per_layer + embeddings + 2 * h + projector + newline


def vision_flops(model: Model, projected: int) -> float:
    """One image through the tower (every patch and [CLS] of each of its views) and the projector
    (the `projected` tokens: every patch of every view, or FasterVLM's kept ones)."""
    v, d = model.vision, model.text["hidden_size"]
    h, i = v["hidden_size"], v["intermediate_size"]
    tokens = model.view_patches + model.vision_has_cls
    patch = 2 * model.view_patches * 3 * v["patch_size"] ** 2 * h
    tower = model.views * (patch + v["num_layers"] * encoder_layer_flops(tokens, h, i))
    return tower + 2 * projected * (h * d + d * d)


def encoder_layer_flops(tokens: int, hidden: int, intermediate: int) -> float:
    """One ViT layer: q, k, v, o and a two-matrix MLP over every token, full attention."""
    return 2 * tokens * (4 * hidden * hidden + 2 * hidden * intermediate) + 4 * tokens * tokens * hidden


def llm_layer_flops(text: dict, n: int, past: int = 0) -> float:
    """One decoder layer over n new tokens attending to past + n positions (the full square, as the
    attention kernels compute it unless they skip masked blocks)."""
    attention = 2 * 2 * n * (past + n) * text["num_heads"] * text["head_dim"]
    return 2 * n * layer_params(text) + attention


def prefill_flops(model: Model, text_tokens: int, vision_keep: int, llm_keep: int, k: int) -> float:
    """The LLM's prefill: layers below FastV's K over the text and the image tokens leaving the
    vision tower, the rest over the text and FastV's kept ones; the LM head on the last token."""
    t = model.text
    head = k * llm_layer_flops(t, text_tokens + vision_keep)
    tail = (t["num_layers"] - k) * llm_layer_flops(t, text_tokens + llm_keep)
    return head + tail + 2 * t["vocab_size"] * t["hidden_size"]


def kv_bytes(model: Model, positions: int, pruned: int, k: int, float_type: str) -> int:
    """Keys and values at `positions` (layers from FastV's K hold `pruned` fewer)."""
    t = model.text
    per_position = 2 * t["num_kv_heads"] * t["head_dim"] * FLOAT_BYTES[float_type]
    return per_position * (k * positions + (t["num_layers"] - k) * (positions - pruned))


def decode_bytes(model: Model, precision: str, float_type: str, context: int, pruned: int, k: int) -> int:
    """What one decode step reads at least: every layer's weights, the final norm, the LM head (the
    table when tied), one embedding row, and the KV cache at `context` positions."""
    parts = llm_bytes(model, precision, float_type)
    head = parts["lm_head"] or parts["embed"]
    row = model.text["hidden_size"] * FLOAT_BYTES[float_type]
    return parts["layers"] + head + row + kv_bytes(model, context, pruned, k, float_type)


def decode_flops(model: Model, context: int) -> float:
    t = model.text
    return t["num_layers"] * llm_layer_flops(t, 1, context - 1) + 2 * t["vocab_size"] * t["hidden_size"]
