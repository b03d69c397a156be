"""The chat prompt and its token ids without transformers: jinja2 for the template, `tokenizers` for the ids.

The runtime must feed the exported graphs the same ids as the Hugging Face processor does on the
export machine, so this replays transformers 5's `apply_chat_template` (the same sandboxed Jinja
environment and template variables) and the processor's tokenization (each image token expanded
to its placeholder run, special tokens added by tokenizer.json's post-processor).

Tokenize with the tokenizer.json that transformers itself *saves* (`processor.save_pretrained`):
transformers 5 rebuilds some tokenizers on load (LlamaTokenizer: pre-tokenizer, decoder, BOS/EOS
post-processor from add_bos_token/add_eos_token), and the saved file holds that rebuilt pipeline,
while a Hub checkpoint's original tokenizer.json may not.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from ..errors import MllmEdgeError

# Named special tokens transformers always passes to chat templates (when set), as its special_tokens_map.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' variant: no HTML escaping (Jinja's own escapes <, >, &, ').
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers renders them in."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise MllmEdgeError(f"the chat template does not compile: {e}") from None


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_special_tokens(folder: Path) -> dict[str, str]:
    """The special tokens transformers hands to chat templates, read from tokenizer_config.json.

    Named tokens (bos_token, ...), a dict `extra_special_tokens`, and any other `*_token` string
    (e.g. image_token); special_tokens_map.json only counts for old configs without
    `added_tokens_decoder`, as in transformers.
    """
    config = _read_json(folder / "tokenizer_config.json")
    legacy = folder / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and legacy.is_file():
        config = {**config, **_read_json(legacy)}
    tokens = {}
    for key, value in config.items():
        if key in SPECIAL_TOKEN_NAMES or key.endswith("_token"):
            tokens[key] = _token_text(value)
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):
        tokens.update({key: _token_text(value) for key, value in extra.items()})
    return {key: value for key, value in tokens.items() if value is not None}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MllmEdgeError(f"{path} is missing") from None
    except (OSError, ValueError) as e:
        raise MllmEdgeError(f"{path} cannot be read: {e}") from None


def _find_chat_template(folder: Path) -> str:
    """The chat template saved with the processor: chat_template.jinja, chat_template.json or tokenizer_config.json."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            template = _read_json(folder / name).get("chat_template")
            if isinstance(template, list):  # named templates
                template = {t.get("name"): t.get("template") for t in template}.get("default")
            if isinstance(template, str):
                return template
    raise MllmEdgeError(f"{folder} has no chat template")


def check_prompt_text(prompt: str, image_token: str) -> None:
    """What every command that takes a prompt refuses: the image placeholder typed into the text (the
    picture goes in once, by the template)."""
    if not isinstance(prompt, str):
        raise MllmEdgeError(f"the prompt must be text, got {type(prompt).__name__}")
    if image_token and image_token in prompt:
        raise MllmEdgeError(
            f"the prompt contains the image token {image_token!r}: the picture goes in once, by itself; leave it out"
        )


ROLES = ("system", "user", "assistant")


def user_turn(text: str, image: bool = False) -> dict:
    """A user message in the processor's form: the image (if any) before the text, as LLaVA's own."""
    return {
        "role": "user",
        "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}],
    }


