"""The runtime: runs an exported bundle with numpy, tokenizers, Pillow and jinja2 only (no torch, transformers or onnx)."""
