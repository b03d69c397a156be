"""`mllm-edge build` without TensorRT: profiles, settings by name, engine folders and metadata,
trtexec lines, the device KV cache's bookkeeping. With TensorRT (never here): build, run, parity."""

from __future__ import annotations

import importlib.util
import json
import subprocess

import numpy as np
import pytest

from mllm_edge.build.build import BuildConfig, plan_build, write_trtexec
from mllm_edge.build.profiles import graph_profiles
from mllm_edge.build.settings import choose_settings
from mllm_edge.engines import (
    EngineEntry,
    EngineSet,
    Target,
    available_memory,
    detect_jetson,
    load_engine_set,
    profile_record,
    same_machine,
    slug,
    write_engine_set,
)
from mllm_edge.errors import MllmEdgeError
from mllm_edge.manifest import MANIFEST_NAME, load_manifest, sha256_file
from mllm_edge.runtime.backends.tensorrt import pick_profile
from mllm_edge.runtime.cache import KVCache
from mllm_edge.runtime.device_cache import ALIGNMENT, DeviceKVCache, HostMemory

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
DESKTOP = Target(
    "NVIDIA GeForce RTX 4090", (8, 9), "10.8.0", jetson=False, total_memory_mb=24000, free_memory_mb=23000
)
ORIN = Target("Orin", (8, 7), "10.3.0", jetson=True, total_memory_mb=7600, free_memory_mb=5000)

# BuilderFlag names of TensorRT 10.3 and 11.0 (python/src/infer/pyCore.cpp at tags v10.3.0 and v11.0)
FLAGS_10_3 = {
    "FP16",
    "BF16",
    "INT8",
    "DEBUG",
    "GPU_FALLBACK",
    "REFIT",
    "DISABLE_TIMING_CACHE",
    "TF32",
    "SPARSE_WEIGHTS",
    "SAFETY_SCOPE",
    "OBEY_PRECISION_CONSTRAINTS",
    "PREFER_PRECISION_CONSTRAINTS",
    "DIRECT_IO",
    "REJECT_EMPTY_ALGORITHMS",
    "VERSION_COMPATIBLE",
    "EXCLUDE_LEAN_RUNTIME",
    "FP8",
    "ERROR_ON_TIMING_CACHE_MISS",
    "DISABLE_COMPILATION_CACHE",
    "WEIGHTLESS",
    "STRIP_PLAN",
    "REFIT_IDENTICAL",
    "WEIGHT_STREAMING",
    "INT4",
    "REFIT_INDIVIDUAL",
}


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    from mllm_edge.testing.checkpoints import sample_image

    path = tmp_path_factory.mktemp("build") / "scene.png"
    sample_image(300, 200, seed=1).save(path)
    return path


def _random_input(spec, shape):
    if spec.name == "image_start":
        return np.array(0, np.int64)  # the image first: valid for every prompt length the profiles allow
    if spec.name in ("position_ids",):
        return np.broadcast_to(np.arange(shape[1], dtype=np.int64), shape).copy()
    if spec.dtype == "int64":
        return np.ones(shape, np.int64)
    return np.random.default_rng(0).standard_normal(shape).astype(spec.dtype) * 0.1


@pytest.mark.parametrize("method", ["fastv", "fastervlm"])
def test_every_profile_shape_runs_in_the_graphs(method, export_cache):
    """min, opt and max of every profile are shapes the ONNX graphs really take (ONNX Runtime runs them)."""
    from mllm_edge.runtime.backends.onnxruntime import OnnxRuntimeEngine

    folder, _ = export_cache("llama_gqa", method)
    manifest = load_manifest(folder)
    for graph, spec in manifest.graphs.items():
        engine = OnnxRuntimeEngine(folder / spec.file)
        for profile in graph_profiles(
            manifest, graph, max_context=manifest.pruning["image_tokens"]["llm"] + 40
        ):  # small: quick max shapes
            for which in range(3):
                feeds = {}
                for t in spec.inputs:
                    shape = profile.shapes[t.name][which] if t.name in profile.shapes else tuple(t.shape)
                    feeds[t.name] = _random_input(t, shape)
                out = engine.run(feeds)
                assert all(np.isfinite(v).all() for v in out.values() if v.dtype.kind == "f"), (
                    graph,
                    profile.name,
                    which,
                )