def normalize_messages(messages: list[dict], image_token: str) -> list[dict]:
    """Messages as `apply_chat_template` takes them: role, and content either text or a list of
    {"type": "text", "text"} and {"type": "image"} parts (kept as given: templates may render the
    two differently), with nothing else in them. Checks what a template cannot: roles, part types,
    text, the image token typed into text."""
    if not isinstance(messages, list) or not messages:
        raise MllmEdgeError("messages must be a non-empty list")
    normal = []
    for i, message in enumerate(messages):
        where = f"message {i + 1}"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise MllmEdgeError(f"{where}: each message needs a role, one of {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, str):
            check_prompt_text(content, image_token)
            normal.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise MllmEdgeError(f"{where}: content must be text or a list of parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise MllmEdgeError(f"{where}: a text part needs its text")
                check_prompt_text(text, image_token)
                parts.append({"type": "text", "text": text})
            elif kind == "image":
                if message["role"] != "user":
                    raise MllmEdgeError(f"{where}: only user messages hold images")
                parts.append({"type": "image"})
            else:
                raise MllmEdgeError(f"{where}: a part must be of type text or image, got {kind!r}")
        normal.append({"role": message["role"], "content": parts})
    return normal


def count_images(messages: list[dict]) -> int:
    """Image parts in normalized messages."""
    return sum(
        part["type"] == "image" for m in messages if isinstance(m["content"], list) for part in m["content"]
    )


class PromptBuilder:
    """One user turn (an image and a question) -> the rendered chat prompt -> the processor's input ids."""

    def __init__(
        self,
        tokenizer_file: Path,
        chat_template: str,
        image_token: str,
        image_token_id: int,
        num_image_tokens: int,
        special_tokens: dict,
        *,
        clean_up_tokenization_spaces: bool = False,
    ):
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises plain Exception for a bad file
            raise MllmEdgeError(f"cannot load the tokenizer {tokenizer_file}: {e}") from None
        self.template = compile_chat_template(chat_template)
        self.image_token, self.image_token_id = image_token, int(image_token_id)
        self.num_image_tokens = int(num_image_tokens)
        # transformers leaves unset tokens out: a template then sees them undefined (""), not "None".
        self.special_tokens = {k: str(v) for k, v in special_tokens.items() if v is not None}
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        chat_template: str | None,
        image_token: str,
        image_token_id: int,
        num_image_tokens: int,
    ) -> PromptBuilder:
        """From a folder written by `processor.save_pretrained` (tokenizer.json, tokenizer_config.json).

        chat_template None: the one saved in the folder.
        """
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        return cls(
            folder / "tokenizer.json",
            chat_template if chat_template is not None else _find_chat_template(folder),
            image_token,
            image_token_id,
            num_image_tokens,
            read_special_tokens(folder),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    def render(self, prompt: str) -> str:
        """The chat template for one user turn holding the image then `prompt`, with the generation prompt."""
        check_prompt_text(prompt, self.image_token)
        return self.render_messages([user_turn(prompt, image=True)])

    def render_messages(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """A whole conversation as `processor.apply_chat_template(messages, tokenize=False)` renders it:
        messages in the processor's form (normalize_messages), the generation prompt after the last."""
        try:
            return self.template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as e:
            raise MllmEdgeError(f"the chat template failed: {e}") from None

    def encode(self, rendered: str, images: int = 1, image_tokens: int | None = None) -> list[int]:
        """Ids as the HF processor gives them: each image token expanded to its placeholders
        (image_tokens, default num_image_tokens: LLaVA-NeXT's count depends on the picture's size),
        specials added. images: how many image tokens the rendered prompt must hold (0 or 1)."""
        count = rendered.count(self.image_token)
        if count != images:
            raise MllmEdgeError(
                f"the rendered prompt holds {count} image tokens {self.image_token!r}, expected {images}"
            )
        n = self.num_image_tokens if image_tokens is None else int(image_tokens)
        # Expand in the text and tokenize that, as the processor does.
        text = rendered.replace(self.image_token, self.image_token * n)
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        if ids.count(self.image_token_id) != n * images:
            raise MllmEdgeError(
                f"the image token {self.image_token!r} is not the single token {self.image_token_id} in tokenizer.json"
            )
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` without special tokens, as `tokenizer.decode(ids, skip_special_tokens=True)`."""
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        # transformers only cleans up for non-BPE models (it would corrupt BPE output).
        if self.clean_up_tokenization_spaces and type(self.tokenizer.model).__name__ != "BPE":
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
                text = text.replace(before, after)
        return text


class TextStream:
    """Turn generated ids, fed one at a time, into text pieces whose concatenation is decode(all ids).

    Each push decodes only a short window: the ids since the last emitted piece plus the piece
    before them as context (so leading-space rules see the same neighbours), and returns the text
    beyond what that context decodes to. Decoding the whole answer at every token would make a
    long answer quadratic in the decode loop. A trailing U+FFFD is held back: it is usually a
    character whose UTF-8 bytes are split over tokens (byte-level BPE, byte fallback).
    """

    def __init__(self, builder: PromptBuilder):
        self._decode = builder.decode
        self._ids: list[int] = []
        self._prefix = 0  # window start: the context ids before the unread ones
        self._read = 0  # ids up to here have been returned as text

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        return self._take(hold_back=True)

    def flush(self) -> str:
        """Whatever is still held back (a genuinely undecodable tail included)."""
        return self._take(hold_back=False)

    def _take(self, hold_back: bool) -> str:
        context = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(context) or (hold_back and text.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(context) :]


class StopFilter:
    """Text pieces -> the same pieces cut at the first stop string (left out), holding back a tail
    that may be the start of one; `text` is everything let through."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending, self.text, self.stopped = "", "", False

    def push(self, piece: str) -> tuple[str, bool]:
        """-> (text to let through now, whether a stop string was reached)."""
        self.pending += piece
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending, self.stopped = self.pending[: min(found)], "", True
        else:
            keep = max(len(self.pending) - self.hold, 0)
            out, self.pending = self.pending[:keep], self.pending[keep:]
        self.text += out
        return out, self.stopped

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        self.text += out
        return out
