"""LLaVA-NeXT in our PyTorch modules against transformers' LlavaNextForConditionalGeneration: the packed
image span, the logits and greedy tokens, on pictures of many shapes; a NeXT bundle's graphs one by
one in ONNX Runtime and through the chain; what is refused. Exported bundles: test_llava_next_bundle.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import NEXT_SPECS as SPECS  # noqa: E402
from helpers import QUESTION, hf_inputs, picture  # noqa: E402

from mllm_edge.errors import MllmEdgeError, UnsupportedModelError  # noqa: E402
from mllm_edge.models import generate, load_llava  # noqa: E402
from mllm_edge.models.config import load_llava_spec  # noqa: E402
from mllm_edge.pruning import PruningConfig  # noqa: E402
from mllm_edge.testing.checkpoints import make_tiny_llava  # noqa: E402

TOL = 1e-4
SIZES = [(56, 56), (40, 90), (90, 40), (3, 5), (200, 60), (57, 113), (300, 300), (1, 400)]


@pytest.fixture(scope="module", params=list(SPECS))
def next_checkpoint(request, tmp_path_factory):
    spec = SPECS[request.param]
    return make_tiny_llava(tmp_path_factory.mktemp("next") / spec.name, spec), spec


def load_both(path, eager: bool = False):
    """transformers' model (eager attention where attention maps are read), its processor, ours."""
    hf = transformers.LlavaNextForConditionalGeneration.from_pretrained(
        path, **({"attn_implementation": "eager"} if eager else {})
    ).eval()
    return hf, transformers.AutoProcessor.from_pretrained(path), load_llava(path)


def close(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def test_packed_span_and_logits_equal_transformers(next_checkpoint):
    """For square, wide, tall, tiny and odd pictures: our packed image span (base view, unpadded tile
    grid, a newline per row) equals transformers' image features, and the last-token logits match."""
    path, spec = next_checkpoint
    hf, processor, ours = load_both(path)
    assert type(ours).__name__ == "LlavaNext" and ours.spec.model_type == "llava_next"
    for i, (h, w) in enumerate(SIZES):
        batch = hf_inputs(processor, picture(h, w, i))
        with torch.no_grad():
            features = hf.model.get_image_features(
                pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]
            )
            features = features.pooler_output if hasattr(features, "pooler_output") else features
            expected = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
            hf_logits = hf(**batch).logits[:, -1]
            span = ours.image_embeds(batch["pixel_values"], batch["image_sizes"])
        assert span.shape[1] == ours.unpruned_image_tokens(batch["image_sizes"].tolist()), (h, w)
        assert span.shape[1] == int((batch["input_ids"] == ours.spec.image_token_id).sum()), (h, w)
        assert span[0].shape == expected.shape, (h, w)
        assert close(span[0], expected) < TOL, (h, w)
        result = generate(
            ours,
            batch["input_ids"],
            batch["pixel_values"],
            max_new_tokens=1,
            image_sizes=batch["image_sizes"],
        )
        assert close(result.prefill.logits, hf_logits) < TOL, (h, w)


def test_greedy_tokens_equal_transformers_generate(next_checkpoint):
    path, _ = next_checkpoint
    hf, processor, ours = load_both(path)
    for i, (h, w) in enumerate([(90, 40), (57, 113)]):
        batch = hf_inputs(processor, picture(h, w, 10 + i))
        with torch.no_grad():
            expected = hf.generate(**batch, max_new_tokens=12, do_sample=False)
        expected = expected[0, batch["input_ids"].shape[1] :].tolist()
        result = generate(
            ours,
            batch["input_ids"],
            batch["pixel_values"],
            max_new_tokens=12,
            eos_token_id=hf.generation_config.eos_token_id,
            image_sizes=batch["image_sizes"],
        )
        assert len(expected) >= 8
        assert result.token_ids[0] == expected, (h, w)


