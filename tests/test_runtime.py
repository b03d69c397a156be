"""The runtime (`mllm_edge.runtime`, `mllm-edge run`): bundles answer as the PyTorch reference does.

The runtime does its own preprocessing, chat template and tokenization (no transformers), so equal
greedy tokens here also say those equal the Hugging Face processor's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

pytest.importorskip("onnxruntime", reason="the runtime tests need the onnxruntime extra")

from helpers import PROMPT, our_model  # noqa: E402

from mllm_edge.cli import app  # noqa: E402
from mllm_edge.errors import MllmEdgeError  # noqa: E402
from mllm_edge.models import generate  # noqa: E402
from mllm_edge.models.inputs import prepare_inputs  # noqa: E402
from mllm_edge.pruning import PruningConfig  # noqa: E402
from mllm_edge.runtime.backends.onnxruntime import OnnxRuntimeEngine, OrtDeviceMemory  # noqa: E402
from mllm_edge.runtime.device_cache import ALIGNMENT, DeviceKVCache, DeviceTensor, HostMemory  # noqa: E402
from mllm_edge.runtime.pipeline import Pipeline  # noqa: E402
from mllm_edge.testing.checkpoints import sample_image  # noqa: E402

runner = CliRunner()
CASES = [
    ("llama_gqa", "none"),
    ("llama_gqa", "fastv"),
    ("llama_gqa", "fastervlm"),
    ("llama_gqa", "fastv+fastervlm"),
    ("llama_mha", "fastv"),
    ("qwen2", "fastv"),
    ("qwen2", "fastervlm"),
    ("mistral", "fastv"),
]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("runtime") / "scene.png"
    sample_image(300, 200, seed=1).save(path)
    return path


@pytest.mark.parametrize("name,method", CASES, ids=["-".join(c) for c in CASES])
def test_greedy_answer_equals_the_pytorch_reference(name, method, export_cache, tiny_checkpoints, image_file):
    folder, _ = export_cache(name, method)
    result = Pipeline.load(folder).generate(image_file, PROMPT, max_new_tokens=10)
    path = tiny_checkpoints[name]
    input_ids, pixel_values, rendered = prepare_inputs(path, sample_image(300, 200, seed=1), PROMPT)
    pruning = PruningConfig.from_method(method, 0.0 if method == "none" else 0.5)
    eos = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    ref = generate(our_model(path), input_ids, pixel_values, pruning, max_new_tokens=10, eos_token_id=eos)
    assert result.prompt == rendered
    assert result.prompt_token_ids == input_ids[0].tolist()
    assert result.token_ids == ref.token_ids[0]
    kept = result.kept_image_tokens
    assert kept["vision"] == (
        ref.prefill.kept_vision[0].tolist() if ref.prefill.kept_vision is not None else None
    )
    assert kept["llm"] == (ref.prefill.kept_llm[0].tolist() if ref.prefill.kept_llm is not None else None)


def test_ratio_zero_bundle_answers_like_none(export_cache, image_file):
    none = Pipeline.load(export_cache("llama_gqa", "none")[0]).generate(image_file, PROMPT, max_new_tokens=8)
    zero = Pipeline.load(export_cache("llama_gqa", "fastv", ratio=0.0)[0]).generate(
        image_file, PROMPT, max_new_tokens=8
    )
    assert zero.token_ids == none.token_ids
    assert zero.kept_image_tokens["llm"] == list(range(64))


def test_a_pipeline_answers_twice_the_same(export_cache, image_file):
    """The cache is reset between requests: nothing of the first answer leaks into the second."""
    pipeline = Pipeline.load(export_cache("llama_gqa", "fastv")[0])
    first = pipeline.generate(image_file, PROMPT, max_new_tokens=8)
    pipeline.generate(sample_image(seed=5), "something else entirely", max_new_tokens=5)
    assert pipeline.generate(image_file, PROMPT, max_new_tokens=8).token_ids == first.token_ids


class CopyCountingMemory(HostMemory):
    copies = 0

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        self.copies += 1
        super().copy(dst, src, nbytes)


@pytest.mark.parametrize(
    "memory,alignment",
    [("onnxruntime", 1), ("host", ALIGNMENT)],
    ids=["ort-device-memory", "tensorrt-alignment"],
)
@pytest.mark.parametrize("method", ["fastv", "fastervlm"])
def test_device_cache_answers_like_the_host_cache(method, memory, alignment, export_cache, image_file):
    """The device cache (TensorRT's, and ONNX Runtime's on CUDA) end to end with real graphs: ONNX
    Runtime binds its addresses as they are, here in host memory (OrtDeviceMemory on the CPU, or
    plain bytes with TensorRT's 256-byte alignment, where the fixture's 128-byte rows make every
    other slot go through scratch and a copy); the answer equals the host cache's."""
    folder, _ = export_cache("llama_gqa", method)
    expected = Pipeline.load(folder).generate(image_file, PROMPT, max_new_tokens=10)
    pipeline = Pipeline.load(folder)
    bytes_ = OrtDeviceMemory("cpu") if memory == "onnxruntime" else CopyCountingMemory()
    pipeline.cache = DeviceKVCache(
        bytes_, *pipeline.cache_shape, alignment=alignment
    )  # replaces the host cache
    result = pipeline.generate(image_file, PROMPT, max_new_tokens=10)
    assert result.token_ids == expected.token_ids and len(result.token_ids) > 1
    assert result.kept_image_tokens == expected.kept_image_tokens
    if memory == "host":
        assert bytes_.copies > 0  # the scratch path ran


