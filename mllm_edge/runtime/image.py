"""Image loading and the checkpoint's image preprocessing, in numpy and Pillow only.

The runtime runs on devices (Jetson) that have no torch or transformers, yet the vision graph
must see exactly the pixel values the Hugging Face processor would give it: a different resize
or rounding shifts every image feature. `ImagePreprocessor` replays what transformers 5's PIL
backend (`CLIPImageProcessorPil`, `SiglipImageProcessorPil`: convert to RGB, resize through PIL,
center crop, rescale in float64, normalize in float32) does, step by step with the same dtypes,
so the result equals the HF processor's to within 1e-5 (in practice bit for bit). Anything it
does not implement is refused by name instead of being silently approximated.
"""

from __future__ import annotations

import io
import math
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import MllmEdgeError

MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own limit (about 9459 x 9459): beyond it, --max-image-pixels


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image file as 8-bit RGB, as a user would expect to see it, with a clear error for a
    missing, empty, unreadable or oversized file (`max_pixels`: width x height, checked from the
    header before anything is decoded).

    - EXIF orientation is applied, as transformers' own `load_image` does (phone pictures upright).
    - 16-bit grayscale (I;16*, and Pillow's 32-bit I of a 16-bit PNG) is scaled to 8 bits (v / 257);
      float (F) is read as 0..1 when it stays within it, else as 0..255. transformers' processors
      convert such images to RGB by clipping at 255, which turns a 16-bit picture white; we read
      the values as the picture's own.
    - Transparency (an alpha band, or a palette's transparent colour) is composited onto white, as
      transformers' `convert_to_rgb` does.
    """
    path = Path(path)
    if path.is_dir():
        raise MllmEdgeError(f"image {path} is a folder, not an image file")
    if not path.is_file():
        raise MllmEdgeError(f"image {path} does not exist")
    if path.stat().st_size == 0:
        raise MllmEdgeError(f"image {path} is empty")
    with _PILLOW_LIMIT:  # Pillow's guard is one global: off only while we hold it, our check instead
        return _open(path, max_pixels, f"image {path}")


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, name: str = "the image") -> Image.Image:
    """load_image for an image file's bytes (a server's request), with the same checks and messages."""
    if not data:
        raise MllmEdgeError(f"{name} is empty")
    with _PILLOW_LIMIT:
        return _open(io.BytesIO(data), max_pixels, name)


_PILLOW_LIMIT = threading.Lock()


def _open(path, max_pixels: int, name: str) -> Image.Image:
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our own limit, and no Pillow warning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's notes on damaged metadata: it loads, or we say why not
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise MllmEdgeError(
                        f"{name} is {width} x {height} = {width * height:,} pixels, over the limit of "
                        f"{max_pixels:,} (a guard against decompression bombs): raise it with --max-image-pixels"
                    )
                img.load()
                return to_rgb(ImageOps.exif_transpose(img))
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
    ) as e:  # Pillow's decoders raise all these
        raise MllmEdgeError(f"{name} cannot be read: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: high bit depths scaled (not clipped), transparency composited onto white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0
        image = Image.fromarray(np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8), "L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# Class defaults of the transformers image processors, used where the config leaves a key out or
# sets it to null (as transformers does). The CLIP mean/std are OpenAI's, SigLIP's are 0.5.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_COMMON = dict(
    do_resize=True,
    resample=3,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    do_convert_rgb=True,
)
_DEFAULTS = {
    "CLIPImageProcessor": dict(
        _COMMON,
        size={"shortest_edge": 224},
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
    ),
    "SiglipImageProcessor": dict(
        _COMMON,
        size={"height": 224, "width": 224},
        do_center_crop=False,
        crop_size=None,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
    ),
}
# Keys that carry no preprocessing (bookkeeping, or call-time options of transformers).
_IGNORED = {
    "image_processor_type",
    "processor_class",
    "feature_extractor_type",
    "input_data_format",
    "device",
    "return_tensors",
    "disable_grouping",
    "image_seq_length",
    "pad_size",
    "default_to_square",
}


def _height_width(value, name: str) -> tuple[int, int]:
    """crop_size or a fixed size: {"height", "width"}, an int (square) or [height, width]."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        return int(value["height"]), int(value["width"])
    raise MllmEdgeError(f"unsupported image processor {name} {value!r} (expected height and width)")


class ImagePreprocessor:
    """PIL image -> float32 pixel_values [1, 3, H, W], as the checkpoint's HF image processor makes them."""

    def __init__(self, cfg: dict):
        kind = cfg.get("image_processor_type")
        kind = (
            kind[:-3] if isinstance(kind, str) and kind.endswith("Pil") else kind
        )  # to_dict() drops "Pil" too
        if kind not in _DEFAULTS:
            raise MllmEdgeError(f"unsupported image processor {kind!r} (supported: {', '.join(_DEFAULTS)})")
        # Unknown options are refused unless switched off (None/False): e.g. LLaVA-NeXT's do_pad.
        unknown = sorted(
            k
            for k, v in cfg.items()
            if k not in _DEFAULTS[kind] and k not in _IGNORED and v not in (None, False)
        )
        if unknown:
            raise MllmEdgeError(
                f"unsupported {kind} options: {', '.join(f'{k}={cfg[k]!r}' for k in unknown)}"
            )
        if cfg.get("data_format") not in (None, "channels_first"):
            raise MllmEdgeError(f"unsupported {kind} option data_format={cfg['data_format']!r}")
        opt = {k: (cfg[k] if cfg.get(k) is not None else default) for k, default in _DEFAULTS[kind].items()}
        self.kind = kind

        self.do_resize = bool(opt["do_resize"])
        self.shortest_edge, self.size = None, None
        size = opt["size"]
        if isinstance(size, int) and not cfg.get("default_to_square", False):
            size = {"shortest_edge": size}  # both classes have default_to_square=False
        if isinstance(size, dict) and set(size) == {"shortest_edge"}:
            self.shortest_edge = int(size["shortest_edge"])
        else:
            self.size = _height_width(size, "size")
        try:
            self.resample = Image.Resampling(int(opt["resample"]))
        except (TypeError, ValueError):
            raise MllmEdgeError(
                f"unsupported {kind} option resample={opt['resample']!r} (expected a PIL filter 0-5)"
            ) from None

        self.do_center_crop = bool(opt["do_center_crop"])
        self.crop_size = _height_width(opt["crop_size"], "crop_size") if self.do_center_crop else None
        self.do_rescale, self.rescale_factor = bool(opt["do_rescale"]), float(opt["rescale_factor"])
        self.do_normalize = bool(opt["do_normalize"])
        self.mean, self.std = (
            [float(x)] * 3 if isinstance(x, (int, float)) else [float(v) for v in x]
            for x in (opt["image_mean"], opt["image_std"])
        )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise MllmEdgeError(
                f"{kind} image_mean and image_std must have 3 values, got {self.mean} and {self.std}"
            )
        self.do_convert_rgb = bool(opt["do_convert_rgb"])

    @classmethod
    def from_config(cls, cfg: dict) -> ImagePreprocessor:
        """From the image processor's settings: preprocessor_config.json, or its `to_dict()`; tried once
        on a tiny picture, so that settings of the wrong type are an error now, naming them."""
        try:
            preprocessor = cls(cfg)
            preprocessor(Image.new("RGB", (2, 2)))
        except (ValueError, TypeError, KeyError, ZeroDivisionError) as e:
            raise MllmEdgeError(
                f"the image preprocessing settings are damaged ({type(e).__name__}: {e})"
            ) from None
        return preprocessor

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing, as transformers' get_resize_output_image_size(default_to_square=False)."""
        if self.size is not None:
            return self.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = (
            self.shortest_edge,
            int(self.shortest_edge * long / short),
        )  # int() truncates, as HF
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = self._to_rgb(image)
        if self.do_resize:
            height, width = self.output_size(image.height, image.width)
            image = image.resize((width, height), resample=self.resample)  # PIL takes (width, height)
        pixels = np.asarray(image).transpose(2, 0, 1)  # uint8 HWC -> CHW
        if self.do_center_crop:
            pixels = _center_crop(pixels, *self.crop_size)
        if self.do_rescale:
            # HF upcasts to float64 before scaling and only then rounds to float32.
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(pixels.dtype, np.floating):
                pixels = pixels.astype(np.float32)
            mean, std = np.array(self.mean, dtype=pixels.dtype), np.array(self.std, dtype=pixels.dtype)
            pixels = (
                (pixels.T - mean) / std
            ).T  # the same expression (and float32 rounding) as HF's normalize
        return np.ascontiguousarray(pixels[None], dtype=np.float32)

    def _to_rgb(self, image: Image.Image) -> Image.Image:
        if not self.do_convert_rgb:
            if image.mode != "RGB":
                raise MllmEdgeError(
                    f"the image is {image.mode}, and this checkpoint's processor does not convert to RGB"
                )
            return image
        return to_rgb(image)  # as transformers' convert_to_rgb, with high bit depths scaled (load_image)


def _center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """CHW center crop as transformers' center_crop: an image smaller than the crop is zero-padded around."""
    _, height, width = pixels.shape
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return pixels[:, top : top + crop_height, left : left + crop_width]
    new_height, new_width = max(crop_height, height), max(crop_width, width)
    padded = np.zeros((pixels.shape[0], new_height, new_width), dtype=pixels.dtype)
    top_pad, left_pad = math.ceil((new_height - height) / 2), math.ceil((new_width - width) / 2)
    padded[:, top_pad : top_pad + height, left_pad : left_pad + width] = pixels
    top, left = top + top_pad, left + left_pad
    return padded[
        :, max(0, top) : min(new_height, top + crop_height), max(0, left) : min(new_width, left + crop_width)
    ]
