"""Load a bundle once, then answer questions about images: the graphs joined with the KV cache.

prefill   preprocess -> vision -> embed -> [llm_head -> prune ->] llm_tail -> first token
decode    embed(one id) -> [llm_head ->] llm_tail -> next token, each group appending to its own cache
Written once for every backend (runtime.backends). Imports no torch, transformers or onnx.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import MllmEdgeError
from ..manifest import DEFAULT_BUNDLE, NO_IMAGE, Manifest, load_manifest
from .backends import load_engine
from .cache import KVCache
from .device_cache import ALIGNMENT as DEVICE_ALIGNMENT
from .device_cache import DeviceKVCache
from .image import ImagePreprocessor, load_image
from .prompt import PromptBuilder, TextStream
from .sampling import Sampler


@dataclass
class RunResult:
    text: str
    prompt: str  # the rendered chat prompt
    prompt_token_ids: list[int]  # as the HF processor gives them: the image placeholder once per image token
    token_ids: list[int]  # generated
    kept_image_tokens: (
        dict  # {"vision": FasterVLM's kept patches or None, "llm": FastV's kept indices or None}
    )
    timings_ms: dict = field(default_factory=dict)  # preprocess, vision, prefill, ttft, decode_per_token
    decode_tokens_per_s: float = 0.0
    backend: str = ""
    device: str = ""
    peak_rss_mb: float = 0.0


class Generation:
    """Iterate to receive the answer's text as it is generated; `.result` is set at the end."""

    def __init__(self, steps: Iterator[str]):
        self._steps = steps
        self.result: RunResult | None = None

    def __iter__(self) -> Iterator[str]:
        self.result = yield from self._steps


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class Pipeline:
    def __init__(self, folder: Path, manifest: Manifest, backend: str = "onnxruntime", device: str = "cpu"):
        self.folder, self.manifest, self.backend, self.device = folder, manifest, backend, device
        max_len, memory, alignment = manifest.max_context, None, 1
        if backend == "tensorrt":
            if manifest.quantization:
                raise MllmEdgeError(
                    f"{folder} holds {manifest.weights} weights for ONNX Runtime only: run it with --backend onnxruntime"
                )
            from .backends.tensorrt import open_engines

            self.device = "cuda"
            self.engines, memory, max_len = open_engines(folder, manifest)
            alignment = DEVICE_ALIGNMENT
        else:
            self.engines = {
                name: load_engine(backend, folder / spec.file, device)
                for name, spec in manifest.graphs.items()
            }
            if device == "cuda":  # keep the cache on the GPU: a host cache would be uploaded whole every step
                from .backends.onnxruntime import OrtDeviceMemory

                memory = OrtDeviceMemory("cuda")
        self.preprocess = ImagePreprocessor.from_config(manifest.preprocessing)
        tok = manifest.tokenizer
        num_image = manifest.pruning["image_tokens"]["vision"]
        self.prompts = PromptBuilder.from_folder(
            folder / tok["folder"], tok["chat_template"], tok["image_token"], tok["image_token_id"], num_image
        )
        text = manifest.architecture["text"]
        self.split = manifest.pruning["split_layer"]
        dtype = np.dtype(manifest.graphs["llm_tail"].input("hidden_states").dtype)
        self.cache_shape = (
            text["num_layers"],
            self.split,
            max_len,
            text["num_kv_heads"],
            text["head_dim"],
            dtype,
        )
        self.cache = (
            KVCache(*self.cache_shape)
            if memory is None
            else DeviceKVCache(memory, *self.cache_shape, alignment=alignment)
        )
        self.max_context = max_len
        self.dtype = dtype
        self.eos = set(tok["eos_token_ids"])

    @classmethod
    def load(cls, bundle: str | Path | None = None, backend: str = "auto", device: str = "cpu") -> Pipeline:
        """Open a bundle (checking every file against the manifest's sha256) and its graphs."""
        folder = Path(bundle if bundle is not None else DEFAULT_BUNDLE)
        manifest = load_manifest(folder)
        if backend == "auto":
            from .backends.tensorrt import engines_for_this_machine

            backend = "tensorrt" if engines_for_this_machine(folder) else "onnxruntime"
        return cls(folder, manifest, backend, device)

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
        """image: a path or a PIL image. Checks the settings now, runs as the result is iterated."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise MllmEdgeError(f"max new tokens must be a whole number >= 1, got {max_new_tokens!r}")
        sampler = Sampler(temperature, top_p, seed)
        picture = image if hasattr(image, "convert") else load_image(image)
        return Generation(self._steps(picture, prompt, max_new_tokens, sampler))

    def _run_llm(
        self, graph: str, group: str, hidden_name: str, hidden: np.ndarray, positions: np.ndarray
    ) -> dict[str, np.ndarray]:
        count = hidden.shape[1]
        inputs = {hidden_name: hidden, "position_ids": positions, **self.cache.past(group)}
        out = self.engines[graph].run(inputs, self.cache.slots(group, count))
        self.cache.advance(group, count)
        return out

    def _steps(self, picture, prompt: str, max_new_tokens: int, sampler: Sampler) -> Iterator[str]:
        start = time.perf_counter()
        pixel_values = self.preprocess(picture)
        rendered = self.prompts.render(prompt)
        prompt_ids = self.prompts.encode(rendered)
        t_pre = time.perf_counter()

        vision = self.engines["vision"].run({"pixel_values": pixel_values})
        image_embeds = vision["image_embeds"]
        t_vision = time.perf_counter()

        ids = np.asarray(prompt_ids, dtype=np.int64)
        image_token = self.manifest.tokenizer["image_token_id"]
        image_start = int(np.argmax(ids == image_token))
        num_full, n = int((ids == image_token).sum()), image_embeds.shape[1]
        ids = np.concatenate(
            (ids[:image_start], np.full(n, image_token, np.int64), ids[image_start + num_full :])
        )[None]
        length = ids.shape[1]
        if length + 1 > self.max_context:
            owner = "engines'" if self.backend == "tensorrt" else "bundle's"
            raise MllmEdgeError(
                f"the prompt takes {length} tokens; the {owner} max context is {self.max_context}"
            )
        max_new_tokens = min(max_new_tokens, self.max_context - length)

        self.cache.reset()
        embeds = self.engines["embed"].run(
            {"input_ids": ids, "image_embeds": image_embeds, "image_start": np.array(image_start, np.int64)}
        )["inputs_embeds"]
        positions = np.arange(length, dtype=np.int64)[None]
        hidden, kept_llm = embeds, None
        if self.split:
            head = self._run_llm("llm_head", "head", "inputs_embeds", embeds, positions)
            pruned = self.engines["prune"].run(
                {
                    "hidden_states": head["hidden_states"],
                    "last_row": head["last_row"],
                    "position_ids": positions,
                    "image_start": np.array(image_start, np.int64),
                }
            )
            hidden, positions, kept_llm = (
                pruned["kept_hidden_states"],
                pruned["kept_position_ids"],
                pruned["kept_image"],
            )
        logits = self._run_llm(
            "llm_tail", "tail", "hidden_states", np.ascontiguousarray(hidden), np.ascontiguousarray(positions)
        )["logits"]
        t_prefill = time.perf_counter()

        stream = TextStream(self.prompts)
        tokens: list[int] = []
        no_image = np.zeros((1, 1, image_embeds.shape[2]), image_embeds.dtype)
        no_image_start = np.array(NO_IMAGE, np.int64)
        t_first = None
        for step in range(max_new_tokens):
            token = sampler(logits[0])
            if t_first is None:
                t_first = time.perf_counter()
            tokens.append(token)
            if token in self.eos:
                break
            piece = stream.push(token)
            if piece:
                yield piece
            if step + 1 == max_new_tokens:
                break
            hidden = self.engines["embed"].run(
                {
                    "input_ids": np.array([[token]], np.int64),
                    "image_embeds": no_image,
                    "image_start": no_image_start,
                }
            )["inputs_embeds"]
            position = np.array(
                [[length + step]], np.int64
            )  # the unpruned prompt length: FastV keeps original positions
            if self.split:
                hidden = self._run_llm("llm_head", "head", "inputs_embeds", hidden, position)["hidden_states"]
            logits = self._run_llm("llm_tail", "tail", "hidden_states", hidden, position)["logits"]
        tail = stream.flush()
        if tail:
            yield tail
        end = time.perf_counter()

        decode_steps = max(len(tokens) - 1, 0)
        per_token = (end - t_first) / decode_steps if decode_steps else 0.0
        kept_vision = vision.get("kept_patches")
        return RunResult(
            text=self.prompts.decode([t for t in tokens if t not in self.eos]),
            prompt=rendered,
            prompt_token_ids=list(prompt_ids),
            token_ids=tokens,
            kept_image_tokens={
                "vision": kept_vision[0].tolist() if kept_vision is not None else None,
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
            backend=self.backend,
            device=self.device,
            peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        )