def test_device_tensors_bind_on_the_engines_device(export_cache):
    """What the CPU cannot show of --device cuda: cache addresses are bound as memory of the session's
    device, host arrays as host memory (ONNX Runtime then copies them across)."""
    import numpy as np

    engine = OnnxRuntimeEngine(export_cache("llama_gqa", "none")[0] / "embed.onnx")
    engine.device = "cuda"  # as opened with device="cuda"; binding itself needs no GPU
    assert engine._where("past_key.0", DeviceTensor(4096, (3, 1, 2, 16), np.dtype(np.float32))) == (
        "cuda",
        0,
        np.float32,
        (3, 1, 2, 16),
        4096,
    )
    host = np.zeros((1, 1, 64), np.float32)
    assert engine._where("hidden_states", host) == ("cpu", 0, np.float32, (1, 1, 64), host.ctypes.data)
    with pytest.raises(ValueError, match="C-contiguous"):
        engine._where("hidden_states", np.zeros((4, 4), np.float32)[:, ::2])


def test_big_graphs_run_without_the_cpu_arena(export_cache, monkeypatch):
    """A graph under ARENA_MAX_WEIGHTS keeps ONNX Runtime's arena (small models: an allocation per
    operator costs), one over it goes without (the arena holds the largest call's activations);
    low-memory sessions never have it. The size is the graph's data file's."""
    from mllm_edge.runtime.backends import onnxruntime as backend

    path = export_cache("llama_gqa", "none")[0] / "llm_tail.onnx"
    assert backend.graph_weight_bytes(path) == (path.parent / "llm_tail.onnx.data").stat().st_size > 0

    def arena(**kwargs) -> bool:
        return OnnxRuntimeEngine(path, **kwargs).session.get_session_options().enable_cpu_mem_arena

    assert arena() and not arena(low_memory=True)
    monkeypatch.setattr(backend, "ARENA_MAX_WEIGHTS", backend.graph_weight_bytes(path))
    assert not arena()