@pytest.mark.parametrize("k, ratio", [(1, 0.5), (2, 0.75)])
def test_fastv_keeps_what_transformers_attention_ranks_over_the_packed_span(next_checkpoint, k, ratio):
    """FastV on NeXT: one top-k over the whole span (base, tiles, newline tokens) by the last prompt
    token's head-mean attention at layer K-1, keep = round(n * (1 - R)) of this picture's n: equal to
    the set derived from transformers' eager attention maps; the answer then decodes at original positions."""
    from helpers import stable_top_k

    from mllm_edge.pruning import keep_count

    path, _ = next_checkpoint
    hf, processor, ours = load_both(path, eager=True)
    for i, (h, w) in enumerate([(40, 90), (300, 300), (90, 40)]):
        batch = hf_inputs(processor, picture(h, w, 20 + i))
        with torch.no_grad():
            out = hf(**batch, output_attentions=True)
        span = (batch["input_ids"][0] == hf.config.image_token_id).nonzero().flatten()
        row = out.attentions[k - 1][0, :, -1, :].mean(dim=0)
        expected = stable_top_k(row[span].tolist(), keep_count(len(span), ratio))
        result = generate(
            ours,
            batch["input_ids"],
            batch["pixel_values"],
            PruningConfig.from_method("fastv", ratio, k),
            max_new_tokens=4,
            image_sizes=batch["image_sizes"],
        )
        assert result.prefill.kept_llm[0].tolist() == expected, (h, w)
        assert (
            result.prefill.prompt_length == batch["input_ids"].shape[1]
        )  # decoding continues at original positions
        assert len(result.token_ids[0]) == 4


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_fastervlm_keeps_per_view_what_each_views_cls_attention_ranks_and_merges_spatially(
    next_checkpoint, ratio
):
    """Each view ranked by its own [CLS] row of transformers' eager CLIP attention at the feature
    layer, round(N * (1 - R)) kept per view; the merged span: the base view's kept tokens, then the
    tiles' in the stitched grid's raster order (no unpadding, no newline), projected: built here
    independently from transformers' tower and projector. FastV then ranks that merged span."""
    from helpers import stable_top_k

    from mllm_edge.pruning import keep_count

    path, spec = next_checkpoint
    hf, processor, ours = load_both(path, eager=True)
    side = spec.image_size // spec.patch_size
    keep = keep_count(side * side, ratio)
    for i, (h, w) in enumerate([(40, 90), (300, 300), (200, 60)]):
        batch = hf_inputs(processor, picture(h, w, 30 + i))
        target_h, target_w = ours.anyres.best_resolution(h, w)
        tiles_w, n_views = (
            target_w // spec.image_size,
            1 + (target_h // spec.image_size) * (target_w // spec.image_size),
        )
        views = batch["pixel_values"][0, :n_views]
        with torch.no_grad():
            tower = hf.model.vision_tower(views, output_attentions=True, output_hidden_states=True)
            cls_rows = tower.attentions[hf.config.vision_feature_layer][:, :, 0, 1:].mean(dim=1)  # [V, N]
            projected = hf.model.multi_modal_projector(
                tower.hidden_states[hf.config.vision_feature_layer][:, 1:]
            )
        expected_kept = [stable_top_k(row.tolist(), keep) for row in cls_rows]
        merged = [projected[0, p] for p in expected_kept[0]]
        tile_patches = []
        for t, kept in enumerate(expected_kept[1:]):
            for p in kept:
                row, col = (t // tiles_w) * side + p // side, (t % tiles_w) * side + p % side
                tile_patches.append(((row, col), projected[1 + t, p]))
        merged += [vector for _, vector in sorted(tile_patches, key=lambda item: item[0])]
        expected = torch.stack(merged)

        with torch.no_grad():
            embeds, kept = ours.fastervlm_embeds(batch["pixel_values"], ratio, batch["image_sizes"])
        assert kept[0].tolist() == expected_kept, (h, w)
        assert embeds[0].shape == expected.shape == (n_views * keep, spec.hidden_size)
        assert close(embeds[0], expected) < TOL, (h, w)

        both = PruningConfig.from_method("fastv+fastervlm", 0.5, 1, vision_ratio=ratio)
        result = generate(
            ours,
            batch["input_ids"],
            batch["pixel_values"],
            both,
            max_new_tokens=2,
            image_sizes=batch["image_sizes"],
        )
        unpruned = int((batch["input_ids"] == hf.config.image_token_id).sum())
        assert result.prefill.kept_vision[0].tolist() == expected_kept
        assert result.prefill.kept_llm.shape[1] == keep_count(n_views * keep, 0.5)
        assert result.prefill.prompt_length == batch["input_ids"].shape[1] - unpruned + n_views * keep


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_fastervlm_unpad_merge_keeps_the_unpadded_grids_kept_tokens_and_every_newline(next_checkpoint, ratio):
    """`--merge unpad` (the official code's spatial_unpad branch), built here from transformers'
    tower, projector, unpad_image and image_newline: the base view's kept tokens, then the tiles'
    stitched grid and its keep mask unpadded together, a newline after each row (always kept), the
    kept ones in row order. At R = 0 it is the unpruned span."""
    from helpers import stable_top_k
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    from mllm_edge.pruning import keep_count

    path, spec = next_checkpoint
    hf, processor, ours = load_both(path, eager=True)
    side = spec.image_size // spec.patch_size
    keep = keep_count(side * side, ratio)
    for i, (h, w) in enumerate([(40, 90), (300, 300), (200, 60), (1, 400)]):
        batch = hf_inputs(processor, picture(h, w, 40 + i))
        tiles_h, tiles_w = ours.anyres.tile_grid(h, w)
        views = batch["pixel_values"][0, : 1 + tiles_h * tiles_w]
        with torch.no_grad():
            tower = hf.model.vision_tower(views, output_attentions=True, output_hidden_states=True)
            cls_rows = tower.attentions[hf.config.vision_feature_layer][:, :, 0, 1:].mean(dim=1)
            projected = hf.model.multi_modal_projector(
                tower.hidden_states[hf.config.vision_feature_layer][:, 1:]
            )
        kept = [stable_top_k(row.tolist(), keep) for row in cls_rows]
        mask = torch.zeros(len(kept), side * side, dtype=torch.bool)
        for v, patches in enumerate(kept):
            mask[v, patches] = True
        grid = projected[1:].view(tiles_h, tiles_w, side, side, -1).permute(4, 0, 2, 1, 3)
        grid = unpad_image(grid.flatten(1, 2).flatten(2, 3), (h, w))  # [C, rows, cols]
        grid_mask = mask[1:].view(tiles_h, tiles_w, side, side).permute(0, 2, 1, 3)
        grid_mask = unpad_image(grid_mask.flatten(0, 1).flatten(1, 2)[None], (h, w))[0]
        newline = hf.model.image_newline[:, None, None].expand(-1, grid.shape[1], 1)
        rows = torch.cat((grid, newline), dim=-1).flatten(1, 2).transpose(0, 1)
        row_mask = torch.cat((grid_mask, torch.ones(grid_mask.shape[0], 1, dtype=torch.bool)), dim=-1)
        expected = torch.cat((projected[0, kept[0]], rows[row_mask.flatten()]))

        with torch.no_grad():
            embeds, got_kept = ours.fastervlm_embeds(
                batch["pixel_values"], ratio, batch["image_sizes"], "unpad"
            )
            unpruned = ours.image_embeds(batch["pixel_values"], batch["image_sizes"])
            all_kept, _ = ours.fastervlm_embeds(batch["pixel_values"], 0.0, batch["image_sizes"], "unpad")
        assert got_kept[0].tolist() == kept, (h, w)
        assert embeds[0].shape == expected.shape, (h, w)
        assert close(embeds[0], expected) < TOL, (h, w)
        assert close(all_kept, unpruned) < TOL, (h, w)
        assert embeds.shape[1] <= unpruned.shape[1]


def test_the_spec_counts_the_largest_picture():
    """num_image_tokens is the most a picture can give (what a bundle's max context must hold): for
    LLaVA-1.6's CLIP-L/336 and its five pinpoints, 576 base tokens + 48 rows of 48 patches and a
    newline (672 x 672) = 2928."""
    from mllm_edge.models.config import spec_from_hf_config

    cfg = transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        ),
        text_config=transformers.LlamaConfig(hidden_size=4096, num_hidden_layers=2, num_attention_heads=32),
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    spec = spec_from_hf_config(cfg)
    assert spec.model_type == "llava_next"
    assert spec.image_grid_pinpoints == ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    assert spec.num_image_tokens == 576 + 48 * 49 == 2928


def test_unsupported_settings_are_refused_and_plan_sizes_the_largest_picture(next_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from mllm_edge.cli import app

    path, _ = next_checkpoint
    config = json.loads((path / "config.json").read_text())
    for key, value, message in [
        ("mm_patch_merge_type", "flat", "mm_patch_merge_type='flat'"),
        ("vision_feature_select_strategy", "full", "vision_feature_select_strategy='full'"),
        ("image_grid_pinpoints", [[50, 70]], "not a whole number"),
    ]:
        folder = tmp_path / key
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(UnsupportedModelError, match=message):
            load_llava_spec(folder)

    ours = load_llava(path)
    processor = transformers.AutoProcessor.from_pretrained(path)
    batch = hf_inputs(processor, picture(40, 90, 0))
    with pytest.raises(MllmEdgeError, match="views"):
        ours.image_embeds(batch["pixel_values"][:, 0])  # one view, no sizes
    with pytest.raises(MllmEdgeError, match="views"):
        ours.image_embeds(batch["pixel_values"], [])  # sizes for fewer pictures than the batch
    with pytest.raises(MllmEdgeError, match="views"):
        ours.unpruned_image_tokens(None)
    got = CliRunner().invoke(app, ["plan", str(path), "--device", "orin-nano-8gb", "--json"])
    assert got.exit_code == 0, got.output  # planning needs only the config: NeXT plans already
    planned = json.loads(got.stdout)
    assert planned["image"] == {"views": ours.spec.max_views, "tokens": ours.spec.num_image_tokens}
    # the default grid's R = 0.95 keeps round(9 x 0.05) = 0 of a 9-patch view (16: 1): left out, said why
    patches = ours.spec.vision.grid**2
    assert patches in (9, 16)  # the two fixtures' towers
    skipped = any(
        s.startswith("fastervlm R=0.95: ratio 0.95 keeps no image token") for s in planned["skipped"]
    )
    assert skipped == (patches == 9)


def test_reference_answers_a_next_checkpoint_as_our_modules_do(next_checkpoint, tmp_path):
    """`mllm-edge reference` on a NeXT checkpoint: the picture's views and sizes from the processor,
    the same greedy answer as generate() on them, and the span's counts through FastV."""
    from typer.testing import CliRunner

    from mllm_edge.cli import app
    from mllm_edge.pruning import keep_count

    path, _ = next_checkpoint
    image = tmp_path / "picture.png"
    picture(40, 90, 0).save(image)
    processor = transformers.AutoProcessor.from_pretrained(path)
    batch = hf_inputs(processor, picture(40, 90, 0))
    ours = load_llava(path)
    pruning = PruningConfig.from_method("fastv", 0.5, 1)
    expected = generate(
        ours,
        batch["input_ids"],
        batch["pixel_values"],
        pruning,
        max_new_tokens=6,
        image_sizes=batch["image_sizes"],
    )
    got = CliRunner().invoke(
        app,
        ["reference", str(image), "--model", str(path), "--prompt", QUESTION]
        + ["--method", "fastv", "--ratio", "0.5", "--k", "1", "--max-new-tokens", "6"],
    )
    assert got.exit_code == 0, got.output
    n = int((batch["input_ids"] == ours.spec.image_token_id).sum())
    assert processor.tokenizer.decode(expected.token_ids[0], skip_special_tokens=True) in got.output
    assert f"image tokens: {n} -> vision {n} -> llm {keep_count(n, 0.5)};" in got.output


def test_a_refused_hub_checkpoint_downloads_no_weights(next_checkpoint, tmp_path, monkeypatch):
    """A hub id is checked on its config and tokenizer files before any weight is asked for: a NeXT
    checkpoint that export refuses (here: a merge type it does not run) costs kilobytes, not 14 GB.
    (The hub is replaced by a local copy.)"""
    import shutil

    import huggingface_hub

    from mllm_edge.export.bundle import ExportConfig, export_bundle

    path, _ = next_checkpoint
    small = tmp_path / "hub"
    small.mkdir()
    for f in path.iterdir():
        if f.suffix in (".json", ".jinja", ".model"):
            shutil.copy(f, small / f.name)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "mm_patch_merge_type": "flat"}))
    asked = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked.append(list(allow_patterns))
        return str(small)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(UnsupportedModelError, match="mm_patch_merge_type='flat'"):
        export_bundle(
            ExportConfig("llava-hf/llava-v1.6-vicuna-7b-hf", tmp_path / "out", PruningConfig(), "fp32")
        )
    assert asked and all("*.safetensors" not in patterns for patterns in asked)


