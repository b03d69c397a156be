"""TensorRT engines without torch: the machine they are for, their folder and `engines.json`, opening one.

`mllm-edge build` writes engines and the runtime opens them; both read this one module, so neither
imports the other's internals.

- Engines only run on the GPU model and TensorRT version they were built with, so they live in
  `engines/<gpu>-sm<cc>-trt<version>/`, and the runtime picks the folder of the machine it runs on.
  Reading the GPU needs CUDA (`gpu_info`, thin); naming, Jetson detection and the match check are
  plain Python.
- `engines.json` is written last, after every engine is in place, so a folder without it is an
  unfinished build. It records the GPU, TensorRT version and the bundle manifest's sha256, so engines
  of another machine or another export are refused with a message that says to rebuild.
- TensorRT's failures mostly come back as None or False with the reason sent to the logger, so a
  logger that keeps the errors turns them into our MllmEdgeError. Never run in this repository's CI.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import MllmEdgeError
from .integrity import check_files, sha256_file
from .manifest import MANIFEST_NAME

ENGINES_DIR = "engines"


@dataclass(frozen=True)
class Target:
    gpu: str  # the CUDA device name, e.g. "NVIDIA GeForce RTX 4090", "Orin"
    compute_capability: tuple[int, int]
    tensorrt: str  # tensorrt.__version__
    jetson: bool
    total_memory_mb: int = 0
    free_memory_mb: int = 0

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"

    @property
    def folder_name(self) -> str:
        return f"{slug(self.gpu)}-{self.sm}-trt{self.tensorrt}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["compute_capability"] = list(self.compute_capability)
        return d


def slug(text: str) -> str:
    """A folder-safe lower-case name: 'NVIDIA GeForce RTX 4090' -> 'nvidia-geforce-rtx-4090'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def engine_folder(bundle: Path, target: Target) -> Path:
    return bundle / ENGINES_DIR / target.folder_name


def detect_jetson(root: Path = Path("/")) -> str | None:
    """The Jetson's model string ('NVIDIA Jetson AGX Orin ...'), or None when this is no Jetson.

    L4T writes /etc/nv_tegra_release; the device tree names the board. Containers may lack the
    device tree, so the release file alone also counts.
    """
    model_file = root / "proc/device-tree/model"
    model = (
        model_file.read_bytes().decode(errors="replace").rstrip("\x00").strip()
        if model_file.is_file()
        else ""
    )
    if "jetson" in model.lower():
        return model
    if (root / "etc/nv_tegra_release").is_file():
        return model or "NVIDIA Jetson"
    return None


def same_machine(built: dict, here: Target) -> str | None:
    """Why engines built for `built` (metadata's target) cannot run here, or None when they can."""
    cc = tuple(built.get("compute_capability", ()))
    problems = []
    if cc != here.compute_capability:
        problems.append(f"compute capability sm{''.join(map(str, cc))} (this GPU: {here.sm})")
    if built.get("tensorrt") != here.tensorrt:
        problems.append(f"TensorRT {built.get('tensorrt')} (installed: {here.tensorrt})")
    if not problems:
        return None
    return (
        f"the engines were built for {built.get('gpu', '?')} with "
        + " and ".join(problems)
        + ": rebuild them here with `mllm-edge build`"
    )


