"""The onnxruntime target: weight-only int8 / int4 as ONNX Runtime's MatMulNBits (what `export
--quantize` made), for CPUs.

A decode step reads every LLM weight once, so on a CPU its time is the time to stream the weights;
storing them in 8 or 4 bits is what makes decoding faster. ONNX Runtime's own quantizer does the work:
each weight MatMul becomes a `MatMulNBits` node (com.microsoft domain) holding the weight in blocks of
32 along the input dimension, one fp32 scale per block, symmetric, rounded to nearest (no calibration
data). `accuracy_level=4` lets the CPU kernel quantize the activations to int8 on the fly and multiply
in integers (without it the kernel dequantizes every block to fp32 on every call: an int8 decode step
of an 85 M Llama took 74 ms against fp32's 12, measured once). A contrib op: TensorRT cannot parse it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import onnx

from ..errors import MllmEdgeError
from .precisions import Precision
from .rewrite import gemms_to_matmuls, load_weights, save_graph

BITS = {"int8": 8, "int4": 4}
ACCURACY_LEVEL = 4  # int8 activations in the CPU kernel: see the module docstring


def check_dtype(precision: Precision, dtype: str) -> None:
    if dtype != "float32":
        raise MllmEdgeError(
            f"--target onnxruntime {precision.name} needs an fp32 bundle: ONNX Runtime's CPU kernel multiplies the "
            f"int{BITS[precision.name]} weights with fp32 activations (export with --dtype fp32)"
        )


def quantize_graph(
    source: Path, dest: Path, name: str, precision: Precision, select: Callable[[str], bool]
) -> dict:
    """source/name.onnx quantized into dest/name.onnx (+ its data file); returns the manifest's entry."""
    import onnxruntime

    model = onnx.load(str(source / f"{name}.onnx"), load_external_data=False)
    rewritten = gemms_to_matmuls(model, source, select)
    if not rewritten:
        raise MllmEdgeError(f"the {name} graph has no weight matrix to quantize")
    load_weights(model, source)  # the small rest: norms, biases, constants, excluded weights
    try:
        quantizer = _quantizer_class()(
            model,
            bits=BITS[precision.name],
            block_size=precision.block_size,
            is_symmetric=True,
            accuracy_level=ACCURACY_LEVEL,
        )
        quantizer.process()
    except Exception as e:  # its own many kinds; the version is what a user can act on
        raise MllmEdgeError(
            f"ONNX Runtime {onnxruntime.__version__}'s quantizer failed on the {name} graph (tested with 1.31, 1.32): {e}"
        ) from e
    save_graph(quantizer.model.model, dest, name)  # the same proto, changed in place
    return {
        "weights": sorted(set(rewritten.values())),
        "bits": BITS[precision.name],
        "symmetric": True,
        "accuracy_level": ACCURACY_LEVEL,
        "library": f"onnxruntime {onnxruntime.__version__}",
    }


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
