"""Image files as users have them: oversized ones (decompression bombs), high bit depths, EXIF
orientation, palettes with transparency. Each read as the picture's own values, or refused clearly."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from mllm_edge.errors import MllmEdgeError
from mllm_edge.runtime.image import load_image
from mllm_edge.testing.checkpoints import sample_image


def png_header_only(path, width, height):
    """A PNG that claims width x height and holds no pixel data: Pillow reads its header lazily."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_an_oversized_image_is_refused_before_decoding_and_without_pillows_noise(tmp_path):
    bomb = tmp_path / "bomb.png"
    png_header_only(bomb, 20000, 20000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would fail here
        with pytest.raises(
            MllmEdgeError, match=r"20000 x 20000 = 400,000,000 pixels, over the limit .*--max-image-pixels"
        ):
            load_image(bomb)
        big = tmp_path / "big.png"
        png_header_only(big, 12000, 12000)  # over Pillow's warning size, under its error size
        with pytest.raises(MllmEdgeError, match="over the limit"):
            load_image(big)
    small = tmp_path / "small.png"
    sample_image(60, 40).save(small)
    with pytest.raises(MllmEdgeError, match="2,400 pixels, over the limit of 1,000"):
        load_image(small, max_pixels=1000)
    assert load_image(small, max_pixels=2400).size == (60, 40)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own guard is back for everyone else


def test_the_cli_refuses_a_bomb_with_an_error_line(tmp_path, export_cache):
    from typer.testing import CliRunner

    from mllm_edge.cli import app

    bomb = tmp_path / "bomb.png"
    png_header_only(bomb, 20000, 20000)
    folder = str(export_cache("llama_gqa", "none")[0])
    for args in (
        ["run", str(bomb), "--bundle", folder],
        ["run", str(bomb), "--bundle", folder, "--max-image-pixels", "1000"],
    ):
        result = CliRunner().invoke(app, args)
        assert (
            result.exit_code == 1 and "over the limit" in result.stderr and "Traceback" not in result.output
        )


def gray(width=48, height=32):
    return np.asarray(sample_image(width, height).convert("L"))


def test_sixteen_bit_and_float_grayscale_read_as_their_values(tmp_path):
    """A 16-bit PNG of a scene must give the scene, not a white picture (transformers clips at 255)."""
    eight = gray()
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(eight.astype(np.uint16) * 257).save(sixteen)  # mode I;16
    assert Image.open(sixteen).mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(load_image(sixteen))[..., 0], eight)
    as_float = tmp_path / "float.tiff"
    Image.fromarray(eight.astype(np.float32) / 255.0).save(as_float)  # mode F, 0..1
    np.testing.assert_array_equal(np.asarray(load_image(as_float))[..., 1], eight)
    wide = tmp_path / "float255.tiff"
    Image.fromarray(eight.astype(np.float32)).save(wide)  # mode F, 0..255
    np.testing.assert_array_equal(np.asarray(load_image(wide))[..., 2], eight)


def test_exif_orientation_is_applied(tmp_path):
    picture = sample_image(60, 40)
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show it rotated 90 degrees clockwise
    picture.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (40, 60)
    expected = np.asarray(picture.transpose(Image.Transpose.ROTATE_270), np.float32)
    assert np.abs(np.asarray(loaded, np.float32) - expected).mean() < 6  # JPEG's loss only


def test_palette_transparency_is_white(tmp_path):
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    palette.putpixel((1, 1), 1)
    path = tmp_path / "palette.png"
    palette.save(path, transparency=1)
    pixels = np.asarray(load_image(path))
    assert pixels[1, 1].tolist() == [255, 255, 255] and pixels[0, 0].tolist() == [255, 0, 0]
