"""The runtime's image preprocessing and prompt building against the checkpoint's own HF processor."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mllm_edge.errors import MllmEdgeError
from mllm_edge.runtime.image import ImagePreprocessor, load_image
from mllm_edge.runtime.prompt import PromptBuilder, TextStream
from mllm_edge.testing.checkpoints import FIXTURE_SPECS, sample_image

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "What colour is the circle?",
    "Décris l'image : où est le carré ? 日本語 🙂 ü",  # non-ASCII: multi-byte characters split over byte tokens
    "First line.\nSecond line,\n\n  indented third {{ bos_token }} <s>?",
]
# (width, height): square, smaller than every fixture's input size, large landscape, portrait, odd sizes
SIZES = [(320, 320), (40, 30), (1280, 400), (150, 517), (333, 97)]


@functools.lru_cache(maxsize=None)
def hf_processor(folder: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(folder))


def hf_render(processor, prompt: str, **kwargs) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, **kwargs)


def hf_pixels(processor, image) -> np.ndarray:
    return processor.image_processor(image, return_tensors="pt")["pixel_values"].numpy()


def builder(name: str, folder: Path, chat_template: str | None = None) -> PromptBuilder:
    processor = hf_processor(folder)
    return PromptBuilder.from_folder(
        folder,
        chat_template,
        processor.image_token,
        processor.image_token_id,
        FIXTURE_SPECS[name].num_image_tokens,
    )


def preprocessor(folder: Path) -> ImagePreprocessor:
    return ImagePreprocessor.from_config(json.loads((folder / "preprocessor_config.json").read_text()))


# ---------------------------------------------------------------------------------------------
# Pixel values


def test_processor_is_the_pil_backend(tiny_checkpoint):
    """What we replicate: without torchvision, transformers uses its PIL/numpy image processors."""
    _, folder = tiny_checkpoint
    assert type(hf_processor(folder).image_processor).__name__ in (
        "CLIPImageProcessorPil",
        "SiglipImageProcessorPil",
    )


@pytest.mark.parametrize("width,height", SIZES)
def test_pixel_values_match_hf(tiny_checkpoint, width, height):
    _, folder = tiny_checkpoint
    processor = hf_processor(folder)
    image = sample_image(width, height, seed=width + height)
    expected = hf_pixels(processor, image)
    for ours in (preprocessor(folder), ImagePreprocessor.from_config(processor.image_processor.to_dict())):
        pixels = ours(image)
        assert pixels.dtype == np.float32 and pixels.shape == expected.shape
        assert np.abs(pixels - expected).max() <= 1e-5


def _with_alpha(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, rgba.width, dtype=np.uint8), (rgba.height, 1))
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "P-transparent"])
def test_converted_modes_match_hf(tiny_checkpoint, mode):
    """Non-RGB inputs are converted as the processor's do_convert_rgb does (alpha composited onto white)."""
    _, folder = tiny_checkpoint
    image = sample_image(200, 150, seed=3)
    if mode == "RGBA":
        image = _with_alpha(image)
    elif mode == "LA":
        image = _with_alpha(image).convert("LA")
    elif mode == "P-transparent":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        image.info["transparency"] = 0
    else:
        image = image.convert(mode)
    expected = hf_pixels(hf_processor(folder), image)
    assert np.abs(preprocessor(folder)(image) - expected).max() <= 1e-5


@pytest.mark.parametrize(
    "cls_name,cfg",
    [
        ("CLIPImageProcessorPil", {}),  # class defaults
        ("SiglipImageProcessorPil", {}),
        # a crop larger than the resized image (zero padding), int sizes, bilinear
        ("CLIPImageProcessorPil", {"size": 40, "crop_size": 48, "resample": 2}),
        (
            "CLIPImageProcessorPil",
            {"size": {"height": 30, "width": 50}, "do_center_crop": False, "do_normalize": False},
        ),
        (
            "SiglipImageProcessorPil",
            {"size": {"height": 37, "width": 61}, "do_rescale": False, "resample": 1},
        ),
    ],
)
def test_other_settings_match_hf(cls_name, cfg):
    import transformers

    hf = getattr(transformers, cls_name)(**cfg)
    ours = ImagePreprocessor.from_config(hf.to_dict())
    for width, height in SIZES:
        image = sample_image(width, height, seed=1)
        expected = hf(image, return_tensors="np")["pixel_values"]
        assert np.abs(ours(image) - expected).max() <= 1e-5, (cfg, width, height)


@pytest.mark.parametrize(
    "change,message",
    [
        (
            {"image_processor_type": "LlavaNextImageProcessor"},
            "unsupported image processor 'LlavaNextImageProcessor'",
        ),
        ({"do_pad": True}, "do_pad=True"),
        ({"image_grid_pinpoints": [[336, 672]]}, "image_grid_pinpoints"),
        ({"size": {"shortest_edge": 336, "longest_edge": 672}}, "unsupported image processor size"),
        ({"resample": 9}, "resample=9"),
    ],
)
def test_unsupported_image_settings_are_refused(tiny_checkpoints, change, message):
    cfg = json.loads((tiny_checkpoints["llama_mha"] / "preprocessor_config.json").read_text())
    with pytest.raises(MllmEdgeError, match=message.replace("[", r"\[")):
        ImagePreprocessor.from_config({**cfg, **change})


def test_switched_off_options_are_accepted(tiny_checkpoints):
    cfg = json.loads((tiny_checkpoints["llama_mha"] / "preprocessor_config.json").read_text())
    ImagePreprocessor.from_config(
        {**cfg, "do_pad": False, "do_convert_rgb": None, "feature_extractor_type": "CLIPFeatureExtractor"}
    )


# ---------------------------------------------------------------------------------------------
# Loading images


