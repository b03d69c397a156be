"""The tiny checkpoints load offline like llava-hf ones, and behave well enough for parity tests."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402

from mllm_edge.testing.checkpoints import FIXTURE_SPECS, TinyLlavaSpec, make_tiny_llava, sample_image  # noqa: E402

QUESTION = "What colour is the circle?"
IMAGE_TURN = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
EXPECTED_PROMPTS = {
    "llava": f"USER: <image>\n{QUESTION} ASSISTANT:",
    "chatml": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<image>\n{QUESTION}<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
}


def load(path):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = transformers.AutoProcessor.from_pretrained(path)
    return model, processor


def model_inputs(processor, image=None):
    prompt = processor.apply_chat_template(IMAGE_TURN, add_generation_prompt=True)
    return processor(images=image if image is not None else sample_image(), text=prompt, return_tensors="pt")


def read_tensors(path) -> dict:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def test_loads_offline_with_the_spec_architecture(tiny_checkpoint):
    name, path = tiny_checkpoint
    spec = FIXTURE_SPECS[name]
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    processor = transformers.AutoProcessor.from_pretrained(path)

    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert isinstance(processor, transformers.LlavaProcessor)
    cfg, text, vision = model.config, model.config.text_config, model.config.vision_config
    assert text.model_type == spec.text_arch
    assert (text.num_attention_heads, text.num_key_value_heads) == (spec.num_heads, spec.num_kv_heads)
    assert text.rope_parameters["rope_theta"] == spec.rope_theta
    assert cfg.tie_word_embeddings == spec.tie_word_embeddings
    assert (vision.image_size, vision.patch_size) == (spec.image_size, spec.patch_size)
    assert cfg.image_seq_length == spec.num_image_tokens
    strategy = "full" if spec.vision_arch == "siglip" else "default"  # SigLIP has no CLS token to drop
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (
        spec.vision_feature_layer,
        strategy,
    )
    assert vision.model_type == f"{spec.vision_arch}_vision_model"
    assert text.vocab_size == len(processor.tokenizer)
    assert (
        cfg.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>") == processor.image_token_id
    )
    assert model.dtype == torch.float32
    if spec.text_arch == "qwen2":
        assert not text.use_sliding_window
        assert model.model.language_model.layers[0].self_attn.q_proj.bias is not None
        assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def test_files_have_the_hub_layout(tiny_checkpoint):
    name, path = tiny_checkpoint
    spec = FIXTURE_SPECS[name]
    for file in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "processor_config.json",
    ):
        assert (path / file).is_file(), file

    # transformers 5's save_pretrained names (the Hub's, except vision_tower.* lacks "vision_model.").
    keys = set(read_tensors(path))
    prefixes = ("language_model.model.", "vision_tower.", "multi_modal_projector.")
    assert all(key.startswith(prefixes) or key == "language_model.lm_head.weight" for key in keys)
    assert not any(key.startswith("vision_tower.vision_model.") for key in keys)
    assert ("language_model.lm_head.weight" in keys) == (not spec.tie_word_embeddings)

    image_settings = json.loads((path / "preprocessor_config.json").read_text())
    processor_settings = json.loads((path / "processor_config.json").read_text())
    assert "image_processor" not in processor_settings
    if spec.vision_arch == "siglip":  # resize straight to the square, every patch a token
        assert image_settings["image_processor_type"] == "SiglipImageProcessor"
        assert image_settings["size"] == {"height": spec.image_size, "width": spec.image_size}
        assert processor_settings["num_additional_image_tokens"] == 0
    else:  # resize the short side, centre-crop; the CLS token is counted, then dropped
        assert image_settings["image_processor_type"] == "CLIPImageProcessor"
        assert image_settings["crop_size"] == {"height": spec.image_size, "width": spec.image_size}
        assert image_settings["size"] == {"shortest_edge": spec.image_size}
        assert processor_settings["num_additional_image_tokens"] == 1
    assert processor_settings["patch_size"] == spec.patch_size
    tokenizer_settings = json.loads((path / "tokenizer_config.json").read_text())
    assert tokenizer_settings["chat_template"] == (path / "chat_template.jinja").read_text()


def test_special_token_ids_agree_everywhere(tiny_checkpoint):
    name, path = tiny_checkpoint
    model, processor = load(path)
    tok, text, gen = processor.tokenizer, model.config.text_config, model.generation_config
    assert 300 <= len(tok) <= 500
    assert text.eos_token_id == gen.eos_token_id == tok.eos_token_id
    assert text.pad_token_id == gen.pad_token_id == model.config.pad_token_id == tok.pad_token_id
    assert text.bos_token_id == gen.bos_token_id == tok.bos_token_id

    if FIXTURE_SPECS[name].chat_style == "llava":
        assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
        assert tok("a red circle").input_ids[0] == tok.bos_token_id  # BOS comes from the post-processor
        assert tok.convert_ids_to_tokens(tok("a red circle", add_special_tokens=False).input_ids)[
            0
        ].startswith("▁")
    else:
        assert tok.bos_token_id is None and tok.unk_token is None
        assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
        assert tok("a red circle").input_ids == tok("a red circle", add_special_tokens=False).input_ids
    for token in ("<image>", tok.pad_token, tok.eos_token):
        assert tok.convert_ids_to_tokens(tok(token, add_special_tokens=False).input_ids) == [token]
    text_back = "How many shapes are there? Three: 1 red, 2 blue!"
    assert tok.decode(tok(text_back, add_special_tokens=False).input_ids) == text_back


def test_chat_template_renders_the_model_style(tiny_checkpoint):
    name, path = tiny_checkpoint
    style = FIXTURE_SPECS[name].chat_style
    processor = transformers.AutoProcessor.from_pretrained(path)
    assert processor.apply_chat_template(IMAGE_TURN, add_generation_prompt=True) == EXPECTED_PROMPTS[style]

    conversation = [
        *IMAGE_TURN,
        {"role": "assistant", "content": [{"type": "text", "text": "It is red."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the square?"}]},
    ]
    expected = {
        "llava": f"USER: <image>\n{QUESTION} ASSISTANT: It is red.</s>USER: And the square? ASSISTANT:",
        "chatml": EXPECTED_PROMPTS["chatml"] + "It is red.<|im_end|>\n"
        "<|im_start|>user\nAnd the square?<|im_end|>\n<|im_start|>assistant\n",
    }[style]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == expected
    # The tokenizer alone (loaded without the processor) has the same template, and plain-string
    # content renders like a single text part.
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False) == expected
    as_parts = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    as_string = [{"role": "user", "content": QUESTION}]
    from_string, from_parts = (
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        for messages in (as_string, as_parts)
    )
    assert from_string == from_parts == EXPECTED_PROMPTS[style].replace("<image>\n", "")


def test_processor_expands_one_image_into_a_contiguous_run(tiny_checkpoint):
    name, path = tiny_checkpoint
    spec = FIXTURE_SPECS[name]
    model, processor = load(path)
    inputs = model_inputs(processor, sample_image(width=300, height=200, seed=3))

    assert inputs["pixel_values"].shape == (1, 3, spec.image_size, spec.image_size)
    positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    assert len(positions) == spec.num_image_tokens == (spec.image_size // spec.patch_size) ** 2
    assert positions[-1] - positions[0] + 1 == len(positions)
    if name == "llama_mha":
        assert len(positions) == 576  # LLaVA-1.5's count


def test_forward_gives_finite_distinct_logits_with_a_clear_top1(tiny_checkpoint):
    name, path = tiny_checkpoint
    model, processor = load(path)
    inputs = model_inputs(processor)
    with torch.no_grad():
        logits = model(**inputs).logits

    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits[0, -1].std() > 0.1  # not a flat distribution
    assert not torch.allclose(logits[0, -1], logits[0, -2])  # positions differ
    top2 = logits[0, -1].topk(2).values
    # Greedy decoding must be decided by the model, not by float noise (parity tests rely on it).
    assert top2[0] - top2[1] > 1e-3


def test_image_changes_the_answer_logits(tiny_checkpoint):
    name, path = tiny_checkpoint
    model, processor = load(path)
    with torch.no_grad():
        a = model(**model_inputs(processor, sample_image(seed=0))).logits[0, -1]
        b = model(**model_inputs(processor, sample_image(seed=1))).logits[0, -1]
    assert (a - b).abs().max() > 1e-2


def test_greedy_generation_runs_without_special_tokens(tiny_checkpoint):
    name, path = tiny_checkpoint
    model, processor = load(path)
    special_ids = {i for i, token in processor.tokenizer.added_tokens_decoder.items() if token.special}
    assert {model.config.image_token_id, model.generation_config.eos_token_id} <= special_ids
    for seed in range(3):  # EOS, <image>, <pad>... are never picked, so generation runs its full length
        inputs = model_inputs(processor, sample_image(seed=seed))
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        new_tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
        assert len(new_tokens) == 16 and not special_ids & set(new_tokens)


def test_constant_initialised_parameters_are_random(tiny_checkpoint):
    name, path = tiny_checkpoint
    tensors = read_tensors(path)
    biases = [t for key, t in tensors.items() if key.endswith(".bias")]
    norms = [t for key, t in tensors.items() if key.endswith(".weight") and "norm" in key]
    assert biases and norms
    assert all(t.abs().min() > 0 and t.std() > 0 for t in biases)
    assert all(not torch.equal(t, torch.ones_like(t)) for t in norms)


def test_same_spec_gives_identical_checkpoints(tiny_checkpoint, tmp_path):
    name, path = tiny_checkpoint
    spec = FIXTURE_SPECS[name]
    rng_before = torch.random.get_rng_state()
    again = make_tiny_llava(tmp_path / "again", spec)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is left alone

    first, second = read_tensors(path), read_tensors(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (path / file).read_text() == (again / file).read_text(), file

    other = read_tensors(make_tiny_llava(tmp_path / "other", replace(spec, seed=spec.seed + 100)))
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_hub_weight_names_load_to_the_same_model(tiny_checkpoints, tmp_path):
    spec = FIXTURE_SPECS["llama_gqa"]
    hub = make_tiny_llava(tmp_path / "hub", spec, hub_weight_names=True)
    names = set(read_tensors(hub))
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in names
    assert not any(key.startswith("vision_tower.") and ".vision_model." not in key for key in names)

    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(hub, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(tiny_checkpoints["llama_gqa"])
    loaded, expected = model.state_dict(), reference.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_rope_scaling_is_written_to_the_config(tmp_path):
    spec = TinyLlavaSpec(
        name="rope_linear",
        num_layers=2,
        image_size=32,
        patch_size=16,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    path = make_tiny_llava(tmp_path / spec.name, spec)
    model, processor = load(path)
    assert model.config.text_config.rope_parameters == {
        "rope_type": "linear",
        "factor": 2.0,
        "rope_theta": 10000.0,
    }
    with torch.no_grad():
        assert torch.isfinite(model(**model_inputs(processor)).logits).all()


def test_sample_image_is_deterministic_and_not_square():
    image = sample_image()
    assert image.mode == "RGB" and image.width != image.height
    assert image.tobytes() == sample_image().tobytes()
    assert image.tobytes() != sample_image(seed=1).tobytes()
    assert sample_image(width=50, height=80).size == (50, 80)
    assert (
        len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 10
    )  # shapes on a gradient, not a flat fill


SENTENCEPIECE_TEXTS = [
    QUESTION,
    "USER: What colour is the circle? ASSISTANT:",
    "Describe the picture.\nThere are 12 shapes,  two of them red.",
    " leading space and trailing ",
    "a\n\nb\tc",
    "Ünïcödé ∑ 漢字 🙂 are byte fallback",
]


def test_sentencepiece_tokenizer_is_its_model_and_padding_rows_are_quiet(tmp_path):
    """The llava-hf kind of tokenizer (tokenizer.model beside tokenizer.json, what llama.cpp's converter
    reads): transformers' fast tokenizer gives SentencePiece's own ids; rows past the tokenizer
    (vocab_size 700 > its ~640) exist and are shrunk as the specials' are, so greedy never picks them."""
    sentencepiece = pytest.importorskip("sentencepiece")
    from mllm_edge.runtime.prompt import PromptBuilder

    spec = TinyLlavaSpec(
        name="spm", tokenizer="sentencepiece", vocab_size=700, num_layers=2, image_size=64, patch_size=16
    )
    path = make_tiny_llava(tmp_path / spec.name, spec)
    model, processor = load(path)
    tokenizer = processor.tokenizer
    spm = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    assert spm.get_piece_size() < len(tokenizer) < 700 == model.config.text_config.vocab_size
    assert (spm.bos_id(), spm.eos_id(), spm.unk_id()) == (tokenizer.bos_token_id, tokenizer.eos_token_id, 0)
    for text in SENTENCEPIECE_TEXTS:
        assert tokenizer(text, add_special_tokens=False).input_ids == spm.encode(text), text
        assert tokenizer(text).input_ids == [spm.bos_id()] + spm.encode(text)
        assert tokenizer.decode(spm.encode(text)) == spm.decode(spm.encode(text))

    # our runtime's ids for the whole prompt are the processor's
    prompt = processor.apply_chat_template(IMAGE_TURN, add_generation_prompt=True)
    builder = PromptBuilder.from_folder(
        path, None, "<image>", model.config.image_token_id, spec.num_image_tokens
    )
    assert builder.encode(builder.render(QUESTION)) == model_inputs(processor)["input_ids"][0].tolist()
    assert builder.render(QUESTION) == prompt

    head = model.get_output_embeddings().weight.detach()
    norms = head.norm(dim=1)
    padding = norms[len(tokenizer) :]
    assert len(padding) == 700 - len(tokenizer)
    assert padding.max() < 0.2 * norms[3 : spm.get_piece_size()].median()
    with torch.no_grad():
        out = model.generate(**model_inputs(processor), max_new_tokens=8, do_sample=False)
    assert (out[0, -8:] < spm.get_piece_size()).all()


def test_vocab_size_below_the_tokenizer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="below the tokenizer"):
        make_tiny_llava(
            tmp_path / "x", TinyLlavaSpec(name="x", vocab_size=10, num_layers=2, image_size=32, patch_size=16)
        )
