"""`mllm-edge bench`: what a bundle costs on this machine, in the spirit of llama-bench.

For each bundle: the vision graph's time; prefill time (the LLM graphs after the vision graph) at the
bundle's image tokens and each of --prompt-lengths text tokens, with its FLOPs (every matrix product
of the LLM, counted by planning/costs.py as plan counts them) per second; decode time per token at each of --contexts, with the
bytes a step must read (the LLM graphs' weights once, and the KV cache at that context: with FastV
the layers from K hold the pruned prompt) per second. Every figure is the median of --runs after
--warmup runs, with the least and the most. Peak host memory is the process's; device
memory is the GPU's used memory sampled after each stage, with CUDA only (CuPy).

Prompts are the bundle's own chat prompt about a picture, padded with a filler text token after the
image to the length asked; decode feeds that token back at each step (what it says does not change
the time). Runs straight on the pipeline's chain, so nothing but the graphs and the cache is timed.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import MllmEdgeError
from .graphs import NO_IMAGE
from .planning import costs
from .pruning import keep_count

Progress = Callable[[str, int, int], None]
FLOAT_TYPE = {"float32": "fp32", "float16": "fp16"}


@dataclass
class Figure:
    """A median over runs, with the spread (ms unless named otherwise)."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Figure:
        return cls(round(statistics.median(values), 4), round(min(values), 4), round(max(values), 4))


@dataclass
class PrefillRow:
    text_tokens: int
    image_tokens: int  # entering the LLM (after FasterVLM)
    ms: Figure
    flops: float  # the LLM's matrix products (planning/costs.py), FastV's pruning counted
    tflops_per_s: float


@dataclass
class DecodeRow:
    context: int  # positions in the cache at the middle step
    image: bool  # the prompt holds the picture (contexts shorter than it: a text-only chat)
    ms_per_token: Figure
    tokens_per_s: float
    bytes_per_step: int  # LLM weights + the KV cache read at this context
    gb_per_s: float


@dataclass
class BundleBench:
    bundle: str
    method: str
    dtype: str
    weights: str
    backend: str
    device: str
    image_tokens: dict  # vision (the tower's patches), llm (entering the LLM), after_fastv
    vision_ms: Figure
    prefill: list[PrefillRow] = field(default_factory=list)
    decode: list[DecodeRow] = field(default_factory=list)
    peak_host_mb: float = 0.0
    peak_device_mb: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def bench_bundle(
    folder: Path,
    backend: str = "auto",
    device: str = "cpu",
    prompt_lengths: tuple[int, ...] = (32,),
    contexts: tuple[int, ...] = (128, 512),
    runs: int = 5,
    warmup: int = 1,
    decode_tokens: int = 16,
    progress: Progress = lambda stage, done, total: None,
    low_memory: bool = False,
) -> BundleBench:
    """low_memory: ONNX Runtime sessions over the mapped weights (Pipeline.load's)."""
    folder = Path(folder)
    from PIL import Image

    from .runtime.chain import place_image_tokens
    from .runtime.pipeline import Pipeline
    from .runtime.prompt import user_turn

    if runs < 1 or warmup < 0 or decode_tokens < 1:
        raise MllmEdgeError("--runs and --decode-tokens must be at least 1, --warmup at least 0")
    if any(n < 0 for n in prompt_lengths) or any(c < 1 for c in contexts):
        raise MllmEdgeError("prompt lengths must be >= 0 and contexts >= 1")
    device_memory = _DeviceMemory(device)
    host_memory = _HostMemory()
    with Pipeline.load(folder, backend, device, low_memory=low_memory) as pipeline:
        manifest, chain = pipeline.manifest, pipeline.chain
        tok = manifest.tokenizer
        pruning = manifest.pruning
        if pipeline.anyres is None:
            image = Image.new("RGB", (640, 480), (120, 160, 200))
        else:  # LLaVA-NeXT: the largest picture, of the shape of the pinpoint that gives the most tokens
            height, width = pipeline.anyres.largest_picture()
            image = Image.new("RGB", (width, height), (120, 160, 200))
        pixel_values, size = pipeline.image_inputs(image)

        def timed(stage: str, run: Callable[[], object]) -> list[float]:
            times = []
            for i in range(warmup + runs):
                progress(stage, i, warmup + runs)
                start = time.perf_counter()
                run()
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1000.0)
            progress(stage, warmup + runs, warmup + runs)
            device_memory.sample()
            return times

        vision_ms = timed("vision", lambda: chain.encode_image(pixel_values, size))
        image_embeds = chain.encode_image(pixel_values, size)["image_embeds"]
        entering = image_embeds.shape[1]  # after FasterVLM
        rendered = pipeline.prompts.render("Describe the picture.")  # one user turn with the image
        unpruned, _ = pipeline.image_tokens_of(size)
        base = np.asarray([pipeline.prompts.encode(rendered, 1, unpruned)], np.int64)
        ids, start = place_image_tokens(base, tok["image_token_id"], entering)
        filler = int(ids[0, -1])  # the prompt's last token: an ordinary text token of this tokenizer
        base_text = ids.shape[1] - entering

        def prompt(text_tokens: int) -> np.ndarray:
            """The chat prompt with text_tokens text tokens (at least its own), the filler after the image."""
            pad = max(0, text_tokens - base_text)
            at = start + entering
            return np.concatenate([ids[:, :at], np.full((1, pad), filler, np.int64), ids[:, at:]], axis=1)

        text_only = pipeline.prompts.render_messages([user_turn("Hello.")])
        text_ids = np.asarray([pipeline.prompts.encode(text_only, 0)], np.int64)
        no_image = np.zeros((1, pipeline.image_tokens, pipeline.hidden_size), pipeline.dtype)

        model = costs.Model.from_architecture(manifest.architecture)
        k = pruning["split_layer"] if manifest.has_fastv else 0
        # of this picture's span (LLaVA-NeXT's unpad merge: its count depends on what FasterVLM kept)
        after_fastv = keep_count(entering, pruning["fastv"]["ratio"]) if pruning["fastv"] else entering
        result = BundleBench(
            bundle=str(folder),
            method=pruning["method"],
            dtype=manifest.dtype,
            weights=manifest.weights,
            backend=pipeline.backend.name,
            device=pipeline.backend.device,
            image_tokens={
                "vision": unpruned,
                "llm": entering,
                "after_fastv": after_fastv,
            },
            vision_ms=Figure.of(vision_ms),
        )
        for length in prompt_lengths:
            p = prompt(length)
            _check_context(p.shape[1] + 1, pipeline.max_context, f"a prompt of {length} text tokens")
            times = timed(f"prefill {length}", lambda p=p: chain.prefill(p, image_embeds, start))
            text_tokens = p.shape[1] - entering
            flops = costs.prefill_flops(model, text_tokens, entering, after_fastv, k)

            ms = Figure.of(times)
            result.prefill.append(PrefillRow(text_tokens, entering, ms, flops, flops / ms.median / 1e9))

        weight_bytes = llm_weight_bytes(folder, manifest)
        for context in contexts:
            first = context - decode_tokens // 2  # the steps' middle is at `context`
            with_image = first >= ids.shape[1]
            if with_image:
                p, embeds, at = prompt(first - entering), image_embeds, start
            else:  # shorter than the picture's prompt: a text-only chat, as long
                if first < text_ids.shape[1]:
                    raise MllmEdgeError(
                        f"context {context} is shorter than a chat prompt ({text_ids.shape[1]} tokens)"
                        f" plus {decode_tokens // 2} decode steps"
                    )
                pad = np.full((1, first - text_ids.shape[1]), filler, np.int64)
                p, embeds, at = (
                    np.concatenate([text_ids[:, :-1], pad, text_ids[:, -1:]], axis=1),
                    no_image,
                    NO_IMAGE,
                )
            _check_context(first + decode_tokens, pipeline.max_context, f"context {context}")
            token = np.array([filler], np.int64)
            per_step = []
            for i in range(warmup + runs):
                progress(f"decode {context}", i, warmup + runs)
                length = chain.prefill(p, embeds, at).length
                begin = time.perf_counter()
                for step in range(decode_tokens):
                    chain.decode_step(token, length + step)
                if i >= warmup:
                    per_step.append((time.perf_counter() - begin) * 1000.0 / decode_tokens)
            progress(f"decode {context}", warmup + runs, warmup + runs)
            device_memory.sample()
            ms = Figure.of(per_step)
            pruned = entering - after_fastv if with_image else 0
            read = weight_bytes + costs.kv_bytes(model, context, pruned, k, FLOAT_TYPE[manifest.dtype])
            result.decode.append(
                DecodeRow(context, with_image, ms, 1000.0 / ms.median, read, read / ms.median / 1e6)
            )
    result.peak_host_mb = host_memory.peak_mb()
    result.peak_device_mb = device_memory.peak_mb
    return result


