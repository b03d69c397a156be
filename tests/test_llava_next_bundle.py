"""LLaVA-NeXT bundles: exported from the tiny NeXT fixtures, run by the runtime on pictures other than
the exporter's sample, and compared with our PyTorch reference (which test_llava_next.py compares
with transformers): the same greedy tokens, prompt ids, kept sets per view and over the span; the
lint; the manifest's geometry, `inspect`, `run --json --show-pruning`, build profiles and bench."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime", reason="running bundles needs the onnxruntime extra")
pytest.importorskip("onnx", reason="export needs the export extra")

from helpers import NEXT_SPECS, QUESTION, hf_inputs, picture  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from mllm_edge.cli import app  # noqa: E402
from mllm_edge.errors import MllmEdgeError  # noqa: E402
from mllm_edge.export.bundle import ExportConfig, export_bundle  # noqa: E402
from mllm_edge.export.lint import lint_model  # noqa: E402
from mllm_edge.export.verify import OnnxChain  # noqa: E402
from mllm_edge.manifest import load_manifest  # noqa: E402
from mllm_edge.models import generate, load_llava  # noqa: E402
from mllm_edge.pruning import PruningConfig, keep_count  # noqa: E402
from mllm_edge.runtime.anyres import AnyRes  # noqa: E402
from mllm_edge.runtime.pipeline import Pipeline  # noqa: E402
from mllm_edge.testing.checkpoints import make_tiny_llava  # noqa: E402

RATIO = 0.5
PICTURES = [(40, 90), (300, 300), (1, 400)]  # wide (2 views), the largest grid, a strip FasterVLM grows
# fp16 leaves out the strip: its tiles are black padding, whose patches tie exactly, and fp16 breaks
# those ties by rounding (ties are judged by the export's check, test_selection_ties.py)
FP16_PICTURES = PICTURES[:2]
# (fixture, method, dtype, FasterVLM's merge): fp32 and fp16, every graph kind on both fixtures'
# geometry, both merges
CASES = [
    ("llama", "none", "fp32", "spatial"),
    ("llama", "fastv", "fp32", "spatial"),
    ("llama", "fastervlm", "fp32", "spatial"),
    ("llama", "fastv+fastervlm", "fp32", "spatial"),
    ("llama", "fastv+fastervlm", "fp32", "unpad"),
    ("llama", "fastv+fastervlm", "fp16", "spatial"),
    ("mistral", "fastv+fastervlm", "fp32", "spatial"),
    ("mistral", "none", "fp16", "spatial"),
]
SAMPLE_PROMPT_TOKENS = {"llama": 98}  # the exporter's sample on the llama fixture: 28 text + 70 image
# Export's own verification (its sample, ONNX Runtime against PyTorch, ties judged) runs on these;
# the others are compared with the reference by the tests alone, which keeps the module's time down
VERIFIED = {("llama", "fastv+fastervlm"), ("mistral", "fastv+fastervlm"), ("mistral", "none")}
GRAPHS = {
    "none": ["vision", "pack", "embed", "llm_tail"],
    "fastervlm": ["vision", "pack", "embed", "llm_tail"],
    "fastv": ["vision", "pack", "embed", "llm_head", "prune", "llm_tail"],
    "fastv+fastervlm": ["vision", "pack", "embed", "llm_head", "prune", "llm_tail"],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("next_ckpt")
    return {name: make_tiny_llava(root / spec.name, spec) for name, spec in NEXT_SPECS.items()}


def pruning_of(method: str, ratio: float = RATIO, merge: str = "spatial") -> PruningConfig:
    return PruningConfig.from_method(method, 0.0 if method == "none" else ratio, 1, merge=merge)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, checkpoints):
    """Bundles exported once per module: (fixture, method, dtype, merge, ratio, max context) ->
    (folder, report)."""
    root = tmp_path_factory.mktemp("next_bundles")
    made = {}

    def get(name, method, dtype="fp32", merge="spatial", ratio=RATIO, max_context=None):
        key = (name, method, dtype, merge, ratio, max_context)
        if key not in made:
            out = root / "-".join(map(str, key))
            pruning = pruning_of(method, ratio, merge)
            verify = (name, method) in VERIFIED or dtype == "fp16"
            config = ExportConfig(str(checkpoints[name]), out, pruning, dtype, max_context, verify)
            made[key] = out, export_bundle(config)
        return made[key]

    return get


@functools.cache
def reference(path, dtype: str):
    return load_llava(path, torch.float16 if dtype == "fp16" else torch.float32)


@functools.cache
def processor(path):
    return transformers.AutoProcessor.from_pretrained(path)


def real_views(batch, anyres: AnyRes) -> tuple[np.ndarray, tuple[int, int]]:
    """The processor's pixel_values without its padding views, and the picture's (height, width)."""
    height, width = (int(v) for v in batch["image_sizes"][0])
    return batch["pixel_values"][0, : anyres.view_count(height, width)].numpy(), (height, width)


@pytest.mark.parametrize("name,method,dtype,merge", CASES, ids=["-".join(c) for c in CASES])
def test_a_next_bundle_answers_as_pytorch_does(name, method, dtype, merge, bundles, checkpoints):
    """Exported (and verified by export itself, for the VERIFIED ones and fp16), every graph through
    the TensorRT lint, then the runtime on three new pictures: fp32 gives generate()'s greedy tokens, the processor's prompt ids and the same kept
    sets (FasterVLM per view, base view first; FastV over the span); fp16's logits stay within
    fp16's tolerance when fed the reference's tokens, and its kept sets differ at most at the cut."""
    folder, report = bundles(name, method, dtype, merge)
    if (name, method) in VERIFIED or dtype == "fp16":
        assert report.checks and all(c.ok for c in report.checks) and report.chain.ok
    manifest = load_manifest(folder)
    assert list(manifest.graphs) == GRAPHS[method]
    for spec in manifest.graphs.values():
        assert lint_model(folder / spec.file) == []
    path = checkpoints[name]
    llava = reference(path, dtype)
    pruning = pruning_of(method, merge=merge)
    pipeline = Pipeline.load(folder)
    chain = OnnxChain(folder, manifest)
    for height, width in PICTURES if dtype == "fp32" else FP16_PICTURES:
        image = picture(height, width, 11)
        batch = hf_inputs(processor(path), image)
        expected = generate(
            llava, batch["input_ids"], batch["pixel_values"], pruning, 6, image_sizes=batch["image_sizes"]
        )
        kept_vision, kept_llm = expected.prefill.kept_vision, expected.prefill.kept_llm
        if dtype == "fp32":
            got = pipeline.generate(image, QUESTION, max_new_tokens=6)
            assert got.token_ids == expected.token_ids[0][: len(got.token_ids)], (height, width)
            assert got.prompt_token_ids == batch["input_ids"][0].tolist()
            vision, llm = got.kept_image_tokens["vision"], got.kept_image_tokens["llm"]
            assert vision == (None if kept_vision is None else kept_vision[0].tolist())
            assert llm == (None if kept_llm is None else kept_llm[0].tolist())
            continue
        views, size = real_views(batch, pipeline.anyres)
        forced = np.asarray(expected.token_ids)
        _, logits = chain.generate(batch["input_ids"].numpy(), views, forced.shape[1], forced, size)
        ref = torch.stack(expected.steps_logits, dim=1).float().numpy()[0]
        scale = np.abs(ref).max(axis=-1)
        assert (np.abs(logits[0] - ref).max(axis=-1) / scale).max() < 2e-2 * 1.5, (height, width)
        # fp16 scores round differently: tokens at the cut may swap (per view for FasterVLM)
        got_sets = [] if kept_vision is None else list(zip(chain.kept_patches, kept_vision[0]))
        got_sets += [] if kept_llm is None else [(chain.kept_image[0], kept_llm[0])]
        for got_set, want in got_sets:
            want = want.tolist()
            assert len(set(got_set.tolist()) ^ set(want)) <= max(2, len(want) // 10), (height, width)


def test_the_manifest_describes_the_geometry_and_inspect_shows_it(bundles, checkpoints):
    """Pinpoints, tile, most views and most image tokens as the config gives them; FasterVLM's keep per
    view, FastV's of the largest span; the export summary's FLOPs for the sample's own tokens."""
    folder, report = bundles("llama", "fastv+fastervlm")
    manifest = load_manifest(folder)
    a = manifest.architecture
    spec = NEXT_SPECS["llama"]
    assert [tuple(p) for p in a["image_grid_pinpoints"]] == list(spec.image_grid_pinpoints)
    assert a["vision"]["image_size"] == 56 and a["vision"]["patch_size"] == 14
    assert a["max_views"] == 1 + (112 * 112) // (56 * 56) == 5
    assert a["num_image_tokens"] == 16 + 8 * (8 + 1) == 88  # the 112x112 grid and its newlines
    per_view = keep_count(16, RATIO)
    assert manifest.pruning["fastervlm"]["keep"] == per_view == 8
    assert manifest.pruning["image_tokens"] == {
        "vision": 88,
        "llm": 5 * per_view,
        "after_fastv": keep_count(5 * per_view, RATIO),
    }
    assert manifest.max_context == 2048  # the largest picture and 1024 of text fit in the default
    assert manifest.merge == "spatial"
    unpad_folder = bundles("llama", "fastv+fastervlm", merge="unpad")[0]
    unpad = load_manifest(unpad_folder)
    assert unpad.merge == "unpad" and unpad.pruning["fastervlm"]["keep"] == per_view
    # the most the unpad merge puts in: the 112x112 pinpoint's 5 views x 8 and a newline per row
    assert unpad.pruning["image_tokens"]["llm"] == 5 * per_view + 8
    # plan reads the bundle's merge: the same 112x112 picture, its 8 newlines into the LLM
    got = CliRunner().invoke(
        app,
        [
            "plan",
            str(unpad_folder),
            "--device",
            "thor",
            "--precision",
            "fp16",
            "--method",
            "fastervlm",
            "--ratio",
            str(RATIO),
            "--json",
        ],
    )
    assert got.exit_code == 0, got.output
    (planned,) = json.loads(got.stdout)["settings"]
    assert planned["setting"]["merge"] == "unpad" and planned["image_tokens"]["vision"] == 5 * per_view + 8
    fastv = CliRunner().invoke(app, ["plan", str(unpad_folder), "--device", "thor", "--method", "fastv"])
    assert fastv.exit_code == 0, fastv.output  # the bundle's merge is for its FasterVLM settings only
    assert report.sample_image_tokens == 70  # the 360x480 sample: 2x2 tiles, unpadded to 6 of 8 rows
    got = CliRunner().invoke(app, ["inspect", str(folder)])
    assert got.exit_code == 0, got.output
    assert "up to 5 views, 88 image tokens" in got.output
    assert "56x112, 112x56, 112x112, 168x56, 56x168" in got.output
    assert "FasterVLM R=0.5 (8 patches per view)" in got.output


