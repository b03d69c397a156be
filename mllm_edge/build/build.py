"""Build every graph of a bundle into a TensorRT engine for this machine, then check them.

plan_build() decides everything from the manifest, the installed TensorRT version and the GPU
(profiles, settings, folder, trtexec lines) and is plain Python; build_bundle() carries it out with
TensorRT: one engine at a time into a temporary folder, memory freed in between, the timing cache
reused and saved, each engine run on export's samples (--verify), engines.json written, and the
folder moved into place only when complete.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import __version__
from ..engines import EngineEntry, EngineSet, Target, engine_folder, profile_record, write_engine_set
from ..errors import MllmEdgeError
from ..manifest import MANIFEST_NAME, Manifest, load_manifest, sha256_file
from ..parity import ENGINE_TOLERANCE, OutputCheck, compare, load_sample
from .profiles import Profile, graph_profiles
from .settings import BuildSettings, choose_settings
from .trtexec import trtexec_command, trtexec_script

TRTEXEC_SCRIPT = "trtexec.sh"


@dataclass
class BuildConfig:
    bundle: Path
    precision: str | None = None  # None: the bundle's dtype
    max_context: int | None = None  # None: the bundle's
    workspace_mb: int | None = None  # None: 4096, or 1024 on a Jetson
    timing_cache: Path | None = None  # None: engines/timing-<target>.cache in the bundle
    trtexec: bool = False
    verify: bool = True


@dataclass
class BuildPlan:
    bundle: Path
    manifest: Manifest
    target: Target
    settings: BuildSettings
    max_context: int
    folder: Path
    timing_cache: Path
    profiles: dict[str, list[Profile]] = field(default_factory=dict)

    def engine_file(self, graph: str) -> str:
        return f"{graph}.engine"

    def trtexec_commands(self) -> dict[str, list[str]]:
        return {
            g: trtexec_command(
                f"../../{self.manifest.graphs[g].file}",
                self.engine_file(g),
                p,
                self.settings,
                self.target.tensorrt,
                str(self.timing_cache.resolve()),
            )
            for g, p in self.profiles.items()
        }


def plan_build(config: BuildConfig, target: Target, manifest: Manifest | None = None) -> BuildPlan:
    """Everything a build decides, from the bundle (its manifest, when already loaded and checked) and the target."""
    if manifest is None:
        manifest = load_manifest(config.bundle)
        check_buildable(config.bundle, manifest)
    settings = choose_settings(
        target.tensorrt, manifest.dtype, config.precision, config.workspace_mb, target.jetson
    )
    max_context = config.max_context or manifest.max_context
    profiles = {g: graph_profiles(manifest, g, max_context) for g in manifest.graphs}
    if config.verify:
        sample_ids = load_sample(config.bundle / manifest.samples["embed"])[0]["input_ids"]
        if sample_ids.shape[1] > max_context:
            raise MllmEdgeError(
                f"export's sample prompt takes {sample_ids.shape[1]} tokens, more than --max-context {max_context}: "
                "raise --max-context or build with --no-verify"
            )
    folder = engine_folder(config.bundle, target)
    cache = config.timing_cache or folder.parent / f"timing-{target.folder_name}.cache"
    return BuildPlan(config.bundle, manifest, target, settings, max_context, folder, cache, profiles)


def check_buildable(bundle: Path, manifest: Manifest) -> None:
    """Quantized bundles hold ONNX Runtime's MatMulNBits op, which TensorRT has no parser for."""
    q = manifest.quantization
    if q:
        raise MllmEdgeError(
            f"{bundle} holds {q['weights']} weights as ONNX Runtime's MatMulNBits op ({', '.join(q['graphs'])}), which TensorRT cannot "
            f"build: run it with `mllm-edge run --bundle {bundle}` (ONNX Runtime), or export without --quantize for TensorRT"
        )


def check_graphs(bundle: Path, manifest: Manifest) -> None:
    """Before TensorRT loads: the bundle can be built, and its graphs keep TensorRT 10's ONNX rules
    (which rule breaks, rather than a parser trace). The lint needs onnx, which a Jetson may lack."""
    check_buildable(bundle, manifest)
    try:
        from ..export.lint import lint_model
    except ImportError:
        return
    for spec in manifest.graphs.values():
        findings = lint_model(bundle / spec.file)
        if findings:
            raise MllmEdgeError(
                f"{spec.file} breaks TensorRT 10's ONNX rules: " + "; ".join(map(str, findings))
            )