def llm_weight_bytes(folder: Path, manifest) -> int:
    """What a decode step reads of weights: the LLM graphs' data files (every layer's matrices, the
    norms, the LM head), each file once; the embed graph reads one row of its table, left out."""
    files = {
        f
        for name, spec in manifest.graphs.items()
        if manifest.definitions[name].quantizable
        for f in spec.data_files
    }
    return sum((folder / f).stat().st_size for f in files)


def _check_context(needed: int, max_context: int, what: str) -> None:
    if needed > max_context:
        raise MllmEdgeError(f"{what} needs {needed} positions; the bundle's max context is {max_context}")


class _HostMemory:
    """This process's peak resident memory from now on: Linux resets its high-water mark on request
    (/proc/self/clear_refs), so each bundle of one bench gets its own; elsewhere the process's peak."""

    def __init__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False

    def peak_mb(self) -> float:
        """MB of 10^6 bytes, as every byte figure of bench."""
        if self.reset:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) * 1024 / 1e6, 1)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
        return round(peak * (1 if sys.platform == "darwin" else 1024) / 1e6, 1)


class _DeviceMemory:
    """The GPU's used memory, sampled (CUDA with CuPy); None elsewhere."""

    def __init__(self, device: str):
        self.peak_mb = None
        self.runtime = None
        if device == "cuda":
            try:
                import cupy

                self.runtime = cupy.cuda.runtime
            except ImportError:
                pass

    def sample(self) -> None:
        if self.runtime is None:
            return
        free, total = self.runtime.memGetInfo()
        used = (total - free) / 1e6
        self.peak_mb = round(max(self.peak_mb or 0.0, used), 1)


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise MllmEdgeError(f"--plot needs matplotlib ({e}): pip install matplotlib") from None


def plot(results: list[BundleBench], path: Path) -> None:
    """Decode time against context (a line per bundle) and prefill time against the image tokens
    entering the LLM (a point per bundle, at the first prompt length)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        name = Path(r.bundle).name
        if r.decode:
            left.plot(
                [d.context for d in r.decode], [d.ms_per_token.median for d in r.decode], "o-", label=name
            )
        if r.prefill:
            right.plot([r.image_tokens["after_fastv"]], [r.prefill[0].ms.median], "o", label=name)
    left.set(xlabel="context (tokens)", ylabel="decode ms / token", title="decode")
    right.set(xlabel="image tokens kept (after all pruning)", ylabel="prefill ms", title="prefill")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
