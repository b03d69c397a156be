"""mllm-edge: visual-token pruning (FastV, FasterVLM) for LLaVA-family models, exported to ONNX and TensorRT."""

__version__ = "0.1.0"
