"""Build settings chosen by name, for TensorRT 10 (JetPack 6 has 10.3) and 11.

TensorRT 11 removed the precision flags (FP16, BF16, ...) and builds only strongly typed networks,
whose precision is the graph's; it also renumbered its enums. So settings are names, looked up on
the installed module at build time (`tensorrt_api`), and the precision rules are:

  engine precision == bundle dtype   strongly typed, on 10 and 11 (fp32 graphs may use TF32)
  fp16 / bf16 from an fp32 bundle    TensorRT 10 only: a weakly typed network with that flag
  anything else                      a clear error saying which export to make
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import MllmEdgeError

PRECISIONS = ("fp32", "fp16", "bf16")
BUNDLE_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
DEFAULT_WORKSPACE_MB = 4096
JETSON_WORKSPACE_MB = 1024  # Jetson memory is shared with the CPU: leave room for the weights


def trt_major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise MllmEdgeError(f"cannot read the TensorRT version '{version}'") from None


@dataclass(frozen=True)
class BuildSettings:
    precision: str  # what the engine computes in: fp32 | fp16 | bf16
    strongly_typed: bool  # network creation flag STRONGLY_TYPED
    builder_flags: list[str] = field(default_factory=list)  # trt.BuilderFlag names to set
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    optimization_level: int = 3  # builder_optimization_level: TensorRT's default

    def to_dict(self) -> dict:
        return asdict(self)


def choose_settings(
    trt_version: str,
    bundle_dtype: str,
    precision: str | None,
    workspace_mb: int | None,
    jetson: bool,
    quantized: str | None = None,
) -> BuildSettings:
    """precision None means the bundle's own; quantized: a calibrated bundle's weights (int8, int4-awq,
    fp8), whose Q/DQ graphs build strongly typed, in the bundle's own float type only."""
    major = trt_major(trt_version)
    if major < 10:
        raise MllmEdgeError(
            f"TensorRT {trt_version} is too old: mllm-edge builds with TensorRT 10 or newer (JetPack 6 ships 10.3)"
        )
    own = BUNDLE_PRECISION.get(bundle_dtype)
    if own is None:
        raise MllmEdgeError(
            f"the bundle's dtype '{bundle_dtype}' cannot be built; re-export with --dtype fp16 or fp32"
        )
    precision = precision or own
    if precision not in PRECISIONS:
        raise MllmEdgeError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if workspace_mb is None:
        workspace_mb = JETSON_WORKSPACE_MB if jetson else DEFAULT_WORKSPACE_MB
    if workspace_mb < 64:
        raise MllmEdgeError(f"--workspace must be at least 64 MB, got {workspace_mb}")
    if precision == own:
        return BuildSettings(precision, strongly_typed=True, workspace_mb=workspace_mb)
    if quantized:
        raise MllmEdgeError(
            f"a {quantized} bundle builds strongly typed in its own {own} (its Q/DQ nodes set the rest): "
            f"build it without --precision, or calibrate a {precision} bundle"
        )
    export_hint = (
        "export makes no bf16 bundles yet: use fp16"
        if precision == "bf16"
        else f"mllm-edge export --dtype {precision}"
    )
    if own == "fp32" and precision in ("fp16", "bf16"):
        if major >= 11:
            raise MllmEdgeError(
                f"TensorRT {trt_version} builds only strongly typed networks, so a {precision} engine needs a {precision} bundle "
                f"({export_hint}), or build this fp32 bundle with --precision fp32"
            )
        return BuildSettings(
            precision, strongly_typed=False, builder_flags=[precision.upper()], workspace_mb=workspace_mb
        )
    raise MllmEdgeError(f"a {own} bundle cannot give {precision} engines ({export_hint})")