def test_profiles_follow_the_manifest(export_cache):
    folder, _ = export_cache("llama_gqa", "fastv")
    manifest = load_manifest(folder)
    ctx, images = manifest.max_context, manifest.pruning["image_tokens"]["llm"]
    vision = graph_profiles(manifest, "vision")
    assert [p.name for p in vision] == ["static"]
    assert set(vision[0].shapes["pixel_values"]) == {
        (1, *manifest.graphs["vision"].input("pixel_values").shape[1:])
    }
    head = {p.name: p for p in graph_profiles(manifest, "llm_head")}
    assert list(head) == ["prefill", "decode"]
    g, d = manifest.architecture["text"]["num_kv_heads"], manifest.architecture["text"]["head_dim"]
    assert (
        head["prefill"].shapes["inputs_embeds"][2][1] == ctx
        and head["prefill"].shapes["past_key.0"] == ((1, 1, g, d),) * 3
    )
    assert head["decode"].shapes["inputs_embeds"][0][1] == head["decode"].shapes["inputs_embeds"][2][1] == 1
    assert (
        head["decode"].shapes["past_value.1"][0][0] == 1
        and head["decode"].shapes["past_value.1"][2][0] == ctx
    )
    assert graph_profiles(manifest, "prune")[0].shapes["hidden_states"][0][1] == images
    embed = {p.name: p for p in graph_profiles(manifest, "embed")}
    assert (
        embed["prefill"].shapes["image_embeds"][0][1] == images
        and embed["decode"].shapes["image_embeds"][2][1] == 1
    )
    assert graph_profiles(manifest, "llm_tail", max_context=256)[1].shapes["past_key.2"][2][0] == 256
    for bad in (
        images,
        ctx + 1,
    ):  # a prompt holds every image token and some text; the graphs were checked up to ctx
        with pytest.raises(
            MllmEdgeError,
            match=f"--max-context must be above the {images} image tokens and at most the bundle's {ctx}",
        ):
            graph_profiles(manifest, "llm_tail", max_context=bad)


def test_settings_are_names_for_tensorrt_10_and_11():
    for version in ("10.3.0", "10.13.1", "11.0.0"):
        for dtype, precision in (("float32", "fp32"), ("float16", "fp16")):
            s = choose_settings(version, dtype, None, None, jetson=False)
            assert (s.precision, s.strongly_typed, s.builder_flags) == (precision, True, [])
    weak = choose_settings("10.3.0", "float32", "fp16", None, jetson=True)
    assert (weak.strongly_typed, weak.builder_flags, weak.workspace_mb) == (False, ["FP16"], 1024)
    assert set(choose_settings("10.3.0", "float32", "bf16", 512, jetson=False).builder_flags) <= FLAGS_10_3
    with pytest.raises(
        MllmEdgeError, match="builds only strongly typed networks.*mllm-edge export --dtype fp16"
    ):
        choose_settings("11.0.0", "float32", "fp16", None, jetson=False)
    with pytest.raises(MllmEdgeError, match="re-export with|export --dtype fp32"):
        choose_settings("10.3.0", "float16", "fp32", None, jetson=False)
    with pytest.raises(MllmEdgeError, match="too old"):
        choose_settings("8.6.1", "float16", None, None, jetson=True)
    with pytest.raises(MllmEdgeError, match="--precision must be one of"):
        choose_settings("10.3.0", "float16", "int3", None, jetson=False)
    with pytest.raises(MllmEdgeError, match="--workspace must be at least"):
        choose_settings("10.3.0", "float16", None, 1, jetson=False)


def test_engine_folders_are_named_by_gpu_cc_and_version(tmp_path):
    assert slug("NVIDIA GeForce RTX 4090") == "nvidia-geforce-rtx-4090"
    assert DESKTOP.folder_name == "nvidia-geforce-rtx-4090-sm89-trt10.8.0"
    assert ORIN.folder_name == "orin-sm87-trt10.3.0"
    assert same_machine(DESKTOP.to_dict(), DESKTOP) is None
    why = same_machine(DESKTOP.to_dict(), ORIN)
    assert (
        "sm89 (this GPU: sm87)" in why and "TensorRT 10.8.0 (installed: 10.3.0)" in why and "rebuild" in why
    )


