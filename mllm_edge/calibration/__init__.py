"""`mllm-edge calibrate`: a bundle's LLM (and optionally vision) graphs in int4-awq, int8 or fp8.

precisions.py  what each precision is, per target: library method, activations, requirements, limits
data.py        the samples: a JSONL dataset or synthetic scenes, split into calibration and held-out
record.py      the source bundle run through the runtime, each graph's real inputs saved per call
rewrite.py     Gemm(transB) -> MatMul over the transposed (or dequantized) weight, for the weights to quantize
awq.py         tensorrt int4-awq: Model Optimizer's AWQ-clip one weight at a time on captured activations
qdq.py         tensorrt int8 and fp8: ONNX Runtime's ranges on the replayed calls, Q/DQ written per weight
modelopt.py    Model Optimizer's install check (its driver, the tests' reference: tests/modelopt_driver.py)
matmulnbits.py the onnxruntime target: ONNX Runtime's MatMulNBits (a contrib op, CPU-fast)
verify.py      quantized graphs against the source on held-out calls, then answers end to end
calibrate.py   the command: a new bundle written atomically beside the source, never changing it
"""
