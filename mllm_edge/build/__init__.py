"""`mllm-edge build`: TensorRT engines for a bundle, on the machine that will run them.

Everything here but `tensorrt_api` is plain Python (profiles, settings by name, engine folder and
metadata, trtexec lines), so it is tested where TensorRT cannot be installed; `tensorrt_api` is the
thin layer over NVIDIA's Python API. Imports no torch: a Jetson builds with numpy and TensorRT.
"""