def test_fastv_at_ratio_zero_is_none_and_a_picture_beyond_the_max_context_is_refused(bundles, tmp_path):
    """FastV keeping every span token answers as the unpruned bundle does. With a max context that
    holds the sample but not the largest picture, that picture is refused before the vision graph
    runs, by a message naming the picture and the limit; `run` exits non-zero without a traceback."""
    small = SAMPLE_PROMPT_TOKENS["llama"] + 8
    folder, _ = bundles("llama", "fastv", ratio=0.0, max_context=small)
    none, _ = bundles("llama", "none")
    zero, plain = Pipeline.load(folder), Pipeline.load(none)
    image = picture(40, 90, 2)  # 52 image tokens: fits
    a = zero.generate(image, QUESTION, max_new_tokens=4)
    b = plain.generate(image, QUESTION, max_new_tokens=4)
    assert a.token_ids == b.token_ids
    assert a.kept_image_tokens["llm"] == list(range(52))
    longer = "Describe every shape in this picture, with its colour and where it is, in full detail."
    assert len(zero.generate(image, longer, max_new_tokens=1).prompt_token_ids) < small  # 52 tokens fit
    calls = []
    zero.observe(lambda graph, inputs, outputs: calls.append(graph))
    with pytest.raises(
        MllmEdgeError, match=rf"\(88 of them for the 300x300 picture\).*max context is {small}"
    ):
        zero.generate(picture(300, 300, 2), longer, max_new_tokens=4)
    assert calls == []  # refused before any graph ran
    path = tmp_path / "big.png"
    picture(300, 300, 2).save(path)
    got = CliRunner().invoke(app, ["run", str(path), "--bundle", str(folder), "--prompt", longer])
    assert got.exit_code != 0 and isinstance(got.exception, SystemExit)  # a message, no traceback
    assert "max context" in got.output