def test_load_image(tmp_path):
    path = tmp_path / "picture.png"
    _with_alpha(sample_image(64, 48)).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (64, 48)


def test_bad_images_give_clear_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image")
    sample_image(64, 48).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    cases = {
        tmp_path / "missing.png": "does not exist",
        tmp_path: "is a folder, not an image file",
        tmp_path / "empty.png": "is empty",
        tmp_path / "junk.jpg": "cannot be read: ",
        tmp_path / "truncated.png": "cannot be read: ",
    }
    for path, message in cases.items():
        with pytest.raises(MllmEdgeError) as caught:
            load_image(path)
        assert str(caught.value).startswith(f"image {path} ") and message in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Prompts and token ids


@pytest.mark.parametrize("prompt", PROMPTS)
def test_render_matches_hf(tiny_checkpoint, prompt):
    name, folder = tiny_checkpoint
    processor = hf_processor(folder)
    expected = hf_render(processor, prompt)
    assert builder(name, folder).render(prompt) == expected  # the template saved in the folder
    assert builder(name, folder, processor.chat_template).render(prompt) == expected


@pytest.mark.parametrize("prompt", PROMPTS)
def test_encode_matches_hf(tiny_checkpoint, prompt):
    name, folder = tiny_checkpoint
    processor = hf_processor(folder)
    ours = builder(name, folder)
    rendered = ours.render(prompt)
    expected = processor(images=sample_image(), text=rendered, return_tensors="np")["input_ids"][0].tolist()
    ids = ours.encode(rendered)
    assert ids == expected
    assert ids.count(processor.image_token_id) == FIXTURE_SPECS[name].num_image_tokens


def test_encode_needs_one_image_token(tiny_checkpoints):
    ours = builder("qwen2", tiny_checkpoints["qwen2"])
    with pytest.raises(MllmEdgeError, match="holds 0 image tokens"):
        ours.encode("<|im_start|>user\nno picture<|im_end|>\n")
    with pytest.raises(MllmEdgeError, match="holds 2 image tokens"):
        ours.encode(ours.render("twice").replace("twice", "<image> twice"))
    with pytest.raises(MllmEdgeError, match="contains the image token"):  # render refuses it first
        ours.render("<image> twice")


def test_template_sees_special_tokens_like_hf(tiny_checkpoints, tmp_path):
    """Named special tokens, `*_token` keys of tokenizer_config.json; unset ones render as empty, not 'None'."""
    for name in ("llama_gqa", "qwen2"):
        folder = tmp_path / name
        shutil.copytree(tiny_checkpoints[name], folder)
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["image_token"] = "<image>"
        config_file.write_text(json.dumps(config))
        template = (
            "[{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ image_token }}|{{ sep_token }}]"
            "{% for m in messages %}{% generation %}{{ m['content'] | tojson }}{% endgeneration %}{% endfor %}"
            "{% if add_generation_prompt %}{{ strftime_now('%Y') | length }}{% endif %}"
        )
        processor = hf_processor(folder)
        ours = builder(name, folder, template)
        prompt = "<b>'quotes' & ü</b>"
        assert ours.render(prompt) == hf_render(processor, prompt, chat_template=template)


def test_template_errors_are_mllm_edge_errors(tiny_checkpoints):
    with pytest.raises(MllmEdgeError, match="does not compile"):
        builder("qwen2", tiny_checkpoints["qwen2"], "{% if %}")
    with pytest.raises(MllmEdgeError, match="only one image"):
        builder("qwen2", tiny_checkpoints["qwen2"], "{{ raise_exception('only one image') }}").render("hi")


# ---------------------------------------------------------------------------------------------
# Decoding and streaming


def _generated_like_ids(processor, seed: int) -> list[list[int]]:
    """Answers as a model would produce them, special tokens in between, and random ids."""
    tokenizer = processor.tokenizer
    rng = np.random.default_rng(seed)
    special = [
        i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id, processor.image_token_id) if i is not None
    ]
    answers = [
        "It is red. The circle is at the left of the image.",
        " Oui : c'est un carré bleu, 日本語 🙂 ü — fin.\n\nTwo lines.",
    ]
    sequences = [tokenizer.encode(text, add_special_tokens=False) for text in answers]
    sequences.append(sequences[1][:5] + special + sequences[1][5:] + special[:1])
    sequences.append(rng.integers(0, len(tokenizer), size=60).tolist())
    return sequences


def test_decode_and_stream_match_hf(tiny_checkpoint):
    name, folder = tiny_checkpoint
    processor = hf_processor(folder)
    ours = builder(name, folder)
    for ids in _generated_like_ids(processor, seed=len(name)):
        expected = processor.tokenizer.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids) == expected
        stream = TextStream(ours)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == expected
        if "\ufffd" not in expected:  # no piece shows half a character
            assert not any("\ufffd" in piece for piece in pieces)


def test_stream_holds_back_split_characters(tiny_checkpoints):
    """Byte-level BPE splits 🙂 over several tokens: nothing comes out until it is whole."""
    processor = hf_processor(tiny_checkpoints["qwen2"])
    ours = builder("qwen2", tiny_checkpoints["qwen2"])
    ids = processor.tokenizer.encode("a🙂", add_special_tokens=False)
    assert len(ids) > 2  # the emoji takes several byte tokens
    stream = TextStream(ours)
    pieces = [stream.push(i) for i in ids]
    assert pieces[0] == "a" and pieces[-1] == "🙂" and all(p == "" for p in pieces[1:-1])
    assert stream.flush() == ""


# ---------------------------------------------------------------------------------------------


def test_runtime_inputs_import_no_torch():
    code = (
        "import sys, mllm_edge.runtime.image, mllm_edge.runtime.prompt; "
        "bad = [m for m in ('torch','transformers','onnx','onnxscript') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
