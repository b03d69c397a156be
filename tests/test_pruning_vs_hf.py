"""FastV and FasterVLM in our reference path, checked against transformers' own computations.

The kept sets are re-derived from transformers' eager attention maps by docs/methods.md's rule, and the
pruned generations are re-derived without any KV cache from transformers' layers, so nothing of our
modules is trusted here.
"""

import pytest
import torch
from helpers import has_cls, hf_fastervlm_keep, hf_fastv_keep, hf_model, inputs, our_model, stable_top_k

from mllm_edge.errors import MllmEdgeError
from mllm_edge.models import generate
from mllm_edge.pruning import PruningConfig, keep_count


def skip_without_cls(path):
    if not has_cls(path):
        pytest.skip("FasterVLM needs a [CLS] token; this tower (SigLIP) has none")


def test_fastervlm_on_a_tower_without_cls_is_refused(tiny_checkpoints):
    path = tiny_checkpoints["qwen2_siglip"]
    input_ids, pixel_values = inputs(path)
    with pytest.raises(MllmEdgeError, match=r"\[CLS\] token"):
        generate(our_model(path), input_ids, pixel_values, PruningConfig.from_method("fastervlm", 0.5))


@pytest.mark.parametrize("k, ratio", [(1, 0.5), (2, 0.5), (2, 0.75), (3, 0.9)])
def test_fastv_kept_tokens_equal_those_from_hf_attention_maps(tiny_checkpoint, k, ratio):
    name, path = tiny_checkpoint
    ours = our_model(path)
    input_ids, pixel_values = inputs(path)
    keep = keep_count(ours.spec.num_image_tokens, ratio)
    result = generate(
        ours, input_ids, pixel_values, PruningConfig.from_method("fastv", ratio, k), max_new_tokens=1
    )
    assert result.prefill.kept_llm[0].tolist() == hf_fastv_keep(path, input_ids, pixel_values, k, keep)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.95])
def test_fastervlm_kept_patches_equal_those_from_clip_attention_maps(tiny_checkpoint, ratio):
    name, path = tiny_checkpoint
    skip_without_cls(path)
    ours = our_model(path)
    input_ids, pixel_values = inputs(path)
    keep = keep_count(ours.spec.num_image_tokens, ratio)
    result = generate(
        ours, input_ids, pixel_values, PruningConfig.from_method("fastervlm", ratio), max_new_tokens=1
    )
    assert result.prefill.kept_vision[0].tolist() == hf_fastervlm_keep(path, pixel_values, keep)