@pytest.mark.parametrize("ratio", [None, 0.5])
def test_the_vision_graph_over_views_and_the_pack_graph_give_the_packed_span(
    next_checkpoint, ratio, tmp_path
):
    """Exported and run in ONNX Runtime: the vision graph over a picture's views (their count a dim,
    1 to the most; FasterVLM inside, per view), then the pack graph by anyres.pack_index (unpruned)
    or spatial_index (FasterVLM's merge) -> the span our modules give (= transformers', above),
    and FasterVLM's kept patches per view; on pictures of several view counts, the most included."""
    ort = pytest.importorskip("onnxruntime")
    from torch.export import Dim

    from mllm_edge import graphs as g
    from mllm_edge.export.graphs import PackGraph, VisionGraph
    from mllm_edge.export.lint import lint_model
    from mllm_edge.export.onnx_graph import export_graph
    from mllm_edge.pruning import keep_count

    path, spec = next_checkpoint
    ours = load_llava(path)
    processor = transformers.AutoProcessor.from_pretrained(path)
    patches = ours.spec.vision.grid**2
    keep = None if ratio is None else keep_count(patches, ratio)
    vision, pack = VisionGraph(ours, keep).eval(), PackGraph(ours).eval()
    max_views = ours.spec.max_views
    views = Dim("views", min=1, max=max_views)
    pixels = torch.randn(3, 3, spec.image_size, spec.image_size)
    export_graph(vision, (pixels,), ({0: views},), tmp_path, g.VISION)
    embeds = torch.randn(3, keep or patches, ours.spec.text.hidden_size)
    index = torch.tensor([0, 1, 3 * (keep or patches), 2])
    tokens = Dim("image_tokens", min=1, max=ours.spec.num_image_tokens)
    view_tokens = Dim("view_tokens", min=1, max=patches)
    export_graph(pack, (embeds, index), ({0: views, 1: view_tokens}, {0: tokens}), tmp_path, g.PACK)
    assert lint_model(tmp_path / "vision.onnx") == [] and lint_model(tmp_path / "pack.onnx") == []
    run_vision = ort.InferenceSession(str(tmp_path / "vision.onnx"), providers=["CPUExecutionProvider"])
    run_pack = ort.InferenceSession(str(tmp_path / "pack.onnx"), providers=["CPUExecutionProvider"])

    seen_views = set()
    with torch.no_grad():
        for height, width in [(30, 30), (40, 90), (90, 40), (300, 300), (1, 400)]:
            batch = hf_inputs(processor, picture(height, width, 3))
            tiles_h, tiles_w = ours.anyres.tile_grid(height, width)
            count = 1 + tiles_h * tiles_w
            seen_views.add(count)
            out = run_vision.run(None, {"pixel_values": batch["pixel_values"][0, :count].numpy()})
            if ratio is None:
                index = ours.anyres.pack_index(height, width)
                expected = ours.image_embeds(batch["pixel_values"], batch["image_sizes"])
            else:
                kept = out[1]
                index = ours.anyres.spatial_index(kept, height, width)
                expected, expected_kept = ours.fastervlm_embeds(
                    batch["pixel_values"], ratio, batch["image_sizes"]
                )
                np.testing.assert_array_equal(kept, expected_kept[0].numpy())  # per view, base view first
            (packed,) = run_pack.run(None, {"image_embeds": out[0], "pack_index": index})
            np.testing.assert_allclose(packed, expected.numpy(), atol=TOL, rtol=TOL)
    assert max(seen_views) == max_views and len(seen_views) >= 2


