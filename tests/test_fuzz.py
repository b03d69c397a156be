"""Property-based tests (Hypothesis): whatever a user hands in, the only exception that reaches them is
ours, with a message naming the problem; where the Hugging Face processor accepts an input, we give
what it gives. Bounded in examples (CI time); Hypothesis prints the failing example and its seed."""

from __future__ import annotations

import functools
import io
import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mllm_edge.errors import MllmEdgeError
from mllm_edge.manifest import MANIFEST_NAME, load_manifest
from mllm_edge.runtime.image import ImagePreprocessor, load_image
from mllm_edge.runtime.prompt import PromptBuilder
from mllm_edge.testing.checkpoints import FIXTURE_SPECS

# The number of examples and their seeds come from the profile conftest.py loads: the same 40 each
# CI run; HYPOTHESIS_PROFILE=explore draws 400 new ones.
BOUNDED = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK", "YCbCr"]


def make_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I", "F"):
        top = {"I;16": 65535, "I": 65535, "F": 1.0}[mode]
        values = rng.uniform(0, top, (height, width))
        kind = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        return Image.fromarray(values.astype(kind))  # uint16 -> I;16, int32 -> I, float32 -> F
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    return rgb.convert(mode)


@st.composite
def image_files(draw):
    """Bytes of an image file: a random mode, size and format, sometimes truncated or corrupted."""
    mode = draw(st.sampled_from(MODES))
    image = make_image(mode, draw(st.integers(1, 48)), draw(st.integers(1, 48)), draw(st.integers(0, 2**16)))
    formats = ["PNG", "TIFF"] if mode in ("I;16", "I", "F") else ["PNG", "TIFF", "BMP", "GIF", "WEBP", "JPEG"]
    fmt = draw(st.sampled_from(formats))
    buffer = io.BytesIO()
    try:
        image.save(buffer, fmt)
    except (OSError, ValueError, KeyError):  # a mode this format cannot hold: save it as PNG
        buffer = io.BytesIO()
        image.convert("RGBA" if "A" in image.getbands() else "RGB").save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    damage = draw(st.sampled_from(["none", "truncate", "flip", "junk"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif damage == "junk":
        data = bytearray(draw(st.binary(min_size=0, max_size=64)))
    return bytes(data)


@functools.cache
def clip_preprocessor(folder) -> ImagePreprocessor:
    return ImagePreprocessor.from_config(json.loads((folder / "preprocessor_config.json").read_text()))


@BOUNDED
@given(data=image_files())
def test_any_image_file_gives_pixels_or_our_error(data, tmp_path, tiny_checkpoints):
    path = tmp_path / "picture"
    path.write_bytes(data)
    try:
        image = load_image(path)
    except MllmEdgeError as e:
        assert str(e).startswith(f"image {path} ")
        return
    assert image.mode == "RGB" and image.size[0] >= 1 and image.size[1] >= 1
    pixels = clip_preprocessor(tiny_checkpoints["llama_gqa"])(image)
    size = FIXTURE_SPECS["llama_gqa"].image_size
    assert pixels.shape == (1, 3, size, size) and np.isfinite(pixels).all()


@functools.cache
def prompt_setup(folder):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(folder))
    name = "llama_gqa"
    builder = PromptBuilder.from_folder(
        folder, None, processor.image_token, processor.image_token_id, FIXTURE_SPECS[name].num_image_tokens
    )
    return processor, builder


PIECES = ["{{", "}}", "{%", "%}", "{#", "<s>", "</s>", "<pad>", "<image>", "USER:", "ASSISTANT:", "\n", " "]
# any unicode (control characters included), mixed with template syntax and special-token strings
TEXT = st.lists(st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(PIECES), max_size=8).map(
    "".join
)


@BOUNDED
@given(prompt=TEXT)
def test_any_prompt_renders_and_tokenizes_as_the_processor_does(prompt, tiny_checkpoints):
    processor, builder = prompt_setup(tiny_checkpoints["llama_gqa"])
    try:
        rendered = builder.render(prompt)
        ids = builder.encode(rendered)
    except MllmEdgeError as e:
        assert "image token" in str(e)  # the only prompt we refuse: one holding the placeholder
        assert processor.image_token in prompt
        return
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    expected = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == expected
    text = expected.replace(
        processor.image_token, processor.image_token * FIXTURE_SPECS["llama_gqa"].num_image_tokens
    )
    assert ids == processor.tokenizer(text)["input_ids"]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def paths(value, prefix=()):
    """Every path into a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, (*prefix, i))


@pytest.fixture(scope="module")
def bundle(export_cache):
    return export_cache("llama_gqa", "fastv+fastervlm")[0]


@BOUNDED
@given(data=st.data())
def test_any_mutated_manifest_loads_or_is_named_damaged(data, bundle, tmp_path):
    folder = tmp_path / "bundle"
    if not folder.exists():
        shutil.copytree(bundle, folder)
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    where = data.draw(st.sampled_from([p for p in paths(manifest) if p]))
    parent = manifest
    for key in where[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()):
        del parent[where[-1]]
    else:
        parent[where[-1]] = data.draw(JSON)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    from typer.testing import CliRunner

    from mllm_edge.cli import app
    from mllm_edge.runtime.pipeline import Pipeline

    try:
        load_manifest(folder)
        Pipeline.load(folder).close()  # what `run` does with it
    except MllmEdgeError as e:
        # the manifest's field, the file it names, or (a changed file list) a file it no longer vouches for
        assert (
            f"{MANIFEST_NAME}" in str(e) or "does not match its sha256" in str(e) or "is missing" in str(e)
        ), str(e)
    result = CliRunner().invoke(app, ["inspect", str(folder)])
    assert result.exit_code in (0, 1) and "Traceback" not in result.output, result.output
    if result.exit_code == 1:
        assert result.stderr.startswith("error: ")


@BOUNDED
@given(data=st.data())
def test_any_damaged_bundle_file_is_named(data, bundle, tmp_path_factory):
    from mllm_edge.runtime.pipeline import Pipeline

    folder = tmp_path_factory.mktemp("damaged") / "bundle"
    shutil.copytree(bundle, folder)
    files = sorted(json.loads((folder / MANIFEST_NAME).read_text())["files"])
    rel = data.draw(st.sampled_from(files))
    path = folder / rel
    action = data.draw(st.sampled_from(["flip", "truncate", "delete", "rename", "empty"]))
    content = bytearray(path.read_bytes())
    if action == "flip" and content:
        content[data.draw(st.integers(0, len(content) - 1))] ^= data.draw(st.integers(1, 255))
        path.write_bytes(bytes(content))
    elif action == "truncate" and content:
        path.write_bytes(bytes(content[: data.draw(st.integers(0, len(content) - 1))]))
    elif action == "delete":
        path.unlink()
    elif action == "rename":
        path.rename(path.with_name(path.name + ".moved"))
    else:
        path.write_bytes(b"")
    from mllm_edge.runtime.backends.onnxruntime import OnnxRuntimeBackend

    original = (bundle / rel).read_bytes()
    changed = not path.is_file() or path.read_bytes() != original
    read_by_run = rel in OnnxRuntimeBackend.files_read(load_manifest(bundle))
    for load, reads in (
        (lambda: load_manifest(folder), True),
        (lambda: Pipeline.load(folder).close(), read_by_run),
    ):
        if not (changed and reads):  # `run` checks only the files it reads
            load()
            continue
        with pytest.raises(MllmEdgeError, match=f"{rel} (is missing|does not match its sha256)"):
            load()