@pytest.mark.parametrize("method", ["fastv", "fastervlm", "fastv+fastervlm"])
def test_ratio_zero_reproduces_the_unpruned_model(tiny_checkpoint, method):
    name, path = tiny_checkpoint
    if "fastervlm" in method:
        skip_without_cls(path)
    ours = our_model(path)
    input_ids, pixel_values = inputs(path)
    plain = generate(ours, input_ids, pixel_values, max_new_tokens=6)
    pruned = generate(
        ours, input_ids, pixel_values, PruningConfig.from_method(method, 0.0, 2), max_new_tokens=6
    )
    assert pruned.token_ids == plain.token_ids
    for a, b in zip(pruned.steps_logits, plain.steps_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def hf_fastv_generate(path, input_ids, pixel_values, k: int, kept_image: list[int], steps: int) -> list[int]:
    """FastV decoded with no cache at all, on transformers' layers.

    Every step reruns the whole sequence: layers [0, K) on every token; layers [K, L) on the text,
    the kept image tokens and the generated tokens, each at its original position id (gaps stay).
    Pruning is static: `kept_image` comes from the prefill and does not change.
    """
    hf = hf_model(path)
    lm = hf.model.language_model
    with torch.no_grad():
        image = torch.cat(hf.model.get_image_features(pixel_values=pixel_values).pooler_output)
    image_pos = (input_ids[0] == hf.config.image_token_id).nonzero().flatten()
    start, n = int(image_pos[0]), len(image_pos)
    tokens: list[int] = []
    for _ in range(steps):
        ids = torch.cat((input_ids, torch.tensor([tokens], dtype=torch.long)), dim=1)
        with torch.no_grad():
            hidden = lm.embed_tokens(ids)
            hidden[0, start : start + n] = image
            t = ids.shape[1]
            survivors = [i for i in range(t) if not start <= i < start + n or (i - start) in kept_image]
            for layer_idx, layer in enumerate(lm.layers):
                if layer_idx == k:
                    hidden = hidden[:, survivors]
                positions = torch.arange(t)[None] if layer_idx < k else torch.tensor([survivors])
                s = hidden.shape[1]
                mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
                cos_sin = lm.rotary_emb(hidden, positions)
                hidden = layer(
                    hidden, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin
                )
            logits = hf.lm_head(lm.norm(hidden[:, -1]))
        tokens.append(int(logits.argmax()))
    return tokens


@pytest.mark.parametrize("k, ratio", [(1, 0.75), (2, 0.5)])
def test_fastv_generation_equals_recomputation_on_hf_layers(tiny_checkpoint, k, ratio):
    """Original position ids, two cache lengths, pruning once at prefill: all visible in the tokens."""
    name, path = tiny_checkpoint
    ours = our_model(path)
    input_ids, pixel_values = inputs(path)
    keep = keep_count(ours.spec.num_image_tokens, ratio)
    kept = hf_fastv_keep(path, input_ids, pixel_values, k, keep)
    result = generate(
        ours, input_ids, pixel_values, PruningConfig.from_method("fastv", ratio, k), max_new_tokens=10
    )
    assert result.token_ids[0] == hf_fastv_generate(path, input_ids, pixel_values, k, kept, steps=10)


def test_fastv_renumbering_positions_would_change_the_answer(tiny_checkpoint):
    """The check above can tell original from renumbered position ids (else it proves nothing)."""
    name, path = tiny_checkpoint
    ours = our_model(path)
    input_ids, pixel_values = inputs(path)
    keep = keep_count(ours.spec.num_image_tokens, 0.75)
    kept = hf_fastv_keep(path, input_ids, pixel_values, 1, keep)
    hf = hf_model(path)
    lm = hf.model.language_model
    with torch.no_grad():
        image = torch.cat(hf.model.get_image_features(pixel_values=pixel_values).pooler_output)
        start = int((input_ids[0] == hf.config.image_token_id).nonzero()[0])
        n = image.shape[0]
        hidden = lm.embed_tokens(input_ids)
        hidden[0, start : start + n] = image
        t = hidden.shape[1]
        survivors = [i for i in range(t) if not start <= i < start + n or (i - start) in kept]

        def run(renumber: bool):
            h = hidden
            for layer_idx, layer in enumerate(lm.layers):
                if layer_idx == 1:
                    h = h[:, survivors]
                positions = (
                    torch.arange(h.shape[1])[None]
                    if (layer_idx < 1 or renumber)
                    else torch.tensor([survivors])
                )
                s = h.shape[1]
                mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
                h = layer(
                    h,
                    attention_mask=mask,
                    position_ids=positions,
                    position_embeddings=lm.rotary_emb(h, positions),
                )
            return hf.lm_head(lm.norm(h[:, -1]))

        original, renumbered = run(False), run(True)
    result = generate(
        ours, input_ids, pixel_values, PruningConfig.from_method("fastv", 0.75, 1), max_new_tokens=1
    )
    torch.testing.assert_close(result.prefill.logits, original, rtol=1e-4, atol=1e-4)
    assert (original - renumbered).abs().max() > 1e-3


def test_fastervlm_generation_equals_hf_generate_on_selected_features(tiny_checkpoint):
    """FasterVLM as its official code does it: project all patches, keep the selected ones, generate."""
    name, path = tiny_checkpoint
    skip_without_cls(path)
    hf, ours = hf_model(path), our_model(path)
    input_ids, pixel_values = inputs(path)
    keep = keep_count(ours.spec.num_image_tokens, 0.75)
    kept = hf_fastervlm_keep(path, pixel_values, keep)
    image_id = hf.config.image_token_id
    with torch.no_grad():
        image = torch.cat(hf.model.get_image_features(pixel_values=pixel_values).pooler_output)[kept]
        ids = input_ids[0].tolist()
        start, n = ids.index(image_id), ours.spec.num_image_tokens
        short = torch.tensor([ids[:start] + [image_id] * keep + ids[start + n :]])
        embeds = hf.get_input_embeddings()(short)
        embeds[0, start : start + keep] = image
        expected = hf.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(short),
            max_new_tokens=10,
            min_new_tokens=10,
            do_sample=False,
        )[0].tolist()
    result = generate(
        ours, input_ids, pixel_values, PruningConfig.from_method("fastervlm", 0.75), max_new_tokens=10
    )
    assert result.prefill.kept_vision[0].tolist() == kept
    assert result.token_ids[0] == expected[-10:]


def test_both_methods_compose(tiny_checkpoint):
    """FastV ranks the tokens FasterVLM kept, with its own ratio: checked on transformers' attention maps."""
    name, path = tiny_checkpoint
    skip_without_cls(path)
    hf, ours = hf_model(path), our_model(path)
    input_ids, pixel_values = inputs(path)
    k = 2
    pruning = PruningConfig.from_method("fastv+fastervlm", 0.5, k, vision_ratio=0.5)
    vision_keep, llm_keep = pruning.keep_counts(ours.spec.num_image_tokens)
    kept = hf_fastervlm_keep(path, pixel_values, vision_keep)
    image_id = hf.config.image_token_id
    with torch.no_grad():
        image = torch.cat(hf.model.get_image_features(pixel_values=pixel_values).pooler_output)[kept]
        ids = input_ids[0].tolist()
        start = ids.index(image_id)
        short = torch.tensor(
            [ids[:start] + [image_id] * vision_keep + ids[start + ours.spec.num_image_tokens :]]
        )
        embeds = hf.get_input_embeddings()(short)
        embeds[0, start : start + vision_keep] = image
        attentions = hf(inputs_embeds=embeds, output_attentions=True).attentions
    row = attentions[k - 1][0, :, -1, :].mean(dim=0)[
        start : start + vision_keep
    ]  # over FasterVLM's survivors
    result = generate(ours, input_ids, pixel_values, pruning, max_new_tokens=2)
    assert result.prefill.kept_vision[0].tolist() == kept
    assert result.prefill.kept_llm[0].tolist() == stable_top_k(row.tolist(), llm_keep)
