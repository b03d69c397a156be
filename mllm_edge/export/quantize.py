"""Weight-only int8 / int4 LLM graphs for ONNX Runtime (`mllm-edge export --quantize`).

A decode step reads every LLM weight once, so on a CPU its time is the time to stream the weights;
storing them in 8 or 4 bits is what makes decoding faster. ONNX Runtime's own quantizer does the work:
each weight MatMul becomes a `MatMulNBits` node (com.microsoft domain) holding the weight in blocks of
32 along the input dimension, one fp32 scale per block, symmetric. `accuracy_level=4` lets the CPU
kernel quantize the activations to int8 on the fly and multiply in integers (without it the kernel
dequantizes every block to fp32 on every call: an int8 decode step of an 85 M Llama took 74 ms
against fp32's 12, measured once).

Only the LLM graphs are quantized: the vision tower runs once per image, so its weights do not bound
decoding, and the embedding table is a lookup that reads one row per token. The quantized graphs hold
a contrib op, so the bundle runs in ONNX Runtime only; TensorRT quantization goes through Q/DQ
graphs (NVIDIA Model Optimizer), a different format.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

from ..errors import MllmEdgeError
from .onnx_graph import ALIGN

BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32  # weights per scale, along the input dimension
ACCURACY_LEVEL = 4  # int8 activations in the CPU kernel: see the module docstring


def quantization_entry(name: str | None, graphs: list[str]) -> dict | None:
    """The manifest's record of how the bundle's weights were quantized, in which graphs (None: not quantized)."""
    if name is None:
        return None
    return {
        "weights": name,
        "format": "onnxruntime MatMulNBits",
        "bits": BITS[name],
        "block_size": BLOCK_SIZE,
        "symmetric": True,
        "accuracy_level": ACCURACY_LEVEL,
        "graphs": graphs,
        "backends": ["onnxruntime"],
    }


def check_quantize(name: str | None, dtype: str) -> None:
    if name is None:
        return
    if name not in BITS:
        raise MllmEdgeError(f"unknown --quantize '{name}' (choose from {', '.join(BITS)})")
    if dtype != "fp32":
        raise MllmEdgeError(
            f"--quantize {name} needs --dtype fp32: the int{BITS[name]} weights are multiplied with fp32 activations by ONNX Runtime's CPU kernel"
        )


def gemms_to_matmuls(model: onnx.ModelProto, folder: Path | None = None) -> int:
    """Rewrite Gemm(A, W, [C], transB=1) with an initializer W [N, K] as MatMul(A, W^T) [+ C].

    Our Linear layers export as Gemm over the weight as stored (see models/layers.py), and ONNX
    Runtime's quantizer only takes MatMul. A weight stored as external data (in `folder`) is read
    from its file straight into its transpose. Returns the number of nodes rewritten.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    nodes, transposed, rewritten = [], {}, 0  # transposed: weight name -> its transpose's
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (
            attrs.get("transA", 0) == 0
            and attrs.get("transB", 0) == 1
            and attrs.get("alpha", 1.0) == 1.0
            and attrs.get("beta", 1.0) == 1.0
        )
        if node.op_type != "Gemm" or not plain or node.input[1] not in inits:
            nodes.append(node)
            continue
        name = node.input[1]
        if name not in transposed:
            weight = inits[name]
            tensor = numpy_helper.from_array(np.ascontiguousarray(_array(weight, folder).T), f"{name}.T")
            if uses[name] == 1:  # in place of a reference to external data: nothing else held
                weight.CopyFrom(tensor)
            else:
                graph.initializer.append(tensor)
            transposed[name] = tensor.name
        has_bias = len(node.input) > 2 and node.input[2] != ""
        base = node.name or node.output[0]  # node names must be unique, and may be empty
        product = f"{node.output[0]}.matmul" if has_bias else node.output[0]
        nodes.append(
            helper.make_node("MatMul", [node.input[0], transposed[name]], [product], name=f"{base}.matmul")
        )
        if has_bias:
            nodes.append(
                helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{base}.bias")
            )
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    if any(t.name not in used for t in graph.initializer):  # originals a shared weight left behind
        kept = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return rewritten


def quantize_graph(folder: Path, name: str, weights: str) -> None:
    """Quantize folder/name.onnx in place (its data file rewritten).

    Memory: the graph's weights are read from the data file once each, straight into their
    transposes (protobuf keeps a message's bytes until the whole model is freed, so a tensor loaded
    and then replaced would stay resident twice); ONNX Runtime's quantizer then adds the quantized
    weights beside them.
    """
    import onnx_ir
    import onnxruntime

    path = folder / f"{name}.onnx"
    model = onnx.load(str(path), load_external_data=False)
    if gemms_to_matmuls(model, folder) == 0:
        raise MllmEdgeError(f"the {name} graph has no weight matrix to quantize")
    for tensor in model.graph.initializer:  # the small rest: norms, biases, constants
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(folder))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    try:
        quantizer = _quantizer_class()(
            model, bits=BITS[weights], block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL
        )
        quantizer.process()
    except Exception as e:  # its own many kinds; the version is what a user can act on
        raise MllmEdgeError(
            f"ONNX Runtime {onnxruntime.__version__}'s quantizer failed on the {name} graph (tested with 1.31): {e}"
        ) from e
    model = quantizer.model.model  # the same proto, changed in place by the default algorithm
    (folder / f"{name}.onnx.data").unlink(
        missing_ok=True
    )  # quantized before weights are shared: only its own
    # every tensor page-aligned, as onnx_graph's data files are, so runtimes can map them
    onnx_ir.save(
        onnx_ir.from_proto(model), path, external_data=f"{name}.onnx.data", alignment=ALIGN, align_threshold=0
    )


def _array(tensor: onnx.TensorProto, folder: Path | None) -> np.ndarray:
    """A weight's values, mapped from its external data file when it has one (no copy until used)."""
    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.memmap(
        folder / info["location"],
        dtype=dtype,
        mode="r",
        offset=int(info.get("offset", 0)),
        shape=tuple(tensor.dims),
    )


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