@pytest.mark.parametrize(
    "method, ratio, k, vision_ratio",
    [
        ("none", 0.0, 2, None),
        ("fastv", 0.5, 1, None),
        ("fastervlm", 0.5, 2, None),
        ("fastv+fastervlm", 0.5, 2, 0.25),
        # FastV's ratio would keep nothing of one view's survivors, but every span holds several views
        ("fastv+fastervlm", 0.95, 1, 0.5),
    ],
)
def test_the_bundle_graphs_through_the_chain_equal_generate(next_checkpoint, method, ratio, k, vision_ratio):
    """A NeXT bundle's graph modules (vision over views, pack, embed, [llm_head, span prune],
    llm_tail) behind the runtime's chain, with the export check's concatenating cache: the same
    kept sets (per view; over the span) and greedy tokens as generate(), on three picture shapes."""
    from mllm_edge.export.graphs import graph_modules
    from mllm_edge.export.samples import TorchEngine
    from mllm_edge.export.verify import ConcatCache
    from mllm_edge.runtime.chain import Chain, place_image_tokens

    path, _ = next_checkpoint
    ours = load_llava(path)
    processor = transformers.AutoProcessor.from_pretrained(path)
    pruning = PruningConfig.from_method(method, ratio, k, vision_ratio)
    modules = graph_modules(ours, pruning)
    assert list(modules)[:2] == ["vision", "pack"]
    t = ours.spec.text
    steps = 6
    with torch.no_grad():
        for height, width in [(40, 90), (300, 300), (90, 40)]:
            batch = hf_inputs(processor, picture(height, width, 5))
            expected = generate(
                ours,
                batch["input_ids"],
                batch["pixel_values"],
                pruning,
                steps,
                image_sizes=batch["image_sizes"],
            )
            chain = Chain(
                {name: TorchEngine(m) for name, m in modules.items()},
                ConcatCache(
                    t.num_layers,
                    pruning.split_layer,
                    np.zeros((1, 1, t.num_kv_heads, t.head_dim), np.float32),
                ),
                pruning.split_layer,
                anyres=ours.anyres,
            )
            tiles_h, tiles_w = ours.anyres.tile_grid(height, width)
            views = batch["pixel_values"][0, : 1 + tiles_h * tiles_w].numpy()
            vision = chain.encode_image(views, (height, width))
            if pruning.fastervlm:
                np.testing.assert_array_equal(vision["kept_patches"], expected.prefill.kept_vision[0].numpy())
            ids, start = place_image_tokens(
                batch["input_ids"].numpy(), ours.spec.image_token_id, vision["image_embeds"].shape[1]
            )
            prefilled = chain.prefill(ids, vision["image_embeds"], start)
            if pruning.fastv:
                np.testing.assert_array_equal(prefilled.kept_image, expected.prefill.kept_llm.numpy())
            tokens = [int(prefilled.logits[0].argmax())]
            for step in range(steps - 1):
                logits = chain.decode_step(np.array(tokens[-1:], np.int64), prefilled.length + step)
                tokens.append(int(logits[0].argmax()))
            assert tokens == expected.token_ids[0], (height, width)
