"""OpenAI chat-completion requests -> what Pipeline.stream_chat takes; every mistake an ApiError
(status 400/413 and OpenAI's error object), never a traceback.

Images come as `image_url` parts: `data:` URIs (base64), or `file://` paths under the server's
--allowed-media-path. http(s) URLs are refused: devices are offline and a server that fetches
what a request names can be made to reach anything its host can.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import MllmEdgeError
from ..runtime.image import decode_image, load_image

UNSUPPORTED = {  # parameter -> why it is refused (a 400 that says so)
    "tools": "tools are not supported",
    "tool_choice": "tools are not supported",
    "functions": "function calling is not supported",
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
    "response_format": "response formats are not supported",
    "audio": "audio is not supported",
}


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class Limits:
    max_image_bytes: int = 20 << 20  # an image's encoded bytes
    max_image_pixels: int = 89_478_485  # Pillow's own decompression-bomb limit
    allowed_media_path: Path | None = None  # file:// images only under here


@dataclass
class ChatRequest:
    messages: list[dict]  # our form: text, or parts of {"type": "text"} / {"type": "image"}
    picture: object = None  # the decoded image of the one image part, or None
    options: dict = field(default_factory=dict)  # max_new_tokens, temperature, top_p, seed
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_chat_request(body: object, limits: Limits) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name, why in UNSUPPORTED.items():
        if body.get(name) not in (None, False, [], {}) and not (
            name == "response_format" and _is_text(body[name])
        ):
            raise ApiError(400, why, name)
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, "n must be 1: the server generates one answer per request", "n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    ours, pictures = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object", "messages")
        role, content = message.get("role"), message.get("content")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image_url":
                    pictures.append(_picture(part.get("image_url"), f"messages[{i}].content[{j}]", limits))
                    parts.append({"type": "image"})
                elif kind == "text":
                    parts.append({"type": "text", "text": part.get("text")})
                else:
                    raise ApiError(
                        400,
                        f"messages[{i}].content[{j}]: parts are text or image_url, got {kind!r}",
                        "messages",
                    )
            content = parts
        ours.append({"role": role, "content": content})
    if len(pictures) > 1:
        raise ApiError(
            400, f"the conversation holds {len(pictures)} images; this model takes one", "messages"
        )

    options = {"max_new_tokens": _max_tokens(body)}
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        value = body.get(name)
        if value is not None:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
                raise ApiError(400, f"{name} must be a number in [{low}, {high}]", name)
            options[name] = float(value)
    if options.get("top_p") == 0.0:
        options["top_p"] = 1e-9  # OpenAI accepts 0: the single most likely token
    seed = body.get("seed")
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ApiError(400, "seed must be an integer", "seed")
        options["seed"] = seed
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    return ChatRequest(
        ours,
        pictures[0] if pictures else None,
        options,
        stop,
        stream,
        bool(stream_options.get("include_usage", False)),
    )


def _is_text(value) -> bool:
    return isinstance(value, dict) and value.get("type") == "text"


def _max_tokens(body: dict) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ApiError(400, f"{name} must be a whole number >= 1", name)
            return value
    return 256


def _picture(image_url, where: str, limits: Limits):
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{where}: image_url needs a url", "messages")
    scheme = urlparse(url).scheme.lower() if not url.startswith("data:") else "data"
    if scheme == "data":
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ApiError(
                400, f"{where}: a data: image must be base64 (data:image/png;base64,...)", "messages"
            )
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise ApiError(
                413, f"{where}: the image is larger than {limits.max_image_bytes} bytes", "messages"
            )
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: the image's base64 does not decode", "messages") from None
        try:
            return decode_image(data, limits.max_image_pixels)
        except MllmEdgeError as e:
            raise ApiError(400, f"{where}: {e}", "messages") from None
    if scheme == "file":
        if limits.allowed_media_path is None:
            raise ApiError(400, f"{where}: file:// images need the server's --allowed-media-path", "messages")
        path = Path(unquote(urlparse(url).path)).resolve()
        root = limits.allowed_media_path.resolve()
        if not path.is_relative_to(root):
            raise ApiError(400, f"{where}: {path} is outside the allowed media path", "messages")
        if path.is_file() and path.stat().st_size > limits.max_image_bytes:
            raise ApiError(
                413, f"{where}: the image is larger than {limits.max_image_bytes} bytes", "messages"
            )
        try:
            return load_image(path, limits.max_image_pixels)
        except MllmEdgeError as e:
            raise ApiError(400, f"{where}: {e}", "messages") from None
    if scheme in ("http", "https"):
        raise ApiError(
            400, f"{where}: http(s) images are not fetched; send the image as a data: URI", "messages"
        )
    raise ApiError(400, f"{where}: unsupported image url scheme {scheme!r}", "messages")