def test_fp32_llm_graphs_go_unpacked_on_cpus_without_avx512(export_cache, monkeypatch):
    """Only fp32 LLM graphs on the CPU can go without prepacking (vision always packs, quantized
    weights would decode 20x slower); by default on x86 CPUs without AVX-512, MLLM_EDGE_PREPACK
    overriding either way."""
    from dataclasses import replace

    from mllm_edge.manifest import load_manifest
    from mllm_edge.runtime.backends import onnxruntime as backend

    manifest = load_manifest(export_cache("llama_gqa", "fastv")[0])  # no sessions: the rule alone
    assert manifest.dtype == "float32" and manifest.quantization is None
    monkeypatch.delenv("MLLM_EDGE_PREPACK", raising=False)
    for without_avx512 in (True, False):
        monkeypatch.setattr(backend, "_x86_without_avx512", lambda answer=without_avx512: answer)
        assert [backend.prepacks(manifest, g) for g in ("vision", "embed", "llm_head", "llm_tail")] == [
            True,
            True,
            not without_avx512,
            not without_avx512,
        ]
        assert backend.prepacks(manifest, "llm_tail", "cuda")
    for setting in ("0", "1"):
        monkeypatch.setenv("MLLM_EDGE_PREPACK", setting)
        assert backend.prepacks(manifest, "llm_tail") == (setting == "1")
        assert backend.prepacks(manifest, "vision")
    monkeypatch.setenv("MLLM_EDGE_PREPACK", "0")
    quantized = replace(manifest, quantization={"weights": "int8", "graphs": ["llm_tail"]})
    assert backend.prepacks(quantized, "llm_tail")
    assert backend.prepacks(replace(manifest, dtype="float16"), "llm_tail")
    monkeypatch.setenv("MLLM_EDGE_PREPACK", "true")
    with pytest.raises(MllmEdgeError, match="MLLM_EDGE_PREPACK must be 0 or 1"):
        backend.prepacks(manifest, "vision")


def test_cpus_without_avx512_are_told_by_their_flags():
    from mllm_edge.runtime.backends.onnxruntime import lacks_avx512

    zen3 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx fma avx2 bmi2\n"
    xeon = "processor\t: 0\nflags\t\t: fpu sse2 avx fma avx2 avx512f avx512bw amx_tile\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd sve\n"
    assert lacks_avx512(zen3) and not lacks_avx512(xeon) and not lacks_avx512(arm)
    assert not lacks_avx512("flags\t\t: fpu sse2 avx\n")  # no AVX2: not a CPU that was measured


def test_unpacked_weights_answer_as_packed_ones(export_cache, image_file, monkeypatch):
    """The sessions get the setting prepacks() chose, and answer alike either way."""
    folder = export_cache("llama_gqa", "fastv")[0]
    answers = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("MLLM_EDGE_PREPACK", setting)
        pipeline = Pipeline.load(folder)
        unpacked = set()
        for name, engine in pipeline.backend.engines.items():
            try:  # raises for a key never set
                engine.session.get_session_options().get_session_config_entry("session.disable_prepacking")
                unpacked.add(name)
            except RuntimeError:
                pass
        assert unpacked == ({"llm_head", "llm_tail"} if setting == "0" else set())
        answers[setting] = pipeline.generate(image_file, PROMPT, max_new_tokens=10).token_ids
        pipeline.close()
    assert answers["0"] == answers["1"]


def test_seeded_sampling_repeats(export_cache, image_file):
    pipeline = Pipeline.load(export_cache("llama_gqa", "fastv")[0])
    runs = [
        pipeline.generate(
            image_file, PROMPT, max_new_tokens=12, temperature=1.5, top_p=0.95, seed=s
        ).token_ids
        for s in (7, 7, 8)
    ]
    assert runs[0] == runs[1]
    assert (
        runs[0] != runs[2]
    )  # 12 tokens at temperature 1.5 from a random model: a collision would be a fluke
    greedy = pipeline.generate(image_file, PROMPT, max_new_tokens=12).token_ids
    assert (
        pipeline.generate(image_file, PROMPT, max_new_tokens=12, top_p=0.5, seed=3).token_ids == greedy
    )  # T=0 ignores top-p


def test_generation_stops_at_end_of_sequence(export_cache, image_file):
    pipeline = Pipeline.load(export_cache("llama_gqa", "fastv")[0])
    free = pipeline.generate(image_file, PROMPT, max_new_tokens=6).token_ids
    pipeline.eos = {free[2]}
    stopped = pipeline.generate(image_file, PROMPT, max_new_tokens=6)
    assert stopped.token_ids == free[:3]
    assert stopped.text == pipeline.prompts.decode(free[:2])


