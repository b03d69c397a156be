"""The thin layer over NVIDIA's TensorRT Python API (10.x and 11.x): build one engine.

Everything TensorRT-specific that can only run with TensorRT and a GPU is here and kept short; the
rest of `mllm_edge.build` decides what to pass; opening an engine is `mllm_edge.engines`' job.
Failures in TensorRT mostly come back as None or False with the reason sent to the logger, so a
logger that keeps the errors turns them into our MllmEdgeError. Never run in this repository's CI (TensorRT cannot be installed there).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..engines import import_tensorrt, make_logger
from ..errors import MllmEdgeError
from .profiles import Profile
from .settings import BuildSettings


def build_engine(
    onnx_path: Path, profiles: list[Profile], settings: BuildSettings, timing_cache: bytes | None, out: Path
) -> bytes:
    """Build one engine into the file `out` -> the updated timing cache.

    Host memory: the parser holds the graph's weights and the builder's plan about as much again, so
    both are let go as soon as the build returns, and the plan is written from its own buffer (no
    bytes() copy: that would be a third copy of the weights)."""
    trt = import_tensorrt()
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if settings.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)  # kept referenced until the build ends
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so external weight data resolves
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise MllmEdgeError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    config.builder_optimization_level = settings.optimization_level
    for name in settings.builder_flags:
        flag = getattr(trt.BuilderFlag, name, None)  # by name: 11 renumbered and removed flags
        if flag is None:
            raise MllmEdgeError(
                f"TensorRT {trt.__version__} has no builder flag {name}; export the bundle in that precision instead"
            )
        config.set_flag(flag)
    for p in profiles:
        if not p.shapes:
            continue
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in p.shapes.items():
            try:
                profile.set_shape(name, low, opt, high)
            except RuntimeError as e:  # inconsistent min/opt/max: a bug of profiles.py, said plainly
                raise MllmEdgeError(
                    f"{onnx_path.name}: TensorRT refused the {p.name} shapes of {name} {low} {opt} {high}: {e}"
                ) from None
        if config.add_optimization_profile(profile) < 0:
            raise MllmEdgeError(
                f"TensorRT rejected the {p.name} profile of {onnx_path.name}: {'; '.join(logger.errors)}"
            )
    cache = config.create_timing_cache(timing_cache or b"")
    if cache is None or not config.set_timing_cache(cache, False):  # made on another GPU or TensorRT
        print(
            "TensorRT: the timing cache does not fit this GPU or TensorRT version; starting a new one",
            file=sys.stderr,
        )
        config.set_timing_cache(config.create_timing_cache(b""), False)
    plan = builder.build_serialized_network(network, config)
    del parser, network  # the parsed weights: no longer needed once the plan exists
    if plan is None:
        raise MllmEdgeError(
            f"TensorRT could not build {onnx_path.name}: {'; '.join(logger.errors) or 'see the messages above'}"
        )
    with open(out, "wb") as f:
        f.write(memoryview(plan))
    del plan
    updated = config.get_timing_cache()
    return bytes(memoryview(updated.serialize())) if updated is not None else (timing_cache or b"")