def test_jetson_is_detected_from_the_platform_files(tmp_path):
    assert detect_jetson(tmp_path) is None
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    assert detect_jetson(tmp_path) == "NVIDIA Jetson AGX Orin Developer Kit"
    assert available_memory(tmp_path) == 0
    (tmp_path / "proc/meminfo").write_text(
        "MemTotal:       7834000 kB\nMemFree:         900000 kB\nMemAvailable:   5120000 kB\n"
    )
    assert available_memory(tmp_path) == 5120000 * 1024  # the page cache counts on a Jetson
    container = tmp_path / "container"
    (container / "etc").mkdir(parents=True)
    (container / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.0\n")
    assert detect_jetson(container) == "NVIDIA Jetson"


def test_engine_metadata_round_trip_and_mismatches(export_cache, tmp_path):
    import shutil

    source, _ = export_cache("llama_gqa", "fastv")
    bundle = tmp_path / "bundle"
    shutil.copytree(source, bundle)
    plan = plan_build(BuildConfig(bundle), ORIN)
    plan.folder.mkdir(parents=True)
    engine = plan.folder / "llm_tail.engine"
    engine.write_bytes(b"serialized engine bytes")
    meta = EngineSet(
        ORIN.to_dict(), plan.settings.to_dict(), plan.max_context, sha256_file(bundle / MANIFEST_NAME)
    )
    meta.engines["llm_tail"] = EngineEntry(
        engine.name, "llm_tail.onnx", sha256_file(engine), profile_record(plan.profiles["llm_tail"])
    )
    write_engine_set(plan.folder, meta)
    loaded = load_engine_set(plan.folder, bundle, ORIN)
    assert loaded.engines["llm_tail"].profiles == json.loads(
        json.dumps(profile_record(plan.profiles["llm_tail"]))
    )
    with pytest.raises(MllmEdgeError, match="built for Orin with compute capability sm87"):
        load_engine_set(plan.folder, bundle, DESKTOP)
    engine.write_bytes(b"damaged")
    with pytest.raises(MllmEdgeError, match="llm_tail.engine .* is damaged"):
        load_engine_set(plan.folder, bundle, ORIN)
    (bundle / MANIFEST_NAME).write_text((bundle / MANIFEST_NAME).read_text() + " ")
    with pytest.raises(MllmEdgeError, match="another export of this bundle"):
        load_engine_set(plan.folder, bundle, ORIN)
    (plan.folder / "engines.json").unlink()
    with pytest.raises(MllmEdgeError, match="no finished engines"):
        load_engine_set(plan.folder, bundle, ORIN)


def test_trtexec_script_holds_each_graph_with_its_profiles(export_cache, tmp_path):
    folder, _ = export_cache("llama_gqa", "fastv")
    plan = plan_build(BuildConfig(folder, workspace_mb=2048), ORIN)
    script = write_trtexec(plan, tmp_path).read_text()
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    lines = {line.split("--onnx=")[1].split()[0]: line for line in script.splitlines() if "--onnx=" in line}
    assert set(lines) == {f"../../{g.file}" for g in plan.manifest.graphs.values()}
    head = lines["../../llm_head.onnx"]
    assert head.index("--profile=0") < head.index("--minShapes") < head.index("--profile=1")
    assert (
        "inputs_embeds:1x1x" in head and "--memPoolSize=workspace:2048M" in head and "--stronglyTyped" in head
    )
    assert f"past_key.0:{plan.max_context}x1x" in head  # decode profile's max past
    assert (
        "--profile=1" not in lines["../../vision.onnx"]
        and "--minShapes=pixel_values:1x3x" in lines["../../vision.onnx"]
    )
    weak = plan_build(BuildConfig(folder, precision="fp16"), ORIN)
    assert "--fp16" in " ".join(weak.trtexec_commands()["llm_tail"]) and "--stronglyTyped" not in " ".join(
        weak.trtexec_commands()["llm_tail"]
    )
    eleven = plan_build(BuildConfig(folder), Target("H100", (9, 0), "11.0.0", False))
    assert "--stronglyTyped" not in " ".join(
        eleven.trtexec_commands()["llm_tail"]
    )  # a no-op on 11: the graph's dtypes decide


def test_decode_and_prefill_profiles_are_picked_by_shape(export_cache):
    folder, _ = export_cache("llama_gqa", "fastv")
    profiles = profile_record(graph_profiles(load_manifest(folder), "llm_tail"))
    low = {
        name: tuple(lo) for name, (lo, _, _) in profiles[0]["shapes"].items()
    }  # the prefill minimum: seq 1, past 1

    def shapes(seq: int, past: int) -> dict:
        return {n: (past, *s[1:]) if n.startswith("past_") else (1, seq, *s[2:]) for n, s in low.items()}

    assert pick_profile(profiles, shapes(40, 1)) == 0  # a prompt after the null row
    assert pick_profile(profiles, shapes(1, 300)) == 1  # one token after 299 cached
    with pytest.raises(MllmEdgeError, match="rebuild with a larger --max-context"):
        pick_profile(profiles, shapes(1, 5000))


@pytest.mark.parametrize(
    "heads,head_dim,dtype", [(2, 32, np.float32), (1, 8, np.float16)]
)  # 256-byte rows, and 16-byte rows
def test_device_cache_bookkeeping_matches_the_host_cache(heads, head_dim, dtype):
    """Rows written through the device cache's slot addresses read back through its past addresses
    exactly as the host cache holds them, aligned slots or not (then via scratch and a copy)."""
    rng = np.random.default_rng(0)
    memory = HostMemory()
    device = DeviceKVCache(memory, 4, 2, 64, heads, head_dim, dtype)
    host = KVCache(4, 2, 64, heads, head_dim, dtype)

    def read(t):
        return (
            np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * t.nbytes).from_address(t.address))
            .view(dtype)
            .reshape(t.shape)
            .copy()
        )

    misaligned = 0
    for group, count in [("head", 37), ("tail", 20), ("head", 1), ("tail", 1), ("head", 1), ("tail", 3)]:
        slots, views = device.slots(group, count), host.slots(group, count)
        for name, slot in slots.items():
            assert slot.address % ALIGNMENT == 0 and slot.shape == views[name].shape
            rows = rng.standard_normal(slot.shape).astype(dtype)
            views[name][...] = rows
            np.ctypeslib.ctypes.memmove(slot.address, rows.ctypes.data, rows.nbytes)
        misaligned += len(device.pending)
        device.advance(group, count)
        host.advance(group, count)
        for name, past in device.past(group).items():
            np.testing.assert_array_equal(read(past), host.past(group)[name])
    assert (misaligned > 0) == (
        heads * head_dim * np.dtype(dtype).itemsize % ALIGNMENT != 0
    )  # the scratch path ran where it must
    with pytest.raises(MllmEdgeError, match="max context of 64"):
        device.slots("head", 64)
    device.close()


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message shown where TensorRT is missing")
def test_build_without_tensorrt_says_how_to_get_it(export_cache, image_file, tmp_path):
    from typer.testing import CliRunner

    from mllm_edge.cli import app

    folder, _ = export_cache("llama_gqa", "fastv")
    cases = [
        (["build", str(folder)], "TensorRT is not installed"),
        (["build", str(tmp_path / "nothing")], "does not exist"),
        (
            ["run", str(image_file), "--bundle", str(folder), "--backend", "tensorrt"],
            "TensorRT is not installed",
        ),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and "Traceback" not in result.output + result.stderr, (
            result.output + result.stderr
        )
        assert message in result.stderr, (args, result.stderr)
    auto = CliRunner().invoke(
        app, ["run", str(image_file), "--bundle", str(folder), "--max-new-tokens", "2", "--json"]
    )
    assert (
        auto.exit_code == 0 and json.loads(auto.stdout)["backend"] == "onnxruntime"
    )  # auto falls back to ONNX Runtime


@pytest.mark.skipif(
    not HAS_TENSORRT,
    reason="TensorRT is not installed (it cannot be on these machines): build, run and parity need it and a GPU",
)
@pytest.mark.parametrize("method", ["fastv", "fastervlm"])
def test_engines_build_verify_and_answer_like_onnxruntime(method, export_cache, image_file):
    from mllm_edge.build.build import build_bundle
    from mllm_edge.runtime.pipeline import Pipeline

    folder, _ = export_cache("llama_gqa", method)
    plan, checks = build_bundle(BuildConfig(folder, trtexec=True))
    assert checks and all(c.ok for c in checks) and (plan.folder / "trtexec.sh").is_file()
    from mllm_edge.parity import ENGINE_TOLERANCE, tie_gap

    seen = {}
    with Pipeline.load(folder, backend="onnxruntime") as pipeline:
        pipeline.observe(lambda graph, inputs, outputs: seen.setdefault(graph, inputs))
        ort = pipeline.generate(image_file, "What is in the picture?", max_new_tokens=8)
    with Pipeline.load(folder, backend="auto") as trt:
        assert trt.backend.name == "tensorrt"
        result = trt.generate(image_file, "What is in the picture?", max_new_tokens=8)
    if result.kept_image_tokens == ort.kept_image_tokens:
        assert result.token_ids == ort.token_ids
    else:  # only a tie at the cut may differ (TF32 scores), judged by ONNX Runtime's own scores
        assert method == "fastv", (result.kept_image_tokens, ort.kept_image_tokens)
        prune = seen["prune"]
        start, n = int(prune["image_start"]), trt.manifest.pruning["image_tokens"]["llm"]
        gap = tie_gap(
            prune["last_row"][:, start : start + n],
            np.array([ort.kept_image_tokens["llm"]]),
            np.array([result.kept_image_tokens["llm"]]),
        )
        assert gap is not None and gap <= ENGINE_TOLERANCE[plan.settings.precision]


def test_build_bundle_lints_the_graphs_before_tensorrt_loads(export_cache, tmp_path):
    """The Python API checks TensorRT 10's ONNX rules too (not only the CLI): a graph holding an op
    the parser refuses stops build_bundle() with the rule, wherever TensorRT is or is not installed."""
    import shutil

    import onnx
    from onnx import helper

    from mllm_edge.build.build import build_bundle
    from mllm_edge.manifest import load_manifest, write_manifest

    source, _ = export_cache("llama_gqa", "none")
    folder = tmp_path / "bundle"
    shutil.copytree(source, folder)
    model = onnx.load(str(folder / "embed.onnx"), load_external_data=False)
    model.graph.node.append(helper.make_node("NonZero", [model.graph.input[0].name], ["nz"], name="nonzero"))
    onnx.save(model, str(folder / "embed.onnx"))
    write_manifest(folder, load_manifest(folder, verify_files=False))  # a consistent bundle, linted as built
    with pytest.raises(MllmEdgeError, match=r"embed.onnx breaks TensorRT 10's ONNX rules: .*NonZero"):
        build_bundle(BuildConfig(folder))


def _bundle_copy(export_cache, tmp_path, method="fastv"):
    import shutil

    source, _ = export_cache("llama_gqa", method)
    folder = tmp_path / "bundle"
    shutil.copytree(source, folder)
    return folder


FAKE_TRTEXEC = """#!/usr/bin/env bash
# Stands for NVIDIA's trtexec: writes 'engine of <onnx>' where --saveEngine says.
for a in "$@"; do case "$a" in --onnx=*) onnx="${a#--onnx=}";; --saveEngine=*) out="${a#--saveEngine=}";; esac; done
test -f "$onnx" && printf 'engine of %s' "$onnx" > "$out"
"""


def fake_tensorrt(monkeypatch, plan):
    """TensorRT faked for adopting: an engine file written by FAKE_TRTEXEC opens as an engine reporting
    its graph's inputs, outputs, dtypes and the plan's profiles (renamed/retyped: what to report wrong)."""
    from types import SimpleNamespace

    from mllm_edge import engines

    class FakeEngine:
        """What TensorRT would report of an engine trtexec built from the graph with the plan's shapes."""

        def __init__(self, graph, rename=None):
            spec = plan.manifest.graphs[graph]
            self.io = [(t.name, "input") for t in spec.inputs] + [
                (rename or {}).get(t.name, t.name) for t in spec.outputs
            ]
            self.io = [x if isinstance(x, tuple) else (x, "output") for x in self.io]
            self.num_io_tensors, self.graph = len(self.io), graph

        def get_tensor_name(self, i):
            return self.io[i][0]

        def get_tensor_mode(self, name):
            return dict(self.io)[name]

        def get_tensor_dtype(self, name):
            spec = plan.manifest.graphs[self.graph]
            dtype = next(t.dtype for t in (*spec.inputs, *spec.outputs) if t.name == name)
            return "float16" if name in retyped.get(self.graph, ()) else dtype

        @property
        def num_optimization_profiles(self):
            return len([p for p in plan.profiles[self.graph] if p.shapes]) or 1

        def get_tensor_profile_shape(self, name, index):
            return [list(s) for s in [p for p in plan.profiles[self.graph] if p.shapes][index].shapes[name]]

    trt = SimpleNamespace(__version__="10.3.0", TensorIOMode=SimpleNamespace(INPUT="input"), nptype=np.dtype)
    renamed, retyped = {}, {}

    def load_engine(path):
        graph = path.read_text().split("../../")[1].removesuffix(".onnx")
        return trt, FakeEngine(graph, renamed.get(graph)), None

    monkeypatch.setattr(engines, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(engines, "gpu_info", lambda version: ORIN)
    monkeypatch.setattr(engines, "load_engine", load_engine)
    return renamed, retyped


def test_trtexec_script_builds_beside_the_engine_folder_and_build_adopts_it(
    export_cache, tmp_path, monkeypatch
):
    """trtexec.sh never writes into the engine folder (whose engines.json vouches for its engines); its
    engines are registered with `build --adopt`, checked against the bundle: one per graph, the
    graph's inputs and outputs, the plan's profiles. TensorRT itself is faked: no engine is built."""

    from mllm_edge.build.build import build_bundle, trtexec_folder

    folder = _bundle_copy(export_cache, tmp_path)
    plan = plan_build(BuildConfig(folder), ORIN)
    plan.folder.mkdir(parents=True)
    script = write_trtexec(plan, plan.folder)
    fake = tmp_path / "trtexec"
    fake.write_text(FAKE_TRTEXEC)
    fake.chmod(0o755)
    done = subprocess.run(
        ["bash", str(script)],
        env={"TRTEXEC": str(fake), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    out = trtexec_folder(plan)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{g}.engine" for g in plan.manifest.graphs)
    assert [p.name for p in plan.folder.iterdir()] == ["trtexec.sh"]  # nothing written where ours live
    custom = tmp_path / "elsewhere"
    assert (
        subprocess.run(
            ["bash", str(script), str(custom)], env={"TRTEXEC": str(fake), "PATH": "/usr/bin:/bin"}
        ).returncode
        == 0
    )
    assert len(list(custom.glob("*.engine"))) == len(plan.manifest.graphs)
    (plan.folder / "trtexec.sh").unlink()
    plan.folder.rmdir()

    renamed, retyped = fake_tensorrt(monkeypatch, plan)
    adopted, checks = build_bundle(BuildConfig(folder, adopt=out, verify=False))
    meta = load_engine_set(adopted.folder, folder, ORIN)
    assert set(meta.engines) == set(plan.manifest.graphs) and not checks and not meta.verified
    assert meta.adopted_from == str(out.resolve())
    assert meta.engines["llm_tail"].profiles == profile_record(plan.profiles["llm_tail"])

    renamed["llm_tail"] = {"logits": "scores"}
    with pytest.raises(MllmEdgeError, match="llm_tail.engine was not built from this bundle's llm_tail.onnx"):
        build_bundle(BuildConfig(folder, adopt=out, verify=False))
    renamed.clear()
    retyped["embed"] = ("inputs_embeds",)  # built with fp16 I/O from this fp32 bundle
    with pytest.raises(
        MllmEdgeError, match="embed.engine takes inputs_embeds as float16, the bundle's graph as float32"
    ):
        build_bundle(BuildConfig(folder, adopt=out, verify=False))
    retyped.clear()
    with pytest.raises(
        MllmEdgeError, match="embed.engine.s prefill profile takes input_ids .* this build plans"
    ):
        build_bundle(BuildConfig(folder, adopt=out, verify=False, max_context=plan.max_context - 8))
    (out / "prune.engine").unlink()
    with pytest.raises(MllmEdgeError, match="prune.engine missing"):
        build_bundle(BuildConfig(folder, adopt=out, verify=False))
    assert load_engine_set(
        adopted.folder, folder, ORIN
    ).engines  # a refused adoption left the last good folder


def test_a_build_writes_the_plan_from_its_buffer_and_lets_the_weights_go(tmp_path, monkeypatch):
    """build_engine with a fake TensorRT: the plan lands in the engine file as TensorRT gave it, and the
    parser (holding the weights), the network and the plan are all released by the time it returns."""
    import gc
    import weakref
    from types import SimpleNamespace

    from mllm_edge.build import tensorrt_api
    from mllm_edge.build.profiles import Profile
    from mllm_edge.build.settings import BuildSettings

    alive, released = {}, []

    class Tracked:
        def __init__(self, name):
            alive[name] = weakref.ref(self)

    class Plan(bytearray):  # IHostMemory supports the buffer protocol
        pass

    class Config(Tracked):
        builder_optimization_level = 0

        def set_memory_pool_limit(self, *a):
            pass

        def create_timing_cache(self, data):
            return SimpleNamespace(serialize=lambda: b"cache")

        def set_timing_cache(self, cache, ignore):
            return True

        def get_timing_cache(self):  # called after the plan is written: by then the weights must be gone
            gc.collect()
            released.append(all(alive[n]() is None for n in ("parser", "network", "plan")))
            return SimpleNamespace(serialize=lambda: b"cache")

    class Builder(Tracked):
        def __init__(self, logger):
            super().__init__("builder")

        def create_network(self, flags):
            return Tracked("network")

        def create_builder_config(self):
            return Config("config")

        def build_serialized_network(self, network, config):
            plan = Plan(b"serialized engine")
            alive["plan"] = weakref.ref(plan)
            return plan

    class Parser(Tracked):
        def __init__(self, network, logger):
            super().__init__("parser")
            self.network = network

        def parse_from_file(self, path):
            return True

    trt = SimpleNamespace(
        Builder=Builder,
        OnnxParser=Parser,
        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=0),
        MemoryPoolType=SimpleNamespace(WORKSPACE=0),
        __version__="10.3.0",
    )
    monkeypatch.setattr(tensorrt_api, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(tensorrt_api, "make_logger", lambda trt: SimpleNamespace(errors=[]))
    out = tmp_path / "g.engine"
    cache = tensorrt_api.build_engine(
        tmp_path / "g.onnx", [Profile("static", {})], BuildSettings("fp32", True), None, out
    )
    gc.collect()
    assert out.read_bytes() == b"serialized engine" and cache == b"cache"
    assert released == [True]  # parser, network and plan let go before the build went on


def test_the_memory_check_counts_a_third_copy_on_a_jetson():
    from mllm_edge.build.build import check_memory

    desktop = Target("RTX 4090", (8, 9), "10.3.0", jetson=False, total_memory_mb=24000, free_memory_mb=5000)
    check_memory("llm_tail", 2000, 1000, desktop)  # 2 x 2000 + 1000 fits in 5000
    with pytest.raises(MllmEdgeError, match="needs about 7000 MB and this Jetson"):
        check_memory("llm_tail", 2000, 1000, ORIN)  # weights, plan and the builder's copy share its memory


def test_trtexec_only_writes_the_script_where_its_engines_go_and_builds_nothing(
    export_cache, tmp_path, monkeypatch
):
    """For a machine where NVIDIA's trtexec builds and ours should not: the script alone, then --adopt."""
    from mllm_edge.build.build import build_bundle, trtexec_folder

    folder = _bundle_copy(export_cache, tmp_path)
    plan = plan_build(BuildConfig(folder), ORIN)
    fake_tensorrt(monkeypatch, plan)
    written, checks = build_bundle(BuildConfig(folder, trtexec_only=True))
    assert written.script == trtexec_folder(plan) / "trtexec.sh" and not checks
    assert not plan.folder.exists()  # nothing built, no engine folder
    fake = tmp_path / "trtexec"
    fake.write_text(FAKE_TRTEXEC)
    fake.chmod(0o755)
    done = subprocess.run(["bash", str(written.script)], env={"TRTEXEC": str(fake), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0
    assert len(list(trtexec_folder(plan).glob("*.engine"))) == len(plan.manifest.graphs)  # beside the script
    adopted, _ = build_bundle(BuildConfig(folder, adopt=trtexec_folder(plan), verify=False))
    assert set(load_engine_set(adopted.folder, folder, ORIN).engines) == set(plan.manifest.graphs)