def test_run_json_and_show_pruning_mark_every_view(bundles, checkpoints, tmp_path):
    """`run --json` gives kept_image_tokens.vision as one sorted list per view (base view first) and
    llm as sorted indices into the span; `--show-pruning` draws the base view and the tile grid."""
    from PIL import Image

    folder, _ = bundles("llama", "fastv+fastervlm")
    path = tmp_path / "wide.png"
    picture(40, 90, 4).save(path)  # 1 x 2 tiles: 3 views
    out = tmp_path / "pruned.png"
    got = CliRunner().invoke(
        app,
        ["run", str(path), "--bundle", str(folder), "--prompt", QUESTION, "--max-new-tokens", "3"]
        + ["--json", "--show-pruning", str(out)],
    )
    assert got.exit_code == 0, got.output
    result = json.loads(got.stdout)
    vision, llm = result["kept_image_tokens"]["vision"], result["kept_image_tokens"]["llm"]
    assert len(vision) == 3 and all(v == sorted(v) and len(v) == 8 for v in vision)
    assert llm == sorted(llm) and len(llm) == keep_count(3 * 8, RATIO) and max(llm) < 3 * 8
    batch = hf_inputs(processor(checkpoints["llama"]), Image.open(path))
    assert result["prompt_token_ids"] == batch["input_ids"][0].tolist()
    drawn = Image.open(out)
    gap = max(56 // 8, 4)
    assert drawn.size == (56 + gap + 2 * 56, 56)  # the base view, a gap, one row of two tiles


def test_view_patches_maps_the_span_back_to_each_views_patches():
    """The span's rows: the base view's patches, then the unpadded tile grid row by row with a
    newline after each row (unpruned), or the kept patches of each view (FasterVLM). Worked by hand
    on a 2 x 2-patch tile and a picture of one 1 x 2 tile row."""
    from mllm_edge.runtime.show_pruning import view_patches

    anyres = AnyRes.from_config([(2, 4)], tile=2, patch=1)  # tiles of 2 x 2 patches, one row of two
    size = (2, 4)  # the pinpoint's own shape: nothing unpadded
    # unpruned: base 0-3, then grid rows [t1 p0, t1 p1, t2 p0, t2 p1, nl], [t1 p2, t1 p3, t2 p2, t2 p3, nl]
    assert anyres.image_tokens(*size) == 4 + 2 * 5
    marks = view_patches(anyres, size, 3, None, None)
    assert marks == [({0, 1, 2, 3},) * 2] * 3
    # FastV keeps span index 0 (base patch 0), 5 (tile 1 patch 1), 8 (newline), 11 (tile 2 patch 2)
    marks = view_patches(anyres, size, 3, None, [0, 5, 8, 11])
    assert [final for _, final in marks] == [{0}, {1}, {2}]
    # FasterVLM kept two patches per view; the span: base [1, 3], then the stitched grid's row 0 of
    # (tile 1's 0, tile 2's 1), row 1 (tile 1's 3, tile 2's 2) in raster order: t1 0, t2 1, t1 3, t2 2
    kept = [[1, 3], [0, 3], [1, 2]]
    marks = view_patches(anyres, size, 3, kept, [2, 3])
    assert [entered for entered, _ in marks] == [{1, 3}, {0, 3}, {1, 2}]
    assert [final for _, final in marks] == [set(), {0}, {1}]
    # the unpad merge: the unpruned order above, pruned patches left out, newlines (row 6) kept:
    # base 1, 3; row 0: t1 0 (row 2), t2 1 (row 4), newline; row 1: t1 3 (row 3), t2 2 (row 5), newline
    assert anyres.unpad_index(np.asarray(kept), *size).tolist() == [0, 1, 2, 4, 6, 3, 5, 6]
    marks = view_patches(anyres, size, 3, kept, [2, 4, 7], merge="unpad")
    assert [final for _, final in marks] == [set(), {0}, set()]  # the two newlines belong to no patch


def test_build_profiles_span_every_view_count_and_image_span(bundles):
    """A NeXT bundle's TensorRT profiles: vision and pack take 1 to the most views; the pack, embed
    and prune graphs take an image span from 1 token to the largest picture's."""
    from mllm_edge.build.profiles import graph_profiles

    folder, _ = bundles("llama", "fastv+fastervlm")
    manifest = load_manifest(folder)
    (vision,) = graph_profiles(manifest, "vision")
    assert vision.shapes["pixel_values"] == ((1, 3, 56, 56), (5, 3, 56, 56), (5, 3, 56, 56))
    (pack,) = graph_profiles(manifest, "pack")
    entering = manifest.pruning["image_tokens"]["llm"]
    assert pack.shapes["pack_index"] == ((1,), (entering,), (entering,))
    hidden = manifest.architecture["text"]["hidden_size"]
    assert pack.shapes["image_embeds"] == ((1, 8, hidden), (5, 8, hidden), (5, 8, hidden))
    (prune,) = graph_profiles(manifest, "prune")
    assert prune.shapes["image_positions"] == ((1,), (entering,), (entering,))
    assert prune.shapes["hidden_states"][0][1] == 1  # a prompt of any length
    embed = {p.name: p for p in graph_profiles(manifest, "embed")}
    assert embed["prefill"].shapes["image_embeds"][0][1] == 1
    assert embed["prefill"].shapes["image_embeds"][2][1] == entering


def test_bench_measures_a_next_bundle_at_its_largest_picture(bundles):
    """bench's picture is the pinpoint that gives the most tokens (112x112 here: 88), and its counts
    are that picture's: 5 views x 8 into the LLM, FastV's keep of those 40."""
    from mllm_edge.bench import bench_bundle

    folder, _ = bundles("llama", "fastv+fastervlm")
    result = bench_bundle(folder, prompt_lengths=[0], contexts=[128], runs=1, warmup=0, decode_tokens=2)
    assert AnyRes.from_config(NEXT_SPECS["llama"].image_grid_pinpoints, 56, 14).image_tokens(112, 112) == 88
    assert result.image_tokens == {"vision": 88, "llm": 5 * 8, "after_fastv": keep_count(5 * 8, RATIO)}
    assert result.prefill[0].image_tokens == 40
    assert result.vision_ms.median > 0 and result.prefill[0].ms.median > 0


@pytest.mark.parametrize("method", ["fastv+fastervlm", "none"])
def test_a_follow_up_turn_and_a_text_only_chat_answer_as_a_fresh_run(method, bundles):
    """On a NeXT bundle, a second turn about the same picture reuses the vision output and the
    cache (through the span prune) and answers as a fresh pipeline running the whole conversation;
    a conversation without a picture runs too, and equally."""
    folder, _ = bundles("llama", method)
    image = picture(90, 40, 6)
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    talking = Pipeline.load(folder)
    first = talking.chat(turn, image, max_new_tokens=4)
    follow = turn + [
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "And what else?"},
    ]
    second = talking.chat(follow, image, max_new_tokens=4)
    assert second.vision_reused and second.cached_prompt_tokens > 0
    fresh = Pipeline.load(folder).chat(follow, image, max_new_tokens=4, reuse=False)
    assert second.token_ids == fresh.token_ids
    assert second.kept_image_tokens == fresh.kept_image_tokens
    text_only = [{"role": "user", "content": "Hello, who are you?"}]
    a = talking.chat(text_only, max_new_tokens=4)
    b = Pipeline.load(folder).chat(text_only, max_new_tokens=4, reuse=False)
    assert a.token_ids == b.token_ids and a.kept_image_tokens == {"vision": None, "llm": None}
