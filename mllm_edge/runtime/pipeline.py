"""Load a bundle once, then answer questions about images: preprocessing, the chain, sampling, timings.

    with Pipeline.load("bundle") as pipeline:
        print(pipeline.generate("photo.jpg", "What is in the picture?").text)

The graphs run through runtime.chain (prefill, decode_step) on whichever backend opened the bundle
(runtime.backends); this module knows no backend. Imports no torch, transformers or onnx.
"""

from __future__ import annotations

import hashlib
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import MllmEdgeError
from ..graphs import NO_IMAGE
from ..manifest import DEFAULT_BUNDLE, MANIFEST_NAME, Manifest, load_manifest
from .anyres import AnyRes, preprocess_views, view_config
from .backends import Backend, open_backend
from .chain import Chain, History, Observer, place_image_tokens
from .image import ImagePreprocessor, load_image
from .prompt import (
    PromptBuilder,
    StopFilter,
    TextStream,
    check_prompt_text,
    count_images,
    normalize_messages,
    user_turn,
)
from .sampling import Sampler


@dataclass
class RunResult:
    text: str
    prompt: str  # the rendered chat prompt
    prompt_token_ids: list[int]  # as the HF processor gives them: the image placeholder once per image token
    token_ids: list[int]  # generated
    # {"vision": FasterVLM's kept patches or None, "llm": FastV's kept indices into the image span
    # that entered the LLM or None}; LLaVA-NeXT's vision: one list per view, base view first
    kept_image_tokens: dict
    timings_ms: dict = field(default_factory=dict)  # preprocess, vision, prefill, ttft, decode_per_token
    decode_tokens_per_s: float = 0.0
    finish_reason: str = "length"  # "stop": the end-of-sequence token or a stop string; "length": max tokens
    cached_prompt_tokens: int = 0  # prompt tokens a follow-up took from the cache (layers < K with FastV)
    vision_reused: bool = False  # the picture's vision output was the previous call's
    backend: str = ""
    device: str = ""
    peak_rss_mb: float = 0.0

    def image_token_counts(self, image_token_id: int) -> tuple[int, int, int]:
        """The picture's image tokens (unpruned, entering the LLM after FasterVLM, reaching its last
        layers after FastV); LLaVA-NeXT's vary with the picture. (0, 0, 0) without a picture."""
        unpruned = self.prompt_token_ids.count(image_token_id)
        llm, vision = self.kept_image_tokens["llm"], self.kept_image_tokens["vision"]
        entering = unpruned
        if vision is not None:  # LLaVA-NeXT's: a list per view
            entering = sum(map(len, vision)) if vision and isinstance(vision[0], list) else len(vision)
        return unpruned, entering, len(llm) if llm is not None else entering


class Generation:
    """Iterate to receive the answer's text as it is generated; `.result` is set at the end."""

    def __init__(self, steps: Iterator[str]):
        self._steps = steps
        self.result: RunResult | None = None

    def __iter__(self) -> Iterator[str]:
        self.result = yield from self._steps


MAX_IMAGES = 1  # per conversation: the graphs place one image run


