"""The chain written once (runtime.chain) and the Pipeline's lifecycle and observer hook."""

from __future__ import annotations

import numpy as np
import pytest

from mllm_edge.errors import MllmEdgeError
from mllm_edge.runtime.chain import place_image_tokens
from mllm_edge.testing.checkpoints import sample_image

PROMPT = "What is in the picture?"


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chain") / "scene.png"
    sample_image(300, 200, seed=1).save(path)
    return path


def test_place_image_tokens_sets_the_run_to_the_vision_graphs_count():
    ids = np.array([[5, 6, 9, 9, 9, 9, 7], [1, 2, 9, 9, 9, 9, 3]], np.int64)
    short, start = place_image_tokens(ids, 9, 2)
    assert start == 2 and short.tolist() == [[5, 6, 9, 9, 7], [1, 2, 9, 9, 3]]
    longer, _ = place_image_tokens(ids, 9, 5)
    assert longer.tolist()[0] == [5, 6, 9, 9, 9, 9, 9, 7]
    with pytest.raises(MllmEdgeError, match="no image placeholder"):
        place_image_tokens(np.array([[1, 2, 3]]), 9, 2)
    with pytest.raises(MllmEdgeError, match="one run"):
        place_image_tokens(np.array([[9, 1, 9, 2]]), 9, 2)
    with pytest.raises(MllmEdgeError, match="one run"):
        place_image_tokens(np.array([[1, 9, 9], [9, 9, 1]]), 9, 2)


def test_observers_see_every_graph_call_with_the_cache_rows_it_wrote(export_cache, image_file):
    """The hook calibration needs: each call's graph, inputs and outputs, the new K/V rows bound into
    the cache included, in the order the graphs run (FastV: prune once, in prefill)."""
    from mllm_edge.runtime.pipeline import Pipeline

    folder, _ = export_cache("llama_gqa", "fastv")
    calls = []
    with Pipeline.load(folder) as pipeline:
        pipeline.observe(
            lambda graph, inputs, outputs: calls.append(
                (graph, dict(inputs), {k: np.array(v) for k, v in outputs.items()})
            )
        )
        result = pipeline.generate(image_file, PROMPT, max_new_tokens=4)
        split = pipeline.manifest.pruning["split_layer"]
        cache = pipeline.cache
        steps = len(result.token_ids) - 1
        graphs = [c[0] for c in calls]
        assert (
            graphs
            == ["vision", "embed", "llm_head", "prune", "llm_tail"]
            + ["embed", "llm_head", "llm_tail"] * steps
        )
        for graph, inputs, outputs in calls:
            engine = pipeline.engines[graph]
            assert set(inputs) == set(engine.input_names) and set(outputs) == set(engine.output_names)
        # the last llm_tail call's new rows are the last rows of the tail group's cache
        _, _, last = calls[-1]
        layer = split  # the first tail layer
        n = cache.lengths["tail"]
        np.testing.assert_array_equal(
            last[f"new_key.{layer}"], cache.past("tail")[f"past_key.{layer}"][n : n + 1]
        )
        assert result.kept_image_tokens["llm"] == calls[3][2]["kept_image"][0].tolist()


def test_a_closed_pipeline_gives_its_sessions_back_and_says_so(export_cache, image_file):
    from mllm_edge.runtime.pipeline import Pipeline

    folder, _ = export_cache("llama_gqa", "none")
    with Pipeline.load(folder) as pipeline:
        engines = dict(pipeline.engines)
        assert pipeline.generate(image_file, PROMPT, max_new_tokens=2).token_ids
    assert not pipeline.engines and all(e.session is None for e in engines.values())
    with pytest.raises(MllmEdgeError, match="closed"):
        pipeline.generate(image_file, PROMPT, max_new_tokens=2)


def test_verification_cache_and_runtime_cache_give_the_same_tokens(export_cache, image_file):
    """Verification's concatenating cache and the runtime's zero-copy one, through the same chain."""
    from mllm_edge.export.verify import OnnxChain
    from mllm_edge.manifest import load_manifest
    from mllm_edge.runtime.image import load_image
    from mllm_edge.runtime.pipeline import Pipeline

    folder, _ = export_cache("llama_gqa", "fastv+fastervlm")
    with Pipeline.load(folder) as pipeline:
        result = pipeline.generate(image_file, PROMPT, max_new_tokens=6)
        pixels = pipeline.preprocess(load_image(image_file))
    steps = len(result.token_ids)
    tokens, _ = OnnxChain(folder, load_manifest(folder)).generate(
        np.asarray([result.prompt_token_ids]), pixels, steps
    )
    assert tokens[0].tolist() == result.token_ids