def graph_weight_mb(plan: BuildPlan, graph: str) -> int:
    spec = plan.manifest.graphs[graph]
    files = [spec.file, *spec.data_files]
    return sum((plan.bundle / f).stat().st_size for f in files if (plan.bundle / f).is_file()) >> 20


def check_memory(graph: str, weights_mb: int, workspace_mb: int, target: Target) -> None:
    """A build holds the weights about twice (network and engine) plus the workspace."""
    need = 2 * weights_mb + workspace_mb
    free = target.free_memory_mb
    if free and need > free:
        where = "this Jetson (memory shared with the CPU)" if target.jetson else f"the GPU ({target.gpu})"
        raise MllmEdgeError(
            f"building {graph} needs about {need} MB and {where} has {free} MB free: close other programs, "
            f"lower --workspace, or export a smaller model (--dtype fp16, a smaller --max-context)"
        )


def write_trtexec(plan: BuildPlan, folder: Path) -> Path:
    header = f"mllm-edge {__version__}: the engines of {plan.bundle.name} for {plan.target.folder_name}"
    path = folder / TRTEXEC_SCRIPT
    path.write_text(trtexec_script(plan.trtexec_commands(), header))
    path.chmod(0o755)
    return path


def verify_engine(plan: BuildPlan, graph: str, engine) -> list[OutputCheck]:
    inputs, outputs = load_sample(plan.bundle / plan.manifest.samples[graph])
    got = engine.run(inputs)
    tolerance = ENGINE_TOLERANCE[plan.settings.precision]
    return [compare(graph, name, got[name], ref, tolerance) for name, ref in outputs.items()]


def build_bundle(
    config: BuildConfig, progress: Callable[[str], None] = lambda _: None
) -> tuple[BuildPlan, list[OutputCheck]]:
    from ..engines import gpu_info
    from . import tensorrt_api

    manifest = load_manifest(
        config.bundle
    )  # a clear error for a missing or damaged bundle before TensorRT loads
    check_graphs(config.bundle, manifest)
    trt = tensorrt_api.import_tensorrt()
    target = gpu_info(trt.__version__)
    plan = plan_build(config, target, manifest)
    plan.folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{plan.folder.name}.", suffix=".partial", dir=plan.folder.parent))
    checks: list[OutputCheck] = []
    try:
        cache = plan.timing_cache.read_bytes() if plan.timing_cache.is_file() else None
        meta = EngineSet(
            target.to_dict(),
            plan.settings.to_dict(),
            plan.max_context,
            sha256_file(plan.bundle / MANIFEST_NAME),
            created_by=f"mllm-edge {__version__}",
        )
        for graph, profiles in plan.profiles.items():  # one at a time, memory freed in between
            check_memory(graph, graph_weight_mb(plan, graph), plan.settings.workspace_mb, target)
            progress(f"building {graph}")
            engine_bytes, cache = tensorrt_api.build_engine(
                plan.bundle / plan.manifest.graphs[graph].file, profiles, plan.settings, cache
            )
            file = tmp / plan.engine_file(graph)
            file.write_bytes(engine_bytes)
            meta.engines[graph] = EngineEntry(
                file.name, plan.manifest.graphs[graph].file, sha256_file(file), profile_record(profiles)
            )
            del engine_bytes
            gc.collect()
        plan.timing_cache.write_bytes(cache)
        if config.trtexec:
            write_trtexec(plan, tmp)
        if config.verify:
            from ..runtime.backends.tensorrt import CudaMemory, TensorRTEngine

            memory = CudaMemory()
            for graph in plan.profiles:
                progress(f"verifying {graph}")
                engine = TensorRTEngine(tmp / plan.engine_file(graph), meta.engines[graph].profiles, memory)
                checks += verify_engine(plan, graph, engine)
                engine.close()
                del engine
                gc.collect()
            bad = [c for c in checks if not c.ok]
            if bad:
                worst = ", ".join(f"{c.graph}.{c.output} {c.rel:.2e}" for c in bad)
                raise MllmEdgeError(
                    f"the engines disagree with the bundle's reference outputs beyond {ENGINE_TOLERANCE[plan.settings.precision]:.0e}: {worst}"
                )
            meta.verified = True
        write_engine_set(tmp, meta)
        if plan.folder.exists():
            shutil.rmtree(plan.folder)
        tmp.rename(plan.folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return plan, checks