def picture_key(pixel_values: np.ndarray, size) -> bytes:
    """What identifies a picture's vision output: its pixels and (LLaVA-NeXT) its size."""
    digest = hashlib.blake2b(pixel_values.tobytes(), digest_size=16)
    digest.update(repr(size).encode())
    return digest.digest()


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class Pipeline:
    def __init__(self, folder: Path, manifest: Manifest, backend: Backend):
        """A bundle opened with a backend (Pipeline.load does both)."""
        self.folder, self.manifest, self.backend = folder, manifest, backend
        tok = manifest.tokenizer
        num_image = manifest.pruning["image_tokens"]["vision"]
        try:  # settings the manifest carries: an error says where they come from
            self.anyres = AnyRes.of_bundle(manifest)  # LLaVA-NeXT's views, or None
            preprocessing = manifest.preprocessing
            # LLaVA-NeXT's: each view goes through the processor's per-image steps
            self.preprocess = ImagePreprocessor.from_config(
                view_config(preprocessing) if self.anyres else preprocessing
            )
            self.prompts = PromptBuilder.from_folder(
                folder / tok["folder"],
                tok["chat_template"],
                tok["image_token"],
                tok["image_token_id"],
                num_image,
            )
        except MllmEdgeError as e:
            raise MllmEdgeError(f"{folder / MANIFEST_NAME}'s preprocessing or tokenizer: {e}") from None
        text = manifest.architecture["text"]
        self.dtype = np.dtype(manifest.graphs["llm_tail"].input("hidden_states").dtype)
        self.max_context = backend.max_context
        # (layers, split, max context, kv heads, head dim, dtype): what a KV cache for this bundle holds
        self.cache_shape = (
            text["num_layers"],
            manifest.pruning["split_layer"],
            self.max_context,
            text["num_kv_heads"],
            text["head_dim"],
            self.dtype,
        )
        layers, split, _, kv_heads, head_dim, dtype = self.cache_shape
        self.chain = Chain(
            backend.engines,
            backend.new_cache(layers, split, kv_heads, head_dim, dtype),
            split,
            anyres=self.anyres,
            merge=manifest.merge,
        )
        self.eos = set(tok["eos_token_ids"])
        self.hidden_size, self.image_tokens = text["hidden_size"], manifest.pruning["image_tokens"]["llm"]
        self._vision = None  # (picture key, the vision graph's outputs): a follow-up's picture

    @classmethod
    def load(
        cls,
        bundle: str | Path | None = None,
        backend: str = "auto",
        device: str = "cpu",
        low_memory: bool = False,
    ) -> Pipeline:
        """Open a bundle and its graphs, checking the files the backend reads against the manifest's
        sha256. low_memory: unoptimised ONNX Runtime sessions without an arena (backends.open_backend):
        an fp16 bundle's weights stay mapped on the CPU instead of fp32 copies (docs/performance.md)."""
        folder = Path(bundle if bundle is not None else DEFAULT_BUNDLE)
        manifest = load_manifest(folder, verify_files=False)
        opened = open_backend(backend, folder, manifest, device, low_memory)
        try:
            return cls(folder, manifest, opened)
        except BaseException:  # e.g. no device memory left for the cache: give the engines back
            opened.close()
            raise

    def image_inputs(self, picture) -> tuple[np.ndarray, tuple[int, int] | None]:
        """A PIL picture as the vision graph takes it: pixel_values [1, 3, S, S], or LLaVA-NeXT's
        views [V, 3, S, S] and the picture's (height, width)."""
        if self.anyres is None:
            return self.preprocess(picture), None
        return preprocess_views(picture, self.anyres, self.preprocess)

    def image_tokens_of(self, size: tuple[int, int] | None) -> tuple[int, int | None]:
        """(placeholder tokens the processor puts for a picture of this (height, width), tokens
        of it that enter the LLM after FasterVLM: None where they depend on what it keeps, with
        LLaVA-NeXT's unpad merge)."""
        tokens = self.manifest.pruning["image_tokens"]
        if self.anyres is None:
            return tokens["vision"], tokens["llm"]
        unpruned = self.anyres.image_tokens(*size)
        fastervlm = self.manifest.pruning["fastervlm"]
        if fastervlm is None:
            return unpruned, unpruned
        if self.manifest.merge == "unpad":
            return unpruned, None
        return unpruned, self.anyres.view_count(*size) * fastervlm["keep"]  # the spatial merge

    def _check_context(self, length: int, image_tokens: int, size) -> None:
        if length + 1 > self.max_context:
            picture = f" ({image_tokens} of them for the {size[1]}x{size[0]} picture)" if size else ""
            raise MllmEdgeError(
                f"the prompt takes {length} tokens{picture}; the {self.cache.owner} max context is {self.max_context}"
            )

    @property
    def engines(self) -> dict:
        """Graph name -> the backend's engine (replace an entry to wrap one)."""
        return self.chain.engines

    @property
    def cache(self):
        return self.chain.cache

    @cache.setter
    def cache(self, cache) -> None:
        """Run with another cache of runtime.cache's interface (the one this replaces is closed)."""
        self.chain.cache.close()
        self.chain.cache = cache
        self.chain.history = History()  # the new cache holds nothing to reuse

    def observe(self, observer: Observer) -> Observer:
        """Call observer(graph, inputs, outputs) after every graph call (outputs include those bound
        into the cache); returns it, for `pipeline.chain.observers.remove`."""
        self.chain.observers.append(observer)
        return observer

    def close(self) -> None:
        """Give back the backend's sessions or engines and device memory; the pipeline is not used again."""
        self.chain.cache.close()
        self.backend.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, image, prompt: str, **options) -> RunResult:
        generation = self.stream(image, prompt, **options)
        for _ in generation:
            pass
        return generation.result

    def stream(
        self,
        image,
        prompt: str,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Generation:
        """One question about one picture, from scratch: image a path or a PIL image. Checks the
        settings now, runs as the result is iterated."""
        check_prompt_text(prompt, self.prompts.image_token)
        messages = [user_turn(prompt, image=True)]
        return self.stream_chat(messages, image, max_new_tokens, temperature, top_p, seed, reuse=False)

    def chat(self, messages: list[dict], image=None, **options) -> RunResult:
        generation = self.stream_chat(messages, image, **options)
        for _ in generation:
            pass
        return generation.result

    def stream_chat(
        self,
        messages: list[dict],
        image=None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        reuse: bool = True,
        stop: list[str] | None = None,
    ) -> Generation:
        """The assistant's next turn in a conversation: messages as chat templates read them (role,
        content as text or a list of {"type": "text", "text"} / {"type": "image"} parts), at most one
        image part, `image` its picture. The answer is the one a fresh run of the whole conversation
        gives; reuse: skip what the previous call already computed of it (the vision graph for the
        same picture, the cache for the same leading tokens: Chain.prefill). stop: strings that end
        the answer where they first appear (left out of it)."""
        if not self.engines:
            raise MllmEdgeError("this pipeline is closed: load the bundle again")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise MllmEdgeError(f"max new tokens must be a whole number >= 1, got {max_new_tokens!r}")
        sampler = Sampler(temperature, top_p, seed)
        messages = normalize_messages(messages, self.prompts.image_token)
        images = count_images(messages)
        if images > MAX_IMAGES:
            raise MllmEdgeError(
                f"the conversation holds {images} images; a bundle takes {MAX_IMAGES} per conversation"
            )
        if images and image is None:
            raise MllmEdgeError("the conversation has an image part but no picture was given")
        if image is not None and not images:
            raise MllmEdgeError("a picture was given but no message has an image part to put it in")
        rendered = self.prompts.render_messages(messages)  # a prompt it would refuse is refused now
        picture = None if image is None else image if hasattr(image, "convert") else load_image(image)
        stop = list(stop or [])
        if not all(isinstance(s, str) and s for s in stop):
            raise MllmEdgeError("stop strings must be non-empty text")
        return Generation(self._steps(picture, rendered, images, max_new_tokens, sampler, reuse, stop))

    def _steps(
        self,
        picture,
        rendered: str,
        images: int,
        max_new_tokens: int,
        sampler: Sampler,
        reuse: bool,
        stop: list[str],
    ) -> Iterator[str]:
        start = time.perf_counter()
        pixel_values, size = self.image_inputs(picture) if picture is not None else (None, None)
        unpruned, entering = self.image_tokens_of(size) if picture is not None else (0, 0)
        prompt_ids = self.prompts.encode(rendered, images, unpruned or None)
        if entering is not None:  # known before the vision graph runs: refused before it runs
            self._check_context(len(prompt_ids) - unpruned + entering, entering, size)
        t_pre = time.perf_counter()

        vision, vision_reused, key = {}, False, None
        if pixel_values is not None:
            # the picture's key only where it is used: run, eval and the benchmarks never reuse
            key = picture_key(pixel_values, size) if reuse else None
            vision_reused = key is not None and self._vision is not None and self._vision[0] == key
            vision = self._vision[1] if vision_reused else self.chain.encode_image(pixel_values, size)
            self._vision = (key, vision) if key is not None else None
        t_vision = time.perf_counter()

        ids = np.asarray([prompt_ids], np.int64)
        if pixel_values is not None:
            image_embeds = vision["image_embeds"]
            ids, image_start = place_image_tokens(
                ids, self.manifest.tokenizer["image_token_id"], image_embeds.shape[1]
            )
        else:  # text only: zero rows as many as an image's, the shapes a prefill engine takes
            image_embeds, image_start = (
                np.zeros((1, self.image_tokens, self.hidden_size), self.dtype),
                NO_IMAGE,
            )
        length = ids.shape[1]
        if entering is None:
            self._check_context(length, image_embeds.shape[1], size)
        max_new_tokens = min(max_new_tokens, self.max_context - length)
        reuse_cache = reuse and self.backend.extends_cache
        prefilled = self.chain.prefill(ids, image_embeds, image_start, reuse=reuse_cache, image=key)
        logits = prefilled.logits
        t_prefill = time.perf_counter()

        stream = TextStream(self.prompts)
        stops = StopFilter(stop)
        tokens: list[int] = []
        t_first, finish = None, "length"
        for step in range(max_new_tokens):
            token = sampler(logits[0])
            if t_first is None:
                t_first = time.perf_counter()
            tokens.append(token)
            if token in self.eos:
                finish = "stop"
                break
            piece, stopped = stops.push(stream.push(token))
            if piece:
                yield piece
            if stopped:
                finish = "stop"
                break
            if step + 1 == max_new_tokens:
                break
            logits = self.chain.decode_step(np.array([token], np.int64), prefilled.length + step)
        if not stops.stopped:
            piece, _ = stops.push(stream.flush())
            tail = piece + stops.flush()
            if tail:
                yield tail
        end = time.perf_counter()

        decode_steps = max(len(tokens) - 1, 0)
        per_token = (end - t_first) / decode_steps if decode_steps else 0.0
        kept_vision, kept_llm = vision.get("kept_patches"), prefilled.kept_image
        return RunResult(
            text=stops.text,
            prompt=rendered,
            prompt_token_ids=list(prompt_ids),
            token_ids=tokens,
            kept_image_tokens={
                "vision": None
                if kept_vision is None
                else kept_vision.tolist()  # LLaVA-NeXT's: per view
                if self.anyres
                else kept_vision[0].tolist(),
                "llm": kept_llm[0].tolist() if kept_llm is not None else None,
            },
            timings_ms={
                "preprocess": _ms(t_pre - start),
                "vision": _ms(t_vision - t_pre),
                "prefill": _ms(t_prefill - t_vision),
                "ttft": _ms(t_first - start),
                "decode_per_token": _ms(per_token),
            },
            decode_tokens_per_s=round(1.0 / per_token, 3) if per_token else 0.0,
            finish_reason=finish,
            cached_prompt_tokens=prefilled.reused,
            vision_reused=vision_reused,
            backend=self.backend.name,
            device=self.backend.device,
            peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        )