def test_streamed_text_equals_the_whole_answer(export_cache, image_file):
    pipeline = Pipeline.load(export_cache("qwen2", "fastv")[0])
    generation = pipeline.stream(image_file, PROMPT, max_new_tokens=12)
    pieces = list(generation)
    assert "".join(pieces) == generation.result.text


def test_runtime_imports_no_torch(export_cache, image_file):
    folder, _ = export_cache("llama_gqa", "fastv")
    code = textwrap.dedent(
        f"""
        import sys
        from mllm_edge.runtime.pipeline import Pipeline
        result = Pipeline.load({str(folder)!r}).generate({str(image_file)!r}, "hello", max_new_tokens=3)
        heavy = [m for m in ("torch", "transformers", "onnx", "onnxscript") if m in sys.modules]
        print(heavy, len(result.token_ids))
        sys.exit(1 if heavy else 0)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cli_streams_and_reports(export_cache, image_file):
    folder, _ = export_cache("llama_gqa", "fastv")
    text = runner.invoke(
        app, ["run", str(image_file), "--prompt", PROMPT, "--bundle", str(folder), "--max-new-tokens", "6"]
    )
    assert text.exit_code == 0, text.output + text.stderr
    assert "image tokens 64 -> 64 -> 32" in text.stderr and "tokens/s" in text.stderr
    args = [
        "run",
        str(image_file),
        "--prompt",
        PROMPT,
        "--bundle",
        str(folder),
        "--max-new-tokens",
        "6",
        "--json",
    ]
    as_json = runner.invoke(app, args)
    assert as_json.exit_code == 0, as_json.output + as_json.stderr
    result = json.loads(as_json.stdout)
    assert result["text"] == text.stdout.rstrip("\n")
    assert set(result) >= {
        "text",
        "prompt",
        "prompt_token_ids",
        "token_ids",
        "kept_image_tokens",
        "timings_ms",
        "decode_tokens_per_s",
        "backend",
        "device",
        "peak_rss_mb",
    }
    assert set(result["timings_ms"]) == {"preprocess", "vision", "prefill", "ttft", "decode_per_token"}
    assert result["backend"] == "onnxruntime" and result["device"] == "cpu"
    assert result["kept_image_tokens"]["vision"] is None and len(result["kept_image_tokens"]["llm"]) == 32

    low = runner.invoke(app, [*args, "--low-memory"])  # unoptimised sessions: the same answer
    assert low.exit_code == 0, low.output + low.stderr
    assert json.loads(low.stdout)["token_ids"] == result["token_ids"]
    refused = runner.invoke(app, [*args, "--low-memory", "--backend", "tensorrt"])
    assert (
        refused.exit_code == 1 and "low-memory sessions are ONNX Runtime's" in refused.stderr + refused.output
    )


def _run_error(args):
    result = runner.invoke(app, ["run", *args])
    assert result.exit_code == 1, result.output + result.stderr
    assert "Traceback" not in result.output + result.stderr
    return result.stderr


def test_bad_input_gets_a_clear_error(export_cache, image_file, tmp_path):
    folder, _ = export_cache("llama_gqa", "fastv")
    empty, corrupt = tmp_path / "empty.png", tmp_path / "corrupt.jpg"
    empty.write_bytes(b"")
    corrupt.write_bytes(b"not a picture")
    good = [str(image_file), "--bundle", str(folder)]
    cases = [
        ([str(tmp_path / "missing.png"), "--bundle", str(folder)], "missing.png does not exist"),
        ([str(empty), "--bundle", str(folder)], "is empty"),
        ([str(corrupt), "--bundle", str(folder)], "cannot be read"),
        ([str(image_file), "--bundle", str(tmp_path / "nothing")], "does not exist"),
        ([*good, "--max-new-tokens", "-3"], "max new tokens must be a whole number >= 1"),
        ([*good, "--max-new-tokens", "0"], "max new tokens must be a whole number >= 1"),
        ([*good, "--temperature", "-1"], "temperature must be a number >= 0"),
        ([*good, "--temperature", "nan"], "temperature must be a number >= 0"),
        ([*good, "--top-p", "0"], "top-p must be in (0, 1]"),
        ([*good, "--top-p", "1.5"], "top-p must be in (0, 1]"),
        ([*good, "--seed", "-1"], "seed must be a whole number >= 0"),
        ([*good, "--backend", "tvm"], "unknown backend 'tvm'"),
        ([*good, "--device", "tpu"], "unknown device 'tpu'"),
        ([*good, "--prompt", "word " * 3000], "the bundle's max context is 2048"),
    ]
    for args, message in cases:
        assert message in _run_error(args), args


def test_damaged_bundles_are_named(export_cache, image_file, tmp_path):
    source, _ = export_cache("llama_gqa", "fastv")
    for victim, message in [
        ("llm_head.onnx", "llm_head.onnx does not match its sha256"),
        ("manifest.json", "not valid JSON"),
    ]:
        folder = tmp_path / victim
        shutil.copytree(source, folder)
        data = bytearray((folder / victim).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / victim).write_bytes(bytes(data))
        assert message in _run_error([str(image_file), "--bundle", str(folder)])
    with pytest.raises(MllmEdgeError, match="schema version"):
        folder = tmp_path / "old"
        shutil.copytree(source, folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["schema_version"] = 0
        (folder / "manifest.json").write_text(json.dumps(manifest))
        Pipeline.load(folder)


def test_a_graph_that_fails_to_open_names_itself_and_closes_the_others(export_cache, tmp_path, monkeypatch):
    """The graphs open side by side: one that ONNX Runtime cannot load gives its own error, and every
    session that did open is closed, not left behind (those not started yet are not opened)."""
    from mllm_edge.manifest import load_manifest
    from mllm_edge.runtime.backends import onnxruntime as ort_backend

    source, _ = export_cache("llama_gqa", "fastv")
    folder = tmp_path / "bundle"
    shutil.copytree(source, folder)
    broken = ort_backend.session_file(load_manifest(folder).graphs["llm_head"])  # what the CPU opens
    (folder / broken).write_bytes(b"not a graph")
    opened, closed = [], []
    engine = ort_backend.OnnxRuntimeEngine
    real_init, real_close = engine.__init__, engine.close

    def init(self, path, *args, **kwargs):
        real_init(self, path, *args, **kwargs)
        opened.append(self.name)

    monkeypatch.setattr(engine, "__init__", init)
    monkeypatch.setattr(engine, "close", lambda self: closed.append(self.name) or real_close(self))
    manifest = load_manifest(folder, verify_files=False)
    with pytest.raises(MllmEdgeError, match=f"ONNX Runtime cannot load {broken}"):
        ort_backend.OnnxRuntimeBackend(folder, manifest)
    assert "llm_head" not in opened and opened  # the one before it in the manifest opened
    assert sorted(closed) == sorted(opened)


def test_cuda_without_onnxruntime_gpu_is_refused(export_cache, image_file):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has onnxruntime-gpu")
    assert "--device cuda needs onnxruntime-gpu" in _run_error(
        [str(image_file), "--bundle", str(export_cache("llama_gqa", "none")[0]), "--device", "cuda"]
    )


def test_decode_positions_follow_the_unpruned_prompt(export_cache, tiny_checkpoints, image_file):
    """FastV keeps original positions: decoding must continue at the full prompt length, not the kept one.
    Shifting the runtime's positions by the pruned count must change the answer, or this check is blind."""
    folder, _ = export_cache("llama_gqa", "fastv", ratio=0.75)
    pipeline = Pipeline.load(folder)
    right = pipeline.generate(image_file, PROMPT, max_new_tokens=10).token_ids

    class Shifted:  # the engine, fed decode positions as if renumbered after pruning 48 of 64
        def __init__(self, engine):
            self.engine = engine

        def run(self, inputs, outputs=None):
            if inputs["position_ids"].shape[1] == 1:
                inputs = {**inputs, "position_ids": inputs["position_ids"] - 48}
            return self.engine.run(inputs, outputs)

    for graph in ("llm_head", "llm_tail"):
        pipeline.engines[graph] = Shifted(pipeline.engines[graph])
    wrong = pipeline.generate(image_file, PROMPT, max_new_tokens=10).token_ids
    assert wrong != right
    ref = generate(
        our_model(tiny_checkpoints["llama_gqa"]),
        *prepare_inputs(tiny_checkpoints["llama_gqa"], sample_image(300, 200, seed=1), PROMPT)[:2],
        PruningConfig.from_method("fastv", 0.75),
        max_new_tokens=10,
        eos_token_id=2,
    )
    assert right == ref.token_ids[0]


def test_show_pruning_marks_the_kept_patches(export_cache, image_file, tmp_path):
    """Patches pruned by FasterVLM are darkest, those FastV dropped dimmer, the survivors outlined."""
    import numpy as np
    from PIL import Image

    from mllm_edge.runtime.show_pruning import LLM_PRUNED_DIM, VISION_PRUNED_DIM, kept_patches

    folder, _ = export_cache("llama_gqa", "fastv+fastervlm")
    out = tmp_path / "pruning.png"
    result = runner.invoke(
        app,
        [
            "run",
            str(image_file),
            "--bundle",
            str(folder),
            "--max-new-tokens",
            "2",
            "--show-pruning",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output + result.stderr
    kept = json.loads(result.stdout)["kept_image_tokens"]
    entered, final = kept_patches(64, kept["vision"], kept["llm"])
    assert len(entered) == 32 and len(final) == 16 and final <= entered
    pipeline = Pipeline.load(folder)
    from mllm_edge.runtime.image import load_image
    from mllm_edge.runtime.show_pruning import model_view

    plain = np.asarray(
        model_view(pipeline.preprocess(load_image(image_file)), pipeline.manifest.preprocessing), np.float32
    )
    drawn = np.asarray(Image.open(out).convert("RGB"), np.float32)
    assert drawn.shape == plain.shape == (64, 64, 3)
    for patch in range(64):
        row, col = divmod(patch, 8)
        inner = (slice(row * 8 + 1, row * 8 + 7), slice(col * 8 + 1, col * 8 + 7))  # inside the outline
        ratio = drawn[inner].sum() / max(plain[inner].sum(), 1.0)
        expected = 1.0 if patch in final else LLM_PRUNED_DIM if patch in entered else VISION_PRUNED_DIM
        assert abs(ratio - expected) < 0.03, (patch, ratio, expected)
    assert "does not exist" in _run_error(
        [str(image_file), "--bundle", str(folder), "--show-pruning", str(tmp_path / "no" / "x.png")]
    )


def test_cached_decoding_equals_recomputation(export_cache, image_file):
    """Each token the runtime decodes with its cache is the argmax of the whole sequence recomputed
    from scratch (no cache) through the same graphs."""
    import numpy as np

    pipeline = Pipeline.load(export_cache("qwen2", "none")[0])
    result = pipeline.generate(image_file, PROMPT, max_new_tokens=8)
    from mllm_edge.runtime.image import load_image

    image_embeds = pipeline.engines["vision"].run(
        {"pixel_values": pipeline.preprocess(load_image(image_file))}
    )["image_embeds"]
    ids = np.asarray(result.prompt_token_ids, np.int64)
    start = int(np.argmax(ids == pipeline.manifest.tokenizer["image_token_id"]))
    sequence = list(result.prompt_token_ids)
    text = pipeline.manifest.architecture["text"]
    for token in result.token_ids:
        batch = np.asarray([sequence], np.int64)
        embeds = pipeline.engines["embed"].run(
            {"input_ids": batch, "image_embeds": image_embeds, "image_start": np.array(start, np.int64)}
        )["inputs_embeds"]
        empty = np.zeros((1, 1, text["num_kv_heads"], text["head_dim"]), np.float32)  # the null row alone
        past = {f"past_{kind}.{i}": empty for i in range(text["num_layers"]) for kind in ("key", "value")}
        logits = pipeline.engines["llm_tail"].run(
            {"hidden_states": embeds, "position_ids": np.arange(batch.shape[1])[None], **past}
        )["logits"]
        assert int(logits[0].argmax()) == token
        sequence.append(token)
