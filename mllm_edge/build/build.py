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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__, engines
from ..atomic import locked, partial_folder, remove_stale, signals_as_interrupts
from ..engines import EngineEntry, EngineSet, Target, engine_folder, profile_record, write_engine_set
from ..errors import MllmEdgeError
from ..manifest import MANIFEST_NAME, Manifest, load_manifest, sha256_file
from ..parity import ENGINE_TOLERANCE, TOLERANCE, OutputCheck, compare_graph, load_references, load_sample
from . import tensorrt_api
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
    adopt: Path | None = None  # take engines built elsewhere (trtexec.sh) instead of building
    trtexec_only: bool = False  # write trtexec.sh (into trtexec_folder) and build nothing


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
    engine_set: EngineSet | None = None  # what build_bundle wrote
    script: Path | None = None  # with trtexec_only: the trtexec.sh written

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
    check_target(config.bundle, manifest, target)
    settings = choose_settings(
        target.tensorrt,
        manifest.dtype,
        config.precision,
        config.workspace_mb,
        target.jetson,
        manifest.weights if manifest.quantization else None,
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
    """Bundles of calibrate's onnxruntime target hold ONNX Runtime's MatMulNBits op, which TensorRT has no parser for."""
    q = manifest.quantization
    if q and "tensorrt" not in manifest.backends:
        raise MllmEdgeError(
            f"{bundle} holds {q['weights']} weights as ONNX Runtime's MatMulNBits op ({', '.join(q['graphs'])}), which TensorRT cannot "
            f"build: run it with `mllm-edge run --bundle {bundle}` (ONNX Runtime), or calibrate its float bundle with --target tensorrt"
        )


def check_target(bundle: Path, manifest: Manifest, target: Target) -> None:
    """A calibrated bundle's graphs may need a newer GPU than this one (fp8: SM 8.9, never an Orin)."""
    from ..calibration.precisions import sm_at_least

    need = ((manifest.quantization or {}).get("requires") or {}).get("min_sm")
    have = "{}.{}".format(*target.compute_capability)
    if need and not sm_at_least(have, need):
        raise MllmEdgeError(
            f"{bundle} holds {manifest.weights} graphs, which need a GPU of SM {need} or newer; this {target.gpu} is SM {have}: "
            "calibrate its float bundle with --precision int4-awq or int8 for this GPU"
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
    """While TensorRT builds, the parser holds the graph's weights and the serialized plan about as much
    again (tensorrt_api.build_engine lets both go and writes the plan from its own buffer), plus the
    workspace; on a Jetson the builder's device copy of the weights is in the same memory, a third.
    Reasoned from the API, never measured (TensorRT has not run in this project)."""
    need = (3 if target.jetson else 2) * weights_mb + workspace_mb
    free = target.free_memory_mb
    if free and need > free:
        where = "this Jetson (memory shared with the CPU)" if target.jetson else f"the GPU ({target.gpu})"
        raise MllmEdgeError(
            f"building {graph} needs about {need} MB and {where} has {free} MB free: close other programs, "
            f"lower --workspace, or export a smaller model (--dtype fp16, a smaller --max-context)"
        )


def trtexec_folder(plan: BuildPlan) -> Path:
    """Where trtexec.sh puts the engines it builds by default: beside the engine folder, never in it
    (engines.json vouches for what is in there), ready for `mllm-edge build --adopt`."""
    return plan.folder.parent / f"{plan.folder.name}.trtexec"


def write_trtexec(plan: BuildPlan, folder: Path) -> Path:
    header = f"mllm-edge {__version__}: the engines of {plan.bundle.name} for {plan.target.folder_name}"
    adopt = f"mllm-edge build {plan.bundle} --adopt OUT" + (
        f" --max-context {plan.max_context}" if plan.max_context != plan.manifest.max_context else ""
    )
    path = folder / TRTEXEC_SCRIPT
    path.write_text(trtexec_script(plan.trtexec_commands(), header, f"../{trtexec_folder(plan).name}", adopt))
    path.chmod(0o755)
    return path


def adopt_engines(plan: BuildPlan, source: Path, into: Path, meta: EngineSet, progress) -> None:
    """Take engines built elsewhere (trtexec.sh, NVIDIA's trtexec) into the engine folder, checked
    against the bundle as ours are: one per graph, named <graph>.engine, opening in this TensorRT, with
    the graph's inputs and outputs and the plan's profiles (so the runtime picks them right)."""
    if not source.is_dir():
        raise MllmEdgeError(f"--adopt {source}: no such folder")
    missing = [plan.engine_file(g) for g in plan.profiles if not (source / plan.engine_file(g)).is_file()]
    if missing:
        raise MllmEdgeError(
            f"--adopt {source}: {', '.join(missing)} missing (one engine per graph of the bundle)"
        )
    for graph, profiles in plan.profiles.items():
        progress(f"adopting {graph}")
        file = source / plan.engine_file(graph)
        trt, engine, _ = engines.load_engine(file)
        spec = plan.manifest.graphs[graph]
        mode = trt.TensorIOMode.INPUT
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = sorted(n for n in names if engine.get_tensor_mode(n) == mode)
        outputs = sorted(n for n in names if engine.get_tensor_mode(n) != mode)
        if inputs != sorted(t.name for t in spec.inputs) or outputs != sorted(t.name for t in spec.outputs):
            raise MllmEdgeError(
                f"--adopt: {file.name} was not built from this bundle's {spec.file} (other inputs or outputs)"
            )
        for t in (*spec.inputs, *spec.outputs):
            built = str(np.dtype(trt.nptype(engine.get_tensor_dtype(t.name))))
            if built != t.dtype:
                raise MllmEdgeError(
                    f"--adopt: {file.name} takes {t.name} as {built}, the bundle's graph as {t.dtype}"
                )
        planned = len([p for p in profiles if p.shapes]) or 1
        if engine.num_optimization_profiles != planned:
            raise MllmEdgeError(
                f"--adopt: {file.name} has {engine.num_optimization_profiles} optimization profiles, this build plans {planned}"
            )
        for index, profile in enumerate(p for p in profiles if p.shapes):
            for name, shapes in profile.shapes.items():
                built = tuple(tuple(d) for d in engine.get_tensor_profile_shape(name, index))
                if built != tuple(shapes):
                    raise MllmEdgeError(
                        f"--adopt: {file.name}'s {profile.name} profile takes {name} {built}, this build plans {tuple(shapes)}: "
                        f"build it with this plan's trtexec.sh (mllm-edge build --trtexec, same --max-context)"
                    )
        del engine
        shutil.copyfile(file, into / file.name)
        meta.engines[graph] = EngineEntry(
            file.name, spec.file, sha256_file(into / file.name), profile_record(profiles)
        )


def build_engines(plan: BuildPlan, into: Path, meta: EngineSet, progress) -> None:
    """Our own build: one engine at a time (memory freed in between), the timing cache reused and saved."""
    cache = plan.timing_cache.read_bytes() if plan.timing_cache.is_file() else None
    for graph, profiles in plan.profiles.items():
        check_memory(graph, graph_weight_mb(plan, graph), plan.settings.workspace_mb, plan.target)
        progress(f"building {graph}")
        file = into / plan.engine_file(graph)
        cache = tensorrt_api.build_engine(
            plan.bundle / plan.manifest.graphs[graph].file, profiles, plan.settings, cache, file
        )
        meta.engines[graph] = EngineEntry(
            file.name, plan.manifest.graphs[graph].file, sha256_file(file), profile_record(profiles)
        )
        gc.collect()
    plan.timing_cache.write_bytes(cache)


def verify_engines(plan: BuildPlan, folder: Path, meta: EngineSet, progress) -> list[OutputCheck]:
    from ..runtime.backends.tensorrt import CudaMemory, TensorRTEngine

    memory, checks = CudaMemory(), []
    for graph in plan.profiles:
        progress(f"verifying {graph}")
        # one context is enough for one sample (and spares a Jetson the second's memory)
        engine = TensorRTEngine(folder / plan.engine_file(graph), meta.engines[graph].profiles, memory, False)
        try:
            meta.engines[graph].activation_bytes = engine.activation_bytes
            checks += verify_engine(plan, graph, engine)
        finally:
            engine.close()
        del engine
        gc.collect()
    bad = [c for c in checks if not c.ok]
    if bad:
        worst = ", ".join(f"{c.graph}.{c.output} {c.rel:.2e}" for c in bad)
        raise MllmEdgeError(
            f"the engines disagree with the bundle's reference outputs beyond their limits: {worst}"
        )
    return checks


def verify_engine(plan: BuildPlan, graph: str, engine) -> list[OutputCheck]:
    path = plan.bundle / plan.manifest.samples[graph]
    inputs, outputs = load_sample(path)
    got = engine.run(inputs)
    return compare_graph(graph, got, inputs, outputs, load_references(path), engine_tolerance(plan, graph))


def engine_tolerance(plan: BuildPlan, graph: str) -> float:
    """The engine precision's limit; a quantized graph's own against the float reference, when larger."""
    own = ENGINE_TOLERANCE[plan.settings.precision]
    return max(own, TOLERANCE[plan.manifest.weights]) if plan.manifest.quantized(graph) else own


def build_bundle(
    config: BuildConfig, progress: Callable[[str], None] = lambda _: None
) -> tuple[BuildPlan, list[OutputCheck]]:
    """Build (or with config.adopt, take in) the bundle's engines for this machine, check them, and
    move the engine folder into place only when complete."""
    manifest = load_manifest(
        config.bundle
    )  # a clear error for a missing or damaged bundle before TensorRT loads
    check_graphs(config.bundle, manifest)
    target = engines.gpu_info(engines.import_tensorrt().__version__)
    plan = plan_build(config, target, manifest)
    plan.folder.parent.mkdir(parents=True, exist_ok=True)
    if config.trtexec_only:  # the script alone, in the folder its engines go to: build nothing here
        out = trtexec_folder(plan)
        out.mkdir(exist_ok=True)
        plan.script = write_trtexec(plan, out)
        return plan, []
    with locked(plan.folder), signals_as_interrupts():
        remove_stale(plan.folder)
        return _build_into(config, plan, partial_folder(plan.folder), progress)


def _build_into(
    config: BuildConfig, plan: BuildPlan, tmp: Path, progress
) -> tuple[BuildPlan, list[OutputCheck]]:
    checks: list[OutputCheck] = []
    try:
        meta = EngineSet(
            plan.target.to_dict(),
            plan.settings.to_dict(),
            plan.max_context,
            sha256_file(plan.bundle / MANIFEST_NAME),
            created_by=f"mllm-edge {__version__}",
        )
        if config.adopt is not None:
            adopt_engines(plan, Path(config.adopt), tmp, meta, progress)
            meta.adopted_from = str(Path(config.adopt).resolve())
        else:
            build_engines(plan, tmp, meta, progress)
        if config.trtexec:
            write_trtexec(plan, tmp)
        if config.verify:
            checks = verify_engines(plan, tmp, meta, progress)
            meta.verified = True
        write_engine_set(tmp, meta)
        if plan.folder.exists():
            shutil.rmtree(plan.folder)
        tmp.rename(plan.folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    plan.engine_set = meta
    return plan, checks