def gpu_info(tensorrt_version: str, root: Path = Path("/")) -> Target:
    """Ask CUDA about device 0 (cuda-python, else the driver API through ctypes). Needs a GPU.

    On a Jetson the memory is the system's, and CUDA's free figure leaves out the page cache the
    kernel would give back: /proc/meminfo's MemAvailable is the honest one there.
    """
    name, cc, total, free = _cuda_device()
    jetson = detect_jetson(root) is not None
    if jetson:
        free = max(free, available_memory(root))
    return Target(name, cc, tensorrt_version, jetson, total // (1 << 20), free // (1 << 20))


def available_memory(root: Path = Path("/")) -> int:
    """MemAvailable from /proc/meminfo in bytes, 0 when unreadable."""
    meminfo = root / "proc/meminfo"
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _cuda_device() -> tuple[str, tuple[int, int], int, int]:
    try:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python (the TensorRT 10.3 samples' spelling)
    except ImportError:
        return _cuda_device_ctypes()
    err, prop = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:  # e.g. a cuda-python newer than the driver: the driver API may still answer
        return _cuda_device_ctypes()
    err, free, total = cudart.cudaMemGetInfo()
    if int(err) != 0:
        raise MllmEdgeError(f"CUDA cannot report the GPU's memory ({err})")
    name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
    return name.rstrip("\x00"), (prop.major, prop.minor), int(total), int(free)


def _cuda_device_ctypes() -> tuple[str, tuple[int, int], int, int]:
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")  # the driver API: stable symbols for name and attributes
    except OSError:
        raise MllmEdgeError(
            "no CUDA driver (libcuda.so.1) on this machine; TensorRT engines need an NVIDIA GPU"
        ) from None

    def check(status: int, what: str) -> None:
        if status != 0:
            raise MllmEdgeError(
                f"the CUDA driver failed at {what} (error {status}); TensorRT engines need a working GPU"
            )

    check(cuda.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    check(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    buf = ctypes.create_string_buffer(256)
    check(cuda.cuDeviceGetName(buf, 256, dev), "cuDeviceGetName")
    major, minor = ctypes.c_int(), ctypes.c_int()
    check(
        cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev), "the compute capability"
    )  # ..._COMPUTE_CAPABILITY_MAJOR
    check(cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev), "the compute capability")  # ..._MINOR
    ctx = ctypes.c_void_p()
    check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    try:
        # cuMemGetInfo needs a current context: pushed, then popped, so the thread's own current
        # context (if any) is current again and no released context is left current afterwards
        check(cuda.cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")
        try:
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            check(cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)), "cuMemGetInfo")
        finally:
            cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
    finally:
        cuda.cuDevicePrimaryCtxRelease_v2(dev)
    return buf.value.decode(), (major.value, minor.value), total.value, free.value


ENGINES_META = "engines.json"
ENGINES_SCHEMA = 1


@dataclass
class EngineEntry:
    file: str  # relative to the engine folder
    onnx: str  # the bundle's graph file it was built from
    sha256: str
    profiles: list[dict]  # [{"name": ..., "shapes": {input: [min, opt, max]}}]
    activation_bytes: int = 0  # device memory of one execution context (read when verified; 0: unknown)


@dataclass
class EngineSet:
    target: dict  # Target.to_dict()
    settings: dict  # BuildSettings.to_dict()
    max_context: int
    bundle_manifest_sha256: str
    engines: dict[str, EngineEntry] = field(default_factory=dict)
    verified: bool = False  # whether --verify ran and passed
    adopted_from: str | None = None  # the folder of engines built elsewhere (build --adopt), or None: ours
    created_by: str = ""
    schema_version: int = ENGINES_SCHEMA

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def profile_record(profiles) -> list[dict]:
    """build.profiles.Profile objects as engines.json records them."""
    return [
        {"name": p.name, "shapes": {k: [list(s) for s in v] for k, v in p.shapes.items()}} for p in profiles
    ]


def write_engine_set(folder: Path, meta: EngineSet) -> None:
    tmp = folder / (ENGINES_META + ".tmp")
    tmp.write_text(meta.to_json())
    tmp.replace(folder / ENGINES_META)


def load_engine_set(
    folder: Path, bundle: Path, here: Target | None = None, verify_files: bool = True, full: bool = False
) -> EngineSet:
    """Read and check an engine folder: complete, for this bundle, (given `here`) for this machine."""
    path = folder / ENGINES_META
    if not path.is_file():
        raise MllmEdgeError(
            f"{folder} holds no finished engines ({ENGINES_META} is missing): run `mllm-edge build {bundle}`"
        )
    damaged = f"{path} is damaged: rebuild with `mllm-edge build {bundle}`"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MllmEdgeError(f"{damaged} ({e})") from None
    if not isinstance(data, dict):
        raise MllmEdgeError(damaged)
    if data.get("schema_version") != ENGINES_SCHEMA:
        raise MllmEdgeError(
            f"{path} has schema {data.get('schema_version')!r}; this mllm-edge reads {ENGINES_SCHEMA}: rebuild with `mllm-edge build {bundle}`"
        )
    try:
        engines = {k: EngineEntry(**v) for k, v in data.pop("engines").items()}
        meta = EngineSet(**data, engines=engines)
        files_ok = all(
            isinstance(e.file, str) and isinstance(e.sha256, str) and "/" not in e.file
            for e in engines.values()
        )
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise MllmEdgeError(f"{damaged} ({e})") from None
    if not isinstance(meta.target, dict) or not isinstance(meta.max_context, int) or not files_ok:
        raise MllmEdgeError(damaged)
    if meta.bundle_manifest_sha256 != sha256_file(bundle / MANIFEST_NAME):
        raise MllmEdgeError(
            f"the engines in {folder} were built from another export of this bundle: rebuild with `mllm-edge build {bundle}`"
        )
    if here is not None and (why := same_machine(meta.target, here)):
        raise MllmEdgeError(why)
    if verify_files:  # re-read only engines changed since their last check (integrity.py) unless full
        problem = check_files(folder, {e.file: e.sha256 for e in meta.engines.values()}, full)
        if problem and problem[0] == "missing":
            raise MllmEdgeError(
                f"engine {problem[1]} is missing from {folder}: rebuild with `mllm-edge build {bundle}`"
            )
        if problem:
            raise MllmEdgeError(
                f"engine {problem[1]} in {folder} is damaged (sha256 differs): rebuild with `mllm-edge build {bundle}`"
            )
    return meta


INSTALL_HINT = (
    "TensorRT is not installed: on a Jetson (JetPack 6) it comes with the system: make the venv with "
    "`python3 -m venv --system-site-packages .venv`; on a desktop: pip install 'mllm-edge[tensorrt]'"
)


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise MllmEdgeError(INSTALL_HINT) from None
    return tensorrt


def make_logger(trt):
    """A trt.ILogger that prints warnings and errors to stderr and keeps the errors for our messages."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                self.errors.append(msg)
            if severity <= trt.ILogger.WARNING:  # severities are ordered, most severe first
                print(f"TensorRT: {msg}", file=sys.stderr)

    return Logger()


def load_engine(path: Path):
    """-> (trt module, ICudaEngine, logger): keep the logger to explain later failures."""
    trt = import_tensorrt()
    logger = make_logger(trt)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise MllmEdgeError(
            f"TensorRT cannot open {path.name} ({'; '.join(logger.errors)}): rebuild with `mllm-edge build`"
        )
    return trt, engine, logger
