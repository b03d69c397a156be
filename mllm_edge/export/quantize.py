"""Weight-only int8 / int4 LLM graphs for ONNX Runtime (`mllm-edge export --quantize`).

A decode step reads every LLM weight once, so on a CPU its time is the time to stream the weights;
storing them in 8 or 4 bits is what makes decoding faster. ONNX Runtime's own quantizer does the work:
each weight MatMul becomes a `MatMulNBits` node (com.microsoft domain) holding the weight in blocks of
32 along the input dimension, one fp32 scale per block, symmetric. `accuracy_level=4` lets the CPU
kernel quantize the activations to int8 on the fly and multiply in integers (without it the kernel
dequantizes every block to fp32 on every call: an int8 graph was 6x slower than fp32, measured).

Only the LLM graphs are quantized: the vision tower runs once per image, so its weights do not bound
decoding, and the embedding table is a lookup that reads one row per token. The quantized graphs hold
a contrib op, so the bundle runs in ONNX Runtime only; TensorRT quantization goes through Q/DQ
graphs (NVIDIA Model Optimizer), a different format.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import MllmEdgeError

BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32  # weights per scale, along the input dimension
ACCURACY_LEVEL = 4  # int8 activations in the CPU kernel: see the module docstring
QUANTIZED_GRAPHS = ("llm_head", "llm_tail")


def quantization_entry(name: str | None, graphs: list[str]) -> dict | None:
    """The manifest's record of how the bundle's weights were quantized (None: not quantized)."""
    if name is None:
        return None
    return {
        "weights": name,
        "format": "onnxruntime MatMulNBits",
        "bits": BITS[name],
        "block_size": BLOCK_SIZE,
        "symmetric": True,
        "accuracy_level": ACCURACY_LEVEL,
        "graphs": [g for g in graphs if g in QUANTIZED_GRAPHS],
        "backends": ["onnxruntime"],
    }


def check_quantize(name: str | None, dtype: str) -> None:
    if name is None:
        return
    if name not in BITS:
        raise MllmEdgeError(f"unknown --quantize '{name}' (choose from {', '.join(BITS)})")
    if dtype != "fp32":
        raise MllmEdgeError(f"--quantize {name} needs --dtype fp32: the int{BITS[name]} weights are multiplied with fp32 activations by ONNX Runtime's CPU kernel")


def gemms_to_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite Gemm(A, W, [C], transB=1) with an initializer W [N, K] as MatMul(A, W^T) [+ C].

    Our Linear layers export as Gemm over the weight as stored (see models/layers.py), and ONNX
    Runtime's quantizer only takes MatMul. Returns the number of nodes rewritten.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes, transposed, rewritten = [], {}, 0  # transposed: weight name -> its transpose's
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("transA", 0) == 0 and attrs.get("transB", 0) == 1 and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        if node.op_type != "Gemm" or not plain or node.input[1] not in inits:
            nodes.append(node)
            continue
        name = node.input[1]
        if name not in transposed:
            weight = inits[name]
            tensor = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weight).T), f"{name}.T")
            if uses[name] == 1:  # in place: one matrix at a time in memory twice, not the whole model
                weight.CopyFrom(tensor)
            else:
                graph.initializer.append(tensor)
            transposed[name] = tensor.name
        has_bias = len(node.input) > 2 and node.input[2] != ""
        base = node.name or node.output[0]  # node names must be unique, and may be empty
        product = f"{node.output[0]}.matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], transposed[name]], [product], name=f"{base}.matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{base}.bias"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    if any(t.name not in used for t in graph.initializer):  # originals a shared weight left behind
        kept = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return rewritten


def quantize_graph(folder: Path, name: str, weights: str) -> int:
    """Quantize folder/name.onnx in place (its data file rewritten); returns the MatMuls quantized."""
    import onnx_ir

    path = folder / f"{name}.onnx"
    model = onnx.load(str(path))  # weights in memory: one graph at a time, after the torch model is gone
    if gemms_to_matmuls(model) == 0:
        raise MllmEdgeError(f"the {name} graph has no weight matrix to quantize")
    quantizer = _quantizer_class()(model, bits=BITS[weights], block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL)
    quantizer.process()
    quantized = quantizer.model.model
    count = sum(node.op_type == "MatMulNBits" for node in quantized.graph.node)
    del model, quantizer
    (folder / f"{name}.onnx.data").unlink(missing_ok=True)  # quantized before weights are shared: only its own
    # tensors of 1 MB and more page-aligned, so runtimes can map them
    onnx_ir.save(onnx_ir.from_proto(quantized), path, external_data=f"{name}.onnx.data", alignment=4096)
    return count



def _quantizer_class():
    """ONNX Runtime's MatMulNBitsQuantizer, imported without its side effect: the module calls
    logging.basicConfig(level=INFO) on import, which would make every library's INFO lines print."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return MatMulNBitsQuantizer
