"""Our LLaVA modules compute what transformers' LlavaForConditionalGeneration computes."""

import pytest
import torch
from helpers import has_cls, hf_model, inputs, our_model

from mllm_edge.models import generate, load_llava
from mllm_edge.models.generate import encode_image
from mllm_edge.pruning import PruningConfig

TOL = 1e-4


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's scale."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def test_vision_features_projector_and_logits_match(tiny_checkpoint):
    name, path = tiny_checkpoint
    hf, ours = hf_model(path), our_model(path)
    input_ids, pixel_values = inputs(path)
    with torch.no_grad():
        tower = hf.model.vision_tower(pixel_values, output_hidden_states=True)
        hf_features = tower.hidden_states[hf.config.vision_feature_layer]
        if hf.config.vision_feature_select_strategy == "default":
            hf_features = hf_features[:, 1:]  # CLS dropped
        hf_projected = hf.model.multi_modal_projector(hf_features)
        hf_logits = hf(input_ids=input_ids, pixel_values=pixel_values).logits[:, -1]

        features, _ = ours.image_features(pixel_values)
        projected, _ = encode_image(ours, pixel_values, PruningConfig())
        result = generate(ours, input_ids, pixel_values, max_new_tokens=1)

    assert (
        features.shape == hf_features.shape == (1, ours.spec.num_image_tokens, ours.spec.vision.hidden_size)
    )
    assert close(features, hf_features) < TOL
    assert close(projected, hf_projected) < TOL
    assert close(result.prefill.logits, hf_logits) < TOL


def test_greedy_tokens_match_transformers_generate(tiny_checkpoint):
    name, path = tiny_checkpoint
    hf, ours = hf_model(path), our_model(path)
    input_ids, pixel_values = inputs(path)
    eos = hf.generation_config.eos_token_id
    with torch.no_grad():
        expected = hf.generate(
            input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=16, do_sample=False
        )
    expected = expected[0, input_ids.shape[1] :].tolist()
    result = generate(ours, input_ids, pixel_values, max_new_tokens=16, eos_token_id=eos)
    assert len(expected) >= 8  # the fixtures are built so that greedy decoding does not stop at once
    assert result.token_ids[0] == expected


def recompute_without_cache(ours, input_ids, pixel_values, new_tokens: list[int]) -> list[torch.Tensor]:
    """Last-position logits of prompt + the first i generated tokens, each from scratch (no cache)."""
    from mllm_edge.models.generate import prompt_embeddings

    with torch.no_grad():
        image_embeds, _ = encode_image(ours, pixel_values, PruningConfig())
        prompt, _ = prompt_embeddings(ours, input_ids, image_embeds)
        logits = []
        for i in range(len(new_tokens)):
            tail = ours.decoder.embed(torch.tensor([new_tokens[:i]], dtype=torch.long))
            hidden = torch.cat((prompt, tail), dim=1)
            positions = torch.arange(hidden.shape[1])[None]
            out = ours.decoder.run_layers(hidden, positions, 0, ours.spec.text.num_layers)
            logits.append(ours.decoder.logits(out.hidden[:, -1]))
    return logits


def test_cached_decoding_equals_recomputation(tiny_checkpoint):
    name, path = tiny_checkpoint
    ours = our_model(path)
    input_ids, pixel_values = inputs(path)
    result = generate(ours, input_ids, pixel_values, max_new_tokens=8)
    fresh = recompute_without_cache(ours, input_ids, pixel_values, result.token_ids[0])
    assert [int(x.argmax()) for x in fresh] == result.token_ids[0]
    for cached, recomputed in zip(result.steps_logits, fresh):
        assert close(cached, recomputed) < TOL


def test_batch_rows_are_independent(tiny_checkpoint):
    """Two different images in one batch give each row what it gives alone (per-sequence scores too)."""
    name, path = tiny_checkpoint
    ours = our_model(path)
    ids0, px0 = inputs(path, 0)
    ids1, px1 = inputs(path, 1)
    if has_cls(path):
        pruning = PruningConfig.from_method("fastv+fastervlm", 0.5, 1, vision_ratio=0.25)
    else:
        pruning = PruningConfig.from_method("fastv", 0.5, 1)
    both = generate(ours, torch.cat((ids0, ids1)), torch.cat((px0, px1)), pruning, max_new_tokens=4)
    for row, (ids, px) in enumerate(((ids0, px0), (ids1, px1))):
        alone = generate(ours, ids, px, pruning, max_new_tokens=4)
        assert both.token_ids[row] == alone.token_ids[0]
        assert torch.equal(both.prefill.kept_llm[row], alone.prefill.kept_llm[0])
        if has_cls(path):
            assert torch.equal(both.prefill.kept_vision[row], alone.prefill.kept_vision[0])
    assert not torch.equal(both.prefill.kept_llm[0], both.prefill.kept_llm[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_half_precision_runs_close_to_fp32(tiny_checkpoint, dtype):
    """fp32 is what parity is checked in; a half-precision copy must still run and stay near it."""
    name, path = tiny_checkpoint
    ours = our_model(path)
    input_ids, pixel_values = inputs(path)
    half = load_llava(path, dtype=dtype)
    assert half.decoder.rotary.inv_freq.dtype == torch.float32  # positions stay exact
    ref = generate(ours, input_ids, pixel_values, max_new_tokens=1).prefill.logits
    low = generate(half, input_ids, pixel_values.to(dtype), max_new_tokens=1).prefill.logits
    assert torch.isfinite(low).all()
    assert close(low, ref) < 0.1


def test_attention_in_query_blocks_matches_transformers(tiny_checkpoint, monkeypatch):
    """The eager reference attends in blocks of query rows: blocks that split the prompt unevenly
    give transformers' logits, its greedy tokens and FastV's kept set of one block."""
    from mllm_edge.models import layers

    name, path = tiny_checkpoint
    hf, ours = hf_model(path), our_model(path)
    input_ids, pixel_values = inputs(path)
    pruning = PruningConfig.from_method("fastv", 0.5, 1)
    whole = generate(ours, input_ids, pixel_values, pruning, max_new_tokens=4)
    with torch.no_grad():
        hf_logits = hf(input_ids=input_ids, pixel_values=pixel_values).logits[:, -1]
    length = input_ids.shape[1]  # the processor has expanded the image placeholder
    assert length > 20
    monkeypatch.setattr(layers, "QUERY_BLOCK", next(b for b in (10, 11, 13) if length % b))
    blocked = generate(ours, input_ids, pixel_values, max_new_tokens=1)
    assert close(blocked.prefill.logits, hf_logits) < TOL
    pruned = generate(ours, input_ids, pixel_values, pruning, max_new_tokens=4)
    assert pruned.token_ids == whole.token_ids
    assert torch.equal(pruned.prefill.kept_llm, whole.prefill.kept_llm)
